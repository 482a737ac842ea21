"""Pycro-Manager hooks against a real daemon pipeline, with Pycro-Manager's own call signatures and
metadata; end to end on Pycro-Manager's Python backend (AcqEngPy) driving a pymmcore-plus UniMMCore
when pycromanager is installed."""

from __future__ import annotations

import inspect
import json
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from livescope.bridges.pycromanager import (
    AdaptiveTimelapseEvents,
    MetadataMapper,
    feedback,
    restore,
    saved_tap,
    tap,
)
from livescope.bridges.store import STATUS, read_records
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlServer
from livescope.daemon.pipeline import Pipeline
from livescope.engines import register_engine
from tests.conftest import wait_for

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str) -> dict:
    return json.loads((DATA / name).read_text())


@pytest.fixture
def daemon(tmp_path, free_address):
    """A real pipeline (passthrough engine, OME-Zarr store, ingest + restore sockets)."""
    pipelines = []

    def start(**kw):
        base = dict(
            source="zmq",
            engines=["passthrough"],
            ingest=free_address(),
            restore=free_address(),
            out=tmp_path / f"out{len(pipelines)}.zarr",
            publish=None,
            control=None,
            exit_on_end=False,
        )
        base.update(kw)
        p = Pipeline(DaemonConfig(**base))
        p.start()
        pipelines.append(p)
        return p

    yield start
    for p in pipelines:
        if p.state != "stopped":
            p.close()


def _axes_metadata(t, channel, z, elapsed_ms, **extra):
    """Metadata the way AcqEngPy/AcqEngJ build it (keys of acq_eng_metadata.py)."""
    return {
        "Camera": "Camera",
        "PixelSize_um": 0.1,
        "ElapsedTime-ms": elapsed_ms,
        "Exposure": 10.0,
        "Axes": {"time": t, "channel": channel, "z": z},
        **extra,
    }


# -- metadata mapping ---------------------------------------------------------------------------


def test_python_backend_metadata_maps_onto_the_header():
    fixture = _load("pycromanager_python_backend_metadata.json")
    mapper = MetadataMapper()
    headers = [mapper.header(md, np.dtype("uint16")) for md in fixture["frames"]]
    # order tpcz: (A1, GFP, z0), (A1, GFP, z1), (A1, mCherry, z0), ... ; labels -> first-seen integers
    assert [h["index"] for h in headers[:4]] == [
        {"t": 0, "c": 0, "z": 0, "p": 0},
        {"t": 0, "c": 0, "z": 1, "p": 0},
        {"t": 0, "c": 1, "z": 0, "p": 0},
        {"t": 0, "c": 1, "z": 1, "p": 0},
    ]
    assert headers[4]["index"]["p"] == 1 and fixture["frames"][4]["Axes"]["position"] == "B2"
    assert [h["channel"] for h in headers[:4]] == ["GFP", "GFP", "mCherry", "mCherry"]
    assert all(h["pixel_size_um"] == 0.1 for h in headers)
    assert headers[1]["time"] == pytest.approx(fixture["frames"][1]["ElapsedTime-ms"] / 1000)
    # everything Pycro-Manager said travels in meta, untouched
    assert headers[4]["meta"]["pycromanager"] == fixture["frames"][4]
    assert headers[4]["meta"]["axes_to_index"]["p"] == {"A1": 0, "B2": 1}
    assert headers[4]["meta"]["channels"] == ["GFP", "mCherry"]


