"""Routing: which image (segment) of the store a frame belongs to, and where in it.

Each stream (camera) and position has its current *segment*; a new one opens when the frame
shape, dtype or bit depth changes, when the publisher restarts (``seq`` goes back), after an end
marker, or when ``acquisition`` changes (docs/protocol.md, "Streams, acquisitions and images").
Within a segment each (t, c, z) is taken once. A frame that would break a bound (segments per
stream, records per image, a jump in t) is refused with :class:`Rejected` before any state
changes, so a refused frame leaves no trace.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections import OrderedDict
from typing import Any

import numpy as np

from ..bridges.files import SAMPLING_KEYS
from ..bridges.protocol import Frame
from ..bridges.store import ImageLayout

__all__ = ["MAX_RECORD_CELLS", "MAX_SEGMENTS", "MAX_T_JUMP", "Item", "Rejected", "Router", "Segment", "Seen"]

log = logging.getLogger(__name__)

MAX_SEGMENTS = 64  # images one stream and position may open in a run (shape changes, restarts)
MAX_RECORD_CELLS = 2**23  # planes one image may lay out (records: 21 bytes each, 176 MB at most)
MAX_T_JUMP = 100_000  # time points a frame may skip ahead of the segment's latest


@dataclasses.dataclass
class Segment:
    """One image in the store: a stream's position with one frame shape, dtype and bit depth. A
    restart of the publisher, a new acquisition or an end marker starts a new one; a shape seen
    before in the same acquisition goes back to its segment (two ROIs alternating stay two images)."""

    number: int
    shape: tuple[int, ...]
    dtype: str
    bits: int
    layout: ImageLayout
    spec_base: dict[str, Any]
    t_start: int = 0
    last_seq: dict[str, int] = dataclasses.field(default_factory=dict)  # per publisher (source id)
    stream: str = ""
    tag: str = ""  # the stream's part of the store's image names ("" for the first stream)
    acquisition: int | None = None
    fresh: str = ""  # why this segment opens, until its first frame is accepted
    saved: bool = True  # False for live-mode streams unless --save-live: engines and previews only
    live: bool = False  # a live-mode stream (focusing, snaps): never takes the plain image names
    seen: Seen = dataclasses.field(default_factory=lambda: Seen())
    channel_names: dict[int, str] = dataclasses.field(default_factory=dict)
    product_layouts: list[ImageLayout] = dataclasses.field(default_factory=list)

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.stream, self.spec_base["position"], self.number)


class Seen:
    """Which (t, c, z) of a segment arrived: one growable bitmap over t per (c, z) (an 8-hour
    100 fps stream costs 360 kB per plane): a second frame for the same index is refused, never
    written over the first."""

    def __init__(self) -> None:
        self.by_plane: dict[tuple[int, int], bytearray] = {}
        self.t_max = -1
        self.c_max = 0
        self.z_max = 0

    def cells(self, t: int, c: int, z: int) -> int:
        """The records the store will hold for this image once (t, c, z) is in: a bound on memory."""
        return (max(self.t_max, t) + 1024) * (max(self.c_max, c) + 1) * (max(self.z_max, z) + 1)

    def add(self, t: int, c: int, z: int) -> bool:
        """Mark (t, c, z); False if it was there already."""
        bits = self.by_plane.setdefault((c, z), bytearray())
        byte, bit = divmod(t, 8)
        if byte >= len(bits):
            bits.extend(bytes(max(byte + 1 - len(bits), len(bits))))
        if bits[byte] >> bit & 1:
            return False
        bits[byte] |= 1 << bit
        self.t_max, self.c_max, self.z_max = max(self.t_max, t), max(self.c_max, c), max(self.z_max, z)
        return True


class Rejected(Exception):
    """A frame the daemon refuses before it touches any state: counted under ``reason``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclasses.dataclass
class Item:
    frame: Frame
    p: int
    c: int
    z: int
    t: int
    segment: Segment
    received: float
    cost: int = 0  # bytes counted against the memory budget while queued (pixels and header)

    @property
    def array(self) -> np.ndarray:
        return self.frame.array  # type: ignore[return-value]


