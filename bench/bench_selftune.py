"""Self-tuning deconvolution by photon splitting, against the oracle, the default and scikit-image.

Real images as ground truth (held out: never used to choose anything in engines/selftune.py):
the two W2S high-SNR targets (400-frame averages of real cells) and a nuclei frame of the
cancer-cell migration movie; for choosing the split fraction ``p``, scikit-image's ``cell``
image only (``--calibrate``). Each is blurred by a Gaussian PSF (sigma 1.5 and 2.5 px), scaled to
a peak of 50, 400 and 4000 photons, Poisson noise, offset 100 ADU, gain 1.

Per case, PSNR (dB, after an affine intensity fit to the truth, as the issue measured) of:

- raw;
- the current default (Wiener-Butterworth, 2 iterations, alpha 0.01);
- auto: the setting :func:`livescope.engines.selftune.tune_deconvolution` picks from the frame
  alone, applied to the whole frame;
- oracle: the best of the same candidate settings chosen with the truth;
- scikit-image RL at its best iteration count (1..50, chosen with the truth).

    python bench/bench_selftune.py               # the held-out table (~3 min)
    python bench/bench_selftune.py --calibrate   # the split fraction on the calibration image
    python bench/bench_selftune.py --denoise-first   # also decide whether to denoise first (~4 min)

``--denoise-first``: the shipped denoiser (onnxruntime, gain 1, offset 0) as a second input for
every classic-RL setting; per case the best PSNR deconvolving the raw frame and the denoised one
(each at its best iteration count, chosen with the truth), and what the split criterion picks
from the frame alone (input and count). The denoiser was trained on W2S 035: that image is not
held out for it (085 and the nuclei are).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import tifffile

from livescope.engines.psf import gaussian_psf
from livescope.engines.rl import forward, make_plan, rl_iterates
from livescope.engines.selftune import Candidate, candidates, to_photons, tune_deconvolution

DATA = Path(__file__).resolve().parents[1] / "../shared/data"
REPO_DATA = Path(__file__).resolve().parents[1] / "tests/data/real"


def images(calibrate: bool) -> dict[str, np.ndarray]:
    if calibrate:
        import skimage.data

        return {"skimage cell": skimage.data.cell().astype(np.float64)}
    out = {}
    for name in ("035", "085"):
        p = DATA / "w2s_pairs" / f"target_avg400_{name}_1.tif"
        if p.exists():
            out[f"W2S {name}"] = tifffile.imread(p).astype(np.float64)
    movie = tifffile.imread(REPO_DATA / "cancer_cell_migration_crop.tif").astype(np.float64)
    out["nuclei"] = movie[0]
    return out


def cases(imgs: dict[str, np.ndarray]):
    """Each image normalised to 0..1, blurred by a Gaussian PSF (sigma 1.5, 2.5 px) at a peak of
    50, 400 and 4000 photons: (name, sigma, peak, psf, truth, blurred photon rate)."""
    for name, img in imgs.items():
        img = img - np.percentile(img, 1)
        img = np.maximum(img, 0) / img.max()
        for sigma in (1.5, 2.5):
            psf = gaussian_psf(sigma)
            for peak in (50, 400, 4000):
                truth = img * peak
                blurred = np.maximum(
                    forward(truth.astype(np.float32), make_plan(psf, truth.shape, "rl", np, boundary="dct")), 0
                )
                yield name, sigma, peak, psf, truth, blurred


def psnr_fit(x: np.ndarray, truth: np.ndarray) -> float:
    a = np.vstack([x.ravel(), np.ones(x.size)]).T
    coef, *_ = np.linalg.lstsq(a, truth.ravel(), rcond=None)
    err = truth - (coef[0] * x + coef[1])
    rng = truth.max() - truth.min()
    return float(10 * np.log10(rng**2 / np.mean(err**2)))


def all_settings(counts: np.ndarray, psf: np.ndarray, cands: list[Candidate]) -> dict[Candidate, np.ndarray]:
    out: dict[Candidate, np.ndarray] = {}
    groups: dict[tuple[str, float | None], list[int]] = {}
    for c in cands:
        groups.setdefault((c.method, c.alpha), []).append(c.iterations)
    for (method, alpha), ks in groups.items():
        plan = make_plan(psf, counts.shape, method, np, boundary="dct", **({"alpha": alpha} if alpha else {}))
        for k, est in enumerate(rl_iterates(counts.astype(np.float32), plan, max(ks)), start=1):
            if k in ks:
                out[Candidate(method, k, alpha)] = np.asarray(est)
    return out


def skimage_best(counts: np.ndarray, psf: np.ndarray, truth: np.ndarray) -> tuple[float, int]:
    from skimage.restoration import richardson_lucy

    scale = counts.max()
    best = (-np.inf, 0)
    for k in (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50):
        est = richardson_lucy(counts / scale, psf, num_iter=k, clip=False)
        best = max(best, (psnr_fit(est, truth), k))
    return best


def denoise_first(rng: np.random.Generator) -> None:
    from livescope.engines import FrameInfo, StreamSpec, create_engine

    eng = create_engine("denoise", backend="onnxruntime", tile=0, gain=1.0, offset=0.0)

    def denoiser(x: np.ndarray) -> np.ndarray:
        eng.setup(StreamSpec(shape=x.shape, camera_offset=0.0, camera_gain=1.0))
        return np.asarray(eng.process(x.astype(np.float32), FrameInfo(seq=0))["denoised"], np.float32)

    cands = [c for c in candidates() if c.method == "rl"]
    ks = sorted({c.iterations for c in cands})
    print(
        "| image | PSF sigma | peak photons | raw input, best | denoised input, best | auto picks | auto "
        "| auto - best of both |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, sigma, peak, psf, truth, blurred in cases(images(False)):
        counts = to_photons(rng.poisson(blurred) + 100.0, gain=1.0, offset=100.0)
        raw = {c.iterations: psnr_fit(r, truth) for c, r in all_settings(counts, psf, cands).items()}
        den_in = np.maximum(denoiser(counts), 0)
        den = {c.iterations: psnr_fit(r, truth) for c, r in all_settings(den_in, psf, cands).items()}
        res = tune_deconvolution(
            counts, psf, rng=np.random.default_rng(7), wb_counts=(), rl_counts=ks, denoiser=denoiser
        )
        auto = (den if res.best.denoised else raw)[res.best.iterations]
        both = max(max(raw.values()), max(den.values()))
        pick = f"{'denoised' if res.best.denoised else 'raw'} {res.best.iterations}"
        print(
            f"| {name} | {sigma} | {peak} | {max(raw.values()):.2f} | {max(den.values()):.2f} | {pick} | "
            f"{auto:.2f} | {auto - both:+.2f} |",
            flush=True,
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--denoise-first", action="store_true", help="deconvolve raw or denoised: the table")
    ap.add_argument("--p", type=float, nargs="+", default=[0.8])
    ap.add_argument("--splits", type=int, default=2)
    ap.add_argument("--criterion", default="object", choices=["object", "poisson"])
    ap.add_argument("--otf-floor", type=float, nargs="+", default=[0.05])
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    if args.denoise_first:
        denoise_first(rng)
        return
    cands = candidates()
    print(
        "| image | PSF sigma | peak photons | p | raw | default (WB 2) | auto | auto picks | oracle | oracle picks "
        "| auto - oracle | skimage RL best (it.) | tune s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, sigma, peak, psf, truth, blurred in cases(images(args.calibrate)):
        adu = rng.poisson(blurred) + 100.0
        counts = to_photons(adu, gain=1.0, offset=100.0)
        restored = all_settings(counts, psf, cands)
        scores = {c: psnr_fit(r, truth) for c, r in restored.items()}
        oracle = max(scores, key=lambda c: scores[c])
        default = scores[Candidate("wb", 2, 0.01)]
        sk, sk_k = skimage_best(counts, psf, truth)
        for p, floor in [(p, f) for p in args.p for f in args.otf_floor]:
            t0 = time.perf_counter()
            res = tune_deconvolution(
                counts,
                psf,
                p=p,
                splits=args.splits,
                rng=np.random.default_rng(7),
                criterion=args.criterion,
                otf_floor=floor,
            )
            dt = time.perf_counter() - t0
            auto = scores[res.best]
            print(
                f"| {name} | {sigma} | {peak} | {p}/{floor} | {psnr_fit(counts, truth):.2f} | {default:.2f} | "
                f"{auto:.2f} | {_short(res.best)} | {scores[oracle]:.2f} | {_short(oracle)} | "
                f"{auto - scores[oracle]:+.2f} | {sk:.2f} ({sk_k}) | {dt:.1f} |",
                flush=True,
            )


def _short(c: Candidate) -> str:
    return f"{c.method} {c.iterations}" + (f" a={c.alpha:g}" if c.alpha else "")


if __name__ == "__main__":
    main()
