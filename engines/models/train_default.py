"""Train livescope's shipped default denoising model, and evaluate it honestly on real data.

The shipped ``denoise_default.lsmodel`` (recipe ``supervised``, pixel-unshuffled U-Net with added,
not concatenated, skips), in two learning-rate cycles (50 + 22 minutes) on one torch thread, the
second continuing from the first on fresh crops::

    python engines/models/train_default.py --recipe supervised --base 32 --unshuffle 2 --skip add \
        --minutes 50 --seed 3 --out /tmp/b.lsmodel
    python engines/models/train_default.py --recipe supervised --base 32 --unshuffle 2 --skip add \
        --init /tmp/b.lsmodel --lr 1e-3 --seed 5 --minutes 22 --out engines/models/denoise_default.lsmodel

The model shipped before it (concatenated skips: more FLOPs per frame, docs/denoising.md, section
"The shipped default model"), in two cycles::

    python engines/models/train_default.py --recipe supervised --base 32 --unshuffle 2 --minutes 16 --out /tmp/a.lsmodel
    python engines/models/train_default.py --recipe supervised --base 32 --unshuffle 2 --init /tmp/a.lsmodel \
        --lr 1e-3 --seed 1 --minutes 18 --out /tmp/cat.lsmodel

    python engines/models/train_default.py --out /tmp/n2v.lsmodel   # recipe n2v: the earlier default

Recipe ``supervised`` (the shipped model; better than the best-sigma Gaussian on both W2S pairs,
trained on neither; see docs/denoising.md): clean images that are neither W2S image, made noisy
on the fly and learnt back (supervised "crappify", as ``fit(clean=...)`` but through the
engine's own normalisation):

- the sim microscope's noise-free frames (``bridges.sim.SimSample.clean``) over a spread of its
  parameters: blur 0.8-2.4 px, from a few spots to a dense punctate texture, slow blobs, the
  shipped nuclei image as background;
- ``cancer_cell_migration_crop.tif`` from ``../shared/data`` next to the repository (or --data):
  a 48-frame time-lapse of migrating nuclei (Tinevez and Jacquemet, zenodo 5206107, CC BY 4.0),
  3 adjacent frames averaged and lightly smoothed, which leaves far less noise variance than one
  frame (docs/denoising.md, section "The supervised recipe"): nearly clean.

Each 128x128 crop becomes a camera frame at a random peak of 4-400 photons, background, read
noise, gain and offset (half of them rescaled to 8 bits and clipped, as exported images are);
the noise model is then FITTED from that frame and the frame normalised exactly as the engine
does at inference (generalised Anscombe, percentiles), so the network sees unit-variance noise;
the target is the value the engine's unbiased inverse maps to the clean frame.

Recipe ``n2v`` (the earlier shipped model, until the supervised one replaced it): Noise2Void on
ONE noisy W2S frame (``--w2s-train``), evaluated on the other pair, optionally with the cell
time-lapse (``--with-cells``, Noise2Void plus temporal pairs).

Evaluation: the W2S pairs the model never saw (noisy input vs its 400-frame average, PSNR and
SSIM after an affine fit to the target), against the best-sigma Gaussian filter: both pairs for
``supervised``, the other one for ``n2v``. Training runs on 1 CPU thread (--threads): small
batches gain little from more threads and suffer badly on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from livescope.engines.modelfile import ModelFile

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
            "psnr": round(psnr_affine(out, target), 2),
            "ssim": round(ssim_affine(out, target), 4),
            "gaussian_sigma": best,
            "gaussian_psnr": round(psnr_affine(gauss[best], target), 2),
            "gaussian_ssim": round(ssim_affine(gauss[best], target), 4),
            "raw_psnr": round(psnr_affine(noisy, target), 2),
        }
    return results


# --------------------------------------------------------------------------- supervised recipe

# the range of what a user's camera may deliver: peak photons per pixel, background as a
# fraction of the peak, read noise (electrons rms), gain (ADU per electron), offset (ADU)
PEAK_PHOTONS = (4.0, 400.0)  # log-uniform
BACKGROUND = (0.0, 0.1)
READ_NOISE_E = (0.0, 2.5)
GAIN = (0.3, 20.0)  # log-uniform
OFFSET = (0.0, 200.0)
RESCALED_8BIT = 0.5  # share of frames rescaled to 0..255 and clipped, as exported 8-bit images are


def clean_pool(data: Path, *, sim_images: int = 48, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """Clean images (float32, any scale) that are neither W2S image: the sim microscope's
    noise-free frames over a spread of its parameters, and the cell-migration time-lapse made
    nearly clean (3 adjacent frames averaged, light Gaussian: about 40x less noise variance)."""
    import tifffile
    from scipy import ndimage

    from livescope.bridges.sim import SimConfig, SimSample

    rng = np.random.default_rng(seed)
    pool, described = [], []
    for i in range(sim_images):
        cfg = SimConfig(
            shape=(256, 256),
            seed=1000 + i,
            photons=float(rng.uniform(20, 200)),
            n_slow=int(rng.integers(0, 12)),
            slow_sigma=float(rng.uniform(3, 10)),
            slow_photons=float(rng.uniform(20, 200)),
            # from a few spots to a dense punctate texture
            n_fast=int(np.exp(rng.uniform(np.log(20), np.log(4000)))),
            fast_sigma=float(rng.uniform(0.5, 1.6)),
            fast_photons=float(rng.uniform(20, 300)),
            psf_sigma=float(rng.uniform(0.8, 2.4)),
        )
        pool.append(SimSample(cfg).clean(int(rng.integers(0, 50)), channel=int(rng.integers(0, 2))))
    described.append(f"{sim_images} noise-free frames of the sim microscope (bridges/sim.py, varied parameters)")
    cells_path = data / "cancer_cell_migration_crop.tif"
    if cells_path.is_file():
        cells = tifffile.imread(cells_path).astype(np.float32)
        for t in range(1, len(cells) - 1):
            pool.append(ndimage.gaussian_filter(cells[t - 1 : t + 2].mean(0), 0.7))
        described.append(f"{len(cells) - 2} frames of cancer_cell_migration_crop (3-frame mean, Gaussian 0.7 px)")
    return [np.asarray(p, np.float32) for p in pool], described


_D = np.linspace(0.8, 200.0, 20000)
_F = None


def _gat_forward_unbiased(photons: np.ndarray) -> np.ndarray:
    """The stabilised value whose unbiased inverse (``inference.gat_inverse``) is ``photons``:
    the network's target, so that the engine's inverse maps its output back to the clean value."""
    global _F
    from livescope.engines.inference import gat_inverse

    if _F is None:
        _F = gat_inverse(_D)
    p = np.asarray(photons, np.float64)
    # beyond the table (a tiny fitted gain makes photon counts huge) the inverse is d^2/4 - 1/8
    far = 2.0 * np.sqrt(np.maximum(p, _F[-1]) + 0.125)
    return np.where(p < _F[-1], np.interp(p, _F, _D), far).astype(np.float32)


def degrade(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A camera frame of a clean crop at random photon count, gain, offset, read noise (and, for
    some, 8-bit rescaling), and its expected value in the same ADU: (noisy, expected)."""
    lo, hi = np.percentile(clean, [0.5, 99.9])
    s = np.clip((clean - lo) / max(float(hi - lo), 1e-6), 0, None)
    peak = float(np.exp(rng.uniform(*np.log(PEAK_PHOTONS))))
    lam = s * peak + peak * rng.uniform(*BACKGROUND)
    gain = float(np.exp(rng.uniform(*np.log(GAIN))))
    offset = float(rng.uniform(*OFFSET))
    electrons = rng.poisson(lam).astype(np.float32) + rng.normal(0.0, rng.uniform(*READ_NOISE_E), lam.shape)
    noisy = gain * electrons + offset
    expected = gain * lam + offset
    if rng.random() < RESCALED_8BIT:
        a, b = np.percentile(noisy, [rng.uniform(0, 0.2), rng.uniform(99.7, 100.0)])
        scale = 255.0 / max(float(b - a), 1e-6)
        noisy = np.clip(np.round((noisy - a) * scale), 0, 255)
        expected = (expected - a) * scale
    else:
        noisy = np.maximum(np.round(noisy), 0)
    return noisy.astype(np.float32), expected.astype(np.float32)


