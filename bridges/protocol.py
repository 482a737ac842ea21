"""The frame wire protocol: a JSON header and the raw pixel buffer, as one multipart ZeroMQ message.

Part 0 is a UTF-8 JSON object (the header), part 1 the C-contiguous pixel buffer. Frames are sent
and received without copies (``copy=False``); nothing is ever pickled. Every header is validated:
a malformed message raises :class:`ProtocolError` with a short reason that receivers count and log,
and the receive loop keeps going.

Header fields (``v`` = 1):

=================  ========  =====================================================================
field              required  meaning
=================  ========  =====================================================================
``v``              yes       protocol version (int)
``stream``         yes       stream id (str): the publisher's name for this acquisition
``seq``            yes       monotonic per stream, from 0; gaps are lost frames
``shape``          yes       [y, x] (a plane) or [z, y, x] (a stack)
``dtype``          yes       one of :data:`DTYPES`
``kind``           no        ``"frame"`` (default) or ``"end"`` (end of stream, no buffer)
``time``           no        seconds since the stream started
``bits``           no        camera bit depth; saturation is at 2**bits - 1 (default: the dtype's)
``index``          no        acquisition indices {p, c, z, t} (non-negative ints)
``sizes``          no        expected sizes {p, c, z, t} when known in advance (t may be null)
``channel``        no        channel name
``pixel_size_um``  no        pixel size in micrometres (after binning)
``z_step_um``      no        z step in micrometres
``interval_s``     no        nominal frame interval in seconds
``binning``        no        camera binning (int)
``pixel_size_affine`` no     6 numbers (a, b, tx, c, d, ty): camera pixels -> stage micrometres
``camera``         no        {offset (ADU), gain (ADU per photoelectron), read_noise (ADU), ...}
``product``        no        on preview sockets: which product this is (``raw``, ``denoised``, ...)
``meta``           no        the acquisition's own metadata (JSON object), passed on untouched
``live``           no        a live-mode or snap frame (not saved unless the daemon runs --save-live)
``acquisition``    no        the publisher's acquisition counter: a change starts a new image
``source``         no        the publisher's own id (several publishers on one stream name)
``sender``         no        the publisher's own counts {dropped, meta_dropped}
``shm``            no        same-host fast path: {name, slot, ...} of a shared-memory slot holding
                             the pixels; then the message has no buffer part (bridges/shm.py)
=================  ========  =====================================================================
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

_orjson: ModuleType | None
try:  # 10x faster JSON for the per-frame header (a fixed cost that matters at 512x512 and kHz rates)
    import orjson as _orjson
except ImportError:  # pragma: no cover - the stdlib path is correct, only slower
    _orjson = None

__all__ = [
    "DTYPES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Frame",
    "ProtocolError",
    "decode",
    "encode",
    "make_header",
]

PROTOCOL_VERSION = 1
DTYPES = ("uint8", "uint16", "uint32", "int16", "int32", "float16", "float32", "float64")
MAX_FRAME_BYTES = 2**31  # 2 GiB: anything larger is a corrupt header, not a camera frame
MAX_HEADER_BYTES = 1 << 20
INDEX_KEYS = ("p", "c", "z", "t")
# bounds on what one header may ask for: the store lays out (and keeps records for) every index up
# to the largest seen, so an absurd index on a 2-byte frame must not allocate gigabytes
MAX_INDEX = {"p": 9_999, "c": 255, "z": 9_999, "t": 2**31 - 1}
MAX_SIZES = {"p": 10_000, "c": 256, "z": 10_000, "t": 2**31}
MAX_NAME = 200  # stream and channel names


class ProtocolError(ValueError):
    """A message that does not follow the wire protocol. ``reason`` is a short, countable key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Frame:
    """A decoded message. ``array`` is a read-only view on the received buffer (no copy)."""

    header: dict[str, Any]
    array: np.ndarray | None

    @property
    def seq(self) -> int:
        return int(self.header["seq"])

    @property
    def stream(self) -> str:
        return str(self.header["stream"])

    @property
    def is_end(self) -> bool:
        return self.header.get("kind", "frame") == "end"

    @property
    def index(self) -> dict[str, int]:
        return dict(self.header.get("index") or {})

    @property
    def bits(self) -> int:
        return int(self.header.get("bits") or np.dtype(self.header["dtype"]).itemsize * 8)

    @property
    def timestamp(self) -> float:
        t = self.header.get("time")
        return float(t) if t is not None else time.time()

    received_at: float = field(default_factory=time.perf_counter, compare=False)
    header_nbytes: int = field(default=0, compare=False)  # what the header cost on the wire (budgets)
    restarted: bool = field(default=False, compare=False)  # the receiver saw its publisher's seq go back