class Router:
    """Segments per (stream, position) and the time points within them.

    ``fallback``: the daemon's sampling (``pixel_size_um``, ``z_step_um``, ``interval_s``) for
    streams that do not say theirs; ``save_live``: whether live-mode streams are saved;
    ``calibration``: the camera calibration handed to the engines; ``segment_base``: the first
    segment number (a resumed store continues after its last)."""

    def __init__(
        self,
        *,
        fallback: dict[str, Any] | None = None,
        save_live: bool = False,
        calibration: dict[str, Any] | None = None,
        segment_base: int = 0,
    ) -> None:
        self.fallback = dict(fallback or {})
        self.save_live = save_live
        self.calibration = calibration
        self.segment_base = segment_base
        # the segment in use per (stream, position), those of the current acquisition (a shape
        # seen again goes back to its image), and how many each opened
        self.segments: dict[tuple[str, int], Segment] = {}
        self._open_segments: dict[tuple[str, int], list[Segment]] = {}
        self._segments_made: dict[tuple[str, int], int] = {}
        # (stream, position) -> why its next frame opens a new image (an end marker, a restart)
        self._ended_keys: dict[tuple[str, int], str] = {}
        # the last seq each publisher (stream, source id) sent, of every frame that reached routing
        self._last_seq: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._stream_tags: dict[str, str] = {}
        self._t_counter: dict[tuple, int] = {}

    def segment_for(self, frame: Frame, p: int) -> Segment:
        """The segment this frame belongs to, opening a new one where the stream restarted, began
        a new acquisition, ended, or changed shape, dtype or bit depth. Refuses (``Rejected``)
        before changing anything when the frame would open more segments or records than allowed."""
        h = frame.header
        arr = frame.array
        assert arr is not None
        stream, source, acquisition = frame.stream, str(h.get("source", "")), h.get("acquisition")
        shape, dtype, bits = tuple(arr.shape), arr.dtype.name, frame.bits
        skey = (stream, p)
        current = self.segments.get(skey)
        why = ""
        if current is not None:
            if frame.restarted or frame.seq < self._last_seq.get((stream, source), -1):
                why = "the publisher restarted"
            elif acquisition != current.acquisition:
                why = "a new acquisition"
            elif skey in self._ended_keys:
                why = self._ended_keys[skey]
        if not why:
            for seg in self._open_segments.get(skey, ()):
                if seg.shape == shape and seg.dtype == dtype and seg.bits == bits:
                    return seg
        made = self._segments_made.get(skey, 0)
        if made >= MAX_SEGMENTS:
            raise Rejected(
                "too_many_segments",
                f"stream {stream!r} position {p} opened {made} images in this run (each shape, "
                "dtype or restart opens one); keep the frame shape fixed, or restart the daemon",
            )
        sizes = h.get("sizes") or {}
        index = h.get("index") or {}
        known = bool(sizes)  # an MDA from a generator, or a plain publisher: sizes unknown
        n_c = int(sizes.get("c") or 1)
        n_z = int(sizes.get("z") or (shape[0] if len(shape) == 3 else 1))
        if 1024 * n_c * n_z > MAX_RECORD_CELLS:
            raise Rejected(
                "index_out_of_range",
                f"sizes c={n_c} z={n_z} would lay out more than {MAX_RECORD_CELLS} planes per 1024 time points",
            )
        base = self.segment_base
        number = base + made
        # the stream's sampling, else the daemon's fallback for streams that do not say it
        sampling = {k: h.get(k) if h.get(k) is not None else self.fallback.get(k) for k in SAMPLING_KEYS}
        has_c = n_c > 1 or ("c" in index and not known)
        has_z = n_z > 1 or ("z" in index and not known)
        listed = (h.get("meta") or {}).get("channels")
        channel_names = (
            [str(x) for x in listed[:n_c]]
            if isinstance(listed, list) and all(isinstance(x, str) for x in listed)
            else []
        )
        layout = ImageLayout(
            plane_shape=shape[-2:],
            dtype=dtype,
            has_c=has_c,
            has_z=has_z or len(shape) == 3,
            n_c=n_c,
            n_z=n_z,
            bits=bits,
            pixel_size_um=sampling["pixel_size_um"],
            z_step_um=sampling["z_step_um"],
            interval_s=sampling["interval_s"],
            channel_names=channel_names,
        )
        cam = h.get("camera") or {}
        spec_base: dict[str, Any] = {
            "dtype": dtype,
            "bits": bits,
            **sampling,
            "position": p,
            "camera_offset": cam.get("offset"),
            "camera_gain": cam.get("gain"),
            "binning": int(h.get("binning") or 1),
            "extra": {
                **{k: h[k] for k in ("pixel_size_affine", "sizes") if k in h},
                "camera_read_noise": cam.get("read_noise"),  # ADU rms
                **({"calibration": self.calibration} if self.calibration else {}),
            },
        }
        t_start = int(index.get("t", 0)) if (made > 0 or base > 0) else 0
        seg = Segment(
            number,
            shape,
            dtype,
            bits,
            layout,
            spec_base,
            t_start=t_start,
            stream=stream,
            acquisition=acquisition,
            fresh=why or "new",
            saved=not (h.get("live") is True and not self.save_live),
            live=h.get("live") is True,
        )
        return seg

    def use_segment(self, seg: Segment, frame: Frame) -> None:
        """The frame was accepted: make its segment the stream's current one (registering a new
        segment now, not before, so a refused frame leaves no trace)."""
        skey = (seg.stream, seg.spec_base["position"])
        if seg.fresh:
            current = self.segments.get(skey)
            if current is not None:
                log.warning(
                    "stream %r position %d: new segment %d (%s)",
                    seg.stream,
                    skey[1],
                    seg.number,
                    seg.fresh
                    if seg.fresh != "new"
                    else f"{current.shape} {current.dtype} {current.bits}-bit -> {seg.shape} {seg.dtype} "
                    f"{seg.bits}-bit",
                )
            if seg.fresh != "new" or current is None:
                self._open_segments[skey] = []
                self._ended_keys.pop(skey, None)
            self._open_segments[skey].append(seg)
            self._segments_made[skey] = self._segments_made.get(skey, 0) + 1
            seg.tag = self.stream_tag(seg.stream, live=seg.live)
            seg.fresh = ""
        seg.last_seq[str(frame.header.get("source", ""))] = frame.seq
        self.segments[skey] = seg

    def note_seq(self, frame: Frame, seg: Segment) -> None:
        """Remember how far each publisher got, whether or not this frame is accepted: a restart
        seen now (seq went back) opens new images for every position of the stream, even when
        this first frame of the new run is refused."""
        key = (frame.stream, str(frame.header.get("source", "")))
        self._last_seq[key] = frame.seq
        self._last_seq.move_to_end(key)
        if len(self._last_seq) > 4096:  # publishers tracked at once (a source id per frame costs nothing)
            self._last_seq.popitem(last=False)
        if seg.fresh == "the publisher restarted":
            self._ended_keys.update({k: "the publisher restarted" for k in self.segments if k[0] == frame.stream})

    def stream_tag(self, stream: str, live: bool = False) -> str:
        """The stream's part of the store's image names: none for the first acquisition stream
        the daemon sees (``raw``, ``denoised``), the stream's name for every other (``raw_camB``)
        and for every live-mode stream (``raw_mmcore-live``), whichever comes first."""
        tag = self._stream_tags.get(stream)
        if tag is None:
            if not live and "" not in self._stream_tags.values():
                tag = ""
            else:
                tag = re.sub(r"[^A-Za-z0-9.-]+", "-", stream).strip("-.")[:64] or "stream"
                taken = set(self._stream_tags.values())
                base, n = tag, 2
                while tag in taken:
                    tag, n = f"{base}-{n}", n + 1
            self._stream_tags[stream] = tag
        return tag

    def route(self, frame: Frame) -> Item:
        """The frame's place: its segment (image), (p, c, z) and time point. Raises ``Rejected``
        before changing any state for a frame the daemon cannot take."""
        if frame.array is None:
            raise Rejected("bad_parts", "a frame without pixels")
        idx = frame.header.get("index") or {}
        p, c, z = int(idx.get("p", 0)), int(idx.get("c", 0)), int(idx.get("z", 0))
        seg = self.segment_for(frame, p)
        self.note_seq(frame, seg)
        lay = seg.layout
        if c and not lay.has_c:
            raise Rejected(
                "index_outside_layout",
                f"index.c={c}, but stream {frame.stream!r} opened this image "
                "without a channel axis: send index.c from the first frame, or sizes.c",
            )
        if z and not lay.has_z:
            raise Rejected(
                "index_outside_layout",
                f"index.z={z}, but stream {frame.stream!r} opened this image "
                "without a z axis: send index.z from the first frame, or sizes.z",
            )
        count_key = (seg.stream, p, c, z, seg.number)
        if "t" in idx:
            t = int(idx["t"]) - seg.t_start
            if t < 0:
                raise Rejected(
                    "index_out_of_range", f"index.t={idx['t']} is before this segment's first time point {seg.t_start}"
                )
        else:
            t = self._t_counter.get(count_key, 0)
        z_hi = frame.array.shape[0] - 1 if frame.array.ndim == 3 else z
        if t > seg.seen.t_max + MAX_T_JUMP or seg.seen.cells(t, c, z_hi) > MAX_RECORD_CELLS:
            raise Rejected(
                "index_out_of_range",
                f"t={t} c={c} z={z_hi}: a jump of more than {MAX_T_JUMP} "
                f"time points, or more than {MAX_RECORD_CELLS} planes in one image",
            )
        if not seg.seen.add(t, c, z_hi if frame.array.ndim == 3 else z):
            raise Rejected(
                "duplicate_index",
                f"stream {frame.stream!r} sent t={t} c={c} z={z} twice in one segment; the first is kept",
            )
        self.use_segment(seg, frame)
        if "t" not in idx:
            self._t_counter[count_key] = t + 1
        name = frame.header.get("channel")
        if isinstance(name, str) and seg.channel_names.get(c) != name:
            seg.channel_names[c] = name
            names = lay.channel_names  # shared with the products' layouts: one list per segment
            while len(names) <= c:
                names.append(f"channel {len(names)}")
            names[c] = name
        for key in SAMPLING_KEYS:  # a sampling the first frame did not say (a z step known from plane 2)
            value = frame.header.get(key)
            if value and getattr(lay, key) is None:
                for layout in (lay, *seg.product_layouts):
                    setattr(layout, key, float(value))
                seg.spec_base[key] = float(value)
        return Item(frame, p, c, z, t, seg, frame.received_at, cost=frame.array.nbytes + frame.header_nbytes)

    def end(self, stream: str) -> None:
        """The stream's end marker: its next frame, at every position, opens new images."""
        self._ended_keys.update({k: "the previous acquisition ended" for k in self.segments if k[0] == stream})

    def status(self) -> dict[str, Any]:
        return {
            "segments": {(f"{k[0]}/p{k[1]}" if s.tag else str(k[1])): s.number for k, s in self.segments.items()},
            "streams": {stream: tag or "(plain names)" for stream, tag in self._stream_tags.items()},
        }
