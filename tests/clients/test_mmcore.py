"""The pymmcore-plus bridge driven the way pymmcore-plus and useq users drive it.

Each test builds a real ``UniMMCore`` with Python camera and stage devices, writes its own
``useq.MDASequence`` (default axis orders, files, event iterables), runs it with
``core.mda.run`` or ``core.run_mda``, and receives on a real ``FrameReceiver`` bound to a free
tcp port: every frame must arrive bit-exact with the right index, sizes, channel and acquisition
counter. The frames to compare against are those pymmcore-plus hands its own listeners
(``frameReady``). The ``_e2e`` tests run the same acquisitions into a real daemon and read the
OME-Zarr store back.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import threading
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pymmcore_plus", reason="pymmcore-plus is not installed")
useq = pytest.importorskip("useq", reason="useq-schema is not installed")

from pymmcore_plus.experimental.unicore import (  # noqa: E402
    SimpleCameraDevice,
    StageDevice,
    UniMMCore,
    XYStageDevice,
    pymm_property,
)

from livescope.bridges.mmcore import attach, psygnal_signals  # noqa: E402
from livescope.bridges.transport import FrameReceiver, free_tcp_address  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

SHAPE = (6, 10)
CHANNELS = ("DAPI", "FITC")
_frame_counter = itertools.count(1)


# -- a small rig: every image is new (its own random pixels), so bit-exact means the right frame --


def _pixels(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(next(_frame_counter)).integers(0, 4096, shape, dtype=np.uint16)


class Camera(SimpleCameraDevice):
    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__()
        self._exposure = 1.0
        self._mode = CHANNELS[0]
        self.delay_s = delay_s

    @pymm_property(allowed_values=list(CHANNELS))
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        self._mode = value

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = float(exposure)

    def sensor_shape(self) -> tuple[int, int]:
        return SHAPE

    def dtype(self) -> Any:
        return np.uint16

    def snap(self, buffer: np.ndarray) -> dict[str, Any]:
        if self.delay_s:
            time.sleep(self.delay_s)
        buffer[...] = _pixels(buffer.shape)
        return {"mode": self._mode}


class MultiCamera(Camera):
    """Stands in for Micro-Manager's Multi Camera utility (a C++ adapter UniMMCore cannot load):
    the same ``Physical Camera N`` properties, one image per physical camera per snap."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = names
        self.images: list[np.ndarray] = []

    @pymm_property(name="Physical Camera 1")
    def physical_1(self) -> str:
        return self.names[0]

    @pymm_property(name="Physical Camera 2")
    def physical_2(self) -> str:
        return self.names[1]

    def snap(self, buffer: np.ndarray) -> dict[str, Any]:
        self.images = [_pixels(buffer.shape) for _ in self.names]
        buffer[...] = self.images[0]
        return {"mode": self._mode}


class MultiCameraCore(UniMMCore):
    """What CMMCore answers with a Multi Camera device as the camera: several camera channels and
    one image per channel after each snap; the rest is UniMMCore's (and pymmcore-plus's engine)."""

    def getNumberOfCameraChannels(self) -> int:
        cam = self._py_camera()
        return len(cam.names) if isinstance(cam, MultiCamera) else super().getNumberOfCameraChannels()

    def getImage(self, numChannel: int | None = None, *, fix: bool = True) -> np.ndarray:
        cam = self._py_camera()
        if numChannel is not None and isinstance(cam, MultiCamera):
            return cam.images[numChannel]
        return super().getImage(fix=fix)


class XY(XYStageDevice):
    def __init__(self) -> None:
        super().__init__()
        self.pos = (0.0, 0.0)

    def set_position_um(self, x: float, y: float) -> None:
        self.pos = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self.pos

    def set_origin_x(self) -> None:
        pass

    def set_origin_y(self) -> None:
        pass

    def home(self) -> None:
        pass

    def stop(self) -> None:
        pass


