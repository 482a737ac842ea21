"""Bytes per frame of the saved products and what the store sustains, at 2048x2048 (#24).

The daemon's store path (``OmeZarrStore`` image writers: ``write``, ``flush_due`` + ``poll`` as
the store thread does, then ``flush``) writes raw (uint16) plus the products of the four-engine
chain (register, denoise, deconvolve, decompose) for each product set and dtype:

- ``all`` products (7: registered, denoised, deconvolved, background, slow, fast, residual);
- ``auto`` (the default: deconvolved, background, slow, fast);

each as float32 and as float16 (the default). Reported: MB per frame, MB/s sustained until the
data is handed to the OS (and including a final ``sync``), and the frame rate that allows, against
the 20 fps a 2048x2048 sCMOS stream runs at. Frames are camera-like noise (Poisson around a
W2S-like level), products are float images of the same scale.

    python bench/bench_product_budget.py            # ~2 min, writes ~12 GB (deleted)
    python bench/bench_product_budget.py --frames 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from livescope.bridges.store import ImageLayout, OmeZarrStore

PRECONVERT = False
ALL = ["registered", "denoised", "deconvolved", "background", "slow", "fast", "residual"]
AUTO = ["deconvolved", "background", "slow", "fast"]


def run(folder: Path, products: list[str], dtype: str, frames: int, size: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    raw = [rng.poisson(600, (size, size)).astype(np.uint16) + 100 for _ in range(4)]
    prod = [rng.normal(600, 80, (size, size)).astype(np.float32) for _ in range(4)]
    if dtype == "float16" and PRECONVERT:  # converted by the producer (the chain's thread), as the daemon does
        prod = [p.astype(np.float16) for p in prod]
    out = folder / f"{dtype}_{len(products)}.zarr"
    store = OmeZarrStore(out, overwrite=True, product_dtypes={p: dtype for p in products})
    layout = ImageLayout(plane_shape=(size, size), dtype="uint16", has_c=False, has_z=False, bits=12)
    flayout = ImageLayout(plane_shape=(size, size), dtype="float32", has_c=False, has_z=False, bits=12)
    writers = [store.image("raw", 0, 0, layout)] + [store.image(p, 0, 0, flayout) for p in products]
    t0 = time.perf_counter()
    for t in range(frames):
        for k, w in enumerate(writers):
            plane = raw[t % 4] if k == 0 else prod[(t + k) % 4]
            w.write(t, 0, 0, plane, seq=t, time_s=t * 0.05)
        now = time.monotonic()
        for w in writers:
            w.flush_due(now)
            w.poll()
    for w in writers:
        w.flush()
    handed = time.perf_counter() - t0
    store.close()
    subprocess.run(["sync"], check=False)
    synced = time.perf_counter() - t0
    nbytes = sum(w.bytes_written for w in writers)
    shutil.rmtree(out, ignore_errors=True)
    per_frame = nbytes / frames / 2**20
    return {"mb_frame": per_frame, "mbs": nbytes / 2**20 / handed, "mbs_sync": nbytes / 2**20 / synced}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--preconvert", action="store_true", help="hand float16 planes to the store (converted upstream)")
    args = ap.parse_args()
    global PRECONVERT
    PRECONVERT = args.preconvert
    base = Path(args.dir) if args.dir else Path(__file__).resolve().parents[1]
    folder = Path(tempfile.mkdtemp(prefix="budget-", dir=base))
    try:
        print("| products | dtype | MB/frame | MB/s handed to the OS | MB/s incl. sync | fps sustained (incl. sync) |")
        print("|---|---|---|---|---|---|")
        for name, products in (("auto (4)", AUTO), ("all (7)", ALL)):
            for dtype in ("float16", "float32"):
                r = run(folder, products, dtype, args.frames, args.size)
                fps = r["mbs_sync"] / r["mb_frame"]
                print(
                    f"| {name} | {dtype} | {r['mb_frame']:.0f} | {r['mbs']:.0f} | {r['mbs_sync']:.0f} | "
                    f"{fps:.1f}{' (>= 20)' if fps >= 20 else ' (< 20)'} |"
                )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\n{os.cpu_count()} cores; frames {args.frames} of {args.size}x{args.size}; raw uint16 in every row")


if __name__ == "__main__":
    main()
