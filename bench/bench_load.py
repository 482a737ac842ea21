"""Load test: the highest frame rate the daemon sustains with zero lost raw frames, per engine
chain and frame size, and what happens just above it (engines skip, raw is kept or losses counted).

    python bench/bench_load.py [--seconds 6] [--sizes 512 2048] [--chains passthrough deconvolve]

A publisher process offers frames at a fixed rate on loopback (non-blocking sends: what it cannot
hand over is counted); the daemon runs in this process with a store in a temp folder. For each
chain the rate doubles until raw frames are lost, then the last clean rate is reported.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _publish(address: str, size: int, fps: float, seconds: float, result) -> None:
    from livescope.bridges.transport import FramePublisher

    rng = np.random.default_rng(0)
    frames = [rng.integers(90, 4000, (size, size), dtype=np.uint16) for _ in range(4)]
    pub = FramePublisher(address, stream="load", hwm=64)
    n = int(fps * seconds)
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / fps
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.send(frames[i % 4], index={"t": i}, bits=12)
    pub.end()
    result.put({"offered": n, "dropped_at_publisher": pub.dropped})
    pub.close()


def run(size: int, fps: float, seconds: float, engines: list[str]) -> dict:
    from livescope.bridges.transport import free_tcp_address
    from livescope.daemon.cli import run_daemon
    from livescope.daemon.config import DaemonConfig

    out = Path(tempfile.mkdtemp(prefix="livescope-load-")) / "o.zarr"
    cfg = DaemonConfig(source="zmq", engines=engines, out=out, ingest=free_tcp_address(), publish=None,
                       control=None, exit_on_end=True, min_free_gb=0.0)
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_publish, args=(cfg.ingest, size, fps, seconds, result))

    def start(_pipeline):
        proc.start()

    t0 = time.perf_counter()
    summary = run_daemon(cfg, on_started=start)
    wall = time.perf_counter() - t0
    pub = result.get(timeout=60)
    proc.join(10)
    shutil.rmtree(out.parent, ignore_errors=True)
    f = summary["frames"]
    lost = pub["offered"] - f["saved"]
    return {"size": size, "fps": fps, "offered": pub["offered"], "saved": f["saved"], "lost": lost,
            "dropped_at_publisher": pub["dropped_at_publisher"], "skipped": f.get("skipped_frames", 0),
            "processed": max((e["processed"] for e in summary["engines"].values()), default=0), "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--chains", nargs="+", default=["passthrough", "register", "denoise", "deconvolve", "decompose"])
    args = ap.parse_args()
    print("| frames | chain | highest clean rate (fps) | MB/s | engine processed | just above: offered -> saved (lost, skipped by engine) |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for chain in args.chains:
            fps, clean, above = (40.0 if size == 512 else 5.0), None, None
            while fps <= (1280 if size == 512 else 160):
                r = run(size, fps, args.seconds, chain.split("+"))
                if r["lost"] == 0:
                    clean, fps = r, fps * 2
                else:
                    above = r
                    break
            mb = clean["fps"] * size * size * 2 / 1e6 if clean else 0
            c = f"{clean['fps']:.0f}" if clean else "< start"
            proc = f"{clean['processed']}/{clean['offered']}" if clean else "-"
            ab = (f"{above['offered']} -> {above['saved']} ({above['lost']} lost, {above['skipped']} skipped)"
                  if above else "not reached")
            print(f"| {size}x{size} | {chain} | {c} | {mb:.0f} | {proc} | {ab} |", flush=True)


if __name__ == "__main__":
    main()