class Focus(StageDevice):
    def __init__(self) -> None:
        super().__init__()
        self.z = 0.0

    def set_position_um(self, val: float) -> None:
        self.z = float(val)

    def get_position_um(self) -> float:
        return self.z

    def set_origin(self) -> None:
        pass

    def home(self) -> None:
        pass

    def stop(self) -> None:
        pass


def _build(core_cls: type = UniMMCore, camera: Camera | None = None) -> Any:
    logging.getLogger("pymmcore-plus").setLevel(logging.CRITICAL)  # it looks for a Micro-Manager install
    with psygnal_signals():
        core = core_cls()
    core.setAutoShutter(False)
    for label, device in (("Camera", camera or Camera()), ("XY", XY()), ("Z", Focus())):
        core.loadPyDevice(label, device)
        core.initializeDevice(label)
    core.setCameraDevice("Camera")
    core.setXYStageDevice("XY")
    core.setFocusDevice("Z")
    for ch in CHANNELS:
        core.defineConfig("Channel", ch, "Camera", "mode", ch)
    core.setChannelGroup("Channel")
    core.definePixelSizeConfig("px")
    core.setPixelSizeUm("px", 0.25)
    core.setPixelSizeConfig("px")
    return core


def _teardown(core: Any) -> None:
    # CMMCore's destructor can abort the interpreter when it runs at exit: unload and drop it now
    if core.isSequenceRunning():
        core.stopSequenceAcquisition()
    core.unloadAllDevices()
    gc.collect()


@pytest.fixture
def core():
    c = _build()
    yield c
    _teardown(c)
    del c
    gc.collect()


class Received:
    """A real ``FrameReceiver`` on a free tcp port, drained on a thread into per-stream lists."""

    def __init__(self) -> None:
        self.address = free_tcp_address()
        self.rx = FrameReceiver(self.address)
        self.frames: dict[str, list[Any]] = {}
        self.ends: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            frame = self.rx.recv(timeout_ms=20)
            if frame is None:
                continue
            if frame.is_end:
                self.ends[frame.stream] += 1
            else:
                self.frames.setdefault(frame.stream, []).append(frame)

    def count(self, stream: str) -> int:
        return len(self.frames.get(stream, []))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.rx.close()


@pytest.fixture
def received():
    r = Received()
    yield r
    r.close()


def _record(core: Any) -> list[tuple[np.ndarray, Any, dict]]:
    """What pymmcore-plus hands its own listeners: the frames to compare against."""
    emitted: list[tuple[np.ndarray, Any, dict]] = []
    core.mda.events.frameReady.connect(lambda img, event, meta: emitted.append((img.copy(), event, dict(meta))))
    return emitted


def _plain(index: Any) -> dict[str, int]:
    return {getattr(k, "value", k): int(v) for k, v in dict(index).items()}


def _check_frames(
    got: list[Any],
    emitted: list[tuple[np.ndarray, Any, dict]],
    *,
    sizes: dict[str, int],
    acquisition: int = 0,
    position=None,
    channel: bool = True,
) -> None:
    """Every emitted frame arrived once, in order, bit-exact, with its index, sizes, channel and
    acquisition; ``position(index)`` gives the expected ``index.p`` (default: useq's ``p``)."""
    assert len(got) == len(emitted), f"{len(got)} frames received, {len(emitted)} acquired"
    for frame, (img, event, _) in zip(got, emitted, strict=True):
        np.testing.assert_array_equal(frame.array, img)
        index = _plain(event.index)
        want = {k: index[k] for k in ("t", "c", "z") if k in index}
        if position is not None:
            want["p"] = position(index)
        elif "p" in index:
            want["p"] = index["p"]
        assert frame.header["index"] == want
        assert frame.header.get("sizes", {}) == sizes
        assert frame.header["acquisition"] == acquisition
        assert frame.header["sender"] == {"dropped": 0, "meta_dropped": 0}
        if channel and event.channel is not None:
            assert frame.header["channel"] == event.channel.config
        assert all(k in want for k in frame.header["index"])