def test_java_backend_style_metadata_strings_affine_binning_tiles():
    fixture = _load("pycromanager_java_backend_style_metadata.json")
    h = MetadataMapper().header(fixture["frame"], np.dtype("uint16"))
    assert h["index"] == {"t": 3, "c": 0, "z": 2, "p": 0}
    assert h["channel"] == "DAPI" and h["pixel_size_um"] == 0.65 and h["bits"] == 12 and h["binning"] == 2
    assert h["time"] == pytest.approx(1.2345)
    assert h["pixel_size_affine"] == [0.65, 0.0, 0.0, 0.0, 0.65, 0.0]
    # BitDepth that does not fit the dtype is not claimed
    assert "bits" not in MetadataMapper().header(fixture["frame"], np.dtype("uint8"))
    # an explore/tiled frame: negative z and row/column tiles get their own stable indices
    mapper = MetadataMapper()
    tile = fixture["tiled_explore_frame"]
    first = mapper.header(tile, np.dtype("uint16"))
    assert first["index"]["z"] == 0 and first["binning"] == 1 and first["bits"] == 16
    other = dict(tile, Axes=dict(tile["Axes"], row=0, column=1, z=0))
    second = mapper.header(other, np.dtype("uint16"))
    assert second["index"]["p"] != first["index"]["p"]
    assert second["index"]["z"] == 1  # z=0 comes after z=-2 took index 0: never the same index twice
    again = mapper.header(tile, np.dtype("uint16"))
    assert again["index"] == first["index"]


def test_channels_given_in_advance_fix_the_order():
    mapper = MetadataMapper(channels=["mCherry", "GFP"])
    assert mapper.header(_axes_metadata(0, "GFP", 0, 0.0))["index"]["c"] == 1
    assert mapper.header(_axes_metadata(0, "mCherry", 0, 0.0))["index"]["c"] == 0


def test_hooks_have_the_signatures_pycromanager_counts(free_address):
    hooks = [tap(free_address()), saved_tap(free_address()), restore(free_address(), timeout_s=0.05)]
    policy = AdaptiveTimelapseEvents(slow_s=1, fast_s=0.1, quiet_s=1, frames=3)
    hooks.append(feedback(free_address(), free_address(), policy))
    try:
        counts = [len(inspect.signature(h).parameters) for h in hooks]
        assert counts == [2, 2, 2, 3]
        with pytest.raises(TypeError, match="takes 1 parameters"):
            tap(free_address(), then=lambda image: image)
    finally:
        for h in hooks:
            h.close(**({"timeout": 0.2} if hasattr(h, "publisher") else {}))


# -- tap ---------------------------------------------------------------------------------------


def test_tap_frames_arrive_in_order_bit_exact_and_routed(daemon):
    pipeline = daemon()
    hook = tap(pipeline.cfg.ingest, channels=["DAPI", "FITC"])
    rng = np.random.default_rng(3)
    frames = {}
    for t in range(3):
        for c in ("DAPI", "FITC"):
            for z in range(2):
                img = rng.integers(0, 4096, (24, 32), dtype=np.uint16)
                md = _axes_metadata(t, c, z, 10.0 * t, BitDepth="12")
                out = hook(img, md)
                assert out[0] is img and out[1] is md  # unchanged, for Micro-Manager to save
                frames[(t, c, z)] = img.copy()
    hook.close()
    wait_for(lambda: pipeline.received == 12, timeout=10, message="12 frames")
    summary = pipeline.close()
    assert summary["frames"]["saved"] == 12 and summary["frames"]["lost"] == 0
    assert hook.stats() == {"frames": 12, "sent": 12, "dropped": 0, "queued": 0}
    raw = zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")
    assert raw.shape == (3, 2, 2, 24, 32)
    for (t, c, z), img in frames.items():
        np.testing.assert_array_equal(raw[t, ["DAPI", "FITC"].index(c), z], img)
    rec = read_records(pipeline.cfg.out / "raw")
    assert (rec["status"] == STATUS["saved"]).all()
    assert np.array_equal(np.sort(rec["seq"].ravel()), np.arange(12))
    assert rec["seq"][2, 1, 1] == 11  # acquisition order t, c, z -> seq


