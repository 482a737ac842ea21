"""pymmcore-plus bridge: stream every frame of an MDA into livescope without slowing it down.

    handle = attach(core, "tcp://127.0.0.1:5570")
    core.mda.run(sequence)          # as many acquisitions as you like, then
    handle.close()

The MDA thread only puts (image, event, metadata) into a bounded queue; a sender thread builds
the header and sends. A frame that finds the queue full is counted in ``dropped`` and its ``seq``
is skipped, so the daemon counts it as lost: nothing is lost silently. A header the daemon would
refuse, or metadata JSON cannot hold, never costs the frame: the offending part is left out,
counted per cause (``stats()``, the ``sender`` header field) and logged once.

useq keys ``sequence.sizes`` and ``event.index`` with ``useq.Axis`` members unless an
``axis_order`` is given; the bridge sends plain ``p``, ``c``, ``z``, ``t`` and folds the grid
axis ``g`` into the position (docs/bridge_mmcore.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import functools
import json
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import PurePath
from typing import Any

import numpy as np

from ._sender import QueuedSender
from .transport import FramePublisher

__all__ = ["MMCoreBridge", "attach", "json_safe", "psygnal_signals", "release_core"]

log = logging.getLogger(__name__)

INDEX_AXES = ("p", "c", "z", "t")
CAMERA_MODES = ("streams", "channels")
MAX_PLAN_BYTES = 256 * 1024  # the sequence as JSON, sent with each stream's first frame of a run
MAX_LAYOUT_EVENTS = 100_000  # a sequence whose positions have sub-sequences is walked once to lay it out


@contextlib.contextmanager
def psygnal_signals() -> Any:
    """Make a pymmcore-plus core created inside use psygnal signals, even in a process where a
    Qt application exists: livescope runs MDAs on plain threads with no Qt event loop to deliver
    queued Qt signals (and Qt signals would need qtpy)."""
    old = os.environ.get("PYMM_SIGNALS_BACKEND")
    os.environ["PYMM_SIGNALS_BACKEND"] = "psygnal"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYMM_SIGNALS_BACKEND", None)
        else:
            os.environ["PYMM_SIGNALS_BACKEND"] = old


# -- JSON-safe metadata ---------------------------------------------------------------------

_DROP = object()  # a value JSON cannot hold: left out of its container, its cause recorded
MAX_META_DEPTH = 16
MAX_META_ARRAY = 64  # a small array in metadata becomes a list; a larger one is left out


def _key(key: Any) -> str:
    """A metadata key as JSON wants it: useq's ``Axis`` members (and any Enum) by value."""
    if isinstance(key, enum.Enum):
        key = key.value
    return key if type(key) is str else str(key)


def json_safe(obj: Any, drops: list[tuple[str, str]], path: str = "meta", depth: int = 0) -> Any:
    """A copy of ``obj`` that JSON holds: Enum keys and values by value, numpy scalars as numbers,
    small arrays as lists, dates as ISO strings, pydantic models dumped. What cannot be held
    (a non-finite number, bytes, a large array, an unknown object, nesting deeper than
    ``MAX_META_DEPTH``) is left out and recorded in ``drops`` as (cause, where)."""
    if obj is None or type(obj) in (bool, str):
        return obj
    if isinstance(obj, enum.Enum):
        return json_safe(obj.value, drops, path, depth)
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        value = int(obj)
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(obj, (float, np.floating)):
        number = float(obj)
        if math.isfinite(number):
            return number
        drops.append(("non_finite_number", path))
        return _DROP
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, Mapping) or isinstance(obj, (list, tuple, set, frozenset)):
        if depth >= MAX_META_DEPTH:
            drops.append(("too_deep", path))
            return _DROP
        if isinstance(obj, Mapping):
            out: Any = {}
            for k, v in obj.items():
                key = _key(k)
                v = json_safe(v, drops, f"{path}.{key}", depth + 1)
                if v is not _DROP:
                    out[key] = v
            return out
        items = (json_safe(v, drops, f"{path}[{i}]", depth + 1) for i, v in enumerate(obj))
        return [v for v in items if v is not _DROP]
    if isinstance(obj, np.ndarray):
        if obj.size <= MAX_META_ARRAY:
            return json_safe(obj.tolist(), drops, path, depth)
        drops.append(("large_array", path))
        return _DROP
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, datetime.timedelta):
        return obj.total_seconds()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        drops.append(("bytes", path))
        return _DROP
    if hasattr(obj, "model_dump"):  # a pydantic model (useq's)
        try:
            return json_safe(obj.model_dump(mode="json"), drops, path, depth)
        except Exception:
            pass
    drops.append((f"unserialisable:{type(obj).__name__}", path))
    return _DROP