def _sequence(axes: str, axis_order: str | None = None, **extra: Any) -> Any:
    kw: dict[str, Any] = dict(extra)
    if "t" in axes:
        kw["time_plan"] = {"interval": 0, "loops": 2}
    if "p" in axes:
        kw["stage_positions"] = [(0.0, 0.0, 0.0), (10.0, 5.0, 0.0)]
    if "c" in axes:
        kw["channels"] = list(CHANNELS)
    if "z" in axes:
        kw["z_plan"] = {"range": 1.0, "step": 1.0}
    if axis_order is not None:
        kw["axis_order"] = axis_order
    return useq.MDASequence(**kw)


COMBOS = ["".join(c) for n in range(1, 5) for c in itertools.combinations("tpcz", n)]


@pytest.mark.parametrize("order", [None, "tpgcz", "pzct"], ids=["default-order", "tpgcz", "pzct"])
@pytest.mark.parametrize("axes", COMBOS)
def test_every_axis_combination_arrives_bit_exact(core, received, axes, order):
    seq = _sequence(axes, order)
    emitted = _record(core)
    bridge = attach(core, received.address)
    try:
        core.mda.run(seq)
        wait_for(lambda: received.ends["mmcore"] == 1, timeout=10, message="the end marker")
    finally:
        bridge.close()
    assert len(emitted) == 2 ** len(axes)
    _check_frames(received.frames["mmcore"], emitted, sizes={k: 2 for k in axes})
    assert received.rx.stats()["rejected"] == 0 and received.rx.stats()["lost"] == 0
    assert bridge.stats()["meta_dropped"] == 0 and bridge.stats()["causes"] == {}
    first = received.frames["mmcore"][0].header
    assert first["pixel_size_um"] == 0.25 and first["bits"] == 16
    assert useq.MDASequence.model_validate(first["meta"]["sequence"]) == seq  # the plan, with the first frame
    assert "sequence" not in received.frames["mmcore"][-1].header["meta"] or len(emitted) == 1


@pytest.mark.parametrize("case", ["grid-only", "grid-and-positions", "per-position-grids"])
def test_grid_tiles_become_positions(core, received, case):
    grid = {"rows": 1, "columns": 2}
    if case == "grid-only":
        seq = useq.MDASequence(grid_plan=grid, channels=["DAPI"])
        n_pos, pos = 2, lambda i: i["g"]
    elif case == "grid-and-positions":
        seq = useq.MDASequence(
            stage_positions=[(0, 0, 0), (100, 0, 0)], grid_plan=grid, time_plan={"interval": 0, "loops": 2}
        )
        n_pos, pos = 4, lambda i: i["p"] * 2 + i["g"]
    else:  # the first position has a 2x2 grid of its own, the second none: numbered in order
        seq = useq.MDASequence(
            stage_positions=[
                useq.Position(x=0, y=0, sequence=useq.MDASequence(grid_plan={"rows": 2, "columns": 2})),
                useq.Position(x=500, y=0),
            ],
            time_plan={"interval": 0, "loops": 2},
        )
        n_pos, pos = 5, lambda i: i["g"] if i["p"] == 0 else 4
    emitted = _record(core)
    bridge = attach(core, received.address)
    try:
        core.mda.run(seq)
        wait_for(lambda: received.ends["mmcore"] == 1, timeout=10, message="the end marker")
    finally:
        bridge.close()
    sizes = {"p": n_pos} | ({"t": 2} if case != "grid-only" else {"c": 1})
    _check_frames(received.frames["mmcore"], emitted, sizes=sizes, position=pos)
    assert {f.header["index"]["p"] for f in received.frames["mmcore"]} == set(range(n_pos))
    # the tile each position came from stays in the event's metadata
    assert all(
        "g" in f.header["meta"]["event"]["index"] or f.header["index"]["p"] == 4 for f in received.frames["mmcore"]
    )


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_sequence_from_a_file(core, received, tmp_path, fmt):
    import yaml

    seq = _sequence("tcz", stage_positions=[(1.0, 2.0, 0.0)])
    path = tmp_path / f"seq.{fmt}"
    if fmt == "yaml":
        path.write_text(yaml.safe_dump(json.loads(seq.model_dump_json(exclude_unset=True))))
    else:
        path.write_text(seq.model_dump_json(exclude_unset=True))
    loaded = useq.MDASequence.from_file(path)
    emitted = _record(core)
    bridge = attach(core, received.address)
    try:
        core.mda.run(loaded)
        wait_for(lambda: received.ends["mmcore"] == 1, timeout=10, message="the end marker")
    finally:
        bridge.close()
    _check_frames(received.frames["mmcore"], emitted, sizes={"t": 2, "c": 2, "z": 2, "p": 1})