def test_tap_with_a_three_argument_user_function(daemon):
    pipeline = daemon(engines=[])
    seen = []

    def mine(image, metadata, event_queue):
        seen.append(event_queue)
        image[:] = 0  # the user's own processing may change the frame in place
        return image, metadata

    hook = tap(pipeline.cfg.ingest, then=mine)
    assert len(inspect.signature(hook).parameters) == 2  # without feedback: the two-argument form
    img = np.full((8, 8), 7, np.uint16)
    out = hook(img, _axes_metadata(0, "DAPI", 0, 0.0))
    assert seen == [None] and int(out[0].sum()) == 0
    hook.close()
    wait_for(lambda: pipeline.received == 1, timeout=10, message="one frame")
    pipeline.close()
    # livescope got the frame as acquired, before the user's function zeroed it
    assert int(zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")[0].min()) == 7


def test_tap_never_blocks_and_every_dropped_frame_reaches_the_daemon_as_lost(daemon):
    pipeline = daemon(engines=[])
    hook = tap(pipeline.cfg.ingest, buffer_frames=2)
    gate = threading.Event()
    real_send = hook.publisher.send

    def stalled_send(*a, **kw):  # a network that stalls: the sender thread is stuck on frame 0
        gate.wait(10)
        return real_send(*a, **kw)

    hook.publisher.send = stalled_send
    img = np.ones((16, 16), np.uint16)
    t0 = time.perf_counter()
    for t in range(20):
        hook(img, _axes_metadata(t, "DAPI", 0, float(t)))
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, elapsed  # 20 calls with a stuck sender: no waiting
    assert hook.dropped >= 16  # one in the sender's hands, two queued, the rest dropped
    dropped = hook.dropped
    gate.set()
    hook.close()
    wait_for(lambda: pipeline.received == 20 - dropped, timeout=10, message="kept frames")
    wait_for(lambda: pipeline._ended.is_set(), timeout=10, message="end of stream")
    summary = pipeline.close()
    # the gap in seq (and the end marker's seq) tells the daemon how many were lost
    assert summary["frames"]["lost_in_transport"] == dropped
    assert hook.stats()["sent"] == 20 - dropped


def test_tap_without_a_daemon_returns_at_once(free_address):
    hook = tap(free_address(), buffer_frames=4)
    img = np.zeros((32, 32), np.uint16)
    t0 = time.perf_counter()
    for t in range(50):
        hook(img, _axes_metadata(t, "DAPI", 0, 0.0))
    assert time.perf_counter() - t0 < 0.5
    assert hook.dropped >= 40
    t0 = time.perf_counter()
    hook.close(timeout=0.3)  # a full queue and nobody listening: close still keeps its deadline
    assert time.perf_counter() - t0 < 1.0
    assert hook.dropped + hook.sent == 50  # "sent": handed to ZeroMQ's queue for a peer that never came


# -- restore -----------------------------------------------------------------------------------


def test_restore_returns_input_dtype_with_one_fixed_scale(daemon):
    pipeline = daemon()
    hook = restore(pipeline.cfg.restore, timeout_s=5.0)
    rng = np.random.default_rng(0)
    frames = [rng.integers(100, 3000, (16, 20), dtype=np.uint16) for _ in range(4)]
    frames[2][0, 0] = 60000  # a much brighter later frame: clipped at the dtype's top, counted
    outs = []
    for t, f in enumerate(frames):
        out, md = hook(f, _axes_metadata(t, "DAPI", 0, 5.0 * t))
        assert out.dtype == np.uint16 and out.shape == f.shape
        assert md["livescope"]["restored"] is True and md["livescope"]["product"] == "passthrough"
        outs.append((out, md))
    peak = float(frames[0].max())
    expected_scale = 2.0 ** np.floor(np.log2(65535 / (4 * peak)))
    assert hook.scale == expected_scale and expected_scale >= 4  # 12-bit data in uint16: room to spare
    for f, (out, md) in zip(frames, outs, strict=True):
        assert md["livescope"]["scale"] == expected_scale
        np.testing.assert_array_equal(out, np.clip(np.rint(f.astype(np.float32) * expected_scale), 0, 65535))
    st = hook.stats()
    assert st["served"] == 4 and st["missed"] == 0 and st["clipped_pixels"] == 1
    assert st["latency_ms"]["n"] == 4 and 0 < st["latency_ms"]["p50"] <= st["latency_ms"]["p99"]
    hook.close()
    summary = pipeline.close()
    assert summary["restore"] == {"served": 4, "errors": 0}
    # the daemon kept the raw frames
    raw = zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")
    np.testing.assert_array_equal(raw[:, 0, 0], np.stack(frames))


def test_restore_given_scale_and_uint8(daemon):
    pipeline = daemon(out=None)
    hook = restore(pipeline.cfg.restore, timeout_s=5.0, scale=0.5)
    f = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    out, md = hook(f, _axes_metadata(0, "DAPI", 0, 0.0))
    assert out.dtype == np.uint8 and md["livescope"]["scale"] == 0.5
    np.testing.assert_array_equal(out, np.rint(f.astype(np.float32) * 0.5).astype(np.uint8))
    hook.close()
    pipeline.close()


def test_restore_timeout_and_errors_return_the_raw_frame_tagged(daemon, free_address):
    pipeline = daemon(engine_params={"passthrough": {"delay_s": 0.4}})
    slow = restore(pipeline.cfg.restore, timeout_s=0.1, max_misses_in_row=100)
    f = np.full((8, 8), 5, np.uint16)
    md_in = _axes_metadata(0, "DAPI", 0, 0.0)
    out, md = slow(f, md_in)
    assert out is f and md["livescope"]["restored"] is False and md["livescope"]["reason"].startswith("timeout")
    assert "livescope" not in md_in  # Pycro-Manager's own dict is not changed behind its back
    wrong = restore(pipeline.cfg.restore, timeout_s=5.0, want="nonexistent")
    out, md = wrong(f, _axes_metadata(1, "DAPI", 0, 0.0))
    assert out is f and "no product" in md["livescope"]["reason"]
    for h in (slow, wrong):
        h.close()
    pipeline.close()
    assert slow.stats()["missed_by_reason"] == {"timeout": 1}
    assert wrong.stats()["missed_by_reason"] == {"daemon": 1}

    # no daemon at all: three waits, then raw frames at once for retry_s, never an exception
    away = restore(free_address(), timeout_s=0.05, max_misses_in_row=3, retry_s=60)
    for t in range(3):
        away(f, _axes_metadata(t, "DAPI", 0, 0.0))
    t0 = time.perf_counter()
    out, md = away(f, _axes_metadata(3, "DAPI", 0, 0.0))
    assert time.perf_counter() - t0 < 0.02 and out is f and "unavailable" in md["livescope"]["reason"]
    bad, md = away(np.zeros((4, 4), np.complex64), {"Axes": {"time": 9}})  # whatever happens: raw, tagged
    assert md["livescope"]["restored"] is False
    assert away.stats()["missed"] == 5 and away.stats()["served"] == 0
    away.close()


# -- image_saved_fn ----------------------------------------------------------------------------


def test_saved_tap_reads_a_real_ndtiff_dataset(daemon, tmp_path):
    ndstorage = pytest.importorskip("ndstorage", reason="ndstorage (a pycromanager dependency) is not installed")
    pipeline = daemon(engines=[])
    hook = saved_tap(pipeline.cfg.ingest)
    dataset = ndstorage.NDTiffDataset(str(tmp_path / "nd"), summary_metadata={}, writable=True)
    rng = np.random.default_rng(5)
    frames = {}
    for t in range(3):
        for c in ("DAPI", "FITC"):
            img = rng.integers(0, 65535, (20, 24), dtype=np.uint16)
            axes = {"time": t, "channel": c}
            dataset.put_image(axes, img, _axes_metadata(t, c, 0, 100.0 * t, BitDepth="16"))
            frames[(t, c)] = img
            hook(dict(axes), dataset)  # as Pycro-Manager's StorageMonitorThread calls it
    dataset.finish()
    # Java-backend style: a read-only view of a dataset another process wrote
    view = ndstorage.NDTiffDataset(dataset.path)
    hook(json.loads(json.dumps({"time": 3, "channel": "DAPI"})), view)  # has no such image: counted
    hook.close()
    wait_for(lambda: pipeline.received == 6, timeout=10, message="6 frames")
    summary = pipeline.close()
    assert hook.stats()["sent"] == 6 and hook.stats()["dropped"] == 1
    raw = zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")
    for (t, c), img in frames.items():
        np.testing.assert_array_equal(raw[t, ["DAPI", "FITC"].index(c)], img)
    assert summary["frames"]["lost_in_transport"] == 1  # the unreadable one is a gap, not a silence
    view.close()


# -- feedback ----------------------------------------------------------------------------------


@register_engine("test_pcm_flag_t3")
class FlagT3:
    """Flags time point 3 as an event, as the decomposition flags a novel frame."""

    name = "test_pcm_flag_t3"
    outputs = ()

    def setup(self, spec):
        pass

    def process(self, frame, info):
        return {"events": [{"kind": "novelty", "score": 9.0}]} if info.index.get("t") == 3 else {}


def _run_feedback(pipeline, acquire):
    """A daemon event at t=3 switches the time-lapse to fast; a quiet period switches it back."""
    server = ControlServer(pipeline.cfg.control, pipeline.handle)
    server.start()
    policy = AdaptiveTimelapseEvents(
        slow_s=0.4,
        fast_s=0.05,
        quiet_s=0.5,
        frames=16,
        per_time_point=[{"axes": {"channel": "GFP"}, "config_group": ["Channel", "GFP"]}],
    )
    hook = feedback(pipeline.cfg.ingest, pipeline.cfg.control, policy)
    try:
        times = acquire(hook, policy)
    finally:
        hook.close()
        server.close()
        summary = pipeline.close()
    return policy, times, summary


def _check_feedback(policy, times, summary):
    assert summary["frames"]["received"] == 16
    assert [m for _, m, _ in policy.switches] == ["fast", "slow"]
    gaps = np.diff([times[t] for t in range(16)])
    assert np.all(gaps[:3] > 0.3), gaps  # slow before the event
    first_fast = next(t for t in range(1, 16) if gaps[t - 1] < 0.2)
    assert first_fast == 4, gaps  # the time point right after the flagged one
    assert policy.switches[0][2]["seq"] == 3 and policy.switches[0][2]["event_id"] == 1
    assert times[4] - times[3] < 0.3  # did not wait out the slow interval


def test_feedback_policy_drives_a_pycromanager_style_event_queue(daemon, free_address):
    """The hook inside a loop that does what Pycro-Manager's engine does with ``event_queue``."""
    try:
        from pycromanager.acquisition.acquisition_superclass import EventQueue
    except ImportError:
        EventQueue = queue.Queue
    pipeline = daemon(engines=["test_pcm_flag_t3"], control=free_address(), out=None)

    def acquire(hook, policy):
        events = EventQueue()
        events.put(policy.events(0))
        times: dict[int, float] = {}
        modes: dict[int, str] = {}
        t_start = time.monotonic()
        while True:
            batch = events.get(timeout=10)
            if batch is None:
                assert [modes[t] for t in range(5)] == ["slow"] * 4 + ["fast"]  # into the saved metadata
                return times
            for ev in batch if isinstance(batch, list) else [batch]:
                t = ev["axes"]["time"]
                times[t] = time.monotonic()
                md = {"Axes": dict(ev["axes"]), "ElapsedTime-ms": 1000 * (times[t] - t_start)}
                _, saved_md = hook(np.full((16, 16), t, np.uint16), md, events)
                modes[t] = saved_md["livescope"]["mode"]

    policy, times, summary = _run_feedback(pipeline, acquire)
    _check_feedback(policy, times, summary)


# -- end to end on Pycro-Manager's Python backend ----------------------------------------------


@pytest.fixture(scope="module")
def pycromanager_on_unicore():
    """Pycro-Manager's Python backend (AcqEngPy) driving livescope's simulated UniMMCore.

    AcqEngPy expects mmpycorex's snake_case CMMCore; we give the pymmcore-plus core snake_case
    aliases of its own (Python-device aware) methods and register it the way
    ``pycromanager.start_headless(python_backend=True)`` does, without a Micro-Manager install.
    """
    pytest.importorskip("pycromanager", reason="pycromanager is not installed (pip install pycromanager)")
    pytest.importorskip("pymmcore_plus", reason="pymmcore-plus is not installed")
    import types

    import mmpycorex.launcher as launcher
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    from livescope.bridges.sim import SimConfig, SimMicroscope

    if Engine.get_instance() is not None:
        pytest.skip("a Pycro-Manager engine is already running in this process")
    scope = SimMicroscope(SimConfig(shape=(24, 32), seed=2))
    core = scope.core
    for name in dir(type(core)):
        snake = launcher._camel_to_snake(name)
        if (
            not name.startswith("_")
            and snake != name
            and not hasattr(core, snake)
            and callable(getattr(type(core), name, None))
        ):
            setattr(core, snake, getattr(core, name))
    core.get_tagged_image = types.MethodType(launcher.get_tagged_image, core)
    core.pop_next_tagged_image = types.MethodType(launcher.pop_next_tagged_image, core)
    core.TaggedImage = launcher.TaggedImage
    launcher._PYMMCORES.append(core)
    Engine(core)

    def follow_events(event):  # the sim camera renders the frame of the event being acquired
        first = event[0] if isinstance(event, list) else event  # a hardware sequence comes as a list
        scope._current_t = int(first["axes"].get("time", 0))
        scope._current_z = int(first["axes"].get("z", 0))
        return event

    try:
        yield scope, follow_events
    finally:
        Engine.get_instance().shutdown()
        del Engine.singleton
        launcher._PYMMCORES.remove(core)
        core.unloadAllDevices()


def test_e2e_pycromanager_acquisition_with_tap(pycromanager_on_unicore, daemon):
    from pycromanager import Acquisition, multi_d_acquisition_events

    scope, follow = pycromanager_on_unicore
    pipeline = daemon()
    hook = tap(pipeline.cfg.ingest)
    events = multi_d_acquisition_events(
        num_time_points=3, channel_group="Channel", channels=["GFP", "mCherry"], z_start=0, z_end=1, z_step=0.5
    )
    with Acquisition(name="livescope", image_process_fn=hook, pre_hardware_hook_fn=follow) as acq:
        acq.acquire(events)
    hook.close()
    dataset = acq.get_dataset()
    wait_for(lambda: pipeline.received == 18, timeout=10, message="18 frames")
    summary = pipeline.close()
    assert summary["frames"]["saved"] == 18 and summary["frames"]["lost"] == 0 and hook.dropped == 0
    raw = zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")
    assert raw.shape == (3, 2, 3, 24, 32)
    for t in range(3):
        for c, name in enumerate(("GFP", "mCherry")):
            for z in range(3):
                np.testing.assert_array_equal(raw[t, c, z], dataset.read_image(time=t, channel=name, z=z))
    assert not np.array_equal(raw[0, 0, 0], raw[1, 0, 0])  # frames really differ over time
    rec = read_records(pipeline.cfg.out / "raw")
    assert np.array_equal(rec["seq"].ravel(), np.arange(18))  # tcz order, nothing lost
    dataset.close()


def test_e2e_pycromanager_saves_restored_frames(pycromanager_on_unicore, daemon):
    from pycromanager import Acquisition, multi_d_acquisition_events

    scope, follow = pycromanager_on_unicore
    pipeline = daemon()
    hook = restore(pipeline.cfg.restore, timeout_s=5.0)
    with Acquisition(name="restored", image_process_fn=hook, pre_hardware_hook_fn=follow) as acq:
        acq.acquire(multi_d_acquisition_events(num_time_points=4))
    dataset = acq.get_dataset()
    summary = pipeline.close()
    raw = zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")
    st = hook.stats()
    assert st["served"] == 4 and st["missed"] == 0
    for t in range(4):
        saved = dataset.read_image(time=t)
        md = dataset.read_metadata(time=t)
        assert saved.dtype == np.uint16 and md["livescope"]["restored"] is True
        assert md["livescope"]["scale"] == st["scale"]
        # passthrough restores to the raw frame: Micro-Manager saved raw x the fixed scale
        np.testing.assert_array_equal(saved, np.clip(np.rint(raw[t].astype(np.float32) * st["scale"]), 0, 65535))
    assert summary["restore"]["served"] == 4
    hook.close()
    dataset.close()


def test_e2e_pycromanager_image_saved_fn_on_ndtiff(pycromanager_on_unicore, daemon, tmp_path):
    from pycromanager import Acquisition, multi_d_acquisition_events

    scope, follow = pycromanager_on_unicore
    pipeline = daemon(engines=[])
    hook = saved_tap(pipeline.cfg.ingest)
    with Acquisition(
        directory=str(tmp_path / "pm"), name="saved", image_saved_fn=hook, pre_hardware_hook_fn=follow
    ) as acq:
        acq.acquire(multi_d_acquisition_events(num_time_points=3, channel_group="Channel", channels=["GFP", "mCherry"]))
    hook.close()
    dataset = acq.get_dataset()
    wait_for(lambda: pipeline.received == 6, timeout=10, message="6 frames")
    pipeline.close()
    raw = zarr.open_array(str(pipeline.cfg.out / "raw" / "0"), mode="r")
    # what Pycro-Manager wrote, opened afresh from disk (the acquisition's own dataset object can
    # serve stale zeros: ndstorage 0.1.18's buffered reader, see docs/bridge_pycromanager.md)
    from ndstorage import NDTiffDataset

    on_disk = NDTiffDataset(dataset.path)
    for t in range(3):
        for c, name in enumerate(("GFP", "mCherry")):
            np.testing.assert_array_equal(raw[t, c], on_disk.read_image(time=t, channel=name))
    assert len({int(raw[t, 0].sum()) for t in range(3)}) == 3  # three different frames, not zeros
    assert hook.stats()["sent"] == 6 and hook.stats()["dropped"] == 0
    on_disk.close()
    dataset.close()


def test_e2e_pycromanager_event_queue_feedback(pycromanager_on_unicore, daemon, free_address):
    from pycromanager import Acquisition

    scope, follow = pycromanager_on_unicore
    pipeline = daemon(engines=["test_pcm_flag_t3"], control=free_address(), out=None)
    times: dict[int, float] = {}

    def acquire(hook, policy):
        def stamp(event):
            times[event["axes"]["time"]] = time.monotonic()
            return follow(event)

        acq = Acquisition(name="adaptive", image_process_fn=hook, post_hardware_hook_fn=stamp)
        acq.acquire(policy.events(0))
        acq.await_completion()
        dataset = acq.get_dataset()
        modes = [dataset.read_metadata(time=t, channel="GFP")["livescope"]["mode"] for t in range(16)]
        assert modes[:5] == ["slow"] * 4 + ["fast"] and modes[-1] == "slow"  # saved with each frame
        dataset.close()
        return times

    policy, times, summary = _run_feedback(pipeline, acquire)
    _check_feedback(policy, times, summary)
