"""The daemon tunes its deconvolution from the stream and reads out the resolution live
(daemon/tuning.py); the choice is recorded where it applies, so saved products follow it."""

from __future__ import annotations

import json
import threading

import numpy as np

from livescope.bridges.sim import SimConfig, SimMicroscope, SimSample
from livescope.bridges.store import read_records
from livescope.bridges.transport import FramePublisher
from livescope.daemon.cli import run_daemon
from livescope.daemon.config import DaemonConfig
from livescope.engines.selftune import frc_resolution, split_photons, to_photons


def test_the_resolution_readout_tracks_the_sims_focus_drift():
    """The built-in microscope's blur is known: it widens with defocus, and so must the readout."""
    cfg = SimConfig(shape=(160, 160), seed=2)
    sample, cam = SimSample(cfg), SimMicroscope(cfg).camera_metadata()
    rng = np.random.default_rng(0)
    readout = []
    for dz in (0.0, 1.0, 2.0):
        counts = to_photons(sample.render(0, 0, 0, z_um=dz), cam["gain"], cam["offset"])
        readout.append(frc_resolution(*split_photons(counts, 0.5, rng), pixel_size_nm=108.0))
    assert readout[0] < readout[1] < readout[2], readout
    assert 150 < readout[0] < 2000  # nm: a widefield image, not a number of pixels


def _cfg(tmp_path, free_address, **kw):
    base = dict(
        out=tmp_path / "t.zarr", ingest=free_address(), publish=None, control=None, source="sim", frames=70,
        sim_shape=(96, 96), sim_interval_s=0.05, engines=["deconvolve"], tune_every_s=1.0, resolution_every_s=0.5,
        save_products=True,
    )  # fmt: skip
    base.update(kw)
    return DaemonConfig(**base)


def test_the_daemon_tunes_from_the_stream_records_where_and_reads_out_resolution(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)
    summary = run_daemon(cfg)
    tuning = summary["tuning"]
    assert tuning["runs"] >= 1 and tuning["last"]["best"]["method"] in ("rl", "wb") and tuning["cpu_s"] > 0
    prov = json.loads((cfg.out / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]
    if tuning["changes"]:  # the sim's default light: the default WB 2 is not the best setting
        assert {c["param"] for c in prov["changes"]} <= {"method", "alpha", "iterations"}
        assert all(c["after"] for c in prov["changes"])  # each with the frame it applies from
    rec = read_records(cfg.out / "raw")
    raw_res = rec["resolution_raw_nm"].ravel()
    dec_res = rec["resolution_deconvolved_nm"].ravel()
    measured = ~np.isnan(raw_res)
    assert measured.sum() >= 2  # every half second, stored with its frame
    assert np.nanmedian(dec_res[measured]) < np.nanmedian(raw_res[measured])  # deconvolution resolves finer
    assert "resolution_raw_nm" in summary["scalars"]


def test_without_a_camera_gain_the_tuner_says_so_and_stays_idle(tmp_path, free_address, caplog):
    cfg = _cfg(tmp_path, free_address, source="zmq", frames=30, exit_on_end=False)
    frames = np.random.default_rng(0).integers(100, 4000, (30, 64, 64), dtype=np.uint16)

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)  # no camera metadata
        for t in range(30):
            pub.send(frames[t], index={"t": t})
            threading.Event().wait(0.05)
        pub.close()

    with caplog.at_level("INFO", logger="livescope.daemon.tuning"):
        summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == 30
    assert summary["tuning"]["runs"] == 0 and "calibration" in summary["tuning"]["idle"]
    assert sum("idle" in r.message for r in caplog.records) == 1  # said once


def test_with_a_denoiser_before_it_the_tuner_also_chooses_the_deconvolutions_input(tmp_path, free_address):
    """denoise then deconvolve: the tuner scores both inputs and sets denoise.pass_on; with
    pass_on false the deconvolution gets the frame the denoiser got (denoised is still saved)."""
    cfg = _cfg(tmp_path, free_address, engines=["denoise", "deconvolve"], frames=60)
    summary = run_daemon(cfg)
    last = summary["tuning"]["last"]
    assert isinstance(last["denoise_first"], bool)
    prov = json.loads((cfg.out / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]
    switched = [c for c in prov.get("changes", []) if c["engine"] == "denoise"]
    assert all(c["param"] == "pass_on" and c["after"] for c in switched)
    from livescope.bridges.store import STATUS

    assert (read_records(cfg.out / "denoised")["status"] == STATUS["saved"]).sum() > 30  # still saved


def test_pass_on_false_hands_the_denoisers_input_to_the_next_engine():
    from livescope.daemon.chain import Chain, slots_for
    from livescope.engines import FrameInfo, StreamSpec

    frame = np.random.default_rng(0).poisson(40.0, (64, 64)).astype(np.uint16) + 100
    spec = StreamSpec(shape=(64, 64), camera_offset=100.0, camera_gain=1.0)
    params = {"denoise": {"backend": "onnxruntime", "pass_on": False}, "deconvolve": {"iterations": 2}}
    bypass = Chain(slots_for(["denoise", "deconvolve"], params), spec).run(frame, FrameInfo(seq=0))
    alone = Chain(slots_for(["deconvolve"], params), spec).run(frame, FrameInfo(seq=0))
    np.testing.assert_array_equal(bypass.images["deconvolved"], alone.images["deconvolved"])
    assert "denoised" in bypass.images
    params["denoise"]["pass_on"] = True
    chained = Chain(slots_for(["denoise", "deconvolve"], params), spec).run(frame, FrameInfo(seq=0))
    assert not np.array_equal(chained.images["deconvolved"], alone.images["deconvolved"])


def test_the_tuner_works_on_a_centred_crop_of_large_frames():
    from livescope.daemon.tuning import CROP, _centre

    frame = np.arange(700 * 600, dtype=np.float32).reshape(700, 600)
    crop = _centre(frame, CROP)
    assert crop.shape == (512, 512) and crop[0, 0] == frame[94, 44]
    assert _centre(frame[:100, :80], CROP).shape == (100, 80)  # smaller frames whole
