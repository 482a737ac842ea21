"""Why ``deconvolve`` computes a frame slower inside a Dask worker than in one process, measured.

    python bench/bench_process_worker.py            # 512x512 frames, 40 per case (~1 min)

The same loop (one ``deconvolve`` engine, default parameters, frames already in memory, after 3
warm-up frames) runs in this process and inside one Dask worker process (1 thread, 512 MB, as
``livescope process`` starts them), as Dask starts the worker and after
``tune_worker_malloc`` (daemon/distributed.py), with and without Dask's statistical profiler and
with 1 or all cores for scipy.fft. Per case: wall and CPU ms per frame, and minor page faults
per frame (the sign of memory mapped and zeroed afresh). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from typing import Any

import numpy as np


def deconvolve_loop(n: int, size: int, tune: bool = False, fft_workers: int | None = None) -> dict[str, Any]:
    from livescope.daemon.distributed import tune_worker_malloc
    from livescope.engines import FrameInfo, StreamSpec, _array, create_engine

    if tune:
        tune_worker_malloc()
    default_workers = _array.fft_workers
    if fft_workers is not None:  # the engines ask _array how many FFT threads to use
        _array.fft_workers = lambda: fft_workers
    try:
        eng = create_engine("deconvolve")
        eng.setup(StreamSpec(shape=(size, size), dtype="uint16", bits=16))
        rng = np.random.default_rng(0)
        frames = (rng.poisson(300.0, (4, size, size)) + 100).astype(np.uint16)
        for i in range(3):
            eng.process(frames[i], FrameInfo(seq=i, timestamp=float(i), index={"t": i}))
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(n):
            eng.process(frames[i % 4], FrameInfo(seq=i, timestamp=float(i), index={"t": i}))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        _array.fft_workers = default_workers
    return {
        "wall_ms": 1e3 * wall / n,
        "cpu_ms": 1e3 * cpu / n,
        "faults": (r1.ru_minflt - r0.ru_minflt) / n,
        "malloc_env": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "fft_workers": fft_workers or _array.fft_workers(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    import dask
    from distributed import Client, LocalCluster

    rows = []

    def row(name: str, r: dict[str, Any]) -> None:
        rows.append((name, r))
        print(f"  {name}: {r['wall_ms']:.1f} ms/frame", flush=True)

    row("one process", deconvolve_loop(args.frames, args.size))
    for profiler in (True, False):
        with (
            dask.config.set({"distributed.worker.profile.enabled": profiler}),
            LocalCluster(
                n_workers=1, threads_per_worker=1, processes=True, memory_limit="512MB", dashboard_address=":0"
            ) as cluster,
            Client(cluster) as client,
        ):
            prof = "profiler on" if profiler else "profiler off"
            if profiler:  # before any tuning: the worker as Dask starts it
                row(
                    f"Dask worker as started ({prof})",
                    client.submit(deconvolve_loop, args.frames, args.size, pure=False).result(),
                )
            row(
                f"Dask worker, tune_worker_malloc ({prof})",
                client.submit(deconvolve_loop, args.frames, args.size, True, pure=False).result(),
            )
            if not profiler:
                row(
                    f"Dask worker, tune_worker_malloc, 1 FFT thread ({prof})",
                    client.submit(deconvolve_loop, args.frames, args.size, True, 1, pure=False).result(),
                )
    row("one process, again", deconvolve_loop(args.frames, args.size))
    print()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}; deconvolve defaults, {args.size}x{args.size}, "
        f"{args.frames} frames per case"
    )
    print()
    print("| where | wall ms/frame | CPU ms/frame | minor page faults/frame | FFT threads |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['wall_ms']:.1f} | {r['cpu_ms']:.1f} | {r['faults']:.0f} | {r['fft_workers']} |")


if __name__ == "__main__":
    main()