def test_an_event_iterable_goes_without_sizes(core, received):
    events = [
        useq.MDAEvent(index={"t": t, "c": c}, channel={"config": CHANNELS[c], "group": "Channel"})
        for t in range(3)
        for c in range(2)
    ]
    emitted = _record(core)
    bridge = attach(core, received.address)
    try:
        core.run_mda(iter(events)).join(10)  # CMMCorePlus.run_mda: the MDA on its own thread
        wait_for(lambda: received.ends["mmcore"] == 1, timeout=10, message="the end marker")
    finally:
        bridge.close()
    _check_frames(received.frames["mmcore"], emitted, sizes={})


def test_an_iterable_of_grid_events_numbers_tiles_as_they_come(core, received):
    seq = useq.MDASequence(stage_positions=[(0, 0, 0), (50, 0, 0)], grid_plan={"rows": 1, "columns": 2})
    emitted = _record(core)
    bridge = attach(core, received.address)
    try:
        core.mda.run(iter(list(seq)))  # a plain iterator over the sequence's events: no sizes known
        wait_for(lambda: received.ends["mmcore"] == 1, timeout=10, message="the end marker")
    finally:
        bridge.close()
    _check_frames(received.frames["mmcore"], emitted, sizes={}, position=lambda i: i["p"] * 2 + i["g"])


@pytest.mark.parametrize("runner", ["mda.run", "run_mda"])
def test_two_runs_through_one_attach_are_told_apart(core, received, runner, caplog):
    caplog.set_level(logging.INFO, logger="livescope.bridges.mmcore")
    emitted = _record(core)
    bridge = attach(core, received.address)
    try:
        for n in range(2):
            seq = useq.MDASequence(time_plan={"interval": 0, "loops": 4}, channels=list(CHANNELS))
            if runner == "run_mda":
                core.run_mda(seq).join(10)
            else:
                core.mda.run(seq)
            wait_for(lambda n=n: received.ends["mmcore"] == n + 1, timeout=10, message=f"end marker {n}")
    finally:
        bridge.close()
    got = received.frames["mmcore"]
    _check_frames(got[:8], emitted[:8], sizes={"t": 4, "c": 2}, acquisition=0)
    _check_frames(got[8:], emitted[8:], sizes={"t": 4, "c": 2}, acquisition=1)
    assert [f.seq for f in got] == list(range(16))  # seq keeps counting; ``acquisition`` tells runs apart
    assert bridge.stats()["acquisitions"] == 2
    wait_for(
        lambda: sum("frames sent" in r.getMessage() for r in caplog.records) == 2,
        timeout=5,
        message="one line per acquisition",
    )
    lines = [r.getMessage() for r in caplog.records if "frames sent" in r.getMessage()]
    assert lines == ["stream 'mmcore' acquisition 0: 8 frames sent", "stream 'mmcore' acquisition 1: 8 frames sent"]


