from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import zarr

from livescope.bridges.sim import SimConfig, SimSample
from livescope.bridges.store import STATUS, read_records
from livescope.bridges.transport import FramePublisher
from livescope.daemon.cli import run_daemon
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlClient, ControlServer
from livescope.daemon.pipeline import Pipeline
from tests.conftest import wait_for


def _cfg(tmp_path, free_address, **kw):
    base = dict(out=tmp_path / "out.zarr", ingest=free_address(), publish=free_address(), control=free_address())
    base.update(kw)
    return DaemonConfig(**base)


def test_sim_two_channels_z_stack_every_raw_frame_saved_bit_exact(tmp_path, free_address):
    cfg = _cfg(
        tmp_path,
        free_address,
        source="sim",
        frames=6,
        sim_shape=(48, 64),
        sim_channels=("GFP", "mCherry"),
        sim_z=3,
        sim_interval_s=0.0,
        engines=["passthrough"],
        sim_seed=7,
    )
    summary = run_daemon(cfg)
    assert summary["frames"]["received"] == 6 * 2 * 3
    assert summary["frames"]["saved"] == 36 and summary["frames"]["lost"] == 0
    raw = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")
    assert raw.shape == (6, 2, 3, 48, 64)
    sample = SimSample(SimConfig(shape=(48, 64), seed=7))
    for t in range(6):
        for c in range(2):
            for z in range(3):
                np.testing.assert_array_equal(raw[t, c, z], sample.render(t, c, z, (z - 1) * 0.5))
    rec = read_records(cfg.out / "raw")
    assert (rec["status"] == STATUS["saved"]).all()
    # seq follows acquisition order t, c, z
    assert np.array_equal(rec["seq"].ravel(), np.arange(36))
    meta = json.loads((cfg.out / "raw" / "zarr.json").read_text())["attributes"]["ome"]
    assert [a["name"] for a in meta["multiscales"][0]["axes"]] == ["t", "c", "z", "y", "x"]
    assert [c["label"] for c in meta["omero"]["channels"]][:1] == ["GFP"]
    # each engine instance's describe() is in the provenance, one per (p, c, z, segment) stream
    root = json.loads((cfg.out / "zarr.json").read_text())["attributes"]
    state = root.get("livescope", root)["provenance"]["engine_state"]["passthrough"]
    assert len(state) == 6 and all("delay_s" in json.dumps(d) for d in state.values())
    # the passthrough product kept the same index as raw for every frame it processed
    prod = zarr.open_array(str(cfg.out / "passthrough" / "0"), mode="r")
    prec = read_records(cfg.out / "passthrough")
    for idx in zip(*np.nonzero(prec["status"] == STATUS["saved"]), strict=True):
        np.testing.assert_array_equal(prod[idx], raw[idx].astype(np.float32))


