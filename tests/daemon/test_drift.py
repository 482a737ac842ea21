"""Registration on the sim microscope: a drifting stream is measured and stabilised, and the
stage-correction policy brings a drifting sample back (a wrong sign would make the drift grow)."""

from __future__ import annotations

import numpy as np

from livescope.bridges.feedback import EventFollower, StageCorrection
from livescope.bridges.mmcore import attach
from livescope.bridges.sim import SimConfig, SimMicroscope
from livescope.bridges.store import read_records
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlServer
from livescope.daemon.pipeline import Pipeline

DRIFT = (0.3, -0.2)  # px per frame (y, x)
FRAMES = 50


def _run(tmp_path, free_address, *, correct: bool):
    cfg = DaemonConfig(
        source="zmq",
        engines=["register"],
        out=tmp_path / f"drift{correct}.zarr",
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=True,
        engine_params={"register": {"feedback": correct, "feedback_threshold_px": 1.0}},
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    scope = SimMicroscope(SimConfig(shape=(128, 128), drift=DRIFT, n_fast=0, seed=4))
    bridge = attach(scope.core, cfg.ingest)
    policy = StageCorrection(scope.core)
    follower = EventFollower(cfg.control, policy.on_event, kinds={"drift"}) if correct else None
    try:
        # one frame at a time, as a real time-lapse would give the loop time to act
        scope.core.mda.run(scope.sequence(frames=FRAMES, interval_s=0.04))
        pipeline.wait(timeout=30)
    finally:
        if follower:
            follower.close()
        bridge.close()
        server.close()
        summary = pipeline.close()
    x_um, y_um = scope.xy_stage.pos
    residual_px = scope.sample.drift_px(FRAMES - 1) - np.array([y_um, x_um]) / scope.cfg.pixel_size_um
    return summary, residual_px, policy, cfg


def test_drifting_sim_stream_is_measured_and_stabilised(tmp_path, free_address):
    summary, residual, _, cfg = _run(tmp_path, free_address, correct=False)
    assert summary["frames"]["saved"] == FRAMES
    rec = read_records(cfg.out / "raw")
    truth = np.outer(np.arange(FRAMES), DRIFT)
    measured = np.stack([rec["shift_y"], rec["shift_x"]], axis=1)
    ok = np.isfinite(measured).all(axis=1)
    assert ok.sum() > 0.8 * FRAMES
    err = np.abs(measured[ok] - truth[ok])
    assert np.median(err) < 0.25 and err.max() < 1.0, err.max()
    assert np.linalg.norm(residual) > 10  # no correction: the sample walked away


def test_stage_correction_brings_a_drifting_sample_back(tmp_path, free_address):
    summary, residual, policy, _ = _run(tmp_path, free_address, correct=True)
    uncorrected = np.linalg.norm(np.array(DRIFT) * (FRAMES - 1))
    assert policy.moves, "no drift event reached the stage"
    assert np.linalg.norm(residual) < 0.25 * uncorrected, (residual, uncorrected)


def test_decomposition_background_on_a_registered_drifting_stream_matches_no_drift(tmp_path, free_address):
    from livescope.daemon.cli import run_daemon

    def background(drift, engines, name):
        cfg = DaemonConfig(
            source="sim",
            engines=engines,
            out=tmp_path / name,
            frames=60,
            sim_shape=(128, 128),
            sim_interval_s=0.0,
            sim_drift=drift,
            sim_seed=5,
            ingest=free_address(),
            publish=None,
            control=None,
        )
        # every frame through the chain (the test compares the last background, not throughput)
        cfg.sim_interval_s = 0.03
        run_daemon(cfg)
        import zarr

        rec = read_records(cfg.out / "background")
        t = int(np.nonzero(rec["status"] == 1)[0][-1])
        return zarr.open_array(str(cfg.out / "background" / "0"), mode="r")[t], t

    still, _ = background((0.0, 0.0), ["decompose"], "still.zarr")
    drifting_reg, t = background((0.15, -0.1), ["register", "decompose"], "reg.zarr")
    drifting_raw, _ = background((0.15, -0.1), ["decompose"], "raw.zarr")
    inner = (slice(16, -16), slice(16, -16))  # the registered frame's edges are filled in

    def corr(a, b):
        return float(np.corrcoef(a[inner].ravel(), b[inner].ravel())[0, 1])

    c_reg, c_raw = corr(drifting_reg, still), corr(drifting_raw, still)
    assert c_reg > 0.9, (c_reg, c_raw)
    assert c_reg > c_raw + 0.05, (c_reg, c_raw)
