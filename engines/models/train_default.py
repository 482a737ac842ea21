"""Train livescope's shipped default denoising model on real data, and evaluate it honestly.

    python engines/models/train_default.py                 # writes engines/models/denoise_default.lsm
    python engines/models/train_default.py --w2s-train 085_1 --out /tmp/mirror.lsm   # the mirror

Training data (read at run time from ``../shared/data`` next to the repository, or --data; none
of it is copied into the package, only the trained model is shipped):

- ``w2s_pairs/input_avg1_<key>.tif``: ONE noisy widefield frame of the W2S dataset (Zhou et al.
  2020), self-supervised (Noise2Void), its 400-frame average never looked at;
- with ``--with-cells``, also ``cancer_cell_migration_crop.tif``: a 48-frame time-lapse of
  migrating nuclei (Tinevez and Jacquemet, zenodo 5206107, CC BY 4.0), Noise2Void plus temporal
  pairs. Measured: it lowers the held-out W2S score (28.1 vs 29.5 dB on 085_1), so the shipped
  model is fitted without it.

Evaluation: the OTHER W2S pair only (noisy input vs its 400-frame average, PSNR and SSIM after
an affine fit to the target), against the best-sigma Gaussian filter. The model never sees the
image it is evaluated on; run with ``--w2s-train`` set to the other key for the other direction.

Self-supervised, no clean images; 6 minutes on 2 CPU cores (--minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
W2S = ("035_1", "085_1")


def psnr_affine(x: np.ndarray, target: np.ndarray) -> float:
    x = x.astype(np.float64).ravel()
    t = target.astype(np.float64).ravel()
    a = np.stack([x, np.ones_like(x)], 1)
    coef, *_ = np.linalg.lstsq(a, t, rcond=None)
    return float(10 * np.log10(255.0**2 / np.mean((a @ coef - t) ** 2)))


def ssim_affine(x: np.ndarray, target: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    x = x.astype(np.float64)
    a = np.stack([x.ravel(), np.ones(x.size)], 1)
    coef, *_ = np.linalg.lstsq(a, target.astype(np.float64).ravel(), rcond=None)
    return float(structural_similarity((a @ coef).reshape(x.shape), target.astype(np.float64), data_range=255.0))


def evaluate(model_path: Path, data: Path, keys: list[str]) -> dict[str, dict[str, float]]:
    import tifffile
    from scipy import ndimage

    from livescope.engines import FrameInfo, StreamSpec, create_engine

    results = {}
    for key in keys:
        noisy = tifffile.imread(data / "w2s_pairs" / f"input_avg1_{key}.tif")
        target = tifffile.imread(data / "w2s_pairs" / f"target_avg400_{key}.tif")
        eng = create_engine("denoise", model=str(model_path), backend="onnxruntime")
        eng.setup(StreamSpec(shape=noisy.shape, dtype="uint8", bits=8))
        out = eng.process(noisy, FrameInfo(seq=0))["denoised"]
        gauss = {s: ndimage.gaussian_filter(noisy.astype(np.float32), s) for s in (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)}
        best = max(gauss, key=lambda s: psnr_affine(gauss[s], target))
        results[key] = {
            "psnr": round(psnr_affine(out, target), 2), "ssim": round(ssim_affine(out, target), 4),
            "gaussian_sigma": best, "gaussian_psnr": round(psnr_affine(gauss[best], target), 2),
            "gaussian_ssim": round(ssim_affine(gauss[best], target), 4),
            "raw_psnr": round(psnr_affine(noisy, target), 2),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--w2s-train", default="035_1", choices=W2S, help="the W2S noisy input to fit on")
    p.add_argument("--out", type=Path, default=HERE / "denoise_default.lsm")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=6.0, help="stop early after this long")
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--with-cells", action="store_true",
                   help="also fit on the cell-migration time-lapse (measured: worse on held-out W2S)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import tifffile
    import torch

    from livescope.engines.fit import fit
    from livescope.engines.unet import flops_and_traffic

    torch.set_num_threads(2)
    if not (args.data / "w2s_pairs").is_dir():
        print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    held_out = [k for k in W2S if k != args.w2s_train]
    sources = [tifffile.imread(args.data / "w2s_pairs" / f"input_avg1_{args.w2s_train}.tif")]
    described = [f"W2S input_avg1_{args.w2s_train} (one noisy widefield frame, Noise2Void)"]
    if args.with_cells:
        sources.append(tifffile.imread(args.data / "cancer_cell_migration_crop.tif"))
        described.append("cancer_cell_migration_crop (48-frame time-lapse, Noise2Void + temporal pairs)")
    t0 = time.perf_counter()
    res = fit(sources, base=args.base, depth=args.depth, steps=args.steps, batch=16, patch=64,
              lr=2e-3, time_budget_s=60 * args.minutes, seed=args.seed,
              description="; ".join(described))
    net = res.model.build_torch()
    cost = flops_and_traffic(net, 512, 512)
    meta = res.model.metadata
    meta["training"]["held_out_for_evaluation"] = [f"W2S {k}" for k in held_out]
    meta["training"]["script"] = "engines/models/train_default.py " + " ".join(argv or sys.argv[1:])
    meta["cost_per_512x512_frame"] = {"gflops": round(cost["flops"] / 1e9, 2),
                                      "min_traffic_mb": round(cost["bytes"] / 1e6, 1),
                                      "params": int(cost["params"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    res.model.save(args.out)  # saved before evaluating: evaluation reads it back like a user would
    meta["evaluation"] = evaluate(args.out, args.data, held_out)
    res.model.save(args.out)
    print(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "steps": len(res.losses),
                      "loss_first_last": [float(np.mean(res.losses[:50])), float(np.mean(res.losses[-50:]))],
                      "cost": meta["cost_per_512x512_frame"], "evaluation": meta["evaluation"],
                      "size_bytes": args.out.stat().st_size}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