def make_header(
    array: np.ndarray | None,
    *,
    stream: str,
    seq: int,
    kind: str = "frame",
    **fields: Any,
) -> dict[str, Any]:
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "stream": stream, "seq": int(seq), "kind": kind}
    if array is not None:
        header["shape"] = list(array.shape)
        header["dtype"] = array.dtype.name
    else:
        header["shape"] = [0]
        header["dtype"] = "uint8"
    for key, value in fields.items():
        if value is not None:
            header[key] = value
    return header


def encode(header: Mapping[str, Any], array: np.ndarray | None) -> list[Any]:
    """The message parts for ``socket.send_multipart(parts, copy=False)``.

    The array is sent without a copy: the caller must not modify it until the send completed.
    """
    if _orjson is not None:
        head = _orjson.dumps(header, default=_json_default, option=_orjson.OPT_SERIALIZE_NUMPY)
    else:
        head = json.dumps(header, separators=(",", ":"), default=_json_default).encode()
    if array is None:
        return [head]
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return [head, array.data.cast("B")]  # memoryview(array)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _buffer(part: Any) -> memoryview:
    if hasattr(part, "buffer"):  # zmq.Frame
        return part.buffer
    return memoryview(part)


def _require(header: Mapping[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in header:
        raise ProtocolError("missing_field", key)
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ProtocolError("bad_field", f"{key}={value!r}")
    return value


def _check_header(header: Any) -> dict[str, Any]:
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not a JSON object")
    version = _require(header, "v", int)
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"v={version}, this livescope speaks v={PROTOCOL_VERSION}")
    _require(header, "stream", str)
    seq = _require(header, "seq", int)
    if seq < 0:
        raise ProtocolError("bad_field", f"seq={seq}")
    kind = header.get("kind", "frame")
    if kind not in ("frame", "end"):
        raise ProtocolError("bad_field", f"kind={kind!r}")
    if kind == "end":
        return header
    shape = _require(header, "shape", list)
    if not 2 <= len(shape) <= 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise ProtocolError("bad_shape", f"shape={shape!r} (want [y, x] or [z, y, x], positive)")
    dtype = _require(header, "dtype", str)
    if dtype not in DTYPES:
        raise ProtocolError("bad_dtype", f"dtype={dtype!r}, expected one of {', '.join(DTYPES)}")
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if nbytes > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"{nbytes} bytes")
    bits = header.get("bits")
    if bits is not None and (
        isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= np.dtype(dtype).itemsize * 8
    ):
        raise ProtocolError("bad_field", f"bits={bits!r} for dtype {dtype}")
    index = header.get("index")
    if index is not None:
        if not isinstance(index, dict) or not all(
            k in INDEX_KEYS and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in index.items()
        ):
            raise ProtocolError("bad_index", f"index={index!r} (keys p, c, z, t; values >= 0)")
    for key in ("time", "pixel_size_um", "z_step_um", "interval_s"):
        value = header.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
        ):
            raise ProtocolError("bad_field", f"{key}={value!r}")
    for key in ("meta", "camera", "sizes", "sender"):
        value = header.get(key)
        if value is not None and not isinstance(value, dict):
            raise ProtocolError("bad_field", f"{key} is not an object")
    _check_optional(header)
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_optional(header: dict[str, Any]) -> None:
    """The optional fields the daemon reads to lay out and route a frame: each is checked here,
    before any state is touched, so one odd header is refused and counted, never fatal."""
    stream = header["stream"]
    if not 1 <= len(stream) <= MAX_NAME or any(ord(ch) < 32 for ch in stream):
        raise ProtocolError("bad_field", f"stream={stream[:40]!r} (1-{MAX_NAME} printable characters)")
    sizes = header.get("sizes")
    if sizes is not None:
        for k, v in sizes.items():
            if k not in INDEX_KEYS:
                raise ProtocolError("bad_sizes", f"sizes key {k!r} (keys p, c, z, t)")
            if v is None and k == "t":
                continue
            if not _is_int(v) or not 1 <= v <= MAX_SIZES[k]:
                raise ProtocolError("bad_sizes", f"sizes.{k}={v!r} (an integer from 1 to {MAX_SIZES[k]})")
    index = header.get("index") or {}
    for k, v in index.items():  # c, z, p lay out the image; t may run past an estimate (it grows)
        if v > MAX_INDEX[k]:
            raise ProtocolError("index_out_of_range", f"index.{k}={v} (at most {MAX_INDEX[k]})")
        if sizes and k != "t" and v >= (sizes.get(k) or 1):
            raise ProtocolError(
                "index_outside_sizes",
                f"index.{k}={v} but sizes.{k}={sizes.get(k)!r}: send sizes.{k} covering every "
                f"{k} index (or no sizes at all)",
            )
    binning = header.get("binning")
    if binning is not None and (not _is_int(binning) or not 1 <= binning <= 64):
        raise ProtocolError("bad_field", f"binning={binning!r} (an integer from 1 to 64)")
    channel = header.get("channel")
    if channel is not None and (not isinstance(channel, str) or len(channel) > MAX_NAME):
        raise ProtocolError("bad_field", f"channel={str(channel)[:40]!r} (a name of at most {MAX_NAME} characters)")
    for key in ("acquisition",):
        value = header.get(key)
        if value is not None and (not _is_int(value) or not 0 <= value < 2**53):
            raise ProtocolError("bad_field", f"{key}={value!r} (a non-negative integer)")
    live = header.get("live")
    if live is not None and not isinstance(live, bool):
        raise ProtocolError("bad_field", f"live={live!r} (true or false)")
    source = header.get("source")
    if source is not None and (not isinstance(source, str) or not 1 <= len(source) <= 64):
        raise ProtocolError("bad_field", "source must be a short string (the publisher's id)")
    camera = header.get("camera")
    if camera is not None:
        for key in ("offset", "gain", "read_noise"):
            value = camera.get(key)
            if value is not None and not _is_number(value):
                raise ProtocolError("bad_field", f"camera.{key}={value!r} (a finite number)")
        if camera.get("gain") is not None and camera["gain"] <= 0:
            raise ProtocolError("bad_field", f"camera.gain={camera['gain']!r} (positive, ADU per photoelectron)")
    affine = header.get("pixel_size_affine")
    if affine is not None and (
        not isinstance(affine, list) or len(affine) != 6 or not all(_is_number(a) for a in affine)
    ):
        raise ProtocolError("bad_field", "pixel_size_affine must be 6 finite numbers (a, b, tx, c, d, ty)")
    for key in ("pixel_size_um", "z_step_um", "interval_s"):
        value = header.get(key)
        if value is not None and value < 0:
            raise ProtocolError("bad_field", f"{key}={value!r} (not negative; 0 or absent when unknown)")
    sender = header.get("sender")
    if sender is not None and (
        len(sender) > 16 or not all(isinstance(k, str) and _is_int(v) and 0 <= v < 2**63 for k, v in sender.items())
    ):
        raise ProtocolError("bad_field", "sender must map at most 16 names to non-negative integer counts")


