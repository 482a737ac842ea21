"""``livescope process``: the same engine chain, offline, over a saved movie.

Every frame is processed (nothing is skipped offline); products go to a new OME-Zarr store with
the same layout as a live run. By default the movie is cut into chunks run on dask.distributed
(a local cluster, or an existing scheduler): :mod:`.distributed`, docs/process.md. ``workers=0``
runs the whole movie in this process, frame by frame, with no Dask: the reference the chunked
run is tested against.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bridges.store import ImageLayout, OmeZarrStore
from ..engines import FrameInfo, StreamSpec, create_engine
from .sources import read_movie

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
) -> dict[str, Any]:
    """Run ``engines`` over the movie at ``input_path`` into the OME-Zarr folder ``out``.

    scheduler: address of a running Dask scheduler (``tcp://host:8786``); else a LocalCluster of
    ``workers`` processes (default: up to 4, one per core) is started; ``workers=0``: no Dask, one
    process, frame by frame. chunk_t: time points per chunk (default: about 64 MB of input);
    tile: spatial tile size in pixels for chains that allow it (default: whole frames).
    resume: finish an interrupted run in ``out`` (complete chunks are kept).
    processes / memory_limit: the LocalCluster's worker kind and per-worker memory limit.
    """
    if workers == 0 and not scheduler:
        if resume or chunk_t or tile:
            raise ValueError("resume, chunk_t and tile need Dask: give workers >= 1 or a scheduler")
        return _process_serial(input_path, out, engines, engine_params, overwrite=overwrite,
                               save_raw=save_raw, frames=frames, progress=progress)
    from .distributed import plan_job, run_job

    chunk_mb = 64.0
    if memory_limit:
        from dask.utils import parse_bytes

        # a chunk's input, its float32 products, their encoding for the write and the engines'
        # scratch: measured up to ~10x the input, on top of ~100 MB of libraries per worker
        chunk_mb = min(chunk_mb, parse_bytes(memory_limit) / 2**20 / 32)
    job = plan_job(input_path, out, engines, engine_params, frames=frames, chunk_t=chunk_t, tile=tile,
                   save_raw=save_raw, chunk_mb=chunk_mb)
    return run_job(job, scheduler=scheduler, workers=workers, resume=resume, overwrite=overwrite,
                   progress=progress, processes=processes, memory_limit=memory_limit)


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
) -> dict[str, Any]:
    from tqdm import tqdm

    data, axes, info = read_movie(input_path)
    engine_params = engine_params or {}
    n_t = data.shape[0] if frames is None else min(frames, data.shape[0])
    lead = [a for a in axes if a not in ("y", "x")]
    sizes = dict(zip(axes, data.shape))
    dtype = np.dtype(data.dtype)
    plane_shape = tuple(data.shape[-2:])
    bits = dtype.itemsize * 8 if dtype.kind in "ui" else 16
    layout = ImageLayout(plane_shape=plane_shape, dtype=dtype.name if dtype.kind != "f" else "float32",
                         has_c="c" in lead, has_z="z" in lead, n_c=sizes.get("c", 1), n_z=sizes.get("z", 1),
                         bits=bits, pixel_size_um=info.get("pixel_size_um"), z_step_um=info.get("z_step_um"),
                         interval_s=info.get("interval_s"))
    product_layout = dataclasses.replace(layout, dtype="float32")  # once, not per frame
    store = OmeZarrStore(out, overwrite=overwrite, provenance={
        "source": f"file:{input_path}", "engines": {e: engine_params.get(e, {}) for e in engines}, "mode": "process"})
    chains: dict[tuple, list[Any]] = {}
    timings: dict[str, float] = {e: 0.0 for e in engines}
    t_start = time.perf_counter()
    seq = 0
    try:
        for t in tqdm(range(n_t), desc="process", unit="frame", disable=not progress):
            block = np.asarray(data[t])
            for rest in np.ndindex(*block.shape[:-2]):
                idx = dict(zip(lead[1:], rest))
                c, z = int(idx.get("c", 0)), int(idx.get("z", 0))
                plane = block[rest]
                key = (c, z)
                if key not in chains:
                    spec = StreamSpec(shape=plane_shape, dtype=layout.dtype, bits=bits,
                                      pixel_size_um=info.get("pixel_size_um"), z_step_um=info.get("z_step_um"),
                                      interval_s=info.get("interval_s"), channel=str(c))
                    chain = []
                    for name in engines:
                        eng = create_engine(name, **engine_params.get(name, {}))
                        eng.setup(spec)
                        chain.append(eng)
                    chains[key] = chain
                x: Any = plane
                ts = t * float(info.get("interval_s") or 1.0)
                finfo = FrameInfo(seq=seq, timestamp=ts, index={"t": t, "c": c, "z": z})
                if save_raw:
                    store.image("raw", 0, 0, layout).write(t, c, z, plane.astype(layout.dtype, copy=False),
                                                         seq=seq, time_s=ts)
                for name, eng in zip(engines, chains[key]):
                    t0 = time.perf_counter()
                    out_ = eng.process(x, finfo)
                    timings[name] += time.perf_counter() - t0
                    scalars = set(getattr(eng, "scalar_outputs", ()))
                    for pname, value in out_.items():
                        if pname == "events":
                            continue
                        if pname in scalars or np.ndim(value) == 0:
                            store.image("raw", 0, 0, layout).write_scalar(pname, t, c, z, float(value))
                            continue
                        w = store.image(pname, 0, 0, product_layout)
                        w.write(t, c, z, np.asarray(value, dtype=np.float32), seq=seq, time_s=ts)
                    passes = getattr(eng, "passes", eng.outputs[0])
                    if passes is not None and passes in out_:
                        x = out_[passes]
                seq += 1
                for w in store.images.values():
                    w.poll()
    finally:
        store.close()
    elapsed = time.perf_counter() - t_start
    return {"frames": seq, "seconds": round(elapsed, 3), "fps": round(seq / elapsed, 2) if elapsed else None,
            "engine_seconds": {k: round(v, 3) for k, v in timings.items()}, "out": str(out),
            "images": sorted(store.images)}
