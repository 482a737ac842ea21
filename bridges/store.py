"""OME-Zarr (NGFF 0.5, Zarr v3) store for raw frames and engine products.

Layout under the output folder (documented in docs/store.md)::

    OUT/zarr.json                 root group: NGFF ``bioformats2raw.layout`` collection of every
                                  image, the first raw image's multiscales (``raw/0``) for readers
                                  that open one image, livescope provenance + the list of images
    OUT/OME/zarr.json             ``series``: the path of every image, in the order of
    OUT/OME/METADATA.ome.xml      the OME-XML's Image elements (MetadataOnly)
    OUT/raw/                      one NGFF image per (product, position, segment)
    OUT/raw/0                     full-resolution array, axes t[,c][,z],y,x (absent axes left out)
    OUT/raw/livescope/seq         per-frame records: 1-D along t (then c, z), chunked along t
    OUT/raw/livescope/time            seconds since the stream started
    OUT/raw/livescope/status          0 missing, 1 saved, 2 skipped by the engine, 3 lost, 4 failed
    OUT/raw/livescope/saturated       saturated pixels in the raw frame
    OUT/denoised/ ...             products: same t index as raw; a skipped frame stays unwritten
    OUT/raw_p1/, OUT/raw_seg1/    position 1; segment 1 (a new segment starts when the frame
                                  shape, dtype or bit depth changes mid-stream)

Arrays are written with tensorstore: chunks of one plane grouped into shards of several time
points (not one file per frame), the time axis grown in blocks and trimmed on close. A frame
counts as *saved* when its shard write completed (the bytes are in the operating system) and its
record says so: after ``kill -9`` the store opens and every frame whose record is ``saved`` is
intact, even where the array's shape ran ahead of the data. A record write that fails (a full or
read-only disk) is kept and retried on later polls and at close. ``fsync=True`` adds power-loss
safety at a cost (docs/store.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "STATUS",
    "ImageLayout",
    "ImageWriter",
    "OmeZarrStore",
    "StoreError",
    "image_name",
    "read_records",
    "recover",
    "refresh_root",
]

log = logging.getLogger(__name__)

STATUS = {"missing": 0, "saved": 1, "skipped": 2, "lost": 3, "failed": 4}
RECORD_FIELDS = {"seq": "int64", "time": "float64", "status": "uint8", "saturated": "int32"}
_RECORD_FILL = {"seq": -1, "time": float("nan"), "status": 0, "saturated": -1}
NGFF_VERSION = "0.5"
BF2RAW_LAYOUT = 3  # NGFF's "bioformats2raw.layout": a collection of images, listed in OME/
OME_XML_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"
# OME-XML pixel types; OME has no half float: float16 products are listed as "float" (readers
# that go by the array's own data type, napari and ome-zarr-py, read them right)
_OME_TYPES = {
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "int8": "int8",
    "int16": "int16",
    "int32": "int32",
    "float16": "float",
    "float32": "float",
    "float64": "double",
    "bool": "bit",
}
COLORS = ["00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF"]


class StoreError(RuntimeError):
    pass


def image_name(product: str, position: int = 0, segment: int = 0, stream: str = "") -> str:
    """``raw``, ``raw_p1`` (position 1), ``raw_seg2`` (segment 2), ``denoised_p1_seg2``; a second
    camera's stream adds its name: ``raw_camB``, ``denoised_camB_p1``."""
    name = product
    if stream:
        name += f"_{stream}"
    if position:
        name += f"_p{position}"
    if segment:
        name += f"_seg{segment}"
    return name


@dataclass
class ImageLayout:
    """Shape and physical metadata of one image. ``sizes`` gives c and z (1 = axis absent
    unless listed in ``axes``)."""

    plane_shape: tuple[int, int]
    dtype: str
    has_c: bool = False
    has_z: bool = False
    n_c: int = 1
    n_z: int = 1
    bits: int | None = None
    pixel_size_um: float | None = None
    z_step_um: float | None = None
    interval_s: float | None = None
    channel_names: list[str] = field(default_factory=list)

    @property
    def axes(self) -> list[str]:
        return ["t"] + (["c"] if self.has_c else []) + (["z"] if self.has_z else []) + ["y", "x"]

    def lead_shape(self, n_t: int) -> list[int]:
        return [n_t] + ([self.n_c] if self.has_c else []) + ([self.n_z] if self.has_z else [])

    def lead_index(self, t: int, c: int, z: int) -> tuple[int, ...]:
        return (t,) + ((c,) if self.has_c else ()) + ((z,) if self.has_z else ())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # atomic on POSIX and Windows


FLOAT16_MAX = 65504.0