def decode(parts: Sequence[Any]) -> Frame:
    """Validate and decode a received multipart message; raises :class:`ProtocolError`."""
    if not parts:
        raise ProtocolError("empty_message")
    head = _buffer(parts[0])
    if len(head) > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{len(head)} bytes")
    try:
        header = _orjson.loads(head) if _orjson is not None else json.loads(bytes(head))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError("bad_json", str(exc)[:80]) from None
    except RecursionError:  # a deeply nested header: refuse it, never let it kill the receive loop
        raise ProtocolError("bad_json", "nested too deeply") from None
    header = _check_header(header)
    if header.get("kind", "frame") == "end":
        return Frame(header, None, header_nbytes=len(head))
    if "shm" in header and len(parts) == 1:
        # same-host fast path: the pixels are in a shared-memory slot (bridges/shm.py); the
        # receiver resolves them, after checking the slot's size against shape x dtype
        if not isinstance(header["shm"], dict):
            raise ProtocolError("bad_field", "shm is not an object")
        return Frame(header, None, header_nbytes=len(head))
    if len(parts) != 2:
        raise ProtocolError("bad_parts", f"{len(parts)} parts, expected header + buffer")
    buf = _buffer(parts[1])
    dtype = np.dtype(header["dtype"])
    expected = math.prod(header["shape"]) * dtype.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(
            "size_mismatch", f"buffer has {buf.nbytes} bytes, shape {header['shape']} {dtype} needs {expected}"
        )
    array = np.frombuffer(buf, dtype=dtype).reshape(header["shape"])
    return Frame(header, array, header_nbytes=len(head))
