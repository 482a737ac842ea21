"""Pycro-Manager bridge: factories for the hooks of ``pycromanager.Acquisition``.

    hook = tap("tcp://127.0.0.1:5570")                    # stream every frame, save raw as usual
    with Acquisition(directory, "run", image_process_fn=hook) as acq:
        acq.acquire(multi_d_acquisition_events(num_time_points=100))
    hook.close()

Four hooks, one per way Pycro-Manager hands over images:

- :func:`tap`: an ``image_process_fn(image, metadata)`` that forwards the frame and returns it
  unchanged. It never blocks: the acquisition thread only puts the frame in a bounded queue, a
  sender thread builds the header and sends; a frame that finds the queue full is counted in
  ``dropped`` and its ``seq`` skipped, so the daemon records it as lost.
- :func:`restore`: an ``image_process_fn`` that waits (bounded) for the daemon's restored frame
  and returns it in the input dtype with one scale fixed for the whole acquisition, so
  Micro-Manager saves restored data at capture time. It slows the acquisition to the engines'
  latency. On timeout or any error the raw frame is returned, tagged, and the miss counted.
- :func:`feedback`: :func:`tap` with the three-argument signature ``(image, metadata,
  event_queue)``; a policy fed by the daemon's events (:class:`~livescope.bridges.feedback.
  EventFollower`) puts the next acquisition events into ``event_queue``.
- :func:`saved_tap`: an ``image_saved_fn(axes, dataset)`` that reads each frame back from the
  NDTiff dataset once it is on disk and forwards it, for data rates above what the Java-Python
  bridge carries.

Pycro-Manager reads a hook's parameter count with ``inspect.signature`` on every frame; our hooks
are objects whose ``__call__`` has exactly two (or three) parameters, and a user function given
as ``then=`` is inspected once, here.

Pycro-Manager metadata -> livescope header (see :class:`MetadataMapper`): ``Axes`` {position,
channel, z, time} -> ``index`` {p, c, z, t} (names and labels get stable integers in first-seen
order; the name goes in ``channel``), ``PixelSize_um``/``PixelSizeUm`` -> ``pixel_size_um``,
``ElapsedTime-ms`` -> ``time``, ``BitDepth`` -> ``bits``, ``Binning`` -> ``binning``,
``PixelSizeAffine`` -> ``pixel_size_affine``; the whole metadata dict travels in ``meta``.
"""

from __future__ import annotations

import collections
import inspect
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from ._sender import QueuedSender
from .feedback import AdaptiveTimelapse, EventFollower
from .protocol import MAX_HEADER_BYTES, MAX_NAME
from .transport import FramePublisher, RestoreClient

__all__ = [
    "AdaptiveTimelapseEvents",
    "FeedbackTap",
    "MetadataMapper",
    "RestoreHook",
    "SavedTap",
    "Tap",
    "feedback",
    "restore",
    "saved_tap",
    "tap",
]

log = logging.getLogger(__name__)

_STANDARD_AXES = ("time", "channel", "z")
MAX_BINNING = 64  # what the wire protocol accepts (bridges/protocol.py)
META_BYTES = MAX_HEADER_BYTES // 2  # Pycro-Manager's metadata in a header: at most half of one


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):  # numpy scalars stay numbers (np.int64 is no JSON int)
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _json_text(obj: Any) -> str:
    """``obj`` as JSON text: numpy scalars and arrays as numbers and lists, anything else JSON has
    no type for as its ``str``. Raises (TypeError, ValueError, RecursionError) for what JSON
    cannot hold at all: a dict with tuple keys, a self-referencing dict."""
    return json.dumps(obj, default=_json_default)


def _from_json_text(text: str) -> Any:
    return json.loads(text, parse_constant=lambda _: None)  # NaN and infinities: null, as JSON has neither