def to_stored(plane: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """A product plane in its stored dtype, and how many pixels were out of that dtype's range:
    float16 holds values up to 65504; larger ones are stored as 65504 (with their sign) and counted,
    as a camera counts saturated pixels (the frame's ``saturated`` record)."""
    if dtype != np.float16 or plane.dtype == np.float16:
        return plane.astype(dtype, copy=False), -1
    n = 0
    hi, lo = float(np.max(plane)), float(np.min(plane))  # a NaN makes both NaN: then look closer
    if not (-FLOAT16_MAX <= lo and hi <= FLOAT16_MAX):
        n = int(np.count_nonzero(np.abs(plane) > FLOAT16_MAX))
        plane = np.clip(plane, -FLOAT16_MAX, FLOAT16_MAX)
    torch = sys.modules.get("torch")  # already loaded (a denoiser): its conversion is ~6x numpy's
    if torch is not None and plane.dtype == np.float32:
        try:  # round to nearest even, as numpy: the same bits (tests/bridges/test_store.py)
            return torch.from_numpy(np.ascontiguousarray(plane)).to(torch.float16).numpy(), n
        except Exception:
            pass
    return plane.astype(np.float16), n


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader (or a crash) sees the old file or the new one, never half."""
    _atomic_write_json(path, obj)


def _atomic_write_json(path: Path, obj: Any) -> None:
    _atomic_write_text(path, json.dumps(obj, indent=1, default=str))


def _ts():
    try:
        import tensorstore
    except ImportError as exc:  # pragma: no cover - a hard dependency
        raise StoreError("tensorstore is missing: reinstall livescope (`pip install -e .`)") from exc
    return tensorstore


def _context(fsync: bool):
    ts = _ts()
    return ts.Context({"file_io_sync": bool(fsync), "data_copy_concurrency": {"limit": 2}})


def _codecs(dtype: np.dtype, inner: list[int], compress: bool) -> list[dict]:
    inner_codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
    if compress:
        inner_codecs.append(
            {
                "name": "blosc",
                "configuration": {
                    "cname": "zstd",
                    "clevel": 1,
                    "shuffle": "bitshuffle",
                    "typesize": dtype.itemsize,
                    "blocksize": 0,
                },
            }
        )
    return [
        {
            "name": "sharding_indexed",
            "configuration": {
                "chunk_shape": inner,
                "codecs": inner_codecs,
                "index_codecs": [
                    {"name": "bytes", "configuration": {"endian": "little"}},
                    {"name": "crc32c"},
                ],
                "index_location": "end",
            },
        }
    ]


def _fill_json(value: float) -> Any:
    return "NaN" if isinstance(value, float) and math.isnan(value) else value


def _open_array(path: Path, *, shape, shard, inner, dtype, fill, names, compress, context, create: bool):
    ts = _ts()
    spec: dict[str, Any] = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    if create:
        spec["metadata"] = {
            "shape": list(shape),
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(shard)}},
            "chunk_key_encoding": {"name": "default"},
            "data_type": np.dtype(dtype).name,
            "fill_value": fill,
            "codecs": _codecs(np.dtype(dtype), list(inner), compress),
            "dimension_names": list(names),
        }
        return ts.open(spec, create=True, delete_existing=True, context=context).result()
    return ts.open(spec, context=context).result()


class ImageWriter:
    """Buffers planes into shards of ``shard_t`` time points per (c, z) and writes them with
    tensorstore, keeping writes in flight; ``poll()`` turns completed writes into saved records."""

    GROW = 64  # time points added per resize

    def __init__(
        self,
        root: Path,
        name: str,
        layout: ImageLayout,
        *,
        product: str,
        position: int,
        segment: int,
        compress: bool = False,
        context: Any = None,
        target_shard_mb: float = 8.0,
        flush_after_s: float = 0.5,
    ) -> None:
        self.name = name
        self.product = product
        self.position = position
        self.segment = segment
        self.layout = layout
        self.path = root / name
        self.path.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(layout.dtype)
        y, x = layout.plane_shape
        plane_mb = y * x * self.dtype.itemsize / 2**20
        self.shard_t = int(max(1, min(64, target_shard_mb // max(plane_mb, 1e-6))))
        self.flush_after_s = flush_after_s
        self.capacity_t = self.GROW
        lead = layout.lead_shape(self.capacity_t)
        nlead = len(lead)
        self._fill = float("nan") if self.dtype.kind == "f" else 0
        self._context = context
        self.array = _open_array(
            self.path / "0",
            shape=lead + [y, x],
            shard=[self.shard_t] + [1] * (nlead - 1) + [y, x],
            inner=[1] * nlead + [y, x],
            dtype=self.dtype,
            fill="NaN" if self.dtype.kind == "f" else 0,
            names=layout.axes,
            compress=compress,
            context=context,
            create=True,
        )
        (self.path / "livescope").mkdir(exist_ok=True)
        _atomic_write_json(
            self.path / "livescope" / "zarr.json",
            {"zarr_format": 3, "node_type": "group", "attributes": {"livescope": {"records": list(RECORD_FIELDS)}}},
        )
        self.records = {
            k: _open_array(
                self.path / "livescope" / k,
                shape=lead,
                shard=[256] + list(lead[1:]),
                inner=[256] + list(lead[1:]),
                dtype=dt,
                fill=_fill_json(_RECORD_FILL[k]),
                names=layout.axes[:-2],
                compress=False,
                context=context,
                create=True,
            )
            for k, dt in RECORD_FIELDS.items()
        }
        # in-memory copy of the records (small: a few numbers per plane)
        self._rec = {k: np.full(lead, _RECORD_FILL[k], dtype=dt) for k, dt in RECORD_FIELDS.items()}
        self._buffers: dict[tuple[int, int, int], _ShardBuffer] = {}
        self._inflight: list[tuple[Any, list[tuple[int, ...]], _ShardBuffer]] = []  # (write future, leads, shard)
        # planes taken by write() whose record is not final yet (saved or lost): counted up when a
        # plane is buffered and down only after its status is set, so another thread that reads
        # ``pending`` == 0 and then the status sees the final one (no gap while a shard moves from
        # the buffers to the writes in flight, or from there to the records)
        self._unsettled = 0
        self._dirty_scalars: set[str] = set()  # engine scalars changed since their last write
        self._meta_file: Any = None
        self.inflight_bytes = 0
        self.max_inflight_bytes = 64 * 2**20  # a cap on pixels held by writes in flight, per image
        self.n_t = 0
        self.saved = 0  # frames whose pixels and record are both written
        self.skipped = 0
        self.lost = 0
        self.refused = 0  # frames write() refused (the caller counts them lost); recorded lost
        self.bytes_written = 0
        self.write_errors = 0
        self.last_error = ""
        self.retry_after_s = 0.5  # while record writes fail, polls retry them this often
        self.meta_every_s = 5.0  # while the display window changes, polls rewrite the metadata this often
        self._windows: dict[int, list[float]] = {}  # per channel: the range of the values written
        self._rec_span: list[int] | None = None  # [lo, hi) along t: records not yet on disk
        self._unrecorded_saved = 0  # frames written whose records are not yet on disk
        self._deferred: list[tuple[int, int, int, str, int, float]] = []  # records waiting for room
        self._applying = False
        self._records_failing = False
        self._next_retry = 0.0
        self._meta_changed = False
        self._meta_written = time.monotonic()
        # what the engines were told of the stream (camera offset and gain, bit depth, ...), so that
        # reprocessing the saved raw (livescope process) computes what the daemon saved
        self.stream: dict[str, Any] = {}
        self._write_group_metadata()

    def set_stream(self, facts: Mapping[str, Any]) -> None:
        self.stream = json.loads(json.dumps(dict(facts), default=str))
        self._write_group_metadata()

    # -- metadata ---------------------------------------------------------------------------
    def _ome(self) -> dict[str, Any]:
        """The image's NGFF block. An axis whose sampling the stream did not give has scale 1 and
        no unit (NGFF needs a scale, never a made-up unit); each channel's display window is the
        range of the values written so far."""
        lay = self.layout
        axes: list[dict[str, str]] = []
        scale: list[float] = []

        def axis(name: str, kind: str, value: float | None, unit: str) -> None:
            entry = {"name": name, "type": kind}
            if value:
                entry["unit"] = unit
            axes.append(entry)
            scale.append(float(value) if value else 1.0)

        axis("t", "time", lay.interval_s, "second")
        if lay.has_c:
            axes.append({"name": "c", "type": "channel"})
            scale.append(1.0)
        if lay.has_z:
            axis("z", "space", lay.z_step_um, "micrometer")
        axis("y", "space", lay.pixel_size_um, "micrometer")
        axis("x", "space", lay.pixel_size_um, "micrometer")
        n_c = lay.n_c if lay.has_c else 1
        names = lay.channel_names or []
        windows = dict(self._windows)  # a copy: update_provenance may describe from another thread
        channels = [
            {
                "label": names[i] if i < len(names) and names[i] else f"channel {i}",
                "color": COLORS[i % len(COLORS)] if n_c > 1 else "FFFFFF",
                "window": self._window(windows.get(i)),
                "active": True,
            }
            for i in range(n_c)
        ]
        return {
            "version": NGFF_VERSION,
            "multiscales": [
                {
                    "name": self.name,
                    "axes": axes,
                    "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
                }
            ],
            "omero": {"channels": channels, "rdefs": {"model": "color" if n_c > 1 else "greyscale"}},
        }

    def _window(self, seen: list[float] | None) -> dict[str, float]:
        """``start``/``end``: the range of the values written (what napari takes as contrast limits);
        ``min``/``max``: the range they can take, 0 .. 2^bits - 1 for a camera's integers and the
        values' own range for floats."""
        if self.dtype.kind in "ui":
            info = np.iinfo(self.dtype)
            dmin = float(info.min)
            bits = self.layout.bits
            dmax = float(2**bits - 1) if bits and self.dtype.kind == "u" else float(info.max)
            lo, hi = seen if seen else (dmin, dmax)
            dmin, dmax = min(dmin, lo), max(dmax, hi)
        else:
            lo, hi = seen if seen else (0.0, 1.0)  # nothing written yet: the array is all NaN
            dmin, dmax = lo, hi
        if hi <= lo:  # a constant image: viewers want start < end
            hi = lo + 1.0
            dmax = max(dmax, hi)
        return {"start": float(lo), "end": float(hi), "min": float(dmin), "max": float(dmax)}

    def _write_group_metadata(self) -> None:
        attrs = {
            "ome": self._ome(),
            "livescope": {
                "product": self.product,
                "position": self.position,
                "segment": self.segment,
                "bits": self.layout.bits,
                "frames": self.n_t,
                "saved": self.saved,
                "skipped": self.skipped,
                "lost": self.lost,
                **({"stream": self.stream} if self.stream else {}),
            },
        }
        _atomic_write_json(self.path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})
        self._meta_changed = False
        self._meta_written = time.monotonic()

    def describe(self) -> dict[str, Any]:
        """What the root's collection says of this image: sizes as written so far, its NGFF block."""
        y, x = self.layout.plane_shape
        return {
            "path": self.name,
            "product": self.product,
            "position": self.position,
            "segment": self.segment,
            "dtype": self.dtype.name,
            "bits": self.layout.bits,
            "shape": self.layout.lead_shape(max(self.n_t, 1)) + [y, x],
            "ome": self._ome(),
        }

    def observe_window(self, lo: float, hi: float, c: int | None = None) -> None:
        """Widen channel ``c``'s display window (every channel's when None) to take in lo..hi.
        ``write`` calls it with each plane's range; the metadata is rewritten on a later poll
        (every ``meta_every_s`` at most) and at ``flush``/``close``."""
        if not (math.isfinite(lo) and math.isfinite(hi)):
            return
        n_c = self.layout.n_c if self.layout.has_c else 1
        for ch in [c if self.layout.has_c else 0] if c is not None else range(n_c):
            w = self._windows.get(ch)
            if w is not None and w[0] <= lo and hi <= w[1]:
                continue
            # a new list, never changed in place: a reader on another thread sees a whole one
            self._windows[ch] = [lo, hi] if w is None else [min(w[0], lo), max(w[1], hi)]
            self._meta_changed = True

    @property
    def window(self) -> list[float]:
        """The range of the values written, over every channel ([inf, -inf] before the first)."""
        ws = list(self._windows.values())
        return [min(w[0] for w in ws), max(w[1] for w in ws)] if ws else [math.inf, -math.inf]

    def _observe(self, c: int, plane: np.ndarray) -> None:
        if plane.dtype == np.float16:  # numpy's float16 reductions are slow: a display range needs no more
            plane = plane[::4, ::4].astype(np.float32)
        lo, hi = float(plane.min()), float(plane.max())  # 0.3 ms for 2048x2048 uint16: every plane
        if not (math.isfinite(lo) and math.isfinite(hi)):  # NaN or inf in a product: finite values only
            finite = plane[np.isfinite(plane)]
            if not finite.size:
                return
            lo, hi = float(finite.min()), float(finite.max())
        self.observe_window(lo, hi, c)

    # -- writing ----------------------------------------------------------------------------
    def _ensure(self, t: int, c: int, z: int) -> None:
        lay = self.layout
        grow_c = lay.has_c and c >= lay.n_c
        grow_z = lay.has_z and z >= lay.n_z
        if t < self.capacity_t and not grow_c and not grow_z:
            return
        if grow_c or grow_z:
            self._drain(wait=True)  # a new channel or plane changes every shard's shape: settle first
        # growing only the time axis leaves in-flight writes (all inside the old bounds) valid, so
        # no wait; grow geometrically (64, 128, ... up to 1024 time points at a time)
        step = max(self.GROW, min(1024, self.capacity_t))
        capacity = max(self.capacity_t, (t // step + 1) * step)
        n_c = c + 1 if grow_c else lay.n_c
        n_z = z + 1 if grow_z else lay.n_z
        lead = [capacity] + ([n_c] if lay.has_c else []) + ([n_z] if lay.has_z else [])
        y, x = lay.plane_shape
        # the array first: if that fails (a full disk) nothing here has changed and the caller
        # counts the frame as lost
        self.array = self.array.resize(exclusive_max=lead + [y, x], resize_metadata_only=True).result()
        for k in list(self.records):
            self.records[k] = self.records[k].resize(exclusive_max=lead, resize_metadata_only=True).result()
        self.capacity_t, lay.n_c, lay.n_z = capacity, n_c, n_z
        for k in list(self._rec):
            old = self._rec[k]
            new = np.full(lead, _RECORD_FILL.get(k, np.nan), dtype=old.dtype)
            new[tuple(slice(0, s) for s in old.shape)] = old
            self._rec[k] = new
        if grow_c or grow_z:
            self._write_group_metadata()

    def write(self, t: int, c: int, z: int, plane: np.ndarray, *, seq: int, time_s: float, saturated: int = -1) -> None:
        """Buffer one plane; it is saved once ``poll`` reports its shard and record written. A plane
        it cannot take (a full or read-only disk that cannot grow the array) raises: the caller
        counts it lost, and its record says ``lost`` once there is room for it."""
        if self.dtype == np.float16 and plane.dtype != np.float16:
            plane, over = to_stored(plane, self.dtype)
            saturated = over
        try:
            if plane.shape != tuple(self.layout.plane_shape):
                raise StoreError(f"{self.name}: plane shape {plane.shape} != {tuple(self.layout.plane_shape)}")
            self._ensure(t, c, z)
        except Exception:
            self.refused += 1
            self._defer(t, c, z, "lost", seq, time_s)
            raise
        lead = self.layout.lead_index(t, c, z)
        if self._rec["status"][lead] == STATUS["saved"]:
            log.warning("%s: t=%d c=%d z=%d written twice; keeping the first", self.name, t, c, z)
            return
        self.n_t = max(self.n_t, t + 1)
        self._rec["seq"][lead] = seq
        self._rec["time"][lead] = time_s
        self._rec["saturated"][lead] = saturated
        self._observe(c, plane)
        key = (t // self.shard_t, c, z)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _ShardBuffer(
                key[0] * self.shard_t, self.shard_t, self.layout.plane_shape, self.dtype
            )
        buf.put(t, plane)
        self._unsettled += 1
        if buf.full:
            self._submit(key)

    _STATUS_NAMES = {v: k for k, v in STATUS.items()}

    def status_at(self, t: int, c: int, z: int) -> str:
        """This frame's record as the writer knows it now (``saved`` once pixels and record are
        on disk): safe to call from another thread (a read of one small number)."""
        lead = self.layout.lead_index(t, c, z)
        rec = self._rec["status"]
        if any(i >= n for i, n in zip(lead, rec.shape, strict=True)):
            return "missing"
        return self._STATUS_NAMES.get(int(rec[lead]), "missing")

    def read_plane(self, t: int, c: int, z: int) -> np.ndarray:
        """A saved plane, read back from disk (for the in-order completion of products). Only
        planes whose :meth:`status_at` is ``saved`` are on disk."""
        sel = self.layout.lead_index(t, c, z)
        return np.asarray(self.array[sel].read().result())

    def mark(self, t: int, c: int, z: int, status: str, *, seq: int, time_s: float) -> None:
        """Record a frame that will not be written (skipped by the engine, lost, failed). Counted
        now; where the arrays cannot grow for it yet (a full disk) the record waits and is written
        on a later poll."""
        try:
            self._ensure(t, c, z)
        except Exception as exc:
            self.write_errors += 1
            self.last_error = f"records: {type(exc).__name__}: {exc}"
            self._count(status)
            self._defer(t, c, z, status, seq, time_s)
            return
        lead = self.layout.lead_index(t, c, z)
        if self._rec["status"][lead] == STATUS["saved"]:
            return
        self._count(status)
        self._set_record(lead, t, status, seq, time_s)

    def _count(self, status: str) -> None:
        if status == "skipped":
            self.skipped += 1
        elif status == "lost":
            self.lost += 1

    def _set_record(self, lead: tuple[int, ...], t: int, status: str, seq: int, time_s: float) -> None:
        self.n_t = max(self.n_t, t + 1)
        self._rec["status"][lead] = STATUS[status]
        self._rec["seq"][lead] = seq
        self._rec["time"][lead] = time_s
        self._pending(lead)  # written with the next poll: one batched write, not four per frame

    _MAX_DEFERRED = 100_000

    def _defer(self, t: int, c: int, z: int, status: str, seq: int, time_s: float) -> None:
        if len(self._deferred) >= self._MAX_DEFERRED:  # the disk stays full: keep the newest
            if len(self._deferred) == self._MAX_DEFERRED:
                log.error(
                    "%s: over %d frame records wait for room; older ones are dropped", self.name, self._MAX_DEFERRED
                )
            self._deferred.pop(0)
        self._deferred.append((t, c, z, status, seq, time_s))

    def _apply_deferred(self) -> bool:
        """Place the records that waited for the arrays to grow; False while they still cannot."""
        if self._applying:  # _ensure may drain, and a drain comes back here
            return True
        self._applying = True
        try:
            while self._deferred:
                t, c, z, status, seq, time_s = self._deferred[0]
                try:
                    self._ensure(t, c, z)
                except Exception as exc:
                    self.last_error = f"records: {type(exc).__name__}: {exc}"
                    return False
                self._deferred.pop(0)
                lead = self.layout.lead_index(t, c, z)
                if self._rec["status"][lead] != STATUS["saved"]:
                    self._set_record(lead, t, status, seq, time_s)
            return True
        finally:
            self._applying = False

    def _pending(self, lead: tuple[int, ...]) -> None:
        t = lead[0]
        span = self._rec_span
        self._rec_span = [t, t + 1] if span is None else [min(span[0], t), max(span[1], t + 1)]

    def write_meta(self, t: int, c: int, z: int, seq: int, meta: Mapping[str, Any]) -> None:
        """The acquisition's own per-frame metadata (pymmcore-plus, Pycro-Manager), one JSON line
        per frame in ``livescope/frames.jsonl``: append-only, never rewritten."""
        if self._meta_file is None:
            self._meta_file = open(self.path / "livescope" / "frames.jsonl", "a", encoding="utf-8")
        self._meta_file.write(json.dumps({"t": t, "c": c, "z": z, "seq": seq, "meta": meta}, default=str) + "\n")

    def write_scalar(self, name: str, t: int, c: int, z: int, value: float) -> None:
        """A per-frame number computed by an engine (e.g. ``novelty``), stored beside the records."""
        self._ensure(t, c, z)
        if name not in self.records:
            lead_shape = list(self._rec["status"].shape)
            self.records[name] = _open_array(
                self.path / "livescope" / name,
                shape=lead_shape,
                shard=[256] + lead_shape[1:],
                inner=[256] + lead_shape[1:],
                dtype="float64",
                fill="NaN",
                names=self.layout.axes[:-2],
                compress=False,
                context=self._context,
                create=True,
            )
            self._rec[name] = np.full(lead_shape, np.nan)
        lead = self.layout.lead_index(t, c, z)
        self._rec[name][lead] = value
        self._dirty_scalars.add(name)
        self._pending(lead)

    def _submit(self, key: tuple[int, int, int]) -> None:
        buf = self._buffers.pop(key)
        t0, n = buf.t0, buf.count_span
        _, c, z = key
        sel: tuple = (slice(t0, t0 + n),) + ((c,) if self.layout.has_c else ()) + ((z,) if self.layout.has_z else ())
        leads = [self.layout.lead_index(t, c, z) for t in buf.filled]
        try:
            if buf.complete_span:
                fut = self.array[sel].write(buf.data[:n])
            else:  # a partial shard (timer flush): write only the planes we have
                futs = []
                for t in buf.filled:
                    s = (t,) + sel[1:]
                    futs.append(self.array[s].write(buf.data[t - t0]))
                fut = _AllOf(futs)
        except Exception as exc:  # refused before any write started: these planes are lost, counted
            self._write_failed(exc, len(leads))
            self._settle(leads, "lost")
            return
        self.bytes_written += buf.data[0].nbytes * len(buf.filled)
        self._inflight.append((fut, leads, buf))
        self.inflight_bytes += buf.data.nbytes
        while self.inflight_bytes > self.max_inflight_bytes and len(self._inflight) > 1:
            self._drain(wait=True, one=True)  # bounded write-behind

    def flush_due(self, now: float | None = None) -> None:
        """Submit partial shards whose oldest plane waited longer than ``flush_after_s``."""
        now = time.monotonic() if now is None else now
        for key in [k for k, b in self._buffers.items() if now - b.created > self.flush_after_s]:
            # the rest of this shard's planes, if any arrive, start a fresh buffer at the next t
            self._submit(key)

    def poll(self) -> int:
        """Turn completed writes (in order) into saved records, retry record writes that failed,
        and now and then rewrite the metadata while the display window changes; returns frames
        newly saved (pixels and record on disk)."""
        n = self._drain(wait=False)
        if self._meta_changed and time.monotonic() - self._meta_written > self.meta_every_s:
            try:
                self._write_group_metadata()
            except OSError as exc:  # tried again after meta_every_s, and at flush/close
                self._meta_written = time.monotonic()
                log.warning("%s: could not update the image metadata: %s", self.name, exc)
        return n

    def _drain(self, wait: bool, one: bool = False, force_records: bool = False) -> int:
        done_leads: list[tuple[int, ...]] = []
        failed_leads: list[tuple[int, ...]] = []
        while self._inflight:
            fut, leads, buf = self._inflight[0]
            if not wait and not fut.done():
                break
            if one and (done_leads or failed_leads):
                break
            self._inflight.pop(0)
            self.inflight_bytes -= buf.data.nbytes
            # a partial shard is one write per plane: each plane saved or lost on its own
            errors = fut.errors() if isinstance(fut, _AllOf) else [_error_of(fut)] * len(leads)
            for lead, exc in zip(leads, errors, strict=True):
                (done_leads if exc is None else failed_leads).append(lead)
            exc = next((e for e in errors if e is not None), None)
            if exc is not None:  # disk full, permissions, a vanished folder: count, never stall
                self._write_failed(exc, sum(e is not None for e in errors))
        self._settle(failed_leads, "lost")
        self._settle(done_leads, "saved")
        if self._meta_file is not None:
            self._meta_file.flush()  # handed to the OS with the frames it describes
        return self._write_records(force_records)

    def _write_failed(self, exc: BaseException, n: int) -> None:
        self.write_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error("%s: writing %d frame(s) failed: %s", self.name, n, self.last_error)

    def _settle(self, leads: list[tuple[int, ...]], status: str) -> None:
        """The planes' final status; only then do they leave ``pending`` (see ``_unsettled``)."""
        for lead in leads:
            self._rec["status"][lead] = STATUS[status]
            self._pending(lead)
        if status == "lost":
            self.lost += len(leads)
        else:
            self._unrecorded_saved += len(leads)
        self._unsettled -= len(leads)

    def _write_records(self, force: bool) -> int:
        """Write the records not yet on disk; a failed write keeps them for the next try (polls
        retry every ``retry_after_s`` while it fails, ``flush``/``close`` always). Returns the
        frames that became saved."""
        if self._records_failing and not force and time.monotonic() < self._next_retry:
            return 0
        ok = self._apply_deferred()
        span = self._rec_span
        if span is not None:
            lo, hi = span
            names = list(RECORD_FIELDS) + sorted(self._dirty_scalars)
            try:
                futs = [self.records[k][lo:hi].write(self._rec[k][lo:hi]) for k in names]
                for f in futs:
                    f.result()
            except Exception as exc:
                ok = False
                self.last_error = f"records: {type(exc).__name__}: {exc}"
            else:
                if self._rec_span == span:
                    self._rec_span = None
                self._dirty_scalars.clear()
        if not ok:
            if not self._records_failing:
                # the frames are on disk but their records are not: until a retry succeeds they
                # would not count as saved after a crash (recovery trusts the records)
                self.write_errors += 1
                log.error("%s: writing records failed, kept and retried: %s", self.name, self.last_error)
            self._records_failing = True
            self._next_retry = time.monotonic() + self.retry_after_s
            return 0
        if self._records_failing:
            log.warning("%s: records written again after a failure", self.name)
            self._records_failing = False
        n, self._unrecorded_saved = self._unrecorded_saved, 0
        self.saved += n
        return n

    @property
    def pending(self) -> int:
        """Planes taken by :meth:`write` whose status is not final yet (buffered, or being
        written). Safe to read from another thread: once it reads 0, every plane written before
        has its final status in :meth:`status_at`."""
        return self._unsettled

    @property
    def unrecorded(self) -> int:
        """Frames whose record is not on disk yet (0 when every record is written)."""
        n = len(self._deferred)
        if self._rec_span is not None:
            lo, hi = self._rec_span
            n += int(np.count_nonzero(self._rec["status"][lo:hi]))
        return n

    def flush(self) -> int:
        """Write every buffered plane, wait for every write in flight, write the records (retrying
        those that failed) and the metadata (display window, sizes). Returns ``unrecorded``: 0 when
        everything is on disk. Call it from the thread that writes, or after it stopped."""
        for key in list(self._buffers):
            self._submit(key)
        self._drain(wait=True, force_records=True)
        self._write_group_metadata()
        return self.unrecorded

    def close(self) -> None:
        for key in list(self._buffers):
            self._submit(key)
        self._drain(wait=True, force_records=True)
        if self._meta_file is not None:
            self._meta_file.close()
            self._meta_file = None
        if self.unrecorded:
            log.error(
                "%s: the records of %d frame(s) could not be written (%s); they read as missing",
                self.name,
                self.unrecorded,
                self.last_error,
            )
        y, x = self.layout.plane_shape
        n_t = max(self.n_t, 1)
        lead = self.layout.lead_shape(n_t)
        self.array = self.array.resize(exclusive_max=lead + [y, x], resize_metadata_only=True).result()
        for k in list(self.records):
            self.records[k] = self.records[k].resize(exclusive_max=lead, resize_metadata_only=True).result()
        self._write_group_metadata()


def _error_of(fut: Any) -> Exception | None:
    try:
        fut.result()
    except Exception as exc:
        return exc
    return None


class _AllOf:
    def __init__(self, futs: list[Any]) -> None:
        self.futs = futs

    def done(self) -> bool:
        return all(f.done() for f in self.futs)

    def errors(self) -> list[Exception | None]:
        """Each write's outcome, after waiting for every one (a failed plane must not leave the
        others unaccounted for: they may still land)."""
        return [_error_of(f) for f in self.futs]


class _ShardBuffer:
    def __init__(self, t0: int, n: int, plane_shape: tuple[int, int], dtype: np.dtype) -> None:
        self.t0 = t0
        self.n = n
        self.data = np.empty((n, *plane_shape), dtype=dtype)
        self.filled: list[int] = []
        self.created = time.monotonic()

    def put(self, t: int, plane: np.ndarray) -> None:
        self.data[t - self.t0] = plane
        self.filled.append(t)

    @property
    def full(self) -> bool:
        return len(self.filled) == self.n

    @property
    def count_span(self) -> int:
        return max(self.filled) - self.t0 + 1

    @property
    def complete_span(self) -> bool:
        return len(self.filled) == self.count_span


class OmeZarrStore:
    """The output folder: a root group listing one NGFF image per (product, position, segment)."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        resume: bool = False,
        compress_raw: bool = False,
        float16: bool = False,
        product_dtypes: Mapping[str, str] | None = None,
        fsync: bool = False,
        provenance: Mapping[str, Any] | None = None,
        min_free_gb: float = 1.0,
    ) -> None:
        self.path = Path(path)
        # per product, the stored dtype (float16 / float32) where it is not the layout's (float32)
        self.product_dtypes = dict(product_dtypes or {})
        self.segment_base = 0  # a resumed store continues with segments after the existing ones
        previous: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        if self.path.exists() and any(self.path.iterdir()):
            if resume and (self.path / "zarr.json").exists():
                recovered = recover(self.path)  # trims a crashed run; idempotent after a clean one
                meta = json.loads((self.path / "zarr.json").read_text())["attributes"]["livescope"]
                previous = list(meta.get("images", []))
                runs = list(meta.get("runs", [])) + [
                    {k: meta.get("provenance", {}).get(k) for k in ("started", "finished", "source")}
                    | {"saved": recovered}
                ]
                self.segment_base = 1 + max((int(i.get("segment", 0)) for i in previous), default=-1)
            elif not overwrite:
                raise StoreError(
                    f"{self.path} already exists and is not empty; pass --resume to add this run to it "
                    "(as new segments), --overwrite to replace it, or choose another --out"
                )
            else:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._previous_images = previous
        self._previous_described = [d for d in (_image_from_disk(self.path, e) for e in previous) if d]
        self._root_lock = threading.Lock()
        self._runs = runs
        self.compress_raw = compress_raw
        self.float16 = float16
        self.fsync = fsync
        self.context = _context(fsync)
        self.provenance = dict(provenance or {})
        self.provenance.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.images: dict[str, ImageWriter] = {}
        self.min_free_gb = min_free_gb
        self._lock = threading.Lock()
        self._closed = False
        free = self.free_bytes()
        if free < min_free_gb * 2**30:
            raise StoreError(
                f"only {free / 2**30:.1f} GB free at {self.path}; free some space or choose another --out "
                f"(at least {min_free_gb} GB needed)"
            )
        self._write_root()

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def _write_root(self) -> None:
        with self._root_lock:  # the store thread (new images) and the control thread (provenance)
            writers = list(self.images.values())
            images = list(self._previous_images) + [
                {"path": w.name, "product": w.product, "position": w.position, "segment": w.segment} for w in writers
            ]
            attrs = {
                "ome": _write_collection(self.path, self._previous_described + [w.describe() for w in writers]),
                "livescope": {
                    "version": 1,
                    "layout": "one NGFF image per product/position/segment",
                    "images": images,
                    "provenance": self.provenance,
                },
            }
            if self._runs:
                attrs["livescope"]["runs"] = self._runs
            _atomic_write_json(self.path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})

    def flush(self) -> int:
        """Write every buffered plane, wait for every write in flight, write every record (retrying
        those that failed) and the metadata (display windows, sizes, the root's collection).
        Returns the frames whose records are still not on disk: 0 when everything is.

        The writers' counts (``saved``, ``lost``) are final after it, so a run's summary is
        computed after ``flush()``: ``flush(); update_provenance(summary=...); close()``. Call it
        from the thread that writes, or after that thread stopped."""
        left = 0
        for w in list(self.images.values()):
            try:
                left += w.flush()
            except Exception as exc:  # one broken image must not stop the others
                log.error("flushing image %s failed: %s", w.name, exc)
                left += w.unrecorded
        try:
            self._write_root()
        except OSError as exc:
            log.error("could not update %s/zarr.json: %s", self.path, exc)
        return left

    def image(self, product: str, position: int, segment: int, layout: ImageLayout, stream: str = "") -> ImageWriter:
        name = image_name(product, position, segment, stream)
        with self._lock:
            w = self.images.get(name)
            if w is None:
                if product != "raw":
                    dtype = self.product_dtypes.get(product, "float16" if self.float16 else layout.dtype)
                    if dtype != layout.dtype:
                        layout = ImageLayout(**{**layout.__dict__, "dtype": dtype})
                w = ImageWriter(
                    self.path,
                    name,
                    layout,
                    product=product,
                    position=position,
                    segment=segment,
                    compress=self.compress_raw and product == "raw",
                    context=self.context,
                )
                self.images[name] = w
                self._write_root()
            return w

    def update_provenance(self, **items: Any) -> None:
        self.provenance.update(items)
        try:
            self._write_root()
        except OSError as exc:
            log.error("could not update %s/zarr.json: %s", self.path, exc)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self.images.values():
            try:
                w.close()
            except Exception:  # one broken image must not stop the others from closing
                log.exception("closing image %s failed", w.name)
        self.provenance["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            self._write_root()
        except OSError as exc:  # e.g. the disk is full: the previous root metadata stays valid
            log.error("could not update %s/zarr.json on close: %s", self.path, exc)


# -- the root's collection ------------------------------------------------------------------
# The root is an NGFF "bioformats2raw.layout" collection: OME/zarr.json lists every image's path
# ("series") in the order of the Image elements of OME/METADATA.ome.xml. napari-ome-zarr opens
# every image from the root this way. ome-zarr-py's Reader follows no collection (only labels,
# plates and wells), so the root also carries the first raw image's multiscales, its dataset path
# pointing into that image ("raw/0"): Reader(parse_url(OUT)) opens raw, OUT/<image> opens each.
_OME_UNITS = {
    "micrometer": "µm",
    "nanometer": "nm",
    "millimeter": "mm",
    "second": "s",
    "millisecond": "ms",
    "microsecond": "µs",
    "minute": "min",
    "hour": "h",
}


def _image_from_disk(root: Path, entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """An image as ``ImageWriter.describe`` gives it, read back from its metadata on disk (a
    previous run's image, or after a crash); None where it cannot be read."""
    ipath = Path(root) / str(entry["path"])
    try:
        attrs = json.loads((ipath / "zarr.json").read_text())["attributes"]
        ome = attrs["ome"]
        array = json.loads((ipath / ome["multiscales"][0]["datasets"][0]["path"] / "zarr.json").read_text())
        shape, dtype = list(array["shape"]), str(array["data_type"])
    except (OSError, KeyError, IndexError, TypeError, ValueError) as exc:
        log.warning("%s: unreadable image metadata (%s); left out of the root's collection", ipath, exc)
        return None
    return {
        **{k: entry.get(k) for k in ("path", "product", "position", "segment")},
        "dtype": dtype,
        "bits": (attrs.get("livescope") or {}).get("bits"),
        "shape": shape,
        "ome": ome,
    }


def _ome_xml(images: list[dict[str, Any]]) -> str:
    """The collection's OME-XML: one MetadataOnly Image per image, its ID naming its path."""
    import xml.etree.ElementTree as ET

    ome = ET.Element(
        "OME",
        {
            "xmlns": OME_XML_NS,
            "xmlns:xsi": "http://www.w3.org/2001/XMLSchema-instance",
            "xsi:schemaLocation": f"{OME_XML_NS} {OME_XML_NS}/ome.xsd",
            "Creator": "livescope",
        },
    )
    for im in images:
        name = str(im["path"])
        ms = im["ome"]["multiscales"][0]
        axes = [a["name"] if isinstance(a, dict) else str(a) for a in ms["axes"]]
        units = {a["name"]: a.get("unit") for a in ms["axes"] if isinstance(a, dict)}
        transforms = ms["datasets"][0].get("coordinateTransformations", [])
        scales = [t["scale"] for t in transforms if t.get("type") == "scale"]
        scale = dict(zip(axes, scales[0] if scales else [1.0] * len(axes), strict=True))
        size = dict(zip(axes, im["shape"], strict=True))
        dtype = str(im["dtype"])
        pixels = {
            "ID": f"Pixels:{name}",
            "DimensionOrder": "XYZCT",
            "Type": _OME_TYPES.get(dtype, "double"),
            "SizeX": str(size.get("x", 1)),
            "SizeY": str(size.get("y", 1)),
            "SizeZ": str(size.get("z", 1)),
            "SizeC": str(size.get("c", 1)),
            "SizeT": str(max(int(size.get("t", 1)), 1)),
            "BigEndian": "false",
        }
        if im.get("bits") and dtype.startswith(("uint", "int")):
            pixels["SignificantBits"] = str(int(im["bits"]))
        for ax, key in (("x", "PhysicalSizeX"), ("y", "PhysicalSizeY"), ("z", "PhysicalSizeZ"), ("t", "TimeIncrement")):
            unit = _OME_UNITS.get(str(units.get(ax)))
            if unit and ax in scale:  # only what the stream gave: an axis without a unit stays unknown
                pixels[key] = repr(float(scale[ax]))
                pixels[key + "Unit"] = unit
        image = ET.SubElement(ome, "Image", {"ID": f"Image:{name}", "Name": name})
        pix = ET.SubElement(image, "Pixels", pixels)
        for i, ch in enumerate((im["ome"].get("omero") or {}).get("channels", [])[: int(size.get("c", 1))]):
            ET.SubElement(
                pix,
                "Channel",
                {"ID": f"Channel:{name}:{i}", "Name": str(ch.get("label", f"channel {i}")), "SamplesPerPixel": "1"},
            )
        ET.SubElement(pix, "MetadataOnly")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(ome, encoding="unicode") + "\n"


def _write_collection(root: Path, images: list[dict[str, Any]]) -> dict[str, Any]:
    """Write OME/ (series + OME-XML) for these images; returns the root's ``ome`` attributes."""
    ome: dict[str, Any] = {"version": NGFF_VERSION}
    if not images:  # the layout promises images: none yet, no collection
        return ome
    (root / "OME").mkdir(exist_ok=True)
    # OME/ first: a reader that sees the root's marker finds the series it points to
    _atomic_write_text(root / "OME" / "METADATA.ome.xml", _ome_xml(images))
    _atomic_write_json(
        root / "OME" / "zarr.json",
        {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {"ome": {"version": NGFF_VERSION, "series": [str(im["path"]) for im in images]}},
        },
    )
    ome["bioformats2raw.layout"] = BF2RAW_LAYOUT
    raws = [im for im in images if im.get("product") == "raw"]
    if raws:
        first = min(raws, key=lambda im: (int(im.get("position") or 0), int(im.get("segment") or 0)))
        ms = json.loads(json.dumps(first["ome"]["multiscales"][0]))  # a copy
        for ds in ms["datasets"]:
            ds["path"] = f"{first['path']}/{ds['path']}"
        ome["multiscales"] = [ms]
        if first["ome"].get("omero"):
            ome["omero"] = json.loads(json.dumps(first["ome"]["omero"]))
    return ome


def refresh_root(path: str | os.PathLike) -> None:
    """Rewrite the root's collection (OME/ and the raw image's multiscales) from the images' own
    metadata on disk: ``recover`` calls it; so should a writer that changed images behind the
    store's back (sizes, display windows)."""
    root = Path(path)
    meta = json.loads((root / "zarr.json").read_text())
    attrs = meta.setdefault("attributes", {})
    entries = (attrs.get("livescope") or {}).get("images", [])
    attrs["ome"] = _write_collection(root, [d for d in (_image_from_disk(root, e) for e in entries) if d])
    _atomic_write_json(root / "zarr.json", meta)


# -- reading --------------------------------------------------------------------------------
def _record_names(image_path: Path) -> list[str]:
    d = Path(image_path) / "livescope"
    return sorted(p.name for p in d.iterdir() if p.is_dir() and (p / "zarr.json").exists())


def read_records(image_path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The per-frame records of one image (after a crash too), and per-frame engine scalars."""
    import zarr

    out = {}
    for k in _record_names(Path(image_path)):
        out[k] = np.asarray(zarr.open_array(str(Path(image_path) / "livescope" / k), mode="r")[...])
    return out


def recover(path: str | os.PathLike) -> dict[str, int]:
    """After a crash: trim each image's time axis to its last saved frame (the shape may have run
    ahead of the data) and record it. Returns saved frames per image; idempotent."""
    import zarr

    root = Path(path)
    out: dict[str, int] = {}
    meta = json.loads((root / "zarr.json").read_text())
    for entry in meta["attributes"]["livescope"]["images"]:
        ipath = root / entry["path"]
        rec = read_records(ipath)
        status = rec["status"]
        saved_t = np.nonzero((status == STATUS["saved"]).reshape(status.shape[0], -1).any(axis=1))[0]
        n_t = int(saved_t[-1]) + 1 if saved_t.size else 0
        arr = zarr.open_array(str(ipath / "0"), mode="r+")
        arr.resize((max(n_t, 1),) + arr.shape[1:])
        for k in _record_names(ipath):
            r = zarr.open_array(str(ipath / "livescope" / k), mode="r+")
            r.resize((max(n_t, 1),) + r.shape[1:])
        out[entry["path"]] = int((status == STATUS["saved"]).sum())
    meta["attributes"]["livescope"]["recovered"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _atomic_write_json(root / "zarr.json", meta)
    refresh_root(root)  # the collection's sizes as trimmed
    return out


def list_images(path: str | os.PathLike) -> list[dict[str, Any]]:
    meta = json.loads((Path(path) / "zarr.json").read_text())
    return list(meta["attributes"]["livescope"]["images"])


def iter_saved(image_path: str | os.PathLike) -> Iterable[tuple[tuple[int, ...], int]]:
    rec = read_records(image_path)
    for lead in zip(*np.nonzero(rec["status"] == STATUS["saved"]), strict=True):
        yield tuple(int(i) for i in lead), int(rec["seq"][lead])
