"""``livescope process`` at scale: the engine chain over a saved movie, chunk-parallel on Dask.

The movie is cut into chunks: a range of time points x one (position, channel, plane) "unit" x
one spatial tile. Each chunk is one task that reads its own input lazily (with the context its engines need),
runs a fresh engine chain on it and writes its part of every product straight into the output
OME-Zarr, whose shards are aligned to the chunks, so no two tasks ever write the same file.

What context a chunk needs follows from the engines (:func:`engine_reach`):

- a spatial **halo**: pixels of overlap on each side of a tile, or ``None`` when the engine needs
  the whole frame (it normalises over it, or its per-frame numbers are about the whole frame);
- a temporal **warm-up**: past frames a fresh engine must see before its output equals the live
  one's (a finite window: ``denoise``'s past frames), or ``None`` when the engine's state reaches
  back further than any finite window (running averages, a reference from the first frames:
  ``decompose``, ``register``). Such chains are run *in order* over time, one task per unit and
  tile, handing their state from one time chunk to the next (and to disk, for resume), which is
  exact; their parallelism comes from channels, planes and positions.

What an engine fixes on its first frame (the camera offset of ``deconvolve``, the normalisation of
``denoise``) is measured once by the driver on the unit's first frame and handed to every chunk,
so chunks far into the movie see the same settings a single-process run would.

Resume: a chunk counts as done when its marker file exists; the marker is written (atomically)
only after all its data writes completed. Tasks are idempotent (the same chunk always writes the
same bytes into the same shards), so a task that Dask runs twice, or that a killed worker left
half-written, is simply redone. Records (``OUT/<product>/livescope/*``) are written by the driver
alone, from the markers, so concurrent tasks never share a records shard.
The engines' events travel in the markers too and are put together by the driver (numbered in
frame order, into ``provenance.events`` where the live daemon keeps them), so a rerun task or a
resume never duplicates one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..bridges.movies import Movie, open_movie
from ..engines import Chunkable, Reach
from .chain import Chain, event_record, number_events

__all__ = [
    "Job",
    "Reach",
    "Source",
    "engine_reach",
    "open_source",
    "plan_job",
    "run_chain",
    "run_chunk",
    "run_job",
]

log = logging.getLogger(__name__)

STATE_DIR = ".livescope-process"  # markers, checkpoints and the job description, inside OUT
LEAD = ("t", "c", "z")


# ============================================================================ sources


# A movie on disk, read through the one reader the daemon's file source also uses
# (:mod:`livescope.bridges.movies`): picklable, opened lazily once per worker process.
Source = Movie


def open_source(
    path: str | os.PathLike, sampling: dict[str, float | None] | None = None, axes: str | None = None
) -> Source:
    """OME-Zarr (livescope's own output or any NGFF image, Zarr v2 or v3), OME-TIFF / ImageJ /
    plain TIFF, or an NDTiff dataset (Pycro-Manager, read with ``ndstorage``), as
    :func:`livescope.bridges.movies.open_movie` reads them (``axes``: ``--axes``). ``sampling``
    (``pixel_size_um``, ``z_step_um``, ``interval_s``) replaces what the file says where a value is
    given."""
    from ..bridges.files import check_sampling

    given = check_sampling(sampling or {})
    src = open_movie(path, axes)
    for k, v in given.items():
        if src.info.get(k) not in (None, v):
            log.info("%s: %s %s from the command line replaces the file's %s", path, k, v, src.info[k])
    if given:
        src = dataclasses.replace(src, info={**src.info, **given})
    return src


# ============================================================================ engines


def movie_spec(src: Movie, shape: tuple[int, ...], p: int, c: int, dtype: str, bits: int) -> Any:
    """What the engines are told of a movie's stream: its sampling, and for a livescope store what
    the daemon told them when it saved the raw (camera offset and gain, bit depth, binning), so
    that reprocessing computes what the daemon saved."""
    from ..engines import StreamSpec

    facts = src.stream
    info = src.info

    def sampling(key: str) -> Any:
        return info.get(key) if info.get(key) is not None else facts.get(key)

    return StreamSpec(
        shape=shape,
        dtype=str(facts.get("dtype", dtype)),
        bits=int(facts.get("bits", bits)),
        pixel_size_um=sampling("pixel_size_um"),
        z_step_um=sampling("z_step_um"),
        interval_s=sampling("interval_s"),
        position=p if facts else 0,
        channel=str(c),
        camera_offset=facts.get("camera_offset"),
        camera_gain=facts.get("camera_gain"),
        binning=int(facts.get("binning") or 1),
        extra=dict(facts.get("extra") or {}),
    )


def movie_frame_info(src: Movie, t: int, p: int, c: int, z: int | None, *, seq: int) -> Any:
    """A frame's info: for a livescope store, its seq and time as the daemon received it; else
    ``seq`` and the nominal time (t x interval)."""
    from ..engines import FrameInfo

    recorded = src.recorded(t, p, c, z)
    if recorded is not None:
        seq, ts = recorded
    else:
        ts = t * float(src.info.get("interval_s") or 1.0)
    index = {"t": t, "p": p, "c": c} if z is None else {"t": t, "p": p, "c": c, "z": z}
    return FrameInfo(seq=seq, timestamp=ts, index=index)


def engine_reach(name: str, eng: Any) -> Reach:
    """The chunking rule of one engine (after ``setup``): its own ``reach()``; whole frames, in
    time order when it keeps a past, for an engine that does not say."""
    if isinstance(eng, Chunkable):
        return eng.reach()
    return Reach(None, 0 if not getattr(eng, "window", 0) else None)


def _describe(eng: Any) -> Any:
    try:
        return json.loads(json.dumps(eng.describe(), default=str))
    except Exception as exc:  # provenance must not stop the run
        return f"describe() failed: {exc}"


# ============================================================================ the job


@dataclasses.dataclass
class Job:
    """Everything a task needs; small (sent once to each worker)."""

    source: Source
    out: str
    engines: list[str]
    params: dict[str, dict[str, Any]]
    n_t: int
    units: list[tuple[int, int, int | None]]  # (p, c, z); z None: whole stacks (volume engines)
    unit_state: list[list[dict[str, Any]]]  # per unit, per engine: what its first frame fixed
    images: dict[str, str]  # product -> dtype
    scalars: list[str]
    chunk_t: int
    tile: tuple[int, int]  # core size (y, x) of the spatial tiles
    halo: int
    warmup: int
    sequential: bool
    save_raw: bool
    spec_extra: dict[str, Any]
    checkpoint: bool = True
    describe: dict[str, Any] = dataclasses.field(default_factory=dict)  # the engines, for provenance

    # -- geometry
    @property
    def n_tchunks(self) -> int:
        return -(-self.n_t // self.chunk_t)

    @property
    def grid(self) -> tuple[int, int]:
        Y, X = self.source.sizes["y"], self.source.sizes["x"]
        return -(-Y // self.tile[0]), -(-X // self.tile[1])

    def tchunk(self, ti: int) -> tuple[int, int]:
        return ti * self.chunk_t, min(self.n_t, (ti + 1) * self.chunk_t)

    def core(self, yi: int, xi: int) -> tuple[tuple[int, int], tuple[int, int]]:
        Y, X = self.source.sizes["y"], self.source.sizes["x"]
        ty, tx = self.tile
        return (yi * ty, min(Y, (yi + 1) * ty)), (xi * tx, min(X, (xi + 1) * tx))

    def chunks(self) -> Iterator[tuple[int, int, int, int]]:
        gy, gx = self.grid
        for ui in range(len(self.units)):
            for ti in range(self.n_tchunks):
                for yi in range(gy):
                    for xi in range(gx):
                        yield ui, ti, yi, xi

    # -- where things are
    @property
    def state_dir(self) -> Path:
        return Path(self.out) / STATE_DIR

    def marker(self, ui: int, ti: int, yi: int, xi: int) -> Path:
        return self.state_dir / "done" / f"u{ui}_t{ti}_y{yi}_x{xi}.json"

    def checkpoint_path(self, ui: int, yi: int, xi: int) -> Path:
        return self.state_dir / "state" / f"u{ui}_y{yi}_x{xi}.pkl"

    def fingerprint(self) -> str:
        facts = {
            "source": self.source.path,
            "n_t": self.n_t,
            "engines": self.engines,
            "params": self.params,
            "chunk_t": self.chunk_t,
            "tile": self.tile,
            "halo": self.halo,
            "warmup": self.warmup,
            "save_raw": self.save_raw,
            "units": self.units,
        }
        return hashlib.sha1(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()

    def lead_index(self, t: Any, unit: tuple[int, int, int | None]) -> tuple:
        _, c, z = unit
        return (
            (t,)
            + ((c,) if self.source.has_c else ())
            + ((slice(None) if z is None else z,) if self.source.has_z else ())
        )

    def image_path(self, product: str, p: int) -> Path:
        """The full-resolution array of ``product`` at position p (``raw``, ``raw_p1`` ...)."""
        from ..bridges.store import image_name

        return Path(self.out) / image_name(product, p, 0) / "0"

    def spec(self, shape: tuple[int, ...], unit: tuple[int, int, int | None]) -> Any:
        return movie_spec(self.source, shape, unit[0], unit[1], self.spec_extra["dtype"], self.spec_extra["bits"])

    def frame_info(self, t: int, ui: int) -> Any:
        p, c, z = self.units[ui]
        return movie_frame_info(self.source, t, p, c, z, seq=t * len(self.units) + ui)


# -- output arrays -----------------------------------------------------------------------------

_ARRAYS: dict[str, Any] = {}


def _ts_context() -> Any:
    import tensorstore as ts

    return ts.Context({"data_copy_concurrency": {"limit": 2}})


def _array_spec(path: Path) -> dict[str, Any]:
    return {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}


def create_array(path: Path, shape: list[int], shard: list[int], dtype: str, names: list[str]) -> Any:
    """A pre-sized zarr v3 array, sharded like the live store (one plane or tile per inner chunk)."""
    import tensorstore as ts

    dt = np.dtype(dtype)
    inner = [1] * (len(shape) - 2) + shard[-2:]
    spec = _array_spec(path)
    spec["metadata"] = {
        "shape": shape,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
        "chunk_key_encoding": {"name": "default"},
        "data_type": dt.name,
        "fill_value": "NaN" if dt.kind == "f" else 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": inner,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "dimension_names": names,
    }
    return ts.open(spec, create=True, delete_existing=True, context=_ts_context()).result()


def _out_array(path: Path) -> Any:
    key = str(path)
    arr = _ARRAYS.get(key)
    if arr is None:
        import tensorstore as ts

        arr = _ARRAYS[key] = ts.open(_array_spec(path), context=_ts_context()).result()
    return arr


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}.{time.monotonic_ns()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ============================================================================ tasks


def _run_frames(
    job: Job,
    chain: Chain,
    ui: int,
    t_first: int,
    data: np.ndarray,
    keep_from: int,
    crop: tuple[slice, slice],
    tile: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, list[float]], list[dict[str, Any]]]:
    """Frames t_first.. of ``data`` through the chain; outputs and events kept from time
    ``keep_from`` on (those of warm-up frames belong to the chunk before)."""
    n_keep = t_first + data.shape[0] - keep_from
    core = tuple(data.shape[1:-2]) + tuple(len(range(n)[c]) for c, n in zip(crop, data.shape[-2:], strict=True))
    # one block per product, filled in place: a chunk's outputs are held once, not twice
    images = {p: np.empty((n_keep, *core), np.float32) for p in job.images if p != "raw"}
    scalars: dict[str, list[float]] = {s: [] for s in job.scalars}
    events: list[dict[str, Any]] = []
    p, c, z = job.units[ui]
    for i in range(data.shape[0]):
        t = t_first + i
        finfo = job.frame_info(t, ui)
        made = chain.run(data[i], finfo)
        out, raised = made.outputs(), made.events
        if t < keep_from:
            continue  # warm-up
        for pname, block in images.items():
            block[t - keep_from] = np.asarray(out[pname], dtype=np.float32)[(..., *crop)]
        for s in scalars:
            scalars[s].append(float(out[s]))
        for k, ev in enumerate(raised):
            rec = event_record(
                ev,
                seq=finfo.seq,
                p=p,
                c=c,
                z=z,
                t=t,
                time_s=finfo.timestamp,
                frame_shape=[job.source.sizes["y"], job.source.sizes["x"]],
                pixel_size_um=job.source.info.get("pixel_size_um"),
            )
            if job.grid != (1, 1):
                rec["tile"] = tile  # an engine on a tile sees the tile's pixels only
            rec["_order"] = [finfo.seq, tile, k]
            events.append(rec)
    return images, scalars, events


def _write_chunk(
    job: Job,
    ui: int,
    ti: int,
    yi: int,
    xi: int,
    raw: np.ndarray | None,
    images: dict[str, np.ndarray],
    scalars: dict[str, list[float]],
    events: list[dict[str, Any]],
    timing: dict[str, float],
) -> dict:
    """Write a chunk's data, wait for it, then its marker (the order resume relies on)."""
    t0, t1 = job.tchunk(ti)
    (y0, y1), (x0, x1) = job.core(yi, xi)
    sel = job.lead_index(slice(t0, t1), job.units[ui]) + (slice(y0, y1), slice(x0, x1))
    t_write = time.perf_counter()
    futs = []
    window: dict[str, list[float]] = {}
    pos = job.units[ui][0]
    if raw is not None:
        futs.append(_out_array(job.image_path("raw", pos))[sel].write(raw.astype(job.images["raw"], copy=False)))
    for p, block in images.items():
        futs.append(_out_array(job.image_path(p, pos))[sel].write(block))
        sample = block[:: max(1, block.shape[0] // 4)].ravel()[::7]  # display range from a sample
        sample = sample[np.isfinite(sample)]
        if sample.size:
            window[p] = [float(np.percentile(sample, 0.1)), float(np.percentile(sample, 99.9))]
    for f in futs:
        f.result()
    timing = {**timing, "write_s": time.perf_counter() - t_write}
    # the chunk's events travel in its marker: written once with its data, replaced (not added
    # to) when Dask reruns the task, and put together by the driver alone
    marker = {
        "t": [t0, t1],
        "unit": ui,
        "tile": [yi, xi],
        "scalars": scalars,
        "window": window,
        "events": events,
        "timing": {k: round(v, 5) for k, v in timing.items()},
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    _atomic_write(job.marker(ui, ti, yi, xi), json.dumps(marker).encode())
    return marker


def _read_region(job: Job, ui: int, t0: int, t1: int, yi: int, xi: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Input frames t0..t1-1 of a tile with its halo, and where the core sits in it."""
    Y, X = job.source.sizes["y"], job.source.sizes["x"]
    (y0, y1), (x0, x1) = job.core(yi, xi)
    h = job.halo
    ya, yb, xa, xb = max(0, y0 - h), min(Y, y1 + h), max(0, x0 - h), min(X, x1 + h)
    p, c, z = job.units[ui]
    data = job.source.read(t0, t1, c, z, (ya, yb), (xa, xb), p)
    return data, (slice(y0 - ya, y1 - ya), slice(x0 - xa, x1 - xa))


_CHAINS: dict[tuple, Chain] = {}
_MALLOC_TUNED = False


def tune_worker_malloc() -> bool:
    """Undo what Dask's nanny does to a worker's memory allocator, once per process.

    The nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (so freed memory goes back to
    the system and the worker's memory reads low). Setting it also switches off glibc's adaptive
    mmap threshold: every array above 128 kB (a 512x512 float32 frame is 1 MB) is then mapped
    and unmapped afresh, and its pages faulted in and zeroed again on each use. Measured on
    ``deconvolve`` (512x512, bench/bench_process_worker.py): 35x the page faults, 2-3x the time
    per frame. Arrays up to 32 MB now come from the heap again and up to 64 MB of freed heap is
    kept for reuse; Dask's memory monitor counts that as the worker's (unmanaged) memory.
    Returns whether it changed anything (only on glibc, only where the variable is set)."""
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return False
    _MALLOC_TUNED = True
    if not sys.platform.startswith("linux") or "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 32 * 2**20) == 1 and libc.mallopt(m_trim_threshold, 64 * 2**20) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to undo
        return False
    if ok:
        log.debug("worker %d: malloc mmap threshold 32 MB, trim threshold 64 MB", os.getpid())
    return ok


def run_chunk(job: Job, ui: int, ti: int, yi: int, xi: int) -> dict[str, Any]:
    """One chunk from scratch: warm-up frames, then its own. Skipped when its marker exists."""
    if job.marker(ui, ti, yi, xi).exists():
        return {"skipped": True, "frames": 0}
    tune_worker_malloc()
    t_start = time.perf_counter()
    t0, t1 = job.tchunk(ti)
    w0 = max(0, t0 - job.warmup)
    data, crop = _read_region(job, ui, w0, t1, yi, xi)
    t_read = time.perf_counter()
    # engines that keep no past (warm-up 0) are reused by the next chunk of the same unit and
    # tile shape on this worker: their setup (a PSF's OTFs, a model's session) is paid once
    key = (job.fingerprint(), ui, tuple(data.shape[1:]))
    chain = _CHAINS.pop(key, None) if job.warmup == 0 else None
    if chain is None:
        chain = Chain.of(job.engines, job.params, job.spec(tuple(data.shape[1:]), job.units[ui]), job.unit_state[ui])
    images, scalars, events = _run_frames(job, chain, ui, w0, data, t0, crop, yi * job.grid[1] + xi)
    if job.warmup == 0:
        _CHAINS.clear()  # one chain kept per worker: bounded memory
        _CHAINS[key] = chain
    raw = data[t0 - w0 :][(..., *crop)] if job.save_raw else None
    _write_chunk(
        job,
        ui,
        ti,
        yi,
        xi,
        raw,
        images,
        scalars,
        events,
        {"read_s": t_read - t_start, "compute_s": time.perf_counter() - t_read},
    )
    share = 1.0 / (job.grid[0] * job.grid[1])  # a tile is this much of a frame
    return {"skipped": False, "frames": (t1 - t0) * share, "bytes": int(data[t0 - w0 :][(..., *crop)].nbytes)}


def run_chain(job: Job, ui: int, yi: int, xi: int) -> dict[str, Any]:
    """All time chunks of one unit and tile, in order, the engines' state carried from chunk to
    chunk (exact for engines with unbounded memory). After each chunk the state is saved, so a
    rerun continues from the last one; chunks already marked done are recomputed (the state needs
    them) but not rewritten."""
    import cloudpickle  # a dependency of dask.distributed; pickles the engines' array modules too

    tune_worker_malloc()
    ck = job.checkpoint_path(ui, yi, xi)
    chain, start = None, 0
    if ck.exists():
        try:
            after, chain = cloudpickle.loads(ck.read_bytes())
            start = after + 1
        except Exception as exc:  # a checkpoint from another version: start over, exactly
            log.warning("ignoring checkpoint %s (%s); starting the chain from its first frame", ck, exc)
            chain, start = None, 0
    frames = 0.0
    nbytes = 0
    checkpoint = job.checkpoint
    for ti in range(start, job.n_tchunks):
        t_start = time.perf_counter()
        t0, t1 = job.tchunk(ti)
        data, crop = _read_region(job, ui, t0, t1, yi, xi)
        t_read = time.perf_counter()
        if chain is None:
            chain = Chain.of(job.engines, job.params, job.spec(tuple(data.shape[1:]), job.units[ui]))
        images, scalars, events = _run_frames(job, chain, ui, t0, data, t0, crop, yi * job.grid[1] + xi)
        if not job.marker(ui, ti, yi, xi).exists():
            raw = data[(..., *crop)] if job.save_raw else None
            _write_chunk(
                job,
                ui,
                ti,
                yi,
                xi,
                raw,
                images,
                scalars,
                events,
                {"read_s": t_read - t_start, "compute_s": time.perf_counter() - t_read},
            )
            frames += (t1 - t0) / (job.grid[0] * job.grid[1])
            nbytes += int(data[(..., *crop)].nbytes)
        if checkpoint and ti + 1 < job.n_tchunks:
            try:
                state = cloudpickle.dumps((ti, chain))
            except Exception as exc:  # an engine holding a lock or a thread: no checkpoints, still exact
                log.warning(
                    "the chain %s cannot be saved (%s): a resume reruns unit %d from its first "
                    "frame (it rewrites only the missing chunks)",
                    job.engines,
                    exc,
                    ui,
                )
                checkpoint = False
            else:
                _atomic_write(ck, state)
    with contextlib.suppress(FileNotFoundError):
        ck.unlink()  # the chain is complete: its state is no longer needed
    return {"skipped": frames == 0, "frames": frames, "bytes": nbytes}


# ============================================================================ planning


def chain_wants_stacks(engines: list[str], params: dict[str, dict[str, Any]], src: Source) -> bool:
    """Whether the chain runs on (z, y, x) stacks (every engine ``needs_volume``) or on planes."""
    from ..engines import engine_factory

    volume = [bool(getattr(engine_factory(e)(**params.get(e, {})), "needs_volume", False)) for e in engines]
    if any(volume) and not all(volume):
        raise ValueError("the chain mixes engines on planes and on z-stacks; run them in two passes")
    stacks = bool(volume) and all(volume)
    if stacks and not src.has_z:
        raise ValueError(f"{src.path} has no z axis but the engines want z-stacks (volume=True)")
    return stacks


def plan_units(src: Source, stacks: bool) -> list[tuple[int, int, int | None]]:
    """(position, channel, plane) in acquisition order (plane None: the whole stack)."""
    zs: list[int | None] = [None] if stacks else list(range(src.sizes["z"]))
    return [(p, c, z) for p in range(src.sizes["p"]) for c in range(src.sizes["c"]) for z in zs]


def _auto_chunk_t(plane_bytes: int, n_t: int, warmup: int, target_mb: float = 64.0) -> int:
    n = int(max(1, min(256, target_mb * 2**20 // max(plane_bytes, 1))))
    if warmup:
        n = max(n, 4 * warmup)  # warm-up frames cost at most a quarter more work
    return max(1, min(n, n_t))


def plan_job(
    input_path: str | os.PathLike,
    out: str | os.PathLike,
    engines: list[str],
    engine_params: dict[str, dict[str, Any]] | None = None,
    *,
    frames: int | None = None,
    chunk_t: int | None = None,
    tile: int | None = None,
    save_raw: bool = True,
    chunk_mb: float = 64.0,
    sampling: dict[str, float | None] | None = None,
    axes: str | None = None,
) -> Job:
    """Open the input, run each unit's first frame through the chain (what it fixes there, and
    which products it makes) and derive the chunking. ``sampling``, ``axes``: see
    :func:`open_source`."""
    src = open_source(input_path, sampling, axes)
    params = {k: dict(v) for k, v in (engine_params or {}).items()}
    n_t = src.sizes["t"] if frames is None else min(int(frames), src.sizes["t"])
    if n_t < 1:
        raise ValueError(f"{input_path} has no frames to process")
    stacks = chain_wants_stacks(engines, params, src)
    units = plan_units(src, stacks)
    dtype = np.dtype(src.dtype)
    raw_dtype = "float32" if dtype.kind == "f" else dtype.name
    bits = dtype.itemsize * 8 if dtype.kind in "ui" else 16
    job = Job(
        source=src,
        out=str(out),
        engines=list(engines),
        params=params,
        n_t=n_t,
        units=units,
        unit_state=[],
        images={},
        scalars=[],
        chunk_t=1,
        tile=(src.sizes["y"], src.sizes["x"]),
        halo=0,
        warmup=0,
        sequential=False,
        save_raw=save_raw,
        spec_extra={"dtype": raw_dtype, "bits": bits},
    )
    images: dict[str, str] = {"raw": raw_dtype} if save_raw else {}
    scalars: list[str] = []
    reach: list[Reach] = []
    Y, X = src.sizes["y"], src.sizes["x"]
    for ui, (p, c, z) in enumerate(units):
        first = src.read(0, 1, c, z, (0, Y), (0, X), p)[0]
        chain = Chain.of(engines, params, job.spec(tuple(first.shape), (p, c, z)))
        made = chain.run(first, job.frame_info(0, ui))
        job.unit_state.append(chain.first_frame_state())
        if ui == 0:
            reach = [engine_reach(n, e) for n, e in zip(engines, chain.instances(), strict=True)]
            job.describe = {n: _describe(e) for n, e in zip(engines, chain.instances(), strict=True)}
            scalars.extend(made.scalars)
            images.update({k: "float32" for k in made.images})
        chain.close()
    halo = None if any(r.halo is None for r in reach) else sum(r.halo for r in reach)  # type: ignore[misc]
    warmup = None if any(r.warmup is None for r in reach) else sum(r.warmup for r in reach)  # type: ignore[misc]
    multiple = math.lcm(*[r.multiple for r in reach]) if reach else 1
    if halo is None and tile:
        log.warning("the chain %s needs whole frames; --tile %d ignored", engines, tile)
    if halo is not None and tile and (tile < Y or tile < X):
        core = max(multiple, -(-int(tile) // multiple) * multiple)
        if halo % multiple:
            halo = -(-halo // multiple) * multiple
        job.tile = (min(core, Y), min(core, X))
    job.halo = halo or 0
    job.sequential = warmup is None
    job.warmup = warmup or 0
    plane = int(np.prod(job.tile)) * dtype.itemsize * (src.sizes["z"] if stacks else 1)
    job.chunk_t = int(chunk_t) if chunk_t else _auto_chunk_t(plane, n_t, job.warmup, chunk_mb)
    job.images, job.scalars = images, scalars
    return job


# ============================================================================ the driver


def _create_output(job: Job, overwrite: bool, provenance: dict[str, Any]) -> None:
    """The output folder with the live layout (via the store), then every array pre-sized with
    shards of one time chunk x one tile."""
    from ..bridges.store import RECORD_FIELDS, ImageLayout, OmeZarrStore

    src = job.source
    lay = ImageLayout(
        plane_shape=(src.sizes["y"], src.sizes["x"]),
        dtype=job.images.get("raw", job.spec_extra["dtype"]),
        has_c=src.has_c,
        has_z=src.has_z,
        n_c=src.sizes["c"],
        n_z=src.sizes["z"],
        bits=job.spec_extra["bits"],
        pixel_size_um=src.info.get("pixel_size_um"),
        z_step_um=src.info.get("z_step_um"),
        interval_s=src.info.get("interval_s"),
    )
    store = OmeZarrStore(job.out, overwrite=overwrite, provenance=provenance)
    names = list(job.images) + (["raw"] if job.scalars and "raw" not in job.images else [])
    positions = range(src.sizes["p"])
    for pos in positions:  # position p of a product is its own image, as live (``raw_p1``)
        for p in names:
            store.image(p, pos, 0, lay if p == "raw" else ImageLayout(**{**lay.__dict__, "dtype": "float32"}))
    store.close()
    lead = lay.lead_shape(job.n_t)
    shard_lead = [job.chunk_t] + [1] * (len(lead) - 1)
    for pos in positions:
        for p in names:
            dt = job.images.get(p, job.spec_extra["dtype"])
            create_array(
                job.image_path(p, pos),
                lead + [src.sizes["y"], src.sizes["x"]],
                shard_lead + list(job.tile),
                dt,
                lay.axes,
            )
            rec_dir = job.image_path(p, pos).parent / "livescope"
            fields = dict(RECORD_FIELDS)
            if p == "raw":
                fields.update({s: "float64" for s in job.scalars})
            for k, dt_k in fields.items():
                _create_records(rec_dir / k, lead, dt_k, lay.axes[:-2])
    job.state_dir.mkdir(parents=True, exist_ok=True)
    (job.state_dir / "done").mkdir(exist_ok=True)
    _atomic_write(
        job.state_dir / "job.json",
        json.dumps({"fingerprint": job.fingerprint(), "chunks": sum(1 for _ in job.chunks())}).encode(),
    )


def _create_records(path: Path, lead: list[int], dtype: str, names: list[str]) -> None:
    import tensorstore as ts

    fill = {"seq": -1, "saturated": -1, "status": 0}.get(path.name, "NaN")
    spec = _array_spec(path)
    shard = [256] + lead[1:]
    spec["metadata"] = {
        "shape": lead,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
        "chunk_key_encoding": {"name": "default"},
        "data_type": dtype,
        "fill_value": fill,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": shard,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "dimension_names": names,
    }
    ts.open(spec, create=True, delete_existing=True, context=_ts_context()).result()


def _finalize(job: Job, summary: dict[str, Any]) -> dict[str, int]:
    """Records and metadata from the markers (the driver is their only writer)."""
    import tensorstore as ts

    from ..bridges.store import STATUS

    src = job.source
    lead = [job.n_t] + ([src.sizes["c"]] if src.has_c else []) + ([src.sizes["z"]] if src.has_z else [])
    gy, gx = job.grid
    positions = range(src.sizes["p"])
    status = {pos: np.zeros(lead, np.uint8) for pos in positions}
    seq = {pos: np.full(lead, -1, np.int64) for pos in positions}
    tim = {pos: np.full(lead, np.nan) for pos in positions}
    scal = {pos: {s: np.full(lead, np.nan) for s in job.scalars} for pos in positions}
    windows: dict[str, list[float]] = {}
    events: list[dict[str, Any]] = []
    done_chunks = 0
    for ui in range(len(job.units)):
        pos = job.units[ui][0]
        for ti in range(job.n_tchunks):
            markers = []
            for yi in range(gy):
                for xi in range(gx):
                    m = job.marker(ui, ti, yi, xi)
                    if m.exists():
                        markers.append(json.loads(m.read_text()))
            done_chunks += len(markers)
            if len(markers) < gy * gx:
                continue  # a frame counts as saved only when all its tiles are
            t0, t1 = job.tchunk(ti)
            ts_ = np.arange(t0, t1)
            sel = job.lead_index(slice(t0, t1), job.units[ui])
            status[pos][sel] = STATUS["saved"]
            seqs = ts_ * len(job.units) + ui
            times = ts_ * float(src.info.get("interval_s") or 1.0)
            extra = (1,) * (status[pos][sel].ndim - 1)
            seq[pos][sel] = seqs.reshape(-1, *extra)
            tim[pos][sel] = times.reshape(-1, *extra)
            for mk in markers:
                events.extend(mk.get("events", ()))
                for s, vals in mk["scalars"].items():
                    scal[pos][s][sel] = np.asarray(vals).reshape(-1, *extra)
                for p, (lo, hi) in mk["window"].items():
                    w = windows.setdefault(p, [math.inf, -math.inf])
                    windows[p] = [min(w[0], lo), max(w[1], hi)]
    names = list(job.images) + (["raw"] if job.scalars and "raw" not in job.images else [])
    saved = {}
    for pos in positions:
        for p in names:
            rec = {
                "seq": seq[pos],
                "time": tim[pos],
                "status": status[pos] if p in job.images else np.zeros_like(status[pos]),
                "saturated": np.full(lead, -1, np.int32),
            }
            if p == "raw":
                rec.update(scal[pos])
            image = job.image_path(p, pos).parent
            futs = [
                ts.open(_array_spec(image / "livescope" / k), context=_ts_context()).result().write(v)
                for k, v in rec.items()
            ]
            for f in futs:
                f.result()
            gpath = image / "zarr.json"
            meta = json.loads(gpath.read_text())
            attrs = meta["attributes"]
            n_saved = int((rec["status"] == STATUS["saved"]).sum())
            attrs["livescope"].update({"frames": job.n_t, "saved": n_saved})
            saved[image.name] = n_saved
            if p in windows and math.isfinite(windows[p][0]):
                for ch in attrs["ome"].get("omero", {}).get("channels", []):
                    ch["window"].update(
                        {"start": windows[p][0], "end": windows[p][1], "min": windows[p][0], "max": windows[p][1]}
                    )
            _atomic_write(gpath, json.dumps(meta, indent=1).encode())
    root = Path(job.out) / "zarr.json"
    meta = json.loads(root.read_text())
    prov = meta["attributes"]["livescope"].setdefault("provenance", {})
    # the engines' events where the live daemon keeps them (``provenance.events``), rebuilt from
    # the markers on every run: a resumed or retried chunk replaces its events, never adds to them.
    # All of them, where live keeps the last 1000: offline there is no stream to keep up with.
    prov["events"] = number_events(events)
    summary["events"] = len(prov["events"])
    prov.setdefault("runs", []).append(summary)
    prov["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    prov["chunks_done"] = done_chunks
    _atomic_write(root, json.dumps(meta, indent=1, default=str).encode())
    from ..bridges.store import refresh_root

    refresh_root(job.out)  # the root's collection follows the images' sizes and windows written above
    return saved


@contextlib.contextmanager
def _client(scheduler: str | None, workers: int | None, processes: bool, memory_limit: str | None):
    from distributed import Client, LocalCluster

    if scheduler:
        client = Client(scheduler)
        try:
            yield client
        finally:
            client.close()
        return
    n = workers or max(1, min(os.cpu_count() or 1, 4))
    cluster = LocalCluster(
        n_workers=n,
        threads_per_worker=1,
        processes=processes,
        memory_limit=memory_limit or "auto",
        dashboard_address="127.0.0.1:0",  # loopback only
        silence_logs=logging.WARNING,
    )
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _dashboard(client: Any) -> str:
    try:
        import bokeh  # noqa: F401 - the dashboard needs it
    except ImportError:
        return f"{client.dashboard_link} (not served: `pip install bokeh` to see it)"
    from distributed import LocalCluster

    link = str(client.dashboard_link)
    if isinstance(getattr(client, "cluster", None), LocalCluster):
        import re

        link = re.sub(r"//[^/:]+:", "//127.0.0.1:", link)  # a local cluster serves it on loopback only
    return link


def run_job(
    job: Job,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    processes: bool = True,
    memory_limit: str | None = None,
    provenance: dict[str, Any] | None = None,
    client: Any = None,
) -> dict[str, Any]:
    """Create (or, with ``resume``, reopen) the output, run every chunk not yet done on the
    cluster, then write records and metadata."""
    from tqdm import tqdm

    jf = job.state_dir / "job.json"
    if resume and jf.exists():
        prev = json.loads(jf.read_text())
        if prev.get("fingerprint") != job.fingerprint():
            raise ValueError(
                f"{job.out} was started with another input, engines, parameters or chunking; resume it "
                "with the same command (same --chunk-t / --tile), or start again with --overwrite"
            )
    else:
        if resume:
            log.info("%s: nothing to resume; starting", job.out)
        prov = dict(provenance or {})
        prov.setdefault("source", f"file:{job.source.path}")
        prov["mode"] = "process"
        prov["engines"] = {e: job.params.get(e, {}) for e in job.engines}
        prov["engine_describe"] = job.describe
        prov["chunking"] = {
            "chunk_t": job.chunk_t,
            "tile": list(job.tile),
            "halo": job.halo,
            "warmup": job.warmup,
            "in_order": job.sequential,
            "first_frame_state": job.unit_state,
        }
        _create_output(job, overwrite=overwrite, provenance=prov)
    total = sum(1 for _ in job.chunks())
    done_before = sum(1 for k in job.chunks() if job.marker(*k).exists())
    gy, gx = job.grid
    t_start = time.perf_counter()
    frames = 0
    nbytes = 0
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(_client(scheduler, workers, processes, memory_limit))
        n_workers = len(client.scheduler_info().get("workers", {}))
        dash = _dashboard(client)
        if progress:
            print(
                f"livescope process: {total} chunks ({done_before} done before), {n_workers} workers, dashboard {dash}",
                flush=True,
            )
        log.info("dashboard: %s", dash)
        # the job travels with each task (a few kB), not scattered: scattered data dies with the
        # workers that hold it, and the run must survive losing any of them
        job_f = job
        futures = []
        if job.sequential:
            for ui in range(len(job.units)):
                for yi in range(gy):
                    for xi in range(gx):
                        if not all(job.marker(ui, ti, yi, xi).exists() for ti in range(job.n_tchunks)):
                            futures.append(
                                client.submit(
                                    run_chain,
                                    job_f,
                                    ui,
                                    yi,
                                    xi,
                                    pure=False,
                                    key=f"livescope-chain-u{ui}-y{yi}-x{xi}-{time.time_ns()}",
                                )
                            )
        else:
            for k in job.chunks():
                if not job.marker(*k).exists():
                    futures.append(
                        client.submit(
                            run_chunk,
                            job_f,
                            *k,
                            pure=False,
                            key=f"livescope-chunk-{'-'.join(map(str, k))}-{time.time_ns()}",
                        )
                    )
        from distributed import wait

        bar = tqdm(total=total, initial=done_before, unit="chunk", desc="process", disable=not progress)
        pending = set(futures)
        seen = done_before
        try:
            while pending:
                try:
                    finished = wait(list(pending), timeout=0.5, return_when="FIRST_COMPLETED").done
                except TimeoutError:  # nothing finished in this half second: update the bar
                    finished = set()
                for f in finished:
                    pending.discard(f)
                    r = f.result()  # raises the task's own error (after Dask's retries)
                    frames += r["frames"]
                    nbytes += r.get("bytes", 0)
                now = sum(1 for _ in (job.state_dir / "done").glob("*.json"))
                if now > seen:
                    bar.update(now - seen)
                    seen = now
                el = time.perf_counter() - t_start
                bar.set_postfix(fps=f"{frames / el:.1f}" if el else "-", refresh=False)
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        finally:
            bar.close()
    elapsed = time.perf_counter() - t_start
    summary = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
        "seconds": round(elapsed, 3),
        "workers": n_workers,
        "scheduler": scheduler or "LocalCluster",
        "chunks": total,
        "chunks_done_before": done_before,
        "chunk_t": job.chunk_t,
        "tile": list(job.tile),
        "halo": job.halo,
        "warmup": job.warmup,
        "in_order": job.sequential,
        "unit_state": job.unit_state,
    }
    saved = _finalize(job, summary)
    n_frames = job.n_t * len(job.units)
    frames = int(round(frames))
    return {
        "frames": frames,
        "frames_total": n_frames,
        "seconds": round(elapsed, 3),
        "fps": round(frames / elapsed, 2) if elapsed else None,
        "mb_per_s": round(nbytes / 2**20 / elapsed, 2) if elapsed else None,
        "chunks": total,
        "chunks_done_before": done_before,
        "workers": n_workers,
        "chunk_t": job.chunk_t,
        "tile": list(job.tile),
        "halo": job.halo,
        "warmup": job.warmup,
        "in_order": job.sequential,
        "out": job.out,
        "images": sorted(saved),
        "saved": saved,
        "events": summary["events"],
    }
