"""OME-Zarr (NGFF 0.5, Zarr v3) store for raw frames and engine products.

Layout under the output folder (documented in docs/store.md)::

    OUT/zarr.json                 root group: livescope provenance + the list of images
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
intact, even where the array's shape ran ahead of the data. ``fsync=True`` adds power-loss
safety at a cost (docs/store.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
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
]

log = logging.getLogger(__name__)

STATUS = {"missing": 0, "saved": 1, "skipped": 2, "lost": 3, "failed": 4}
RECORD_FIELDS = {"seq": "int64", "time": "float64", "status": "uint8", "saturated": "int32"}
_RECORD_FILL = {"seq": -1, "time": float("nan"), "status": 0, "saturated": -1}
NGFF_VERSION = "0.5"
COLORS = ["00FF00", "FF00FF", "00FFFF", "FFFF00", "FF0000", "0000FF", "FFFFFF"]


class StoreError(RuntimeError):
    pass


def image_name(product: str, position: int = 0, segment: int = 0) -> str:
    """``raw``, ``raw_p1`` (position 1), ``raw_seg2`` (segment 2), ``denoised_p1_seg2``."""
    name = product
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


def _atomic_write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)  # atomic on POSIX and Windows


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
        self._inflight: list[tuple[Any, list[tuple[int, ...]]]] = []
        self._dirty: list[tuple[int, ...]] = []  # records changed without a data write (marks, scalars)
        self._dirty_scalars: set[str] = set()
        self._meta_file: Any = None
        self.inflight_bytes = 0
        self.max_inflight_bytes = 64 * 2**20  # a cap on pixels held by writes in flight, per image
        self.n_t = 0
        self.saved = 0
        self.skipped = 0
        self.lost = 0
        self.bytes_written = 0
        self.write_errors = 0
        self.last_error = ""
        self.window = [math.inf, -math.inf]  # display range seen, for the omero block
        self._write_group_metadata()

    # -- metadata ---------------------------------------------------------------------------
    def _write_group_metadata(self) -> None:
        lay = self.layout
        axes: list[dict[str, str]] = [{"name": "t", "type": "time", "unit": "second"}]
        scale = [float(lay.interval_s or 1.0)]
        if lay.has_c:
            axes.append({"name": "c", "type": "channel"})
            scale.append(1.0)
        if lay.has_z:
            axes.append({"name": "z", "type": "space", "unit": "micrometer"})
            scale.append(float(lay.z_step_um or 1.0))
        px = float(lay.pixel_size_um or 1.0)
        axes += [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
        scale += [px, px]
        if self.dtype.kind == "f":
            lo, hi = (self.window if math.isfinite(self.window[0]) else [0.0, 1.0])
            dmin, dmax = float(lo), float(hi)
        else:
            lo = 0
            hi = 2 ** (lay.bits or self.dtype.itemsize * 8) - 1
            dmin, dmax = 0, int(np.iinfo(self.dtype).max)
            if math.isfinite(self.window[0]):
                lo, hi = self.window
        n_c = lay.n_c if lay.has_c else 1
        names = lay.channel_names or []
        channels = [
            {
                "label": names[i] if i < len(names) else f"channel {i}",
                "color": COLORS[i % len(COLORS)] if n_c > 1 else "FFFFFF",
                "window": {"start": float(lo), "end": float(hi), "min": float(dmin), "max": float(dmax)},
                "active": True,
            }
            for i in range(n_c)
        ]
        ome = {
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
        attrs = {
            "ome": ome,
            "livescope": {
                "product": self.product,
                "position": self.position,
                "segment": self.segment,
                "bits": lay.bits,
                "frames": self.n_t,
                "saved": self.saved,
                "skipped": self.skipped,
                "lost": self.lost,
            },
        }
        _atomic_write_json(self.path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})

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
        self.capacity_t, lay.n_c, lay.n_z = capacity, n_c, n_z
        for k in list(self.records):
            self.records[k] = self.records[k].resize(exclusive_max=lead, resize_metadata_only=True).result()
            old = self._rec[k]
            new = np.full(lead, _RECORD_FILL.get(k, np.nan), dtype=old.dtype)
            new[tuple(slice(0, s) for s in old.shape)] = old
            self._rec[k] = new
        if grow_c or grow_z:
            self._write_group_metadata()

    def write(self, t: int, c: int, z: int, plane: np.ndarray, *, seq: int, time_s: float, saturated: int = -1) -> None:
        """Buffer one plane; it is saved once ``poll`` reports its shard written."""
        if plane.shape != tuple(self.layout.plane_shape):
            raise StoreError(f"{self.name}: plane shape {plane.shape} != {tuple(self.layout.plane_shape)}")
        self._ensure(t, c, z)
        lead = self.layout.lead_index(t, c, z)
        if self._rec["status"][lead] == STATUS["saved"]:
            log.warning("%s: t=%d c=%d z=%d written twice; keeping the first", self.name, t, c, z)
            return
        self.n_t = max(self.n_t, t + 1)
        self._rec["seq"][lead] = seq
        self._rec["time"][lead] = time_s
        self._rec["saturated"][lead] = saturated
        key = (t // self.shard_t, c, z)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = _ShardBuffer(key[0] * self.shard_t, self.shard_t, self.layout.plane_shape, self.dtype)
        buf.put(t, plane)
        if buf.full:
            self._submit(key)

    def mark(self, t: int, c: int, z: int, status: str, *, seq: int, time_s: float) -> None:
        """Record a frame that will not be written (skipped by the engine, lost, failed)."""
        self._ensure(t, c, z)
        lead = self.layout.lead_index(t, c, z)
        if self._rec["status"][lead] == STATUS["saved"]:
            return
        self.n_t = max(self.n_t, t + 1)
        self._rec["status"][lead] = STATUS[status]
        self._rec["seq"][lead] = seq
        self._rec["time"][lead] = time_s
        if status == "skipped":
            self.skipped += 1
        elif status == "lost":
            self.lost += 1
        self._dirty.append(lead)  # written with the next poll: one batched write, not four per frame

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
                self.path / "livescope" / name, shape=lead_shape, shard=[256] + lead_shape[1:],
                inner=[256] + lead_shape[1:], dtype="float64", fill="NaN", names=self.layout.axes[:-2],
                compress=False, context=self._context, create=True)
            self._rec[name] = np.full(lead_shape, np.nan)
        lead = self.layout.lead_index(t, c, z)
        self._rec[name][lead] = value
        self._dirty_scalars.add(name)
        self._dirty.append(lead)

    def _submit(self, key: tuple[int, int, int]) -> None:
        buf = self._buffers.pop(key)
        t0, n = buf.t0, buf.count_span
        _, c, z = key
        sel: tuple = (slice(t0, t0 + n),) + ((c,) if self.layout.has_c else ()) + ((z,) if self.layout.has_z else ())
        if buf.complete_span:
            fut = self.array[sel].write(buf.data[:n])
        else:  # a partial shard (timer flush): write only the planes we have
            futs = []
            for t in buf.filled:
                s = (t,) + sel[1:]
                futs.append(self.array[s].write(buf.data[t - t0]))
            fut = _AllOf(futs)
        leads = [self.layout.lead_index(t, c, z) for t in buf.filled]
        self.bytes_written += buf.data[0].nbytes * len(buf.filled)
        self._inflight.append((fut, leads, buf))
        self.inflight_bytes += buf.data.nbytes
        while self.inflight_bytes > self.max_inflight_bytes and len(self._inflight) > 1:
            self._drain(wait=True, one=True)  # bounded write-behind

    def flush_due(self, now: float | None = None) -> None:
        """Submit partial shards whose oldest plane waited longer than ``flush_after_s``."""
        now = time.monotonic() if now is None else now
        for key in [k for k, b in self._buffers.items() if now - b.created > self.flush_after_s]:
            buf = self._buffers[key]
            self._submit(key)
            # the rest of this shard's planes, if any arrive, start a fresh buffer at the next t
            _ = buf

    def poll(self) -> int:
        """Turn completed writes (in order) into saved records; returns frames newly saved."""
        return self._drain(wait=False)

    def _drain(self, wait: bool, one: bool = False) -> int:
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
            try:
                fut.result()
                done_leads.extend(leads)
            except Exception as exc:  # disk full, permissions, a vanished folder: count, never stall
                failed_leads.extend(leads)
                self.write_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.error("%s: writing %d frame(s) failed: %s", self.name, len(leads), self.last_error)
        for lead in failed_leads:
            self._rec["status"][lead] = STATUS["lost"]
        self.lost += len(failed_leads)
        if done_leads:
            for lead in done_leads:
                self._rec["status"][lead] = STATUS["saved"]
            self.saved += len(done_leads)
        if self._meta_file is not None:
            self._meta_file.flush()  # handed to the OS with the frames it describes
        dirty, self._dirty = self._dirty, []
        if done_leads or failed_leads or dirty:
            try:
                self._write_records(done_leads + failed_leads + dirty)
            except Exception as exc:
                # the frames are on disk but their records are not: they will not count as saved
                # after a crash (recovery trusts the records); report it
                self.write_errors += 1
                self.last_error = f"records: {type(exc).__name__}: {exc}"
                log.error("%s: writing records failed: %s", self.name, exc)
        return len(done_leads)

    def _write_records(self, leads: list[tuple[int, ...]]) -> None:
        lo = min(l[0] for l in leads)
        hi = max(l[0] for l in leads) + 1
        names = list(RECORD_FIELDS) + sorted(self._dirty_scalars)
        self._dirty_scalars.clear()
        futs = [self.records[k][lo:hi].write(self._rec[k][lo:hi]) for k in names]
        for f in futs:
            f.result()

    @property
    def pending(self) -> int:
        return sum(len(b.filled) for b in self._buffers.values()) + sum(len(l) for _, l, _ in self._inflight)

    def observe_window(self, lo: float, hi: float) -> None:
        self.window = [min(self.window[0], lo), max(self.window[1], hi)]

    def close(self) -> None:
        for key in list(self._buffers):
            self._submit(key)
        self._drain(wait=True)
        if self._meta_file is not None:
            self._meta_file.close()
            self._meta_file = None
        y, x = self.layout.plane_shape
        n_t = max(self.n_t, 1)
        lead = self.layout.lead_shape(n_t)
        self.array = self.array.resize(exclusive_max=lead + [y, x], resize_metadata_only=True).result()
        for k in list(self.records):
            self.records[k] = self.records[k].resize(exclusive_max=lead, resize_metadata_only=True).result()
        self._write_group_metadata()


class _AllOf:
    def __init__(self, futs: list[Any]) -> None:
        self.futs = futs

    def done(self) -> bool:
        return all(f.done() for f in self.futs)

    def result(self) -> None:
        for f in self.futs:
            f.result()


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
        fsync: bool = False,
        provenance: Mapping[str, Any] | None = None,
        min_free_gb: float = 1.0,
    ) -> None:
        self.path = Path(path)
        self.segment_base = 0  # a resumed store continues with segments after the existing ones
        previous: list[dict[str, Any]] = []
        runs: list[dict[str, Any]] = []
        if self.path.exists() and any(self.path.iterdir()):
            if resume and (self.path / "zarr.json").exists():
                recovered = recover(self.path)  # trims a crashed run; idempotent after a clean one
                meta = json.loads((self.path / "zarr.json").read_text())["attributes"]["livescope"]
                previous = list(meta.get("images", []))
                runs = list(meta.get("runs", [])) + [{k: meta.get("provenance", {}).get(k) for k in
                                                     ("started", "finished", "source")} | {"saved": recovered}]
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
        images = list(self._previous_images) + [
            {"path": w.name, "product": w.product, "position": w.position, "segment": w.segment}
            for w in self.images.values()
        ]
        attrs = {"livescope": {"version": 1, "layout": "one NGFF image per product/position/segment",
                               "images": images, "provenance": self.provenance}}
        if self._runs:
            attrs["livescope"]["runs"] = self._runs
        _atomic_write_json(self.path / "zarr.json", {"zarr_format": 3, "node_type": "group", "attributes": attrs})

    def image(self, product: str, position: int, segment: int, layout: ImageLayout) -> ImageWriter:
        name = image_name(product, position, segment)
        with self._lock:
            w = self.images.get(name)
            if w is None:
                if product != "raw" and self.float16:
                    layout = ImageLayout(**{**layout.__dict__, "dtype": "float16"})
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
    return out


def list_images(path: str | os.PathLike) -> list[dict[str, Any]]:
    meta = json.loads((Path(path) / "zarr.json").read_text())
    return list(meta["attributes"]["livescope"]["images"])


def iter_saved(image_path: str | os.PathLike) -> Iterable[tuple[tuple[int, ...], int]]:
    rec = read_records(image_path)
    for lead in zip(*np.nonzero(rec["status"] == STATUS["saved"])):
        yield tuple(int(i) for i in lead), int(rec["seq"][lead])
