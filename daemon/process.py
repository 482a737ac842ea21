"""``livescope process``: the same engine chain, offline, over a saved movie.

Every frame is processed (nothing is skipped offline); products go to a new OME-Zarr store with
the same layout as a live run. By default the movie is cut into chunks run on dask.distributed
(a local cluster, or an existing scheduler): :mod:`.distributed`, docs/process.md. ``workers=0``
runs the whole movie in this process, frame by frame, with no Dask: the reference the chunked
run is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bridges.store import ImageLayout, OmeZarrStore
from .chain import Chain, event_record, number_events

__all__ = ["process_file"]

log = logging.getLogger(__name__)


def process_file(
    input_path: str | Path,
    out: str | Path,
    engines: list[str],
    engine_params: dict[str, dict[str, Any]] | None = None,
    *,
    overwrite: bool = False,
    save_raw: bool = True,
    frames: int | None = None,
    progress: bool = True,
    scheduler: str | None = None,
    workers: int | None = None,
    chunk_t: int | None = None,
    tile: int | None = None,
    resume: bool = False,
    processes: bool = True,
    memory_limit: str | None = None,
    sampling: dict[str, float | None] | None = None,
    axes: str | None = None,
) -> dict[str, Any]:
    """Run ``engines`` over the movie at ``input_path`` into the OME-Zarr folder ``out``.

    The movie is read as its writer wrote it (:mod:`livescope.bridges.movies`: every position,
    channel and plane); ``axes`` gives the file's axes where it does not say them (``"TZCYX"``).

    scheduler: address of a running Dask scheduler (``tcp://host:8786``); else a LocalCluster of
    ``workers`` processes (default: up to 4, one per core) is started; ``workers=0``: no Dask, one
    process, frame by frame. chunk_t: time points per chunk (default: about 64 MB of input);
    tile: spatial tile size in pixels for chains that allow it (default: whole frames).
    resume: finish an interrupted run in ``out`` (complete chunks are kept).
    processes / memory_limit: the LocalCluster's worker kind and per-worker memory limit.
    sampling: ``pixel_size_um``, ``z_step_um``, ``interval_s`` that replace what the movie's
    metadata says (None values keep it); the engines (PSF models and resampling) and the output's
    OME-Zarr scale use them.
    """
    if workers == 0 and not scheduler:
        if resume or chunk_t or tile:
            raise ValueError("resume, chunk_t and tile need Dask: give workers >= 1 or a scheduler")
        return _process_serial(
            input_path,
            out,
            engines,
            engine_params,
            overwrite=overwrite,
            save_raw=save_raw,
            frames=frames,
            progress=progress,
            sampling=sampling,
            axes=axes,
        )
    from .distributed import plan_job, run_job

    chunk_mb = 64.0
    if memory_limit:
        from dask.utils import parse_bytes

        # a chunk's input, its float32 products, their encoding for the write and the engines'
        # scratch: measured up to ~10x the input, on top of ~100 MB of libraries per worker
        chunk_mb = min(chunk_mb, parse_bytes(memory_limit) / 2**20 / 32)
    job = plan_job(
        input_path,
        out,
        engines,
        engine_params,
        frames=frames,
        chunk_t=chunk_t,
        tile=tile,
        save_raw=save_raw,
        chunk_mb=chunk_mb,
        sampling=sampling,
        axes=axes,
    )
    return run_job(
        job,
        scheduler=scheduler,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        progress=progress,
        processes=processes,
        memory_limit=memory_limit,
    )


def _process_serial(
    input_path: str | Path,
    out: str | Path,
    engines: list[str],
    engine_params: dict[str, dict[str, Any]] | None = None,
    *,
    overwrite: bool = False,
    save_raw: bool = True,
    frames: int | None = None,
    progress: bool = True,
    sampling: dict[str, float | None] | None = None,
    axes: str | None = None,
) -> dict[str, Any]:
    from tqdm import tqdm

    from .distributed import chain_wants_stacks, movie_frame_info, movie_spec, open_source, plan_units

    src = open_source(input_path, sampling, axes)
    engine_params = engine_params or {}
    info = src.info
    n_t = src.sizes["t"] if frames is None else min(frames, src.sizes["t"])
    dtype = np.dtype(src.dtype)
    Y, X = src.sizes["y"], src.sizes["x"]
    bits = dtype.itemsize * 8 if dtype.kind in "ui" else 16
    layout = ImageLayout(
        plane_shape=(Y, X),
        dtype=dtype.name if dtype.kind != "f" else "float32",
        has_c=src.has_c,
        has_z=src.has_z,
        n_c=src.sizes["c"],
        n_z=src.sizes["z"],
        bits=bits,
        pixel_size_um=info.get("pixel_size_um"),
        z_step_um=info.get("z_step_um"),
        interval_s=info.get("interval_s"),
        channel_names=_channel_names(src.channels),
    )
    product_layout = dataclasses.replace(layout, dtype="float32")  # once, not per frame
    stacks = chain_wants_stacks(engines, engine_params, src)
    units = plan_units(src, stacks)  # (position, channel, plane or None for the whole stack)
    store = OmeZarrStore(
        out,
        overwrite=overwrite,
        provenance={
            "source": f"file:{input_path}",
            "engines": {e: engine_params.get(e, {}) for e in engines},
            "mode": "process",
        },
    )
    chains: dict[tuple, Chain] = {}
    events: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    seq = 0

    def write_planes(
        image: Any, value: np.ndarray, *, planes: list[int], t: int, c: int, seq: int, time_s: float
    ) -> None:
        value = value.reshape(len(planes), Y, X)
        for j, zz in enumerate(planes):
            image.write(t, c, zz, value[j], seq=seq, time_s=time_s)

    try:
        for t in tqdm(range(n_t), desc="process", unit="frame", disable=not progress):
            for p, c, z in units:
                block = src.read(t, t + 1, c, z, (0, Y), (0, X), p)[0]  # (y, x), or (z, y, x) for stacks
                planes = list(range(src.sizes["z"])) if z is None else [z]
                key = (p, c, z)
                if key not in chains:
                    spec = movie_spec(src, tuple(block.shape), p, c, layout.dtype, bits)
                    chains[key] = Chain.of(engines, engine_params, spec)
                finfo = movie_frame_info(src, t, p, c, z, seq=seq)
                ts = finfo.timestamp
                write = functools.partial(write_planes, planes=planes, t=t, c=c, seq=seq, time_s=ts)

                if save_raw:
                    write(store.image("raw", p, 0, layout), block.astype(layout.dtype, copy=False))
                made = chains[key].run(block, finfo)
                for k, ev in enumerate(made.events):
                    rec = event_record(
                        ev,
                        seq=seq,
                        p=p,
                        c=c,
                        z=z,
                        t=t,
                        time_s=ts,
                        frame_shape=[Y, X],
                        pixel_size_um=info.get("pixel_size_um"),
                    )
                    events.append({**rec, "_order": [seq, 0, k]})
                for pname, number in made.scalars.items():
                    for zz in planes:  # a stack's number belongs to each of its planes
                        store.image("raw", p, 0, layout).write_scalar(pname, t, c, zz, number)
                for pname, value in made.images.items():
                    write(store.image(pname, p, 0, product_layout), np.asarray(value, dtype=np.float32))
                seq += 1
                for w in store.images.values():
                    w.poll()
        # where the live daemon keeps them (``provenance.events``); all of them, offline
        store.flush()  # every write and record on disk before the provenance says what was done
        store.update_provenance(events=number_events(events))
    finally:
        for chain in chains.values():
            chain.close()
        store.close()
    timings = dict.fromkeys(engines, 0.0)
    for chain in chains.values():
        for slot in chain.slots:
            timings[slot.name] += slot.latency.total_s
    elapsed = time.perf_counter() - t_start
    return {
        "frames": seq,
        "seconds": round(elapsed, 3),
        "fps": round(seq / elapsed, 2) if elapsed else None,
        "engine_seconds": {k: round(v, 3) for k, v in timings.items()},
        "out": str(out),
        "images": sorted(store.images),
        "events": len(events),
    }


def _channel_names(names: list[str | None]) -> list[str]:
    """The movie's channel names for the store's omero labels (none when the file names none)."""
    return [n or f"channel {i}" for i, n in enumerate(names)] if any(names) else []
