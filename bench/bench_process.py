"""Throughput of ``livescope process`` on dask.distributed: 1 and 2 workers against the
single-process loop (``workers=0``), on a movie larger than the workers' memory limit.

    python bench/bench_process.py                    # 2 GiB movie, 512 MB per worker (~3 min)
    python bench/bench_process.py --gb 0.25 --memory-limit 128MB   # a quick look
    python bench/bench_process.py --chains deconvolve                # the compute-bound rows only

Prints a markdown table (frames/s, input MB/s, scaling efficiency) and the measured per-chunk
costs (read, compute, write per frame) from which docs/process.md projects a 16-GPU cluster.
The movie and every output are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_movie(path: Path, n_t: int, size: int) -> None:
    """A uint16 TIFF written through a memory map, block by block (never all in memory)."""
    import tifffile

    rng = np.random.default_rng(0)
    block = (rng.poisson(300.0, (64, size, size)) + 100).astype(np.uint16)
    mm = tifffile.memmap(path, shape=(n_t, size, size), dtype=np.uint16, photometric="minisblack")
    for t0 in range(0, n_t, 64):
        n = min(64, n_t - t0)
        mm[t0 : t0 + n] = np.roll(block[:n], t0 % size, axis=-1)  # every block a little different
    mm.flush()
    del mm


def chunk_costs(out: Path) -> dict[str, float]:
    """Mean read / compute / write seconds per frame over the chunks' markers."""
    tot = {"read_s": 0.0, "compute_s": 0.0, "write_s": 0.0}
    frames = 0
    chunks = 0
    for m in (out / ".livescope-process" / "done").glob("*.json"):
        d = json.loads(m.read_text())
        for k in tot:
            tot[k] += d["timing"].get(k, 0.0)
        frames += d["t"][1] - d["t"][0]
        chunks += 1
    return {k: 1e3 * v / max(frames, 1) for k, v in tot.items()} | {
        "chunks": chunks,
        "frames_per_chunk": frames / max(chunks, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="size of the movie (GiB)")
    ap.add_argument("--size", type=int, default=512, help="frame width and height")
    ap.add_argument("--memory-limit", default="512MB", help="per worker")
    ap.add_argument("--compute-frames", type=int, default=1024, help="frames for the compute-bound chain (deconvolve)")
    ap.add_argument("--dir", default=None, help="where to put the movie (default: a temporary folder)")
    ap.add_argument("--chains", default="passthrough,deconvolve", help="which chains to run (comma-separated)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from livescope.daemon.process import process_file

    base = Path(tempfile.mkdtemp(prefix="bench_process_", dir=args.dir))
    try:
        n_t = int(args.gb * 2**30 // (args.size * args.size * 2))
        movie = base / "movie.tif"
        t = time.perf_counter()
        make_movie(movie, n_t, args.size)
        print(
            f"movie: {n_t} frames of {args.size}x{args.size} uint16, {movie.stat().st_size / 2**30:.2f} GiB "
            f"(written in {time.perf_counter() - t:.1f} s); worker memory limit {args.memory_limit}"
        )
        frame_mb = args.size * args.size * 2 / 2**20
        rows = []
        costs = {}
        wanted = set(args.chains.split(","))
        for chain, frames in ((["passthrough"], n_t), (["deconvolve"], min(n_t, args.compute_frames))):
            if chain[0] not in wanted:
                continue
            base_fps = {}
            for workers in (0, 1, 2):
                out = base / f"out_{chain[0]}_{workers}.zarr"
                t = time.perf_counter()
                process_file(
                    movie,
                    out,
                    chain,
                    {},
                    save_raw=False,
                    frames=frames,
                    workers=workers,
                    memory_limit=args.memory_limit if workers else None,
                    progress=False,
                )
                wall = time.perf_counter() - t  # including the cluster's start and the planning
                fps = frames / wall
                base_fps[workers] = fps
                eff = "" if workers < 2 else f"{fps / (2 * base_fps[1]):.0%}"
                name = "single process (workers=0)" if workers == 0 else f"Dask LocalCluster, {workers} worker(s)"
                rows.append((" + ".join(chain), name, frames, wall, fps, fps * frame_mb, eff))
                if workers:
                    costs[(chain[0], workers)] = chunk_costs(out)
                shutil.rmtree(out, ignore_errors=True)
                print(f"  {chain} workers={workers}: {wall:.1f} s, {fps:.1f} frames/s", flush=True)
        print()
        print(
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f}; "
            f"movie {n_t} x {args.size}x{args.size} uint16 ({n_t * frame_mb / 1024:.2f} GiB), "
            f"worker memory limit {args.memory_limit}, products float32, raw not copied"
        )
        print()
        print("| chain | run | frames | wall s | frames/s | input MB/s | scaling (2 vs 1 worker) |")
        print("|---|---|---|---|---|---|---|")
        for chain, name, frames, wall, fps, mbs, eff in rows:
            print(f"| {chain} | {name} | {frames} | {wall:.1f} | {fps:.1f} | {mbs:.1f} | {eff} |")
        print()
        print("Per-chunk costs inside the tasks (ms per frame, mean over chunks):")
        print()
        print("| chain | workers | chunks | frames/chunk | read | compute | write |")
        print("|---|---|---|---|---|---|---|")
        for (chain, workers), c in costs.items():
            print(
                f"| {chain} | {workers} | {c['chunks']} | {c['frames_per_chunk']:.0f} | {c['read_s']:.2f} | "
                f"{c['compute_s']:.2f} | {c['write_s']:.2f} |"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
