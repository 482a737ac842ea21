"""Which classical teacher for the learned deconvolution: per-region and single-PSF WB-RL and RL
at several iteration counts, on one frame and on temporal means, against the known object.

Same scene as bench_netdeconv.py (W2S 085_1 averages, blur sigma 1 -> 3 px towards the corners,
Poisson at --peak photons, read noise 2). The teacher runs once at fit time, so its cost is not
what matters here; its quality bounds the network's.

    python bench/bench_netdeconv_teachers.py [--field 96] [--fovs 4] [--peak 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_netdeconv import field_blur, load, psf_grid, psnr  # noqa: E402

from livescope.engines import netdeconv as N  # noqa: E402
from livescope.engines.psf import gaussian_psf  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--field", type=int, default=96)
    ap.add_argument("--fovs", type=int, default=4)
    ap.add_argument("--peak", type=float, default=200.0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    obj = load("085_1", args.peak)
    F = args.field
    grid = N.PSFField.of(psf_grid((F, F)))
    singles = {s: N.PSFField.of(gaussian_psf(s)) for s in (1.5, 2.0, 2.5, 3.0)}
    P = N._teacher_params
    res: dict[str, list[float]] = {}
    for _ in range(args.fovs):
        y0, x0 = rng.integers(0, obj.shape[0] - F + 1, 2)
        o = obj[y0 : y0 + F, x0 : x0 + F]
        b = np.maximum(field_blur(o), 0)
        fr = np.stack([rng.poisson(b) + rng.normal(0, 2.0, b.shape) for _ in range(9)])
        fr = np.maximum(fr, 0).astype(np.float32)

        def add(name, est, o=o):
            res.setdefault(name, []).append(psnr(est, o))

        for name, tp in (
            ("WB 2 it.", None),
            ("WB 1 it.", {"iterations": 1}),
            ("WB 2 it., alpha 0.1", {"alpha": 0.1}),
            *((f"RL {i} it.", {"method": "rl", "iterations": i}) for i in (3, 5, 10, 20)),
        ):
            add(f"per-region, one frame: {name}", N.teacher_deconvolve(fr[0], grid, P(tp)))
            if name in ("WB 2 it.", "WB 1 it.", "RL 3 it."):
                add(
                    f"single PSF (best sigma), one frame: {name}",
                    max((N.teacher_deconvolve(fr[0], f, P(tp)) for f in singles.values()), key=lambda e: psnr(e, o)),
                )
        add(
            "per-region, one frame: Gaussian sigma 1 then WB 2 it.",
            N.teacher_deconvolve(ndimage.gaussian_filter(fr[0], 1.0), grid, P(None)),
        )
        for w in (3, 5, 9):
            add(
                f"per-region, mean of {w} frames (restore): WB 2 it.",
                N.teacher_deconvolve(fr[:w].mean(0), grid, P(None)),
            )
            add(
                f"per-region, mean of {w} frames (restore): RL 10 it.",
                N.teacher_deconvolve(fr[:w].mean(0), grid, P({"method": "rl", "iterations": 10})),
            )
    print(
        f"\n{args.fovs} fields of view {F}x{F} of 085_1, peak {args.peak:g} photons; the best single PSF is "
        "chosen per frame against the object (a user cannot)\n"
    )
    print("| teacher | PSNR vs object (dB) |\n|---|---|")
    for name, v in res.items():
        print(f"| {name} | {np.mean(v):.2f} |")


if __name__ == "__main__":
    main()