def _axis(key: Any) -> str:
    return key.value if isinstance(key, enum.Enum) else str(key)


def _positive(value: Any) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


# -- one MDA run: its layout, read once at sequenceStarted ---------------------------------


@dataclasses.dataclass
class _Run:
    """What every frame of one acquisition shares. ``position`` folds useq's grid axis into the
    position index: with a sequence-wide grid plan of G tiles, position = p * G + g (``sizes.p``
    = P * G); when positions have grids of their own (sub-sequences) the (p, g) pairs are
    numbered in order; for events from an iterable (sizes unknown) each new (p, g) pair gets the
    next number as it first arrives."""

    acquisition: int
    sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    tiles: int = 0
    positions: dict[tuple[int, int | None], int] | None = None
    dynamic: bool = False  # positions numbered as they arrive
    n_cams: int = 1
    cam_names: tuple[str, ...] = ()
    plan: dict[str, Any] | None = None
    lanes: dict[str, _Lane] = dataclasses.field(default_factory=dict)
    planned: set[str] = dataclasses.field(default_factory=set)  # streams that got the plan
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def position(self, p: int, g: int | None) -> int:
        if self.positions is not None:
            if self.dynamic and g is None:
                return p
            with self.lock:
                n = self.positions.get((p, g))
                if n is None:
                    n = self.positions[(p, g)] = len(self.positions)
                return n
        return p * self.tiles + g if self.tiles and g is not None else p

    def camera_name(self, cam: int) -> str:
        return self.cam_names[cam] if 0 <= cam < len(self.cam_names) else f"camera{cam}"


def _layout(sequence: Any) -> tuple[dict[str, int], int, dict | None, bool]:
    """(sizes, grid tiles per position, (p, g) -> position, numbered as they arrive)."""
    if type(sequence).__name__ == "GeneratorMDASequence":  # events from an iterable: sizes unknown
        return {}, 0, {}, True
    sizes = {_axis(k): int(v) for k, v in dict(sequence.sizes).items() if v}
    if not any(getattr(pos, "sequence", None) is not None for pos in sequence.stage_positions or ()):
        tiles = sizes.pop("g", 0)
        if tiles:
            sizes["p"] = max(sizes.get("p", 1), 1) * tiles
        return {k: sizes[k] for k in INDEX_AXES if k in sizes}, tiles, None, False
    # positions with sub-sequences of their own: lay out what the events will actually carry
    maxes: dict[str, int] = {}
    pairs: set[tuple[int, int | None]] = set()
    for n, event in enumerate(sequence):
        if n >= MAX_LAYOUT_EVENTS:
            return {}, 0, {}, True
        index = {_axis(k): int(v) for k, v in event.index.items()}
        for k, v in index.items():
            maxes[k] = max(maxes.get(k, -1), v)
        pairs.add((index.get("p", 0), index.get("g")))
    order = sorted(pairs, key=lambda pg: (pg[0], -1 if pg[1] is None else pg[1]))
    positions = {pg: i for i, pg in enumerate(order)}
    sizes = {k: maxes[k] + 1 for k in ("c", "z", "t") if k in maxes}
    if "p" in maxes or "g" in maxes:
        sizes["p"] = len(positions)
    return {k: sizes[k] for k in INDEX_AXES if k in sizes}, 0, positions, False