@pytest.mark.parametrize("mode", ["streams", "channels"])
def test_a_multi_camera_sends_each_camera(received, mode):
    cam = MultiCamera(("Left", "Right"))
    core = _build(MultiCameraCore, cam)
    core.mda.engine.use_hardware_sequencing = False  # one snap per event, one image per camera
    try:
        emitted = _record(core)
        bridge = attach(core, received.address, cameras=mode)
        try:
            core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 2}, channels=list(CHANNELS)))
            wait_for(
                lambda: sum(received.ends.values()) == (2 if mode == "streams" else 1),
                timeout=10,
                message="the end markers",
            )
        finally:
            bridge.close()
    finally:
        _teardown(core)
    assert len(emitted) == 2 * 2 * 2 and {_plain(e.index)["cam"] for _, e, _ in emitted} == {0, 1}
    if mode == "streams":
        assert set(received.frames) == {"mmcore/Left", "mmcore/Right"}
        for k, name in enumerate(("Left", "Right")):
            mine = [e for e in emitted if _plain(e[1].index)["cam"] == k]
            _check_frames(received.frames[f"mmcore/{name}"], mine, sizes={"t": 2, "c": 2})
    else:
        got = received.frames["mmcore"]
        assert len(got) == len(emitted)
        for frame, (img, event, _) in zip(got, emitted, strict=True):
            i = _plain(event.index)
            np.testing.assert_array_equal(frame.array, img)
            assert frame.header["index"] == {"t": i["t"], "c": i["c"] * 2 + i["cam"]}
            assert frame.header["sizes"] == {"t": 2, "c": 4}
            assert frame.header["channel"] == f"{event.channel.config}/{('Left', 'Right')[i['cam']]}"


def test_live_mode_streams_without_taking_images_from_the_buffer(received):
    core = _build(camera=Camera(delay_s=0.004))  # about 250 frames/s, faster than the 30 Hz poll
    try:
        bridge = attach(core, received.address, live_hz=50)
        try:
            core.startContinuousSequenceAcquisition()
            wait_for(lambda: received.count("mmcore-live") >= 5, timeout=10, message="live frames")
            core.stopSequenceAcquisition()
            wait_for(lambda: received.ends["mmcore-live"] == 1, timeout=10, message="the live end marker")
            # the user's own display still gets every image: all of them are in the buffer
            produced = core.getRemainingImageCount()
            buffer = {}
            while core.getRemainingImageCount():
                img, md = core.popNextImageAndMD()
                buffer[int(dict(md)["ImageNumber"])] = img
            assert sorted(buffer) == list(range(produced))
            n_first = received.count("mmcore-live")
            core.startContinuousSequenceAcquisition()  # a second live session: its own acquisition
            wait_for(lambda: received.count("mmcore-live") >= n_first + 2, timeout=10, message="second session")
            core.stopSequenceAcquisition()
            wait_for(lambda: received.ends["mmcore-live"] == 2, timeout=10, message="the second end marker")
        finally:
            bridge.close()
    finally:
        _teardown(core)
    live = received.frames["mmcore-live"]
    first = [f for f in live if f.header["acquisition"] == 0]
    second = [f for f in live if f.header["acquisition"] == 1]
    assert len(first) >= 5 and len(second) >= 1 and len(first) + len(second) == len(live)
    numbers = [int(f.header["meta"]["frame"]["ImageNumber"]) for f in first]
    assert numbers == sorted(set(numbers))  # never the same image twice
    assert len(first) < produced  # the newest image at each poll, not every image
    for f, n in zip(first, numbers, strict=True):
        assert f.header["live"] is True and f.header["channel"] == "DAPI"
        np.testing.assert_array_equal(f.array, buffer[n])
    assert [f.header["index"]["t"] for f in first] == list(range(len(first)))
    assert [f.header["index"]["t"] for f in second] == list(range(len(second)))
    assert "mmcore" not in received.frames  # live frames are not MDA frames


