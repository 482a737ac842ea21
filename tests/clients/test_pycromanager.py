"""Pycro-Manager conformance: every livescope hook in an acquisition written the way Pycro-Manager's
users write it, with Pycro-Manager's defaults.

    with Acquisition(directory=..., name=..., image_process_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(...))

Pycro-Manager 1.0.2's Python backend (AcqEngPy) drives livescope's simulated microscope (a
pymmcore-plus UniMMCore, registered the way ``start_headless(python_backend=True)`` registers a
core; see ``pycromanager_on_unicore`` in tests/bridges/test_pycromanager.py) and writes its NDTiff
dataset to disk; a real daemon pipeline (``--out`` OME-Zarr store) takes the frames. For time
points, channels, z-stacks, positions, their combination and several ``order`` strings, and for
each hook (``tap``, ``restore``, ``saved_tap``, ``feedback``), the test checks that

- the daemon's store holds every frame bit-exact at its (p, c, z, t), nothing else, with the
  channel names, and refused nothing;
- what Pycro-Manager saved is what the camera gave (``restore``: the restored frame, in the
  camera's dtype, at the hook's fixed scale).

The camera's frames are the ground truth: each frame it renders is recorded in acquisition order,
which is the order of the events (``multi_d_acquisition_events`` lists them in acquisition order).
The Java backend (AcqEngJ) cannot run here: it needs Java and a Micro-Manager installation.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import zarr

from livescope.bridges.pycromanager import AdaptiveTimelapseEvents, MetadataMapper, feedback, restore, saved_tap, tap
from livescope.bridges.store import STATUS, image_name, list_images, read_records
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlServer
from livescope.daemon.pipeline import Pipeline
from tests.conftest import wait_for

pytest.importorskip("pycromanager", reason="pycromanager is not installed (pip install pycromanager)")
pytest.importorskip("pymmcore_plus", reason="pymmcore-plus is not installed")

from pycromanager import Acquisition, multi_d_acquisition_events  # noqa: E402

Y, X = 8, 12
CHANNELS = ["GFP", "mCherry"]  # the sim's "Channel" config group (bridges/sim.py)
XY = [[0, 0], [10, 5]]  # integers, as users type them (multi_d_acquisition_events keeps numpy ints)
Z = dict(z_start=0, z_end=0.5, z_step=0.5)  # two planes
CHANNEL = dict(channel_group="Channel", channels=CHANNELS)
CASES = {
    "time": dict(num_time_points=3),  # AcqEngPy runs these as one hardware sequence
    "channels": CHANNEL,
    "z": dict(z_start=0, z_end=1, z_step=0.5),
    "positions": dict(xy_positions=XY),
    "t_c_z": dict(num_time_points=2, **CHANNEL, **Z),
    "order_tpcz": dict(num_time_points=2, xy_positions=XY, **CHANNEL, **Z),  # the default order
    "order_pzct": dict(num_time_points=2, xy_positions=XY, **CHANNEL, **Z, order="pzct"),
    "order_cpzt": dict(num_time_points=2, xy_positions=XY, **CHANNEL, **Z, order="cpzt"),
}


# -- Pycro-Manager's Python backend on the simulated UniMMCore ---------------------------------


@pytest.fixture(scope="module")
def camera():
    """AcqEngPy on the sim's UniMMCore (as ``pycromanager_on_unicore`` sets it up, without its
    event hook: the acquisitions here pass nothing but the hook under test). Yields the list the
    camera appends a copy of each frame it renders to; every frame differs (its noise is drawn
    for the frame's number), so a frame stored at the wrong place cannot match."""
    import mmpycorex.launcher as launcher
    from pycromanager.acquisition.acq_eng_py.internal.engine import Engine

    from livescope.bridges.sim import SimConfig, SimMicroscope

    if Engine.get_instance() is not None:
        pytest.skip("a Pycro-Manager engine is already running in this process")
    scope = SimMicroscope(SimConfig(shape=(Y, X), seed=4))
    rendered: list[np.ndarray] = []
    render = scope.sample.render

    def render_next(t, channel=0, z_index=0, z_um=None, stage_yx_um=(0.0, 0.0), out=None):
        frame = render(len(rendered), channel, z_index, z_um, stage_yx_um, out=out)
        rendered.append(frame.copy())
        return frame

    scope.sample.render = render_next
    core = scope.core
    for name in dir(type(core)):  # AcqEngPy calls mmpycorex's snake_case names
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
    try:
        yield rendered
    finally:
        Engine.get_instance().shutdown()
        del Engine.singleton
        launcher._PYMMCORES.remove(core)
        scope.close()


@pytest.fixture
def daemon(tmp_path, free_address):
    """A real pipeline with an OME-Zarr store, ingest, restore and control sockets."""
    pipelines = []

    def start(**kw):
        base = dict(
            source="zmq",
            engines=[],
            ingest=free_address(),
            restore=free_address(),
            control=free_address(),
            out=tmp_path / "out.zarr",
            publish=None,
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


# -- what each hook's acquisition looks like in a user's script --------------------------------


def _acquire_tap(pipeline, case, directory):
    hook = tap(pipeline.cfg.ingest)
    with Acquisition(directory=str(directory), name=case, image_process_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(**CASES[case]))
    hook.close()
    return acq, hook


def _acquire_saved_tap(pipeline, case, directory):
    hook = saved_tap(pipeline.cfg.ingest)
    with Acquisition(directory=str(directory), name=case, image_saved_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(**CASES[case]))
    hook.close()
    return acq, hook


def _acquire_restore(pipeline, case, directory):
    hook = restore(pipeline.cfg.restore, timeout_s=10.0)  # generous: the test machine is shared
    with Acquisition(directory=str(directory), name=case, image_process_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(**CASES[case]))
    hook.close()
    return acq, hook


def _feedback_policy(case):
    """The time-lapse the policy schedules: the case's time points (2 when it has none), each time
    point the case's events without time, in the case's order."""
    spec = dict(CASES[case])
    n_t = spec.pop("num_time_points", 2)
    return AdaptiveTimelapseEvents(
        slow_s=0.02, fast_s=0.01, quiet_s=1.0, frames=n_t, per_time_point=multi_d_acquisition_events(**spec)
    )


def _acquire_feedback(pipeline, case, directory):
    # Pycro-Manager's docs: an image processor that adds events cannot use "with Acquisition":
    # it would close the acquisition too soon; the acquisition ends when None is put in event_queue
    server = ControlServer(pipeline.cfg.control, pipeline.handle)
    server.start()
    policy = _feedback_policy(case)
    hook = feedback(pipeline.cfg.ingest, pipeline.cfg.control, policy)
    try:
        acq = Acquisition(directory=str(directory), name=case, image_process_fn=hook)
        acq.acquire(policy.events(0))
        acq.await_completion()
    finally:
        hook.close()
        server.close()
    assert policy.finished
    return acq, hook


def _events(hook_name, case):
    """Pycro-Manager's events of the acquisition, in acquisition order."""
    if hook_name != "feedback":
        return multi_d_acquisition_events(**CASES[case])
    policy = _feedback_policy(case)
    return [ev for t in range(policy.frames) for ev in policy.events(t)]


ACQUIRE = {
    "tap": _acquire_tap,
    "restore": _acquire_restore,
    "saved_tap": _acquire_saved_tap,
    "feedback": _acquire_feedback,
}


# -- reading back what was saved ---------------------------------------------------------------


def _where(axes):
    """Pycro-Manager axes -> (p, c, z, t) in livescope's store: position labels are the integers
    multi_d_acquisition_events gives; channels in the order of the channel list; a frame without a
    time axis is the first of its (p, c, z)."""
    return (
        int(axes.get("position", 0)),
        CHANNELS.index(axes["channel"]) if "channel" in axes else 0,
        int(axes.get("z", 0)),
        int(axes.get("time", 0)),
    )


def _image(out: Path, p: int):
    """One position's raw image: its array, axis names, scale per axis, units, channel labels."""
    path = out / image_name("raw", p)
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    ms = attrs["ome"]["multiscales"][0]
    names = [a["name"] for a in ms["axes"]]
    scale = dict(zip(names, ms["datasets"][0]["coordinateTransformations"][0]["scale"], strict=True))
    units = {a["name"]: a.get("unit") for a in ms["axes"]}
    labels = [c["label"] for c in attrs["ome"]["omero"]["channels"]]
    return zarr.open_array(str(path / "0"), mode="r")[...], names, scale, units, labels, read_records(path)


def _lead(names, t, c, z):
    return (t,) + ((c,) if "c" in names else ()) + ((z,) if "z" in names else ())


def _check_store(pipeline, events, rendered):
    """Every rendered frame in the store at its (p, c, z, t), bit-exact; nothing else there."""
    summary = pipeline.close()
    frames = summary["frames"]
    assert frames["rejected"] == 0, f"the daemon refused frames: {frames['rejected_by_reason']}"
    assert frames["saved"] == len(events) and frames["lost"] == 0, frames
    out = pipeline.cfg.out
    where = [_where(ev["axes"]) for ev in events]
    positions = sorted({p for p, *_ in where})
    assert sorted(e["path"] for e in list_images(out) if e["product"] == "raw") == sorted(
        image_name("raw", p) for p in positions
    )
    for p in positions:
        arr, names, _, _, labels, rec = _image(out, p)
        mine = [(i, w) for i, w in enumerate(where) if w[0] == p]
        n = {k: len({w[j] for _, w in mine}) for j, k in ((1, "c"), (2, "z"), (3, "t"))}
        assert names == ["t"] + (["c"] if "channel" in events[0]["axes"] else []) + (
            ["z"] if "z" in events[0]["axes"] else []
        ) + ["y", "x"]
        assert arr.shape == _lead(names, n["t"], n["c"], n["z"]) + (Y, X)  # no plane more, none less
        assert int((rec["status"] == STATUS["saved"]).sum()) == len(mine)
        for i, (_, c, z, t) in mine:
            np.testing.assert_array_equal(arr[_lead(names, t, c, z)], rendered[i], err_msg=f"event {events[i]}")
        if "c" in names:
            assert labels == CHANNELS


def _check_pycromanager_saved(acq, events, rendered, scale=None):
    """Pycro-Manager's NDTiff on disk (opened afresh: see docs/bridge_pycromanager.md on ndstorage's
    buffered reader) holds the camera's frames, or the restored ones at the hook's scale."""
    from ndstorage import NDTiffDataset

    own = acq.get_dataset()
    dataset = NDTiffDataset(own.path)
    try:
        for i, ev in enumerate(events):
            saved = dataset.read_image(**ev["axes"])
            md = dataset.read_metadata(**ev["axes"])
            assert saved.dtype == np.uint16
            if scale is None:
                np.testing.assert_array_equal(saved, rendered[i], err_msg=f"event {ev}")
            else:
                assert md["livescope"]["restored"] is True and md["livescope"]["scale"] == scale
                expect = np.clip(np.rint(rendered[i].astype(np.float32) * np.float32(scale)), 0, 65535)
                np.testing.assert_array_equal(saved, expect, err_msg=f"event {ev}")
    finally:
        dataset.close()
        own.close()


# -- the conformance matrix --------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("hook_name", list(ACQUIRE))
def test_pycromanager_acquisition_reaches_the_store(camera, daemon, tmp_path, hook_name, case):
    pipeline = daemon(engines=["passthrough"] if hook_name == "restore" else [])
    camera.clear()
    acq, hook = ACQUIRE[hook_name](pipeline, case, tmp_path / "pm")
    events = _events(hook_name, case)
    assert len(camera) == len(events)  # one rendered frame per event: the ground truth lines up
    assert len({f.tobytes() for f in camera}) == len(camera)  # and every frame is different
    if hook_name == "restore":
        st = hook.stats()
        assert st["served"] == len(events) and st["missed"] == 0 and st["meta_dropped_by_cause"] == {}, st
        # the documented scale: the power of two mapping the first frame's peak to 1/4 of uint16
        assert st["scale"] == 2.0 ** np.floor(np.log2(65535 / (4 * float(camera[0].max()))))
        _check_pycromanager_saved(acq, events, camera, scale=st["scale"])
    else:
        wait_for(lambda: pipeline.received >= len(events), timeout=20, message=f"{len(events)} frames")
        assert hook.stats()["sent"] == len(events) and hook.dropped == 0 and hook.meta_dropped == 0, hook.causes
        _check_pycromanager_saved(acq, events, camera)
    if "z_step" in CASES[case]:
        # what the hook sends from the second plane on (the daemon adopts it: see below)
        assert hook.mapper.z_step_um == CASES[case]["z_step"]
    _check_store(pipeline, events, camera)


# Pycro-Manager's metadata has no z step: the hooks learn it from the second plane's
# ZPosition_um_Intended and send z_step_um from then on; the daemon adopts a sampling that arrives
# after an image's first frame while the image has none
def test_the_store_has_the_z_step_of_a_pycromanager_z_stack(camera, daemon, tmp_path):
    pipeline = daemon()
    camera.clear()
    _acquire_tap(pipeline, "t_c_z", tmp_path / "pm")
    wait_for(lambda: pipeline.received >= 8, timeout=20, message="8 frames")
    pipeline.close()
    _, names, scale, units, _, _ = _image(pipeline.cfg.out, 0)
    assert "z" in names
    assert (scale["z"], units["z"]) == (0.5, "micrometer")
    assert (scale["x"], units["x"]) == (0.1, "micrometer")  # the pixel size does arrive with frame 0


# -- metadata the bridge cannot send as it is ---------------------------------------------------


def test_metadata_becomes_plain_json():
    """numpy scalars and arrays (a user's own metadata) stay numbers; NaN becomes null, as JSON
    has no NaN (a daemon reading strict JSON would refuse the frame otherwise)."""
    md = {
        "Axes": {"time": np.int64(2), "position": np.int64(1)},
        "n": np.int64(7),
        "roi": np.arange(3),
        "score": float("nan"),
        "gain": np.float32(1.5),
    }
    header = MetadataMapper().header(md, np.dtype("uint16"))
    assert header["index"] == {"t": 2, "p": 1}
    assert header["meta"]["pycromanager"] == {
        "Axes": {"time": 2, "position": 1},
        "n": 7,
        "roi": [0, 1, 2],
        "score": None,
        "gain": 1.5,
    }


def _unsendable(metadata, frame_number):
    """What a user's own processor adds before handing the frame on to livescope: metadata JSON
    cannot hold (tuple keys) on even frames, a mask too large for a header on odd ones, and a
    binning the protocol refuses on all (the numpy array and the NaN are fine: they become JSON)."""
    extra = {"Binning": "128x128", "score": float("nan"), "roi": np.arange(4)}
    if frame_number % 2:
        extra["mask"] = np.zeros(600_000, np.uint8)
    else:
        extra["spots"] = {(3, 4): 0.9}
    return {**metadata, **extra}


@pytest.mark.parametrize("hook_name", ["tap", "restore"])
def test_unsendable_metadata_is_dropped_counted_and_warned_once(camera, daemon, tmp_path, caplog, hook_name):
    """The frame is sent without what cannot travel; each cause is counted and warned about once;
    every frame arrives, routed, and Pycro-Manager saves what the hook returned."""
    pipeline = daemon(engines=["passthrough"] if hook_name == "restore" else [])
    hook = tap(pipeline.cfg.ingest) if hook_name == "tap" else restore(pipeline.cfg.restore, timeout_s=10.0)
    seen = []

    def mine(image, metadata):
        image_out, md = hook(image, _unsendable(metadata, len(seen)))
        seen.append(1)
        # Pycro-Manager saves the hook's frame (restore: the restored one) with its own metadata
        return image_out, {**metadata, **({"livescope": md["livescope"]} if "livescope" in md else {})}

    camera.clear()
    case = "t_c_z"
    with caplog.at_level(logging.WARNING, logger="livescope"):
        with Acquisition(directory=str(tmp_path / "pm"), name=case, image_process_fn=mine) as acq:
            acq.acquire(multi_d_acquisition_events(**CASES[case]))
        hook.close()
    events = multi_d_acquisition_events(**CASES[case])
    n = len(events)
    causes = {
        "unencodable:meta.pycromanager": n // 2,
        "header_too_large:meta.pycromanager": n // 2,
        "bad_field:binning": n,
    }
    if hook_name == "tap":
        wait_for(lambda: pipeline.received >= n, timeout=20, message=f"{n} frames")
        assert hook.stats()["sent"] == n and hook.dropped == 0 and hook.meta_dropped == n
        assert dict(hook.causes) == {f"meta:{k}": v for k, v in causes.items()}
        _check_pycromanager_saved(acq, events, camera)
    else:
        st = hook.stats()
        assert st["served"] == n and st["missed"] == 0, st
        assert st["meta_dropped_by_cause"] == causes
        _check_pycromanager_saved(acq, events, camera, scale=st["scale"])
    for cause in causes:
        assert sum(cause in r.getMessage() for r in caplog.records) == 1, cause
    _check_store(pipeline, events, camera)