def test_raw_keeps_every_frame_while_a_slow_engine_skips(tmp_path, free_address):
    cfg = _cfg(
        tmp_path,
        free_address,
        source="zmq",
        frames=60,
        engines=["passthrough"],
        engine_params={"passthrough": {"delay_s": 0.05}},
        exit_on_end=False,
        complete="off",  # the live path's own accounting (tests/daemon/test_completion.py: completed)
    )
    frames = np.random.default_rng(0).integers(0, 4000, (60, 32, 32), dtype=np.uint16)

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        for t in range(60):
            pub.send(frames[t], index={"t": t}, bits=12)
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == 60
    np.testing.assert_array_equal(zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")[...], frames)
    skipped = summary["frames"]["skipped"]["passthrough"]
    processed = summary["engines"]["passthrough"]["processed"]
    assert skipped > 10 and processed + skipped == 60
    rec = read_records(cfg.out / "passthrough")
    assert (rec["status"] == STATUS["skipped"]).sum() == skipped
    assert (rec["status"] == STATUS["saved"]).sum() == processed


def test_roi_change_midstream_starts_a_new_segment(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, source="zmq", frames=8, exit_on_end=False)

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        for t in range(4):
            pub.send(np.full((32, 32), t, np.uint16), index={"t": t})
        for t in range(4, 8):
            pub.send(np.full((16, 24), t, np.uint16), index={"t": t})
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == 8
    a = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")
    b = zarr.open_array(str(cfg.out / "raw_seg1" / "0"), mode="r")
    assert a.shape == (4, 32, 32) and b.shape == (4, 16, 24)
    assert int(b[0, 0, 0]) == 4
    root = json.loads((cfg.out / "zarr.json").read_text())["attributes"]["livescope"]
    assert {(i["path"], i["segment"]) for i in root["images"]} == {("raw", 0), ("raw_seg1", 1)}


def test_malformed_frames_are_counted_and_the_daemon_keeps_running(tmp_path, free_address):
    import zmq

    cfg = _cfg(tmp_path, free_address, source="zmq", frames=3, exit_on_end=False)

    def publish(pipeline):
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.connect(cfg.ingest)
        sock.send_multipart([b"{garbage", b"123"])
        sock.send_multipart(
            [json.dumps({"v": 1, "stream": "x", "seq": 0, "shape": [4, 4], "dtype": "uint16"}).encode(), b"short"]
        )
        sock.close(linger=2000)
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        for t in range(3):
            pub.send(np.full((8, 8), t, np.uint16))
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == 3
    assert summary["frames"]["rejected"] == 2
    assert summary["frames"]["rejected_by_reason"] == {"bad_json": 1, "size_mismatch": 1}


def test_memory_budget_records_lost_frames_instead_of_growing(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, source="zmq", frames=10, exit_on_end=False, memory_budget_mb=0.0)
    # a zero budget: nothing fits, every frame must be recorded lost (never silently)

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        for t in range(10):
            pub.send(np.full((16, 16), t, np.uint16), index={"t": t})
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["dropped_over_budget"] == 10
    assert summary["frames"]["lost"] == 10 and summary["frames"]["saved"] == 0
    rec = read_records(cfg.out / "raw")
    assert (rec["status"] == STATUS["lost"]).sum() == 10


def test_engine_failures_pass_frames_through_and_disable_the_engine(tmp_path, free_address, monkeypatch):
    from livescope.engines.passthrough import Passthrough

    def boom(self, frame, info):
        raise RuntimeError("engine exploded")

    monkeypatch.setattr(Passthrough, "process", boom)
    cfg = _cfg(
        tmp_path,
        free_address,
        source="zmq",
        frames=12,
        exit_on_end=False,
        engines=["passthrough"],
        max_engine_failures=3,
    )

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        for t in range(12):
            pub.send(np.full((16, 16), t, np.uint16), index={"t": t})
            # one frame at a time, so none is skipped: every frame meets the failing engine
            wait_for(lambda t=t: pipeline.received >= t + 1 and not pipeline._slots, message=f"frame {t} taken")
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == 12
    eng = summary["engines"]["passthrough"]
    assert not eng["enabled"] and "3 failures in a row" in eng["reason"] and eng["failures"] == 3
    rec = read_records(cfg.out / "passthrough")
    assert (rec["status"] == STATUS["failed"]).sum() == 3


def test_control_socket_status_set_enable_disable_and_bad_requests(tmp_path, free_address):
    import zmq

    cfg = _cfg(tmp_path, free_address, source="zmq", engines=["passthrough"], exit_on_end=False, out=None)
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    client = ControlClient(cfg.control)
    try:
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        pub.send(np.zeros((8, 8), np.uint16))
        wait_for(lambda: pipeline.engine_states["passthrough"].processed == 1, message="one processed frame")
        st = client.status()
        assert st["ok"] and st["frames"]["received"] == 1 and st["state"] == "running"
        assert client.request("set", engine="passthrough", param="delay_s", value=0.001)["ok"]
        chain = next(iter(pipeline._chains.values()))
        assert chain.engines["passthrough"].delay_s == 0.001
        assert not client.request("set", engine="passthrough", param="nope", value=1)["ok"]
        assert client.request("disable", engine="passthrough")["enabled"] is False
        assert client.request("enable", engine="passthrough")["enabled"] is True
        assert "no engine" in client.request("enable", engine="nope")["error"]
        assert "unknown command" in client.request("fly")["error"]
        raw = zmq.Context.instance().socket(zmq.REQ)
        raw.connect(cfg.control)
        raw.send(b"[not an object")
        assert json.loads(raw.recv())["ok"] is False
        raw.close(0)
        assert client.status()["ok"]  # still serving
        assert client.request("stop")["ok"]
        assert pipeline.wait(timeout=5)
        pub.close(0)
    finally:
        client.close()
        server.close()
        pipeline.close()


def test_file_source_replays_a_tiff(tmp_path, free_address, real_data):
    import tifffile

    movie = tifffile.imread(real_data / "cancer_cell_migration_crop.tif")[:10]
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, movie)
    cfg = _cfg(tmp_path, free_address, source=f"file:{path}")
    summary = run_daemon(cfg)
    assert summary["frames"]["saved"] == 10
    np.testing.assert_array_equal(zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")[...], movie)


def test_unknown_engine_is_reported_not_fatal(tmp_path, free_address):
    cfg = _cfg(
        tmp_path, free_address, source="sim", frames=3, sim_shape=(32, 32), sim_interval_s=0.0, engines=["nonexistent"]
    )
    summary = run_daemon(cfg)
    assert summary["frames"]["saved"] == 3
    assert not summary["engines"]["nonexistent"]["enabled"]
    assert "unknown engine" in summary["engines"]["nonexistent"]["reason"]


@pytest.mark.parametrize("bad", ["tcp://999.0.0.1:1", "bogus://x"])
def test_bad_addresses_give_clear_errors(tmp_path, bad):
    with pytest.raises(OSError, match="--ingest"):
        Pipeline(DaemonConfig(ingest=bad, publish=None, control=None, out=None))


def test_volume_engines_get_assembled_stacks_and_products_land_per_plane(tmp_path, free_address):
    from livescope.engines import register_engine

    seen_shapes = []

    @register_engine("test_zsum")
    class ZSum:
        name = "test_zsum"
        outputs = ("zsum",)
        needs_volume = True

        def setup(self, spec):
            assert len(spec.shape) == 3

        def process(self, stack, info):
            seen_shapes.append(stack.shape)
            total = stack.astype(np.float32).sum(axis=0)
            return {"zsum": np.broadcast_to(total, stack.shape).copy()}

    cfg = _cfg(
        tmp_path,
        free_address,
        source="sim",
        frames=3,
        sim_shape=(32, 40),
        sim_z=4,
        sim_interval_s=0.0,
        engines=["test_zsum"],
    )
    summary = run_daemon(cfg)
    assert summary["frames"]["saved"] == 12
    assert seen_shapes and all(s == (4, 32, 40) for s in seen_shapes)
    raw = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")[...]
    prod = zarr.open_array(str(cfg.out / "zsum" / "0"), mode="r")[...]
    rec = read_records(cfg.out / "zsum")
    assert prod.shape == raw.shape == (3, 4, 32, 40)
    for t in range(3):
        if (rec["status"][t] == STATUS["saved"]).all():
            np.testing.assert_allclose(prod[t, 2], raw[t].astype(np.float32).sum(axis=0))
    assert (rec["status"] == STATUS["saved"]).any()


def test_restore_socket_returns_the_product_and_saves_raw(tmp_path, free_address):
    from livescope.bridges.transport import RestoreClient

    cfg = _cfg(tmp_path, free_address, source="zmq", engines=["passthrough"], exit_on_end=False, restore=free_address())
    pipeline = Pipeline(cfg)
    pipeline.start()
    client = RestoreClient(cfg.restore, stream="pm", timeout_s=5.0)
    try:
        frames = [np.full((16, 16), 10 * t, np.uint16) for t in range(5)]
        for t, f in enumerate(frames):
            out, header = client.restore(f, index={"t": t})
            assert out is not None, header
            assert out.dtype == np.float32 and header["product"] == "passthrough"
            np.testing.assert_array_equal(out, f.astype(np.float32))
        bad, reason = client.restore(frames[0], want="nonexistent", index={"t": 5})
        assert bad is None and "no product" in reason
        assert client.served == 5 and client.missed == 1
    finally:
        client.close()
        summary = pipeline.close()
    assert summary["frames"]["saved"] == 6
    assert summary["restore"] == {"served": 5, "errors": 1}
    np.testing.assert_array_equal(zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")[:5], np.stack(frames))


def test_restore_client_times_out_without_a_daemon(free_address):
    from livescope.bridges.transport import RestoreClient

    client = RestoreClient(free_address(), timeout_s=0.2)
    out, reason = client.restore(np.zeros((8, 8), np.uint16))
    assert out is None and "within 200 ms" in reason and client.missed == 1
    client.close()


def test_mmcore_source_runs_a_useq_sequence_file_in_process(tmp_path, free_address):
    seq = tmp_path / "seq.yaml"
    seq.write_text(
        "time_plan:\n  interval: 0\n  loops: 3\nchannels:\n  - config: GFP\n    group: Channel\n"
        "  - config: mCherry\n    group: Channel\nz_plan:\n  range: 1.0\n  step: 0.5\naxis_order: tpcz\n"
    )
    cfg = _cfg(tmp_path, free_address, source="mmcore", sequence=str(seq), sim_shape=(24, 32))
    summary = run_daemon(cfg)
    assert summary["frames"]["saved"] == 3 * 2 * 3
    raw = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")
    assert raw.shape == (3, 2, 3, 24, 32)
    meta = json.loads((cfg.out / "raw" / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]
    assert meta["datasets"][0]["coordinateTransformations"][0]["scale"][2] == 0.5  # z step from the sequence


def test_mmcore_source_with_a_missing_config_names_the_fix(tmp_path, free_address):
    from livescope.daemon.sources import make_source

    cfg = _cfg(tmp_path, free_address, source="mmcore", mm_config=str(tmp_path / "nope.cfg"))
    with pytest.raises(FileNotFoundError, match="nope.cfg"):
        make_source(cfg)


def test_mmcore_source_with_an_unloadable_config_names_the_fix(tmp_path, free_address):
    from livescope.daemon.sources import make_source

    cfg_file = tmp_path / "rig.cfg"
    cfg_file.write_text("Device,Camera,DemoCamera,DCam\n")
    cfg = _cfg(tmp_path, free_address, source="mmcore", mm_config=str(cfg_file))
    with pytest.raises(RuntimeError, match="mmcore install"):
        make_source(cfg)


def test_mmcore_source_releases_the_core_it_made(tmp_path, free_address):
    """The core a daemon makes from --config is its own: stopping unloads it and stops its
    notification thread (one still delivering at interpreter exit aborts the process)."""
    import threading

    from livescope.daemon.sources import make_source

    cfg_file = tmp_path / "empty.cfg"
    cfg_file.write_text("# a configuration with no devices\n")
    source = make_source(_cfg(tmp_path, free_address, source="mmcore", mm_config=str(cfg_file)))
    core = source.core
    heard = threading.Event()
    core.events.systemConfigurationLoaded.connect(heard.set)
    core.unloadAllDevices()
    assert heard.wait(5)  # the core's notifications reach Python from its thread
    source.stop()
    heard.clear()
    core.unloadAllDevices()
    assert not heard.wait(0.5)  # that thread is gone
    assert list(core.getLoadedDevices()) == ["Core"]


def test_acquisition_metadata_is_kept_per_frame(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, source="sim", frames=3, sim_shape=(16, 16), sim_interval_s=0.0)
    run_daemon(cfg)
    lines = [json.loads(x) for x in (cfg.out / "raw" / "livescope" / "frames.jsonl").read_text().splitlines()]
    assert [x["t"] for x in lines] == [0, 1, 2]
    assert lines[0]["meta"]["frame"]["camera_device"] == "Camera"
    assert lines[0]["meta"]["event"]["index"]["t"] == 0


def test_sim_without_frames_runs_until_stopped(tmp_path, free_address):
    cfg = _cfg(
        tmp_path,
        free_address,
        source="sim",
        frames=None,
        sim_shape=(24, 24),
        sim_interval_s=0.01,
        sim_channels=("GFP", "mCherry"),
    )

    def stop_later(pipeline):
        def run():
            wait_for(lambda: pipeline.status()["frames"]["saved"] >= 20, timeout=60, message="20 saved frames")
            pipeline.request_stop()

        threading.Thread(target=run, daemon=True).start()

    summary = run_daemon(cfg, on_started=stop_later)
    assert summary["frames"]["saved"] >= 20 and summary["frames"]["lost"] == 0
    raw = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")
    assert raw.ndim == 4 and raw.shape[1] == 2  # t, c, y, x: both channels kept apart
    rec = read_records(cfg.out / "raw")
    assert (rec["status"] == STATUS["saved"]).sum() == summary["frames"]["saved"]


def test_calibration_file_reaches_the_denoiser(tmp_path, free_address):
    """`livescope daemon --calibration CAL.json`: the denoiser normalises with that camera model."""
    pytest.importorskip("onnxruntime")
    cal = {
        "gain_adu_per_e": 0.5,
        "intercept_adu2": 0.64 - 0.5 * 100,
        "offset_adu": 100.0,
        "read_var_adu2": 0.64,
        "excess_noise_factor": 1.0,
    }
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    cfg = _cfg(
        tmp_path, free_address, source="zmq", engines=["denoise"], exit_on_end=False, out=None, calibration=str(path)
    )
    pipeline = Pipeline(cfg)
    pipeline.start()
    try:
        pub = FramePublisher(cfg.ingest, stream="cam", block=True)
        pub.send(np.full((32, 32), 300, np.uint16))
        wait_for(lambda: pipeline.engine_states["denoise"].processed == 1, message="one denoised frame")
        chain = next(iter(pipeline._chains.values()))
        described = chain.engines["denoise"].describe()
        assert described["noise_source"] == "stream calibration (spec.extra)"
        pub.close(0)
    finally:
        pipeline.close()
    path.write_text("{}")
    with pytest.raises(ValueError, match="livescope calibrate"):
        Pipeline(DaemonConfig(calibration=str(path), ingest=free_address(), publish=None, control=None, out=None))