def test_snaps_go_to_their_own_stream_and_mda_snaps_do_not(core, received):
    emitted = _record(core)
    core.mda.engine.use_hardware_sequencing = False  # the MDA snaps each frame: imageSnapped fires
    bridge = attach(core, received.address)
    snapped = []
    try:
        for _ in range(3):
            core.snapImage()
            snapped.append(core.getImage().copy())
        core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 3}))
        wait_for(
            lambda: received.count("mmcore-snap") == 3 and received.ends["mmcore"] == 1,
            timeout=10,
            message="snaps and the MDA",
        )
    finally:
        bridge.close()
    snaps = received.frames["mmcore-snap"]
    assert [f.header["index"] for f in snaps] == [{"t": 0}, {"t": 1}, {"t": 2}]
    for f, img in zip(snaps, snapped, strict=True):
        np.testing.assert_array_equal(f.array, img)
        assert f.header["live"] is True and f.header["channel"] == "DAPI"
    _check_frames(received.frames["mmcore"], emitted, sizes={"t": 3})
    assert received.count("mmcore-snap") == 3  # the MDA's own snaps were not sent twice


def test_metadata_json_cannot_hold_is_dropped_and_counted_not_the_frame(core, received, caplog):
    class Opaque:
        pass

    events = [
        useq.MDAEvent(
            index={"t": t, "r": t % 2},
            metadata={"note": "ok", "weird": Opaque(), "nan": float("nan"), "raw": b"\x00\x01", "big": np.zeros(1000)},
        )
        for t in range(4)
    ]
    emitted = _record(core)
    bridge = attach(core, received.address, camera={"gain": 0.0, "offset": 100})  # gain 0: refused by the daemon
    try:
        with caplog.at_level(logging.INFO, logger="livescope"):
            core.mda.run(events)
            wait_for(
                lambda: any("sent without some metadata" in r.getMessage() for r in caplog.records),
                timeout=10,
                message="the end-of-acquisition line",
            )
    finally:
        bridge.close()
    got = received.frames["mmcore"]
    assert len(got) == 4
    for n, (frame, (img, _event, _)) in enumerate(zip(got, emitted, strict=True)):
        np.testing.assert_array_equal(frame.array, img)
        assert frame.header["index"] == {"t": n}
        assert "camera" not in frame.header  # refused field left out, the frame kept
        meta = frame.header["meta"]["event"]["metadata"]
        assert meta == {"note": "ok"} and frame.header["meta"]["event"]["index"] == {"t": n, "r": n % 2}
        assert frame.header["sender"] == {"dropped": 0, "meta_dropped": n}
    st = bridge.stats()
    assert st["sent"] == 4 and st["dropped"] == 0 and st["meta_dropped"] == 4
    assert st["causes"] == {
        "meta:bad_field:camera": 4,
        "meta:axis:r": 4,
        "meta:unserialisable:Opaque": 4,
        "meta:non_finite_number": 4,
        "meta:bytes": 4,
        "meta:large_array": 4,
    }
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "logged once" in r.getMessage()]
    assert len(warnings) == 6  # once per cause, not once per frame
    assert not any(r.exc_info for r in caplog.records)  # no traceback per frame
    assert any("4 sent without some metadata" in r.getMessage() for r in caplog.records)  # the end-of-run line


def test_without_a_daemon_every_frame_is_counted_dropped(core, caplog):
    address = free_tcp_address()  # nobody listens here
    bridge = attach(core, address, buffer_frames=2)
    t0 = time.monotonic()
    core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 6}))
    assert time.monotonic() - t0 < 2.0  # the MDA is never held up by a missing daemon
    bridge.close(timeout=0.5)
    st = bridge.stats()
    assert st["frames"] == 6 and st["sent"] == 0 and st["dropped"] == 6
    assert st["causes"].get("frame:queue_full", 0) >= 3


def test_attach_refuses_an_unknown_camera_mode_naming_the_choices(core, received):
    with pytest.raises(ValueError, match="'streams'.*'channels'"):
        attach(core, received.address, cameras="tiles")


# -- end to end: the same acquisitions into a real daemon, read back from its OME-Zarr store ----


def _saved_planes(out) -> list[tuple[str, np.ndarray]]:
    import zarr

    from livescope.bridges.store import STATUS, list_images, read_records

    planes = []
    for entry in list_images(out):
        if entry["product"] != "raw":
            continue
        arr = zarr.open_array(str(out / entry["path"] / "0"), mode="r")
        rec = read_records(out / entry["path"])
        for lead in zip(*np.nonzero(rec["status"] == STATUS["saved"]), strict=True):
            planes.append((entry["path"], np.asarray(arr[lead])))
    return planes


