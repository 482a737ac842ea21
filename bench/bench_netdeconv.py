"""Learned deconvolution against WB-RL and classic RL, side by side in one run.

Known objects: the W2S 400-frame averages (../shared/data/w2s_pairs), the network fitted on
fields of view of 035_1 and judged on fields of view of 085_1. Blur: a Gaussian whose sigma grows
from 1 px at the field centre to 3 px in the corners (blended blurred copies); Poisson noise at
``--peak`` photons, read noise 2 ADU, offset 100. Prints markdown tables: quality against the
known object, frames/s on 512x512, FLOPs per frame and what they imply on an H100.

    python bench/bench_netdeconv.py [--field 256] [--fit-seconds 50] [--repeats 5] [--teacher rl3] [--quality-only]

``--teacher``: the per-region classical teacher, ``wb2`` (WB 2 iterations, the library default)
or ``rlN`` (RL stopped at N iterations; ``rl3`` measured best at 200 photons).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from livescope.engines import FrameInfo, StreamSpec, create_engine
from livescope.engines import netdeconv as N
from livescope.engines.deconvolve import deconvolve_array, wb_parameters
from livescope.engines.psf import gaussian_psf

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "w2s_pairs"
S0, S1, OFFSET = 1.0, 3.0, 100.0


def sigma_map(shape):
    h, w = shape
    y, x = np.mgrid[:h, :w]
    cy, cx = (h - 1) / 2, (w - 1) / 2
    return S0 + (S1 - S0) * ((y - cy) ** 2 + (x - cx) ** 2) / (cy**2 + cx**2)


def field_blur(obj):
    if S1 == S0:  # --fixed: one blur everywhere
        return ndimage.gaussian_filter(obj, S0, mode="reflect")
    sig = sigma_map(obj.shape)
    levels = np.linspace(S0, S1, 5)
    copies = np.stack([ndimage.gaussian_filter(obj, s, mode="reflect") for s in levels])
    pos = np.clip((sig - S0) / (levels[1] - levels[0]), 0, len(levels) - 1 - 1e-9)
    i = pos.astype(int)
    f = pos - i
    yy, xx = np.indices(obj.shape)
    return (1 - f) * copies[i, yy, xx] + f * copies[i + 1, yy, xx]


def psf_grid(shape, n=3):
    if S1 == S0:  # --fixed: the one PSF (the "per-region" rows are then single-PSF)
        return gaussian_psf(S0)
    sig = sigma_map(shape)
    cy = ((np.arange(n) + 0.5) * shape[0] / n - 0.5).round().astype(int)
    cx = ((np.arange(n) + 0.5) * shape[1] / n - 0.5).round().astype(int)
    ks = [[gaussian_psf(sig[a, b]) for b in cx] for a in cy]
    size = max(k.shape[0] for row in ks for k in row)
    return np.array([[np.pad(k, (size - k.shape[0]) // 2) for k in row] for row in ks])


def load(name, peak):
    import tifffile

    return tifffile.imread(DATA / f"target_avg400_{name}.tif").astype(np.float64) / 255 * peak + 2


def acquire(obj, rng, field, fovs, frames_per_fov):
    """(fovs, t, field, field) raw frames (a still scene per field of view) and the objects."""
    stacks, objs = [], []
    for _ in range(fovs):
        y0, x0 = rng.integers(0, obj.shape[0] - field + 1, 2)
        o = obj[y0 : y0 + field, x0 : x0 + field]
        b = np.maximum(field_blur(o), 0)
        stacks.append(
            np.stack([rng.poisson(b) + rng.normal(0, 2.0, b.shape) + OFFSET for _ in range(frames_per_fov)]).astype(
                np.float32
            )
        )
        objs.append(o)
    return stacks, objs


def psnr(est, ref):
    mse = np.mean((np.asarray(est, float) - ref) ** 2)
    return float(10 * np.log10(ref.max() ** 2 / mse)) if mse > 0 else float("inf")


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--field", type=int, default=256)
    ap.add_argument("--peak", type=float, default=200.0)
    ap.add_argument("--fit-seconds", type=float, default=50.0, help="per network (two are fitted)")
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="rl3", help="wbN or rlN: the per-region teacher and its iterations")
    ap.add_argument("--quality-only", action="store_true", help="skip the speed and FLOP tables")
    ap.add_argument(
        "--fixed",
        type=float,
        default=None,
        metavar="SIGMA",
        help="one blur of SIGMA px everywhere instead of 1 -> 3 px (the fixed-blur half)",
    )
    args = ap.parse_args(argv)
    global S0, S1
    if args.fixed is not None:
        S0 = S1 = float(args.fixed)
    if not DATA.is_dir():
        sys.exit(f"{DATA} missing: the shared real data set is needed")
    rng = np.random.default_rng(0)
    F = args.field
    train, _ = acquire(load("035_1", args.peak), rng, F, 6, 4)
    test, test_obj = acquire(load("085_1", args.peak), rng, F, 4, 4)
    grid = psf_grid((F, F))
    field = N.PSFField.of(grid)
    wb = N._teacher_params(None)
    teacher = N._teacher_params({"method": args.teacher[:2], "iterations": int(args.teacher[2:])})
    teacher_name = f"{args.teacher[:2].upper()} {teacher['iterations']} it."
    kw = dict(
        psf=grid,
        teacher_params=teacher,
        offset=OFFSET,
        base=args.base,
        depth=args.depth,
        patch=32,
        batch=8,
        lr=3e-3,
        steps=100000,
        time_budget_s=args.fit_seconds,
        threads=args.threads,
    )
    fits = {}
    for task in ("deconvolve", "restore"):
        t = time.perf_counter()
        res = N.fit_deconvolution(train, task=task, restore_window=4, **kw)
        fits[task] = (res, time.perf_counter() - t)
        print(f"fitted {task}: {len(res.losses)} steps, {fits[task][1]:.0f} s (teacher included)", flush=True)

    nets = {
        t: N.NetDeconvolver(r.model, backend="onnxruntime", tile=0, threads=args.threads) for t, (r, _) in fits.items()
    }
    single = {s: N.PSFField.of(gaussian_psf(s)) for s in (1.0, 1.5, 2.0, 2.5, 3.0)}
    den = create_engine("denoise", backend="onnxruntime")
    den.setup(StreamSpec(shape=(F, F), camera_offset=OFFSET))

    def denoise(d: np.ndarray) -> np.ndarray:
        """livescope's denoise engine on the camera frame, its output back to photons."""
        out = den.process((d + OFFSET).astype(np.float32), FrameInfo(seq=0))["denoised"]
        return np.maximum(out - OFFSET, 0)

    rl = {"method": "rl", "iterations": 10}
    methods = {
        "raw (offset removed)": lambda d: d,
        "WB 2 it., centre PSF (sigma 1)": lambda d: N.teacher_deconvolve(d, single[1.0], wb),
        **{
            f"WB 2 it., single PSF sigma {s}": lambda d, f=f: N.teacher_deconvolve(d, f, wb)
            for s, f in single.items()
            if s != 1.0
        },
        **{
            f"WB 1 it., single PSF sigma {s}": lambda d, f=f: N.teacher_deconvolve(d, f, _p({"iterations": 1}))
            for s, f in single.items()
            if s >= 2.0
        },
        **{
            f"RL 3 it., single PSF sigma {s}": lambda d, f=f: N.teacher_deconvolve(
                d, f, _p({"method": "rl", "iterations": 3})
            )
            for s, f in single.items()
            if s >= 2.0
        },
        "RL 10 it., single PSF sigma 2.0": lambda d: N.teacher_deconvolve(d, single[2.0], _p(rl)),
        "WB 2 it., per-region 3x3": lambda d: N.teacher_deconvolve(d, field, wb),
        "RL 10 it., per-region 3x3": lambda d: N.teacher_deconvolve(d, field, _p(rl)),
        f"{teacher_name}, per-region 3x3 (the teacher)": lambda d: N.teacher_deconvolve(d, field, teacher),
        "Gaussian sigma 1 then per-region WB 2 it.": lambda d: N.teacher_deconvolve(
            ndimage.gaussian_filter(d, 1.0), field, wb
        ),
        **{
            f"denoise engine (shipped model), then WB {it} it. single PSF sigma {s}": lambda d, f=single[s], it=it: (
                N.teacher_deconvolve(denoise(d), f, _p({"iterations": it}))
            )
            for s in (2.0, 2.5)
            for it in (1, 2)
        },
        "denoise engine (shipped model) alone": lambda d: denoise(d),
        "net, task deconvolve (onnxruntime)": lambda d: nets["deconvolve"].restore(d, check=False)[0],
        "net, task restore (onnxruntime)": lambda d: nets["restore"].restore(d, check=False)[0],
    }
    frames = [(np.maximum(f - OFFSET, 0), o) for s, o in zip(test, test_obj, strict=True) for f in s]
    blur_name = f"fixed blur (sigma {S0} px)" if S0 == S1 else f"field-varying blur (sigma {S0} -> {S1} px)"
    print(f"\n### Quality: {blur_name}, {F}x{F}, peak {args.peak:g} photons, {len(frames)} held-back frames of 085_1\n")
    print("| method | PSNR vs object (dB) | PSNR vs teacher (dB) | s/frame |")
    print("|---|---|---|---|")
    for name, fn in methods.items():
        p_obj, p_teach = [], []
        for d, o in frames:
            est = fn(d)
            p_obj.append(psnr(est, o))
            p_teach.append(psnr(est, N.teacher_deconvolve(d, field, teacher)))
        sec = timed(lambda fn=fn: fn(frames[0][0]), args.repeats)
        print(f"| {name} | {np.mean(p_obj):.2f} | {np.mean(p_teach):.2f} | {sec:.4f} |", flush=True)

    # consistency: false alarms on held-back frames of the same kind, alarms on beads
    thr = fits["deconvolve"][0].model.metadata["consistency"]["threshold"]
    scores = [nets["deconvolve"].restore(d)[1] for d, _ in frames]
    beads = np.full((F, F), 2.0)
    pts = rng.integers(5, F - 5, (4 * F // 16, 2))
    beads[pts[:, 0], pts[:, 1]] = 3000.0
    odd = [np.maximum(rng.poisson(field_blur(beads)) + rng.normal(0, 2.0, beads.shape), 0) for _ in range(4)]
    odd_scores = [nets["deconvolve"].restore(d)[1] for d in odd]
    print(
        f"\nconsistency threshold {thr:.2f}: held-back cell frames {np.round(scores, 2).tolist()} "
        f"({sum(s > thr for s in scores)}/{len(scores)} false alarms); bead frames "
        f"{np.round(odd_scores, 1).tolist()} ({sum(s > thr for s in odd_scores)}/{len(odd)} flagged)"
    )

    if args.quality_only:
        return
    # speed on 512x512
    import torch

    from livescope.engines import modelfile
    from livescope.engines.unet import UNet, flops_and_traffic

    torch.set_num_threads(args.threads)
    frame = np.maximum(ndimage.zoom(test[0][0], 512 / F, order=1) - OFFSET, 0).astype(np.float32)
    psf_c = gaussian_psf(2.0)
    plans: dict = {}
    wbp = wb_parameters(psf_c)
    print("\n### 512x512 frame, this CPU\n")
    print("| method | ms/frame (median) | frames/s |")
    print("|---|---|---|")
    rows = {}
    for it in (1, 2):
        rows[f"WB {it} it., one PSF (OTF cached)"] = lambda it=it: deconvolve_array(
            frame, psf_c, iterations=it, wb=wbp, plans=plans
        )
    rows["RL 20 it., one PSF (OTF cached)"] = lambda: deconvolve_array(
        frame, psf_c, iterations=20, method="rl", wb=wbp, plans=plans
    )
    grid512 = N.PSFField.of(psf_grid((512, 512)))
    rows["WB 2 it., per-region 3x3"] = lambda: N.teacher_deconvolve(frame, grid512, wb)
    nets512 = {f"net base {args.base} depth {args.depth} (the fitted one), onnxruntime": fits["deconvolve"][0].model}
    big = UNet(3, 16, 3, 64).eval()
    nets512["net base 16 depth 3 (the denoiser's size), onnxruntime"] = modelfile.ModelFile.from_net(
        big, {"task": "deconvolve", "psf": field.as_metadata(), "field_shape": [512, 512], "residual": True}
    )
    for name, model in nets512.items():
        if "coordinates" not in model.metadata["inputs"]:
            model.metadata["inputs"]["coordinates"] = 2
        r = N.NetDeconvolver(model, backend="onnxruntime", tile=0, threads=args.threads, shape=(512, 512))
        r.field_shape = (512, 512)
        rows[name] = lambda r=r: r.restore(frame, check=False)
        rows[name.replace("onnxruntime", "onnxruntime + consistency check")] = lambda r=r: r.restore(frame)
    for name, fn in rows.items():
        sec = timed(fn, args.repeats)
        print(f"| {name} | {1000 * sec:.1f} | {1 / sec:.1f} |", flush=True)

    print("\n### FLOPs and memory traffic per 512x512 frame (multiply and add counted apart)\n")
    print(
        "| network | GFLOP | MB moved (fp32, lower bound) | parameters | H100 compute bound (ms, 990 TFLOPS fp16) "
        "| H100 memory bound (ms, fp16 at 3.35 TB/s) |"
    )
    print("|---|---|---|---|---|---|")
    for name, model in nets512.items():
        ft = flops_and_traffic(model.build_torch(), 512, 512)
        print(
            f"| {name.split(',')[0]} | {ft['flops'] / 1e9:.2f} | {ft['bytes'] / 1e6:.0f} | {ft['params']:.0f} | "
            f"{ft['flops'] / 990e12 * 1e3:.4f} | {ft['bytes'] / 2 / 3.35e12 * 1e3:.3f} |"
        )
    wb_flops = 2 * 2 * 5 * 600 * 600 * np.log2(600 * 600) / 2  # 2 it. x 2 FFT pairs, rfft ~ half
    print(f"| WB 2 it. (FFTs only, 600x600 padded) | {wb_flops / 1e9:.2f} | | | | |")


def _p(d):
    return N._teacher_params(d)


if __name__ == "__main__":
    main()