# -- one stream: its own publisher, queue and sender thread ---------------------------------


class _Lane(QueuedSender):
    """The queue and sender of one stream; a payload is (image, header builder, *args), the
    header built on the sender thread."""

    def __init__(self, publisher: FramePublisher, *, buffer_frames: int) -> None:
        super().__init__(
            publisher,
            buffer_frames=buffer_frames,
            end_on_close=False,
            name=f"livescope-mmcore-{publisher.stream}",
            validate=True,
            report_counts=True,
        )
        self.mark: tuple[int, int, int, Counter[str]] = (0, 0, 0, Counter())  # counts at the last report

    def _frame(
        self, image: np.ndarray, build: Callable[..., dict[str, Any]], *args: Any
    ) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            header = build(self, *args)
        except Exception as exc:  # a header we cannot build: the frame goes with a bare one
            self.drop_meta(f"header:{type(exc).__name__}", str(exc)[:200])
            header = {}
        return image, header

    def counts(self) -> tuple[int, int, int, Counter[str]]:
        with self._lock:
            return self.sent, self.dropped, self.meta_dropped, Counter(self.causes)


class MMCoreBridge:
    """See :func:`attach`."""

    def __init__(
        self,
        core: Any,
        address: str,
        *,
        stream: str = "mmcore",
        buffer_frames: int = 256,
        camera: dict[str, Any] | None = None,
        bits: int | None = None,
        send_end: bool = True,
        shm: bool | None = False,
        curve: Any = None,
        cameras: str = "streams",
        live: bool = True,
        live_hz: float = 30.0,
    ) -> None:
        if curve is not None and shm:
            raise ValueError("shm=True and curve: shared memory is same-host only; use one or the other")
        if cameras not in CAMERA_MODES:
            raise ValueError(
                f"cameras={cameras!r}: use 'streams' (one stream per camera of a Multi Camera "
                "device) or 'channels' (the cameras as channels of one stream)"
            )
        if not live_hz > 0:
            raise ValueError(f"live_hz={live_hz!r}: how often live mode is polled, in Hz (e.g. 30)")
        self.core = core
        self.address = address
        self.stream = stream
        self.camera = camera
        self.bits = bits
        self.send_end = send_end
        self.cameras = cameras
        self.live = live
        self.live_hz = float(live_hz)
        self._shm, self._curve, self._buffer_frames = shm, curve, buffer_frames
        self._lanes: dict[str, _Lane] = {}
        self._lanes_lock = threading.Lock()
        self._main = self._lane(stream)  # now: a wrong address or a missing key fails at attach
        self.acquisitions = 0  # MDA runs started since attach; a frame's ``acquisition`` is its run's number
        self.live_sessions = 0
        self._run: _Run | None = None
        self._snaps: Counter[str] = Counter()
        self._warned: set[str] = set()
        self._closed = False
        self._stopping = threading.Event()
        self._live_wake = threading.Event()
        self._slots: list[tuple[Any, Callable[..., Any]]] = [
            (core.mda.events.frameReady, self._on_frame),
            (core.mda.events.sequenceStarted, self._on_sequence),
            (core.mda.events.sequenceFinished, self._on_finished),
        ]
        self._live_thread: threading.Thread | None = None
        if live:
            ev = core.events
            self._slots += [(ev.imageSnapped, self._on_snap)]
            self._slots += [
                (getattr(ev, name), self._wake_live)
                for name in ("continuousSequenceAcquisitionStarted", "sequenceAcquisitionStarted")
                if hasattr(ev, name)
            ]
            self._live_thread = threading.Thread(target=self._live_loop, name="livescope-mmcore-live", daemon=True)
            self._live_thread.start()
        for signal, slot in self._slots:
            signal.connect(slot)

    # -- streams ---------------------------------------------------------------------------
    def _publisher(self, stream: str) -> FramePublisher:
        if self._shm is False or self._curve is not None:  # curve: a livescope.bridges.auth.CurveClient
            return FramePublisher(
                self.address, stream=stream, block=True, send_timeout_ms=2000, hwm=16, curve=self._curve
            )
        from .shm import make_publisher  # same-host shared memory (None: when the address is on this machine)

        return make_publisher(self.address, stream, shm=self._shm, block=True, send_timeout_ms=2000, hwm=16)

    def _lane(self, stream: str) -> _Lane:
        lane = self._lanes.get(stream)
        if lane is None:
            with self._lanes_lock:
                lane = self._lanes.get(stream)
                if lane is None:
                    lane = self._lanes[stream] = _Lane(self._publisher(stream), buffer_frames=self._buffer_frames)
        return lane

    @property
    def publisher(self) -> FramePublisher:
        """The publisher of the main stream (an MDA's frames from a single camera)."""
        return self._main.publisher

    @property
    def seq(self) -> int:
        return sum(lane.seq for lane in list(self._lanes.values()))

    @property
    def sent(self) -> int:
        return sum(lane.sent for lane in list(self._lanes.values()))

    @property
    def dropped(self) -> int:
        return sum(lane.dropped for lane in list(self._lanes.values()))

    @property
    def meta_dropped(self) -> int:
        return sum(lane.meta_dropped for lane in list(self._lanes.values()))

    def _warn_once(self, key: str, msg: str, *args: Any, exc_info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg + " (logged once)", *args, exc_info=exc_info)

    # -- MDA: sequenceStarted / frameReady / sequenceFinished (the MDA thread) ------------
    def _on_sequence(self, sequence: Any, *_: Any) -> None:
        acquisition = self.acquisitions
        self.acquisitions += 1
        try:
            self._run = self._new_run(sequence, acquisition)
        except Exception:
            self._warn_once(
                "layout",
                "could not read the layout of acquisition %d: its frames go without sizes",
                acquisition,
                exc_info=True,
            )
            self._run = _Run(acquisition, positions={}, dynamic=True)

    def _new_run(self, sequence: Any, acquisition: int) -> _Run:
        sizes, tiles, positions, dynamic = _layout(sequence)
        info: dict[str, Any] = {}
        time_plan = getattr(sequence, "time_plan", None)
        interval = getattr(time_plan, "interval", None)
        if interval is not None:
            seconds = _positive(getattr(interval, "total_seconds", lambda: interval)())
            if seconds:  # an interval of 0 (as fast as possible) says nothing of the timing
                info["interval_s"] = seconds
        z_step = _positive(getattr(getattr(sequence, "z_plan", None), "step", None))
        if z_step:
            info["z_step_um"] = z_step
        info.update(self._camera_geometry())
        n_cams, cam_names = self._camera_channels()
        if n_cams > 1 and self.cameras == "channels" and sizes:
            sizes["c"] = max(sizes.get("c", 1), 1) * n_cams
        plan = None
        if type(sequence).__name__ != "GeneratorMDASequence":
            drops: list[tuple[str, str]] = []
            plan = json_safe(sequence.model_dump(mode="json", exclude_unset=True), drops, "meta.sequence")
            if len(json.dumps(plan)) > MAX_PLAN_BYTES:  # thousands of positions: not in a frame header
                self._warn_once(
                    "plan",
                    "acquisition %d: the sequence is too large to go with its first frame "
                    "(over %d bytes of JSON); its frames go without it",
                    acquisition,
                    MAX_PLAN_BYTES,
                )
                plan = None
        return _Run(acquisition, sizes, info, tiles, positions, dynamic, n_cams, cam_names, plan)

    def _camera_geometry(self) -> dict[str, Any]:
        """Pixel-size affine (camera pixels -> stage um), binning and bit depth, read once per
        acquisition."""
        core = self.core
        out: dict[str, Any] = {}
        try:
            affine = [float(v) for v in core.getPixelSizeAffine()]
            if affine[0] * affine[4] - affine[1] * affine[3] != 0:  # all zeros: no pixel size configured
                out["pixel_size_affine"] = affine
        except Exception:
            pass
        try:
            out["binning"] = int(str(core.getProperty(core.getCameraDevice(), "Binning")).split("x")[0])
        except Exception:
            pass
        if self.bits:
            out["bits"] = int(self.bits)
        else:
            try:
                depth = int(core.getImageBitDepth())
                if depth > 0:
                    out["bits"] = depth
            except Exception:
                pass
        return out

    def _camera_channels(self) -> tuple[int, tuple[str, ...]]:
        try:
            n = max(1, int(self.core.getNumberOfCameraChannels()))
        except Exception:
            return 1, ()
        names = []
        for i in range(n):
            try:
                names.append(str(self.core.getPhysicalCameraDevice(i)))
            except Exception:
                names.append(f"camera{i}")
        return n, tuple(names)

    def _on_frame(self, image: np.ndarray, event: Any, meta: Any) -> None:
        """The MDA thread: pick the stream, queue the frame; never raises, never waits."""
        try:
            run = self._run
            if run is None:  # frameReady without sequenceStarted: a run of unknown layout
                run = self._run = _Run(self.acquisitions, positions={}, dynamic=True)
                self.acquisitions += 1
            lane = self._main
            cam = event.index.get("cam")
            if cam is not None and self.cameras == "streams":
                name = (meta or {}).get("camera_device") or run.camera_name(int(cam))
                try:
                    lane = self._lane(f"{self.stream}/{name}")
                except Exception:
                    self._warn_once(
                        "camera-stream",
                        "no stream for camera %r: its frames go to %r",
                        name,
                        self.stream,
                        exc_info=True,
                    )
            if lane.publisher.stream not in run.lanes:
                run.lanes[lane.publisher.stream] = lane
            lane.enqueue(image, self._mda_header, event, meta, run)
        except Exception:
            self._main.count_lost("bridge_error", "the bridge could not queue a frame")
            self._warn_once("on_frame", "the bridge could not queue a frame", exc_info=True)

    def _on_finished(self, sequence: Any, *_: Any) -> None:
        run = self._run
        lanes = list(run.lanes.values()) if run is not None and run.lanes else [self._main]
        acquisition = run.acquisition if run is not None else self.acquisitions - 1
        for lane in lanes:
            lane.end(send=self.send_end, report=functools.partial(self._report, lane, f"acquisition {acquisition}"))

    def _report(self, lane: _Lane, what: str) -> None:
        """Sender thread, once the acquisition's frames are out: one line per stream."""
        sent, dropped, meta_dropped, causes = lane.counts()
        s0, d0, m0, c0 = lane.mark
        lane.mark = (sent, dropped, meta_dropped, causes)
        new = {k: v - c0.get(k, 0) for k, v in causes.items() if v > c0.get(k, 0)}
        n_sent, n_dropped, n_meta = sent - s0, dropped - d0, meta_dropped - m0
        if n_sent == 0 and n_dropped:
            log.warning(
                "stream %r %s: none of its %d frames reached the daemon at %s: is `livescope daemon` "
                "running with --ingest %s? (%s)",
                lane.publisher.stream,
                what,
                n_dropped,
                self.address,
                self.address,
                _causes(new),
            )
        elif n_dropped or n_meta:
            log.warning(
                "stream %r %s: %d frames sent, %d dropped, %d sent without some metadata (%s)",
                lane.publisher.stream,
                what,
                n_sent,
                n_dropped,
                n_meta,
                _causes(new),
            )
        else:
            log.info("stream %r %s: %d frames sent", lane.publisher.stream, what, n_sent)

    # -- sender thread: header of an MDA frame ---------------------------------------------
    def _mda_header(self, lane: _Lane, event: Any, meta: Any, run: _Run) -> dict[str, Any]:
        raw = {_axis(k): v for k, v in dict(event.index).items()}
        index: dict[str, int] = {}
        for k, v in raw.items():
            if k in INDEX_AXES:
                index[k] = int(v)
            elif k not in ("g", "cam"):
                lane.drop_meta(
                    f"axis:{k}",
                    f"index axis {k!r} has no place in livescope's p, c, z, t: frames "
                    f"that differ only in {k!r} share an index (its value stays in meta.event.index)",
                )
        if "p" in raw or "g" in raw or run.positions:
            g = raw.get("g")
            index["p"] = run.position(index.get("p", 0), None if g is None else int(g))
        channel = event.channel.config if event.channel is not None else None
        cam = raw.get("cam")
        if cam is not None and self.cameras == "channels":
            index["c"] = index.get("c", 0) * run.n_cams + int(cam)
            name = (meta or {}).get("camera_device") or run.camera_name(int(cam))
            channel = f"{channel}/{name}" if channel else name
        header: dict[str, Any] = {"acquisition": run.acquisition, "index": index}
        if run.sizes:
            header["sizes"] = dict(run.sizes)
        header.update(run.info)
        if channel is not None:
            header["channel"] = str(channel)
        meta = dict(meta or {})
        px = _positive(meta.get("pixel_size_um"))
        if px:
            header["pixel_size_um"] = px
        if meta.get("runner_time_ms") is not None:
            try:
                seconds = float(meta["runner_time_ms"]) / 1000.0
                if math.isfinite(seconds):
                    header["time"] = seconds
            except (TypeError, ValueError):
                pass
        drops: list[tuple[str, str]] = []
        if self.camera:
            header["camera"] = json_safe(self.camera, drops, "camera")
        meta.pop("mda_event", None)  # the event goes once, dumped below
        out = {"frame": json_safe(meta, drops, "meta.frame"), "event": self._event_json(event, drops)}
        stream = lane.publisher.stream
        if run.plan is not None and stream not in run.planned:  # the plan, once per stream and acquisition
            run.planned.add(stream)
            out["sequence"] = run.plan
        header["meta"] = out
        for cause, where in drops:
            lane.drop_meta(cause, where)
        return header

    @staticmethod
    def _event_json(event: Any, drops: list[tuple[str, str]]) -> Any:
        try:
            dumped = event.model_dump(mode="json", exclude_unset=True, exclude={"sequence"})
        except Exception:  # user metadata pydantic cannot dump: ours keeps what JSON can hold
            dumped = event.model_dump(exclude_unset=True, exclude={"sequence"})
        out = json_safe(dumped, drops, "meta.event")
        return {} if out is _DROP else out

    # -- live mode and snaps -----------------------------------------------------------------
    def _wake_live(self, *_: Any) -> None:
        self._live_wake.set()

    def _live_loop(self) -> None:
        """Waits for live mode (woken by the core's signals, and every 0.5 s), then follows it."""
        while not self._stopping.is_set():
            self._live_wake.wait(0.5)
            self._live_wake.clear()
            if self._stopping.is_set():
                return
            try:
                core = self.core
                if core.isSequenceRunning() and not core.mda.is_running():
                    self._live_session()
            except Exception:
                self._warn_once("live", "following live mode failed; live frames are not streamed", exc_info=True)

    def _live_session(self) -> None:
        """Peek at the newest image of Micro-Manager's circular buffer ``live_hz`` times a second
        while a sequence acquisition runs outside an MDA: never ``popNextImage``, so the user's
        own display gets every image it would get without livescope."""
        core = self.core
        lane = self._lane(f"{self.stream}-live")
        acquisition = self.live_sessions
        self.live_sessions += 1
        info = self._preview_info()
        period = 1.0 / self.live_hz
        t, last_key, last_image = 0, None, None
        while True:
            if core.mda.is_running():  # an MDA took the camera: its frames come as frameReady
                break
            running = core.isSequenceRunning()
            try:
                image, md = core.getLastImageAndMD()
            except (IndexError, RuntimeError, ValueError):  # nothing in the buffer yet
                image = None
            if image is not None:
                tags = {str(k): v for k, v in dict(md).items()}
                number = tags.get("ImageNumber")
                key = (tags.get("Camera"), number) if number not in (None, "") else None
                if key is not None:
                    new = key != last_key
                else:  # a camera that numbers nothing: compare pixels
                    new = last_image is None or not np.array_equal(image, last_image)
                if new:
                    lane.enqueue(image, self._live_header, t, acquisition, tags, info)
                    t, last_key, last_image = t + 1, key, (image if key is None else None)
            if not running or self._stopping.wait(period):
                break
        if t:
            lane.end(send=self.send_end, report=functools.partial(self._report, lane, f"live session {acquisition}"))

    def _preview_info(self) -> dict[str, Any]:
        core, info = self.core, self._camera_geometry()
        try:
            group = core.getChannelGroup()
            if group:
                info["channel"] = str(core.getCurrentConfig(group))
        except Exception:
            pass
        try:
            px = _positive(core.getPixelSizeUm())
            if px:
                info["pixel_size_um"] = px
        except Exception:
            pass
        if not info.get("channel"):
            info.pop("channel", None)
        return info

    def _live_header(
        self, lane: _Lane, t: int, acquisition: int, tags: dict[str, Any], info: dict[str, Any]
    ) -> dict[str, Any]:
        header: dict[str, Any] = {"acquisition": acquisition, "index": {"t": t}, "live": True, **info}
        try:
            seconds = float(tags.get("ElapsedTime-ms", "nan")) / 1000.0
            if math.isfinite(seconds):
                header["time"] = seconds
        except (TypeError, ValueError):
            pass
        drops: list[tuple[str, str]] = []
        if self.camera:
            header["camera"] = json_safe(self.camera, drops, "camera")
        header["meta"] = {"mode": "live", "frame": json_safe(tags, drops, "meta.frame")}
        for cause, where in drops:
            lane.drop_meta(cause, where)
        return header

    def _on_snap(self, *_: Any) -> None:
        """``core.snapImage()`` outside an MDA (the MDA's own snaps arrive as frameReady)."""
        try:
            core = self.core
            if core.mda.is_running():
                return
            n = max(1, int(core.getNumberOfCameraChannels()))
            info = self._preview_info()
            names = self._camera_channels()[1] if n > 1 else ()
            for i in range(n):
                image = np.array(core.getImage(i) if n > 1 else core.getImage(), copy=True)
                extra: dict[str, Any] = {}
                if n > 1 and self.cameras == "streams":
                    stream = f"{self.stream}/{names[i]}-snap"
                else:
                    stream = f"{self.stream}-snap"
                    if n > 1:
                        extra = {"c": i, "channel": names[i]}
                t = self._snaps[stream]
                self._snaps[stream] += 1
                self._lane(stream).enqueue(image, self._snap_header, t, extra, info)
        except Exception:
            self._warn_once("snap", "the bridge could not take a snapped image", exc_info=True)

    def _snap_header(self, lane: _Lane, t: int, extra: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
        index = {"t": t, **({"c": extra["c"]} if "c" in extra else {})}
        header: dict[str, Any] = {"acquisition": 0, "index": index, "live": True, **info, "meta": {"mode": "snap"}}
        if "channel" in extra:
            header["channel"] = extra["channel"]
        if self.camera:
            drops: list[tuple[str, str]] = []
            header["camera"] = json_safe(self.camera, drops, "camera")
            for cause, where in drops:
                lane.drop_meta(cause, where)
        return header

    # -- the handle ----------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counts over every stream, and per stream: frames queued, sent, dropped (never reached
        the daemon), meta_dropped (sent with some metadata left out), and why (``causes``)."""
        streams: dict[str, dict[str, Any]] = {}
        causes: Counter[str] = Counter()
        for name, lane in list(self._lanes.items()):
            sent, dropped, meta_dropped, lane_causes = lane.counts()
            streams[name] = {**lane.stats(), "meta_dropped": meta_dropped, "causes": dict(lane_causes)}
            causes.update(lane_causes)
        total = {
            k: sum(s[k] for s in streams.values()) for k in ("frames", "sent", "dropped", "queued", "meta_dropped")
        }
        return {
            **total,
            "causes": dict(causes),
            "acquisitions": self.acquisitions,
            "live_sessions": self.live_sessions,
            "streams": streams,
        }

    def close(self, timeout: float = 10.0) -> None:
        """Detach from the core, send what is queued, close the sockets."""
        if self._closed:
            return
        self._closed = True
        for signal, slot in self._slots:
            try:
                signal.disconnect(slot)
            except Exception:
                pass
        deadline = time.monotonic() + timeout
        self._stopping.set()
        self._live_wake.set()
        if self._live_thread is not None:
            self._live_thread.join(max(0.0, min(2.0, deadline - time.monotonic())))
        for lane in list(self._lanes.values()):
            lane.close(max(0.05, deadline - time.monotonic()))

    def __enter__(self) -> MMCoreBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _causes(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "no cause recorded"


def release_core(core: Any) -> None:
    """Let go of a core this process made and will not use again: cancel its MDA, unload its
    devices, and stop its notification thread. MMCore (12.x) delivers notifications (the unload's
    "system configuration loaded" among them) into Python from a thread of its own; one still
    waiting for the GIL when the interpreter finalizes aborts the process ("terminate called
    without an active exception": Python ends the thread inside a C++ destructor). Unregistering
    the callback delivers or drops what is queued and joins that thread (pymmcore releases the
    GIL meanwhile); the core's pymmcore-plus events end with it. Never for a user's core that
    lives on (the bridge only listens to those)."""
    try:
        if core.mda.is_running():
            core.mda.cancel()
        core.unloadAllDevices()
    except Exception:  # at exit, or a device that fails to unload: nothing more to do
        log.debug("unloading the core's devices failed", exc_info=True)
    try:
        import pymmcore

        pymmcore.CMMCore.registerCallback(core, None)  # CMMCorePlus disallows its own override
    except Exception:  # no pymmcore, or a core that has none
        log.debug("unregistering the core's callback failed", exc_info=True)


def attach(core: Any, address: str, **kwargs: Any) -> MMCoreBridge:
    """Stream what ``core`` (a ``CMMCorePlus`` or ``UniMMCore``) acquires to a livescope daemon's
    ingest ``address``, until ``close()``. Attach once, run as many acquisitions as you like.

    - every MDA frame (``core.mda.run`` / ``core.run_mda``, from a ``useq.MDASequence`` or an
      iterable of ``MDAEvent``) goes to stream ``stream`` (default ``"mmcore"``), each with its
      ``acquisition`` number (0, 1, 2... per ``sequenceStarted``); an end marker follows each run;
    - with a Multi Camera device, each camera's frames go to ``f"{stream}/{camera}"``
      (``cameras="streams"``, default) or become channels of ``stream`` (``cameras="channels"``);
    - ``live=True`` (default): live mode (a sequence acquisition outside an MDA) is followed at
      ``live_hz`` into ``f"{stream}-live"`` and snaps go to ``f"{stream}-snap"``, both flagged
      ``live: true``, without taking images from Micro-Manager's circular buffer.

    Other options: ``buffer_frames`` (queue per stream, default 256), ``camera`` ({offset, gain,
    read_noise}), ``bits`` (default: the core's bit depth), ``send_end``, ``shm``, ``curve``.
    See docs/bridge_mmcore.md.
    """
    return MMCoreBridge(core, address, **kwargs)