def _run_daemon_with(tmp_path, n_frames: int, acquire, **options) -> tuple[dict, list]:
    from livescope.daemon.cli import run_daemon
    from livescope.daemon.config import DaemonConfig

    cfg = DaemonConfig(
        out=tmp_path / "out.zarr",
        ingest=free_tcp_address(),
        publish=free_tcp_address(),
        control=free_tcp_address(),
        source="zmq",
        frames=n_frames,
        exit_on_end=False,
        **options,
    )
    errors: list[BaseException] = []
    done = threading.Event()

    def start(pipeline):
        def go():
            try:
                acquire(cfg.ingest)
            except BaseException as exc:  # reported by the test, not lost on a thread
                errors.append(exc)
            if not done.wait(15):  # the daemon still waits for frames that will not come: stop it
                pipeline.request_stop()

        threading.Thread(target=go, daemon=True).start()

    try:
        summary = run_daemon(cfg, on_started=start)
    finally:
        done.set()
    assert not errors, errors
    return summary, _saved_planes(cfg.out)


def _same_frames(planes: list[tuple[str, np.ndarray]], emitted: list) -> None:
    key = lambda a: a.tobytes()  # noqa: E731
    assert Counter(key(p) for _, p in planes) == Counter(key(img) for img, _, _ in emitted)


@pytest.mark.parametrize("axes", ["t", "tpcz"])
def test_default_sequence_e2e_store_holds_every_frame(core, tmp_path, axes):
    seq = _sequence(axes)
    emitted = _record(core)

    def acquire(address):
        bridge = attach(core, address)
        try:
            core.mda.run(seq)
        finally:
            bridge.close()

    summary, planes = _run_daemon_with(tmp_path, 2 ** len(axes), acquire)
    assert summary["frames"]["saved"] == len(emitted) and summary["frames"]["rejected"] == 0
    _same_frames(planes, emitted)


@pytest.mark.parametrize("send_end", [True, False], ids=["end-markers", "acquisition-field-only"])
def test_two_runs_e2e_store_holds_both(core, tmp_path, send_end):
    emitted = _record(core)

    def acquire(address):
        bridge = attach(core, address, send_end=send_end)
        try:
            for _ in range(2):
                core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 5}))
        finally:
            bridge.close()

    summary, planes = _run_daemon_with(tmp_path, 10, acquire)
    assert summary["frames"]["saved"] == 10
    _same_frames(planes, emitted)
    assert len({path for path, _ in planes}) == 2  # one image per acquisition


def test_multi_camera_e2e_store_holds_each_camera(tmp_path):
    cam = MultiCamera(("Left", "Right"))
    core = _build(MultiCameraCore, cam)
    core.mda.engine.use_hardware_sequencing = False
    try:
        emitted = _record(core)

        def acquire(address):
            bridge = attach(core, address)
            try:
                core.mda.run(useq.MDASequence(time_plan={"interval": 0, "loops": 3}))
            finally:
                bridge.close()

        summary, planes = _run_daemon_with(tmp_path, 6, acquire)
    finally:
        _teardown(core)
    assert summary["frames"]["saved"] == 6
    _same_frames(planes, emitted)
    assert len({path for path, _ in planes}) == 2  # one image per camera


def test_snaps_e2e_store_holds_every_snap(core, tmp_path):
    snapped = []

    def acquire(address):
        bridge = attach(core, address)
        try:
            for _ in range(3):
                core.snapImage()
                snapped.append((core.getImage().copy(), None, None))
        finally:
            bridge.close()

    summary, planes = _run_daemon_with(tmp_path, 3, acquire, save_live=True)  # snaps are previews unless asked
    assert summary["frames"]["saved"] == 3
    _same_frames(planes, snapped)