def normalised_pair(noisy: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, object]:
    """Input and target as the network sees them: the noisy frame normalised exactly as the
    engine does at inference (noise model fitted from the frame itself, generalised Anscombe,
    percentiles), the target the value the engine's inverse maps to ``expected``."""
    from livescope.engines.inference import Normalisation

    norm = Normalisation.estimate(noisy, vst=True, percentiles=(1.0, 99.8))
    x = norm.forward(noisy)
    if norm.gain > 0:
        a = norm.gain
        d = _gat_forward_unbiased((expected - norm.offset) / a + norm.read_var / a**2)
        y = (d - np.float32(norm.low)) / np.float32(norm.high - norm.low)
    else:
        y = norm.forward(expected)
    return x, y.astype(np.float32), norm


def _crop(img: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = img.shape
    y0, x0 = rng.integers(0, h - size + 1), rng.integers(0, w - size + 1)
    c = img[y0 : y0 + size, x0 : x0 + size]
    c = np.rot90(c, int(rng.integers(4)))
    return np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c)


def feature_frames(pool: list[np.ndarray], *, frames: int = 24, size: int = 128, seed: int = 1):
    """(noisy frame, its normalisation) pairs drawn as training draws them: for the trust
    engine's training-feature statistics."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(frames):
        noisy, expected = degrade(_crop(pool[int(rng.integers(len(pool)))], size, rng), rng)
        out.append((noisy, normalised_pair(noisy, expected)[2]))
    return out


def fit_supervised(
    pool: list[np.ndarray],
    *,
    base: int,
    depth: int,
    steps: int,
    batch: int,
    patch: int,
    lr: float,
    time_budget_s: float,
    seed: int,
    description: str,
    unshuffle: int = 1,
    init: ModelFile | None = None,
    skip: str = "cat",
):
    """Supervised fit on crappified clean images; returns (ModelFile, losses, seconds).

    ``init``: a ModelFile of the same architecture to continue from (a second learning-rate
    cycle on fresh crops); its training record is kept under ``continued_from``."""
    import torch
    from tqdm.auto import tqdm

    from livescope.engines.modelfile import ModelFile
    from livescope.engines.trust import feature_statistics, normalised_features
    from livescope.engines.unet import UNet

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    net = UNet(1, base, depth, 64, unshuffle=unshuffle, skip=skip)
    if init is not None:
        net.load_state_dict(init.build_torch().state_dict())
    size = min(128, *(min(p.shape) for p in pool))  # the frame the noise model is fitted on
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    net.train()
    bar = tqdm(total=steps, desc="fitting denoiser (supervised)", unit="step", mininterval=10)
    for step in range(steps):
        xs, ys = np.empty((2, batch, 1, patch, patch), np.float32)
        for i in range(batch):
            while True:
                noisy, expected = degrade(_crop(pool[int(rng.integers(len(pool)))], size, rng), rng)
                x, y, _ = normalised_pair(noisy, expected)
                # a frame whose fitted noise model is degenerate (nearly flat crops: a gain of
                # 1e-16, float32 overflow) is no lesson; about 1 in 3000
                if np.isfinite(x).all() and np.isfinite(y).all() and max(np.abs(x).max(), np.abs(y).max()) < 20:
                    break
            y0, x0 = rng.integers(0, size - patch + 1, 2)
            xs[i, 0], ys[i, 0] = x[y0 : y0 + patch, x0 : x0 + patch], y[y0 : y0 + patch, x0 : x0 + patch]
        frac = min(1.0, max(step / steps, (time.perf_counter() - t0) / time_budget_s))
        for g in opt.param_groups:  # warm-up, cosine decay over whichever runs out first
            g["lr"] = lr * min(1.0, frac / 0.05) * 0.5 * (1 + np.cos(np.pi * frac)) + lr * 0.01
        loss = torch.mean((net(torch.from_numpy(xs)) - torch.from_numpy(ys)) ** 2)
        if not torch.isfinite(loss):
            continue
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.5f}")
        if time.perf_counter() - t0 > time_budget_s:
            break
    bar.close()
    seconds = time.perf_counter() - t0
    net.eval()
    meta = {
        "training": {
            "data": description,
            "method": "supervised-crappify",
            "noise": {
                "peak_photons": PEAK_PHOTONS,
                "background_of_peak": BACKGROUND,
                "read_noise_e": READ_NOISE_E,
                "gain_adu_per_e": GAIN,
                "offset_adu": OFFSET,
                "rescaled_8bit_share": RESCALED_8BIT,
            },
            "steps": len(losses),
            "batch": batch,
            "patch": patch,
            "lr": lr,
            "seconds": round(seconds, 1),
            "final_loss": float(np.mean(losses[-50:])),
        },
        "normalisation": {
            "vst": True,
            "percentiles": [1.0, 99.8],
            "rule": "offset, generalised Anscombe with fitted or given gain, percentiles",
        },
    }
    if init is not None:
        before: dict[str, Any] = dict(init.metadata.get("training", {}))
        meta["training"]["continued_from"] = before
        meta["training"]["steps_total"] = len(losses) + int(before.get("steps_total", before.get("steps", 0)))
    feats = [normalised_features(f, n, shifts=True) for f, n in feature_frames(pool, seed=seed + 1)]
    meta["training_features"] = feature_statistics(feats, description="crappified training frames")
    return ModelFile.from_net(net, meta), losses, seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--recipe",
        default="n2v",
        choices=("n2v", "supervised"),
        help="supervised: the shipped model (crappified sim + cell frames; the commands are in the "
        "docstring); n2v: the earlier default (Noise2Void on one W2S input)",
    )
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--w2s-train", default="035_1", choices=W2S, help="n2v: the W2S noisy input to fit on")
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="where to write the model (engines/models/denoise_default.lsmodel is the shipped one)",
    )
    p.add_argument("--steps", type=int, default=None, help="default: 4000 (n2v), 20000 (supervised)")
    p.add_argument(
        "--minutes", type=float, default=None, help="stop early after this long; default: 6 (n2v), 16 (supervised)"
    )
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument(
        "--unshuffle",
        type=int,
        default=1,
        help="supervised: pixel-unshuffle factor at the input (2: the levels run at half resolution on "
        "4x the channels, no full-resolution layer; the shipped model)",
    )
    p.add_argument(
        "--skip",
        default="cat",
        choices=("cat", "add"),
        help="supervised: decoder skips concatenated (cat) or added (add: 19 %% fewer FLOPs)",
    )
    p.add_argument(
        "--init",
        type=Path,
        default=None,
        help="supervised: continue from this model file (same architecture), a second cycle",
    )
    p.add_argument("--lr", type=float, default=2e-3, help="supervised: peak learning rate")
    p.add_argument("--batch", type=int, default=8, help="supervised: crops per step")
    p.add_argument("--patch", type=int, default=96, help="supervised: crop size the loss sees")
    p.add_argument("--sim-images", type=int, default=48, help="supervised: noise-free sim frames")
    p.add_argument(
        "--with-cells",
        action="store_true",
        help="n2v: also fit on the cell-migration time-lapse (measured: worse on held-out W2S)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads for training")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import tifffile
    import torch

    from livescope.engines import modelfile
    from livescope.engines.fit import fit
    from livescope.engines.unet import flops_and_traffic

    torch.set_num_threads(args.threads)
    supervised = args.recipe == "supervised"
    steps = args.steps or (20000 if supervised else 4000)
    minutes = args.minutes or (16.0 if supervised else 6.0)
    if not (args.data / "w2s_pairs").is_dir():
        print(f"real data not found at {args.data}; pass --data", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if supervised:
        held_out = list(W2S)
        pool, described = clean_pool(args.data, sim_images=args.sim_images, seed=args.seed)
        model, losses, _ = fit_supervised(
            pool,
            base=args.base,
            depth=args.depth,
            steps=steps,
            batch=args.batch,
            patch=args.patch,
            lr=args.lr,
            time_budget_s=60 * minutes,
            seed=args.seed,
            unshuffle=args.unshuffle,
            skip=args.skip,
            init=modelfile.load(args.init) if args.init else None,
            description="supervised on crappified clean images: " + "; ".join(described),
        )
    else:
        held_out = [k for k in W2S if k != args.w2s_train]
        sources = [tifffile.imread(args.data / "w2s_pairs" / f"input_avg1_{args.w2s_train}.tif")]
        described = [f"W2S input_avg1_{args.w2s_train} (one noisy widefield frame, Noise2Void)"]
        if args.with_cells:
            sources.append(tifffile.imread(args.data / "cancer_cell_migration_crop.tif"))
            described.append("cancer_cell_migration_crop (48-frame time-lapse, Noise2Void + temporal pairs)")
        res = fit(
            sources,
            base=args.base,
            depth=args.depth,
            steps=steps,
            batch=16,
            patch=64,
            lr=2e-3,
            time_budget_s=60 * minutes,
            seed=args.seed,
            threads=args.threads,
            description="; ".join(described),
        )
        model, losses = res.model, res.losses
    net = model.build_torch()
    cost = flops_and_traffic(net, 512, 512)
    meta = model.metadata
    meta["training"]["held_out_for_evaluation"] = [f"W2S {k}" for k in held_out]
    meta["training"]["script"] = "engines/models/train_default.py " + " ".join(argv or sys.argv[1:])
    meta["cost_per_512x512_frame"] = {
        "gflops": round(cost["flops"] / 1e9, 2),
        "min_traffic_mb": round(cost["bytes"] / 1e6, 1),
        "params": int(cost["params"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model.save(args.out)  # saved before evaluating: evaluation reads it back like a user would
    meta["evaluation"] = evaluate(args.out, args.data, held_out)
    model.save(args.out)
    print(
        json.dumps(
            {
                "seconds": round(time.perf_counter() - t0, 1),
                "steps": len(losses),
                "loss_first_last": [float(np.mean(losses[:50])), float(np.mean(losses[-50:]))],
                "cost": meta["cost_per_512x512_frame"],
                "evaluation": meta["evaluation"],
                "size_bytes": args.out.stat().st_size,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
