"""Deconvolution speed of the working tree against an earlier revision of engines/deconvolve.py,
with scikit-image's RL, interleaved round after round (a shared machine's load drifts).

Run:  python bench/bench_deconvolve_revision.py [--rounds 30] [--rev HEAD]
Same image, PSF and noise as part 1 of bench_deconvolve.py; prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import time
from pathlib import Path

import numpy as np
import scipy.signal
import tifffile
from skimage.metrics import peak_signal_noise_ratio
from skimage.restoration import richardson_lucy

from livescope.engines import deconvolve as D
from livescope.engines import psf as P

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def load_revision(rev: str):
    """engines/deconvolve.py as of ``rev``, imported beside the current one (not registered)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:engines/deconvolve.py"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    src = src.replace('@register_engine("deconvolve")', "")
    spec = importlib.util.spec_from_loader("livescope.engines._deconvolve_revision", loader=None)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "livescope.engines"
    exec(compile(src, f"deconvolve.py@{rev}", "exec"), mod.__dict__)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rev", default="HEAD", help="git revision to compare against")
    args = ap.parse_args()
    old = load_revision(args.rev)

    obj = tifffile.imread(DATA / "w2s_pairs" / "target_avg400_085_1.tif").astype(np.float64)
    obj = obj / obj.max() * 2000.0 + 20.0
    psf = P.widefield_psf(0.8, 520, 1.33, 0.1)
    psf32 = psf.astype(np.float32)
    p = max(psf.shape)
    blurred = scipy.signal.fftconvolve(np.pad(obj, p, mode="symmetric"), psf, mode="same")[p:-p, p:-p]
    data = np.random.default_rng(0).poisson(blurred).astype(np.float32)
    scale = float(data.max())
    wb = D.wb_parameters(psf)
    fp_old = old._footprint(psf, "wb", wb)  # that revision padded by its footprint
    fp, pad = D._reaches(psf, "wb", wb, (1e-3, D.PAD_MASS))
    plans_old: dict = {}
    plans: dict = {}
    runs = {
        "skimage RL 2 it (its best)": lambda: richardson_lucy(data / scale, psf32, num_iter=2, clip=False) * scale,
        "skimage RL 5 it": lambda: richardson_lucy(data / scale, psf32, num_iter=5, clip=False) * scale,
    }
    for it in (1, 2):
        runs[f"{args.rev}: WB {it} it"] = lambda it=it: old.deconvolve_array(
            data, psf, iterations=it, wb=wb, plans=plans_old, footprint=fp_old
        )
    for it in (1, 2):
        runs[f"working tree: WB {it} it"] = lambda it=it: D.deconvolve_array(
            data, psf, iterations=it, wb=wb, plans=plans, footprint=fp, pad=pad
        )
    rng = float(obj.max() - obj.min())
    quality = {k: peak_signal_noise_ratio(obj, np.asarray(f(), float), data_range=rng) for k, f in runs.items()}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for k, f in runs.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ref = next(iter(runs))
    ref_best, ref_med = min(times[ref]), float(np.median(times[ref]))
    print(f"{args.rounds} interleaved rounds\n")
    print("| run | PSNR dB | best (s) | median (s) | skimage's best-quality time / this (best; median) |")
    print("|---|---|---|---|---|")
    for k, ts in times.items():
        b, m = min(ts), float(np.median(ts))
        print(f"| {k} | {quality[k]:.2f} | {b:.4f} | {m:.4f} | {ref_best / b:.1f}x; {ref_med / m:.1f}x |")


if __name__ == "__main__":
    main()