def _jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values (see :func:`_json_text`)."""
    return _from_json_text(_json_text(obj))


def _hashable(value: Any) -> Hashable:
    """An axis value as a table key: lists and dicts (a user's own axis) by their JSON text."""
    try:
        hash(value)
    except TypeError:
        return json.dumps(value, sort_keys=True, default=_json_default)
    return value


def _number(value: Any) -> float | None:
    """A finite float from a Micro-Manager tag (tags are often strings: ``"16"``, ``"0.1"``)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _leading_int(value: Any) -> int | None:
    """``2``, ``"2"`` and ``"2x2"`` (cameras spell binning both ways) -> 2."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = str(value).strip()
    digits = ""
    for ch in text:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


class MetadataMapper:
    """Turns one Pycro-Manager image's metadata into livescope header fields.

    Axis values that are non-negative integers are used as they are; any other value (a channel
    name, a position label, a negative z of an explore acquisition, a row/column tile) gets the
    next free integer the first time it is seen, and keeps it for the whole acquisition. Axes
    other than time, channel and z (``position``, ``row``, ``column``, ``view``, ``camera``, ...)
    together name the position ``p``: every tile or view gets its own position in the store.

    The z step is in no single frame's metadata: it is ``ZPosition_um_Intended`` of two planes of
    one position over their z distance, known from the second plane on (``z_step_um``).
    What the wire protocol would refuse is left out of the header and listed in ``problems`` as
    (cause, detail): metadata JSON cannot hold or larger than half a header (``meta``), a binning
    above 64, a channel name longer than 200 characters. The frame goes without it.
    """

    def __init__(self, channels: Sequence[str] | None = None) -> None:
        self._tables: dict[str, dict[tuple[str, Hashable], int]] = {"p": {}, "c": {}, "z": {}}  # (type, value)
        self._taken: dict[str, set[int]] = {"p": set(), "c": set(), "z": set()}
        self.channel_names: list[str] = []
        self.z_step_um: float | None = None
        self._z_seen: dict[Hashable, tuple[int, float]] = {}  # position -> (z axis value, z um)
        self.problems: list[tuple[str, str]] = []  # what the last header() left out: (cause, detail)
        for name in channels or ():
            self._index("c", str(name))
            self.channel_names.append(str(name))

    def _index(self, key: str, value: Any) -> int:
        value = _hashable(value)
        table = self._tables[key]
        # 1 and True, 0 and "0" must not share an entry: key the table by (type, value)
        slot = (type(value).__name__, value)
        idx = table.get(slot)
        if idx is None:
            taken = self._taken[key]
            direct = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 0
            if direct and value not in taken:
                idx = int(value)
            else:
                idx = max(taken, default=-1) + 1
            table[slot] = idx
            taken.add(idx)
        return idx

    def mapping(self) -> dict[str, dict[str, int]]:
        """Which axis value went to which index (recorded in every frame's ``meta``)."""
        return {k: {str(v[1]): i for v, i in t.items()} for k, t in self._tables.items() if t}

    def _learn_z_step(self, position: Hashable, z: Any, z_um: Any) -> None:
        """The first two planes of one position with different z give the step (rounded to the
        picometre: ``np.arange`` leaves 0.30000000000000004 where the user asked for 0.3)."""
        z_um = _number(z_um)
        if self.z_step_um is not None or z_um is None or isinstance(z, bool) or not isinstance(z, (int, np.integer)):
            return
        seen = self._z_seen.setdefault(position, (int(z), z_um))
        if seen[0] != z:
            step = round(abs((z_um - seen[1]) / (int(z) - seen[0])), 6)
            if step > 0:
                self.z_step_um = step

    def header(
        self, metadata: Mapping[str, Any], dtype: np.dtype | None = None, axes: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        md = metadata or {}
        axes = dict(axes if axes is not None else (md.get("Axes") or {}))
        self.problems = []
        index: dict[str, int] = {}
        header: dict[str, Any] = {}
        t = axes.get("time")
        if isinstance(t, (int, np.integer)) and not isinstance(t, bool) and t >= 0:
            index["t"] = int(t)  # otherwise the daemon numbers the frames of each (p, c, z) itself
        channel = axes.get("channel")
        if channel is not None:
            index["c"] = self._index("c", channel)
            if isinstance(channel, str) and len(channel) > MAX_NAME:
                self.problems.append(
                    (
                        "bad_field:channel",
                        f"a channel name of {len(channel)} characters "
                        f"(at most {MAX_NAME}): frames keep their channel index, not the name",
                    )
                )
            elif isinstance(channel, str):
                header["channel"] = channel
                if channel not in self.channel_names:
                    self.channel_names.append(channel)
        elif isinstance(md.get("Channel"), str) and md["Channel"]:
            header["channel"] = md["Channel"]
        others = sorted(
            ((str(k), _hashable(v)) for k, v in axes.items() if k not in _STANDARD_AXES and v is not None),
            key=lambda kv: (kv[0], str(kv[1])),
        )
        position: Hashable = None
        if others:
            position = others[0][1] if len(others) == 1 and others[0][0] == "position" else tuple(others)
            index["p"] = self._index("p", position)
        if axes.get("z") is not None:
            index["z"] = self._index("z", axes["z"])
            self._learn_z_step(position, axes["z"], md.get("ZPosition_um_Intended"))
            if self.z_step_um is not None:
                header["z_step_um"] = self.z_step_um
        header["index"] = index
        px = _number(md.get("PixelSize_um"))  # AcqEngJ/AcqEngPy spelling
        if not px or px <= 0:
            px = _number(md.get("PixelSizeUm"))  # MMCore's image tag
        if px and px > 0:
            header["pixel_size_um"] = px
        elapsed = _number(md.get("ElapsedTime-ms"))
        if elapsed is not None and elapsed >= 0:
            header["time"] = elapsed / 1000.0
        bits = _leading_int(md.get("BitDepth"))
        if bits and dtype is not None and np.dtype(dtype).kind in "ui" and 1 <= bits <= np.dtype(dtype).itemsize * 8:
            header["bits"] = bits
        binning = _leading_int(md.get("Binning"))
        if binning is None and md.get("Camera"):
            binning = _leading_int(md.get(f"{md['Camera']}-Binning"))
        if binning and 0 < binning <= MAX_BINNING:
            header["binning"] = binning
        elif binning:
            self.problems.append(("bad_field:binning", f"binning {binning} (1 to {MAX_BINNING})"))
        affine = md.get("PixelSizeAffine")
        if isinstance(affine, str):
            numbers = [_number(x) for x in affine.split(";")]
            if len(numbers) == 6 and all(n is not None for n in numbers) and any(numbers):
                header["pixel_size_affine"] = numbers
        meta: dict[str, Any] = {}
        for key, value in (("pycromanager", md), ("axes", axes)):
            try:
                text = _json_text(dict(value))
            except (TypeError, ValueError, RecursionError) as exc:  # the frame goes without it
                self.problems.append((f"unencodable:meta.{key}", f"{type(exc).__name__}: {exc}"[:200]))
                continue
            if len(text) > META_BYTES:
                self.problems.append(
                    (
                        f"header_too_large:meta.{key}",
                        f"{len(text)} bytes of metadata (at most {META_BYTES} travel with a frame)",
                    )
                )
                continue
            meta[key] = _from_json_text(text)
        meta["axes_to_index"] = self.mapping()
        if self.channel_names:
            meta["channels"] = list(self.channel_names)
        header["meta"] = meta
        return header


def _call_arity(fn: Callable[..., Any]) -> int:
    """2 or 3, read once: Pycro-Manager accepts exactly these two hook signatures."""
    n = len(inspect.signature(fn).parameters)
    if n not in (2, 3):
        raise TypeError(
            f"{fn!r} takes {n} parameters; an image_process_fn takes (image, metadata) "
            "or (image, metadata, event_queue)"
        )
    return n


class Tap(QueuedSender):
    """``image_process_fn(image, metadata)``: forward the frame, return it unchanged (see :func:`tap`)."""

    def __init__(
        self,
        address: str,
        *,
        stream: str = "pycromanager",
        buffer_frames: int = 256,
        channels: Sequence[str] | None = None,
        camera: dict[str, Any] | None = None,
        bits: int | None = None,
        send_end: bool = True,
        then: Callable[..., Any] | None = None,
        curve: Any = None,
    ) -> None:
        self.stream = stream
        self.camera = camera
        self.bits = bits
        self.send_end = send_end
        self.mapper = MetadataMapper(channels)
        self._then = then
        self._then_arity = _call_arity(then) if then is not None else 0
        # curve: a livescope.bridges.auth.CurveClient, for a daemon that runs CURVE
        publisher = FramePublisher(address, stream=stream, block=True, send_timeout_ms=2000, hwm=16, curve=curve)
        # validate: a header field the daemon would refuse (or that cannot be encoded) is dropped
        # from that frame, counted per cause and warned about once; the frame itself is sent
        super().__init__(
            publisher,
            buffer_frames=buffer_frames,
            end_on_close=send_end,
            name="livescope-pycromanager-sender",
            validate=True,
        )

    # -- acquisition thread: a queue entry, never a wait ----------------------------------
    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> Any:
        return self._forward_then(image, metadata, None)

    def _forward_then(self, image: np.ndarray, metadata: dict[str, Any], event_queue: Any) -> Any:
        # a user function downstream may change the frame in place: then we keep a copy
        self._enqueue(image if self._then is None else image.copy(), metadata)
        if self._then is None:
            return image, metadata
        if self._then_arity == 3:
            return self._then(image, metadata, event_queue)
        return self._then(image, metadata)

    def _enqueue(self, image: np.ndarray, metadata: Mapping[str, Any]) -> None:
        # a shallow copy: Pycro-Manager goes on using (and may extend) its dict after we return
        self.enqueue(image, dict(metadata or {}))

    # -- sender thread ---------------------------------------------------------------------
    def _frame(self, image: Any, metadata: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        image = np.asarray(image)
        return image, self._header(image, metadata)

    def _header(
        self, image: np.ndarray, metadata: Mapping[str, Any], axes: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        header = self.mapper.header(metadata, image.dtype, **({"axes": axes} if axes is not None else {}))
        for cause, detail in self.mapper.problems:
            self.drop_meta(cause, detail)
        if self.camera:
            header["camera"] = self.camera
        if self.bits:
            header["bits"] = self.bits
        return header

    def __enter__(self) -> Tap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tap(address: str, **opts: Any) -> Tap:
    """An ``image_process_fn(image, metadata)`` that streams every frame to the daemon at
    ``address`` (its ingest socket) and returns ``(image, metadata)`` unchanged.

    Options: ``stream`` (name), ``buffer_frames`` (queue bound, default 256), ``channels``
    (channel names in the order wanted, otherwise first-seen order), ``camera`` ({offset, gain,
    ...}), ``bits``, ``then`` (your own image_process_fn, called after the frame is queued; its
    result is returned to Pycro-Manager). Call ``close()`` after the acquisition.
    """
    return Tap(address, **opts)


class FeedbackTap(Tap):
    """``image_process_fn(image, metadata, event_queue)``: :class:`Tap` plus a policy that puts
    the next acquisition events into Pycro-Manager's ``event_queue`` (see :func:`feedback`)."""

    def __init__(
        self, address: str, control: str, policy: AdaptiveTimelapseEvents, *, follow: bool = True, **opts: Any
    ) -> None:
        super().__init__(address, **opts)
        self.policy = policy
        self.follower = (
            EventFollower(control, policy.on_event, kinds=policy.kinds, curve=opts.get("curve")) if follow else None
        )

    def __call__(self, image: np.ndarray, metadata: dict[str, Any], event_queue: Any) -> Any:  # type: ignore[override]
        try:
            metadata = self.policy.annotate(metadata)
            self.policy.frame_acquired(metadata, event_queue)
        except Exception:  # a failing policy must not stop the acquisition
            log.exception("feedback policy failed")
        return self._forward_then(image, metadata, event_queue)

    def close(self, timeout: float = 10.0) -> None:
        if self.follower is not None:
            self.follower.close()
            self.follower = None
        self.policy.stop()
        super().close(timeout)


def feedback(address: str, control: str, policy: AdaptiveTimelapseEvents, **opts: Any) -> FeedbackTap:
    """A three-argument ``image_process_fn(image, metadata, event_queue)``: streams frames like
    :func:`tap`, follows the daemon's events on its ``control`` socket and lets ``policy``
    schedule the next acquisition events into ``event_queue``.

        policy = AdaptiveTimelapseEvents(slow_s=10, fast_s=1, quiet_s=60, frames=500)
        hook = feedback("tcp://127.0.0.1:5570", "tcp://127.0.0.1:5572", policy)
        acq = Acquisition(directory, "run", image_process_fn=hook)
        acq.acquire(policy.events(0)); acq.await_completion(); hook.close()
    """
    return FeedbackTap(address, control, policy, **opts)


class AdaptiveTimelapseEvents(AdaptiveTimelapse):
    """:class:`~livescope.bridges.feedback.AdaptiveTimelapse` for Pycro-Manager: the same
    slow/fast/quiet logic, producing Pycro-Manager event dicts instead of ``useq`` events.

    ``per_time_point`` lists the events of one time point without the time axis (default: one
    plain frame), e.g. ``[{"axes": {"channel": "DAPI"}, "config_group": ["Channel", "DAPI"]}]``.
    When the last frame of time point t has arrived, a scheduler thread waits until t's start +
    the current interval (an event arriving meanwhile cuts a slow wait short) and puts the events
    of t + 1 into ``event_queue``; after ``frames`` time points it puts ``None`` (the acquisition
    finishes). The hook writes ``metadata["livescope"]`` = {mode, trigger} into every frame it
    returns, so the saved data says which interval each frame was taken with.
    """

    def __init__(
        self,
        *,
        slow_s: float,
        fast_s: float,
        quiet_s: float,
        frames: int,
        per_time_point: Sequence[Mapping[str, Any]] | None = None,
        kinds: set[str] | None = None,
    ) -> None:
        super().__init__(slow_s=slow_s, fast_s=fast_s, quiet_s=quiet_s, frames=frames, kinds=kinds)
        self.per_time_point = [dict(e) for e in (per_time_point or [{"axes": {}}])]
        self._counts: collections.Counter[int] = collections.Counter()
        self._starts: dict[int, float] = {}
        self._completed = -1
        self._queued = 0  # time points handed to the acquisition so far
        self._event_queue: Any = None
        self._scheduler: threading.Thread | None = None
        self.finished = False
        self.modes: dict[int, dict[str, Any]] = {}

    def events(self, t: int, mode: str | None = None, trigger: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The Pycro-Manager events of time point ``t`` (acquire ``events(0)`` to start)."""
        # the mode is recorded here and written into each frame's metadata by the hook, not as
        # event "tags": Pycro-Manager 1.0.2's Python backend fails on tags (it calls a setTags
        # that AcquisitionEvent does not have) and the acquisition then hangs
        self.modes[int(t)] = {"mode": mode or self.mode, **({"trigger": trigger} if trigger else {})}
        out = []
        for template in self.per_time_point:
            ev = _jsonable(template)  # a copy; multi_d_acquisition_events' x, y are numpy scalars
            ev.setdefault("axes", {})["time"] = int(t)
            out.append(ev)
        if t == 0:
            self._queued = max(self._queued, 1)
        return out

    def annotate(self, metadata: dict[str, Any]) -> dict[str, Any]:
        """The frame's metadata with ``livescope`` {mode, trigger} of its time point added."""
        t = (metadata.get("Axes") or {}).get("time")
        info = self.modes.get(int(t)) if t is not None else None
        if info is None:
            return metadata
        md = dict(metadata)
        md["livescope"] = {**md.get("livescope", {}), **info}
        return md

    def frame_acquired(self, metadata: Mapping[str, Any], event_queue: Any) -> None:
        t = (metadata.get("Axes") or {}).get("time")
        if t is None:
            return
        t = int(t)
        now = time.monotonic()
        with self._lock:
            self._starts.setdefault(t, now)
            self._counts[t] += 1
            complete = self._counts[t] >= len(self.per_time_point)
            if complete:
                self._completed = max(self._completed, t)
            if self._event_queue is None:
                self._event_queue = event_queue
                self._last_acq = self._starts[t]
                self._scheduler = threading.Thread(
                    target=self._schedule, name="livescope-pycromanager-policy", daemon=True
                )
                self._scheduler.start()
        if complete:
            self._wake.set()

    def _schedule(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                t_next = self._queued
                ready = self._completed >= t_next - 1
                start = self._starts.get(t_next - 1)
            if t_next >= self.frames:
                self._event_queue.put(None)
                self.finished = True
                return
            if not ready or start is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            now = time.monotonic()
            interval = self.fast_s if self._next_mode(now) == "fast" else self.slow_s
            due = start + interval
            if now < due:
                self._wake.wait(due - now)  # an event switching to fast wakes us early
                self._wake.clear()
                continue
            mode = self._next_mode(now)
            trigger = None
            if mode != self.mode:
                with self._lock:
                    trigger, self._pending_trigger = self._pending_trigger, None
                self.switches.append((now, mode, trigger))
                self.mode = mode
            clean = {k: v for k, v in trigger.items() if k != "received"} if trigger else None
            self._event_queue.put(self.events(t_next, mode, clean))
            with self._lock:
                self._queued = t_next + 1


class RestoreHook:
    """``image_process_fn(image, metadata)`` returning the daemon's restored frame (see :func:`restore`)."""

    def __init__(
        self,
        restore_address: str,
        *,
        want: str | None = None,
        timeout_s: float = 2.0,
        scale: float | None = None,
        headroom: float = 4.0,
        stream: str = "pycromanager",
        channels: Sequence[str] | None = None,
        camera: dict[str, Any] | None = None,
        max_misses_in_row: int = 3,
        retry_s: float = 5.0,
        latency_window: int = 10000,
        curve: Any = None,
    ) -> None:
        if scale is not None and not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale={scale!r}: give a positive number, or None to choose it from the first frame")
        if headroom < 1:
            raise ValueError("headroom must be >= 1 (how many times brighter than the first frame later frames may be)")
        self.client = RestoreClient(restore_address, stream=stream, timeout_s=timeout_s, curve=curve)
        self.want = want
        self.timeout_s = timeout_s
        self.scale = scale
        self.scale_source = "given" if scale is not None else None
        self.headroom = headroom
        self.camera = camera
        self.mapper = MetadataMapper(channels)
        self.max_misses_in_row = max_misses_in_row
        self.retry_s = retry_s
        self.served = 0
        self.missed = 0
        self.missed_by_reason: collections.Counter[str] = collections.Counter()
        self.meta_dropped_by_cause: collections.Counter[str] = collections.Counter()
        self.clipped_pixels = 0
        self.product: str | None = None
        self._misses_in_row = 0
        self._paused_until = 0.0
        self._latency: collections.deque[float] = collections.deque(maxlen=latency_window)
        self._lock = threading.Lock()
        self._warned = False

    def __call__(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        try:
            return self._restore(image, metadata)
        except Exception as exc:  # the acquisition never fails because of livescope
            log.exception("restore hook failed; returning the raw frame")
            return self._raw(image, metadata, "error", f"{type(exc).__name__}: {exc}")

    def _restore(self, image: np.ndarray, metadata: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        now = time.monotonic()
        if now < self._paused_until:
            return self._raw(
                image,
                metadata,
                "unavailable",
                f"livescope missed {self._misses_in_row} frames in a row; retrying in {self._paused_until - now:.1f} s",
            )
        image = np.asarray(image)
        fields = self.mapper.header(metadata, image.dtype)
        self._note_problems(self.mapper.problems)
        if self.camera:
            fields["camera"] = self.camera
        t0 = time.perf_counter()
        out, info = self.client.restore(image, want=self.want, **fields)
        latency = time.perf_counter() - t0
        if out is None:
            kind = "timeout" if "within" in str(info) else "daemon"
            return self._raw(image, metadata, kind, str(info))
        if out.shape != image.shape:
            return self._raw(image, metadata, "shape", f"restored {out.shape}, frame {image.shape}")
        converted = self._convert(out, image.dtype)
        with self._lock:
            self.served += 1
            self._misses_in_row = 0
            self._latency.append(latency)
            self.product = info.get("product")
        if not self._warned:
            self._warned = True
            log.warning(
                "livescope restore: every frame waits for the engines (%.0f ms for the first); "
                "the acquisition runs no faster than that",
                1000 * latency,
            )
        md = dict(metadata)
        md["livescope"] = {
            "restored": True,
            "product": info.get("product"),
            "scale": self.scale,
            "scale_source": self.scale_source,
            "seq": info.get("seq"),
            "latency_ms": round(1000 * latency, 3),
        }
        return converted, md

    def _note_problems(self, problems: list[tuple[str, str]]) -> None:
        """Metadata left out of a frame's header: counted per cause, warned about once per cause."""
        for cause, detail in problems:
            with self._lock:
                first = cause not in self.meta_dropped_by_cause
                self.meta_dropped_by_cause[cause] += 1
            if first:
                log.warning(
                    "livescope restore: %s (%s); the frame is sent without it (logged once; counted in "
                    "stats()['meta_dropped_by_cause'])",
                    cause,
                    detail,
                )

    def _choose_scale(self, restored: np.ndarray, dtype: np.dtype) -> float:
        """A power of two, so values keep their units up to an exact factor: the largest that maps
        the first frame's peak to at most 1/headroom of the dtype's range."""
        finite = restored[np.isfinite(restored)]
        peak = float(finite.max()) if finite.size else 0.0
        if peak <= 0:
            return 1.0
        top = float(np.iinfo(dtype).max)
        return float(2.0 ** math.floor(math.log2(top / (self.headroom * peak))))

    def _convert(self, restored: np.ndarray, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            if self.scale is None:
                self.scale, self.scale_source = 1.0, "float frames"
            return (restored * self.scale).astype(dtype) if self.scale != 1.0 else restored.astype(dtype)
        if dtype.kind not in "ui":
            raise TypeError(f"cannot restore {dtype} frames")
        if self.scale is None:
            self.scale, self.scale_source = self._choose_scale(restored, dtype), "first frame"
            log.info("livescope restore: scale %g for this acquisition (saved = restored x scale)", self.scale)
        info = np.iinfo(dtype)
        x = np.multiply(restored, self.scale, dtype=np.float32)
        np.rint(x, out=x)
        clipped = int(np.count_nonzero(x < info.min)) + int(np.count_nonzero(x > info.max))
        np.clip(x, info.min, info.max, out=x)
        np.nan_to_num(x, copy=False, nan=0.0)
        if clipped:
            self.clipped_pixels += clipped
        return x.astype(dtype)

    def _raw(self, image: Any, metadata: dict[str, Any], kind: str, reason: str) -> tuple[Any, dict[str, Any]]:
        with self._lock:
            self.missed += 1
            self.missed_by_reason[kind] += 1
            if kind != "unavailable":
                self._misses_in_row += 1
                if self._misses_in_row >= self.max_misses_in_row:
                    # the daemon is away or overwhelmed: stop waiting on every frame for a while
                    self._paused_until = time.monotonic() + self.retry_s
        if self.missed == 1 or self.missed % 100 == 0:
            log.warning("livescope restore: raw frame returned (%s: %s); %d missed so far", kind, reason, self.missed)
        md = dict(metadata or {})
        md["livescope"] = {"restored": False, "reason": f"{kind}: {reason}"}
        return image, md

    def stats(self) -> dict[str, Any]:
        with self._lock:
            lat = np.array(self._latency) * 1000.0
            return {
                "served": self.served,
                "missed": self.missed,
                "missed_by_reason": dict(self.missed_by_reason),
                "latency_ms": {
                    "p50": float(np.percentile(lat, 50)) if lat.size else None,
                    "p99": float(np.percentile(lat, 99)) if lat.size else None,
                    "n": int(lat.size),
                },
                "product": self.product,
                "scale": self.scale,
                "clipped_pixels": self.clipped_pixels,
                "meta_dropped_by_cause": dict(self.meta_dropped_by_cause),
            }

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RestoreHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def restore(restore_address: str, **opts: Any) -> RestoreHook:
    """An ``image_process_fn(image, metadata)`` that sends each frame to the daemon's restore
    socket (``livescope daemon --restore ADDR``), waits at most ``timeout_s`` (default 2 s) and
    returns the restored frame in the input dtype, so Micro-Manager saves restored data.

    **This slows the acquisition to the engines' latency**: Pycro-Manager calls the hook once per
    frame, in order. The raw frame is saved in livescope's store as usual.

    The float product is converted with one scale for the whole acquisition: ``scale`` if given,
    else the power of two that maps the first restored frame's peak to 1/``headroom`` (default
    1/4) of the dtype's range; values are rounded and clipped (clipped pixels counted). The scale
    is recorded in ``metadata["livescope"]``. On timeout or any error the raw frame is returned
    with ``metadata["livescope"] = {"restored": False, "reason": ...}`` and the miss counted;
    after ``max_misses_in_row`` misses, frames are returned raw at once for ``retry_s`` seconds.
    ``want`` picks the product (default: the chain's last). ``stats()`` reports served/missed and
    the round-trip latency p50/p99.
    """
    return RestoreHook(restore_address, **opts)


class SavedTap(Tap):
    """``image_saved_fn(axes, dataset)``: forward each frame once it is saved (see :func:`saved_tap`)."""

    def __init__(self, address: str, **opts: Any) -> None:
        if opts.get("then") is not None:
            raise TypeError("saved_tap takes no then=: an image_saved_fn returns nothing to chain")
        opts.setdefault("buffer_frames", 100_000)
        self._reader = _SavedFrameReader()
        super().__init__(address, **opts)

    def close(self, timeout: float = 10.0) -> None:
        super().close(timeout)
        self._reader.close()

    def __call__(self, axes: dict[str, Any], dataset: Any) -> None:  # type: ignore[override]
        # only the axes are queued: the pixels stay on disk until the sender reads them, so a
        # long buffer costs no memory
        self.enqueue(dataset, dict(axes))

    def _frame(self, dataset: Any, axes: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        image, metadata = self._reader.read(dataset, axes)
        return image, self._header(image, metadata, axes)


class _SavedFrameReader:
    """Reads a saved frame and its metadata with positioned, unbuffered reads (``os.pread``).

    ndstorage's own readers (0.1.18) keep a buffered file object: a read near the end of a file
    that is still being written buffers bytes of the next image half-written, and a later read
    of that image returns them (measured while another thread wrote: docs/bridge_pycromanager.md,
    section "Under load and on errors").
    The NDTiff index entry says where pixels and metadata are; reading those bytes directly
    after the image-saved notification is safe. Datasets that are not NDTiff on disk (the RAM
    dataset, other storage) are read through their own ``read_image``/``read_metadata``.
    """

    # NDTiff pixel types; 2 (RGB) is left to ndstorage. Looked up with whatever an index entry holds.
    _PIXEL_BYTES: ClassVar[dict[Any, int]] = {0: 1, 1: 2, 3: 2, 4: 2, 5: 2, 6: 2}

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, dataset: Any, axes: Mapping[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        entry = None
        index, root = getattr(dataset, "index", None), getattr(dataset, "path", None)
        if isinstance(index, dict) and isinstance(root, str):
            entry = index.get(frozenset((k, v) for k, v in axes.items() if v is not None))
        nbytes = self._PIXEL_BYTES.get(getattr(entry, "pixel_type", None)) if entry is not None else None
        if entry is None or nbytes is None or not isinstance(root, str):  # (an entry comes with a root)
            return np.asarray(dataset.read_image(**axes)), dict(dataset.read_metadata(**axes) or {})
        path = os.path.join(root, entry.filename)
        h, w = int(entry.image_height), int(entry.image_width)
        pixels = self._pread(path, h * w * nbytes, int(entry.pix_offset))
        if len(pixels) != h * w * nbytes:
            raise OSError(f"{path}: {len(pixels)} of {h * w * nbytes} pixel bytes on disk")
        image = np.frombuffer(pixels, dtype=np.uint8 if nbytes == 1 else np.uint16).reshape(h, w)
        metadata = json.loads(self._pread(path, int(entry.metadata_length), int(entry.metadata_offset)))
        return image, metadata

    def _pread(self, path: str, n: int, offset: int) -> bytes:
        if not hasattr(os, "pread"):  # Windows: an unbuffered handle per read
            with open(path, "rb", buffering=0) as f:
                f.seek(offset)
                return f.read(n)
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return os.pread(fd, n, offset)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def saved_tap(address: str, **opts: Any) -> SavedTap:
    """An ``image_saved_fn(axes, dataset)`` that reads each frame back from the dataset
    (``dataset.read_image(**axes)``, ``dataset.read_metadata(**axes)``) after Pycro-Manager saved
    it and streams it to the daemon at ``address``. Use it when frames come faster than the
    Java-Python bridge carries them: with the Java backend, pixels then never cross the bridge,
    only the axes of each saved image do. Options as for :func:`tap` (``buffer_frames`` may be
    large: the queue holds axes, not pixels). Call ``close()`` after the acquisition.
    """
    return SavedTap(address, **opts)
