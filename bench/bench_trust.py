"""Trust scores: false-alarm rates, thresholds, ROC AUC against a naive baseline, cost per frame.

    python bench/bench_trust.py              # everything (about 5 minutes on 2 cores)
    python bench/bench_trust.py --quick      # fewer frames, a smoke run

Frames are 128x128 and labelled:

Checks: the residual (denoising) and re-blur (deconvolution) checks, TTA, the feature distance
(networks: tile features in the model's variance-stabilised units against the statistics its
model file holds), the photon-split check (the frame's photons split into two half-dose frames,
each restored, their disagreement against the noise model: map score and the 99.9 % tail of the
standardised difference; shown beside the others, ``split_every`` in the engine) and the naive
baseline (the whole frame's residual variance).

- in distribution (null) for the shipped denoise model (supervised, trained on crappified sim
  microscope frames and the cell-migration movie; neither W2S image): ``w2s-resim``, crops of the
  two W2S 400-frame averages (random flips / rotations) rendered with fresh Poisson-Gaussian
  noise at the W2S inputs' photon level through a known camera (gain 2 ADU/e-, offset 100, read
  noise 1 e-); ``w2s-real``, crops of the real noisy W2S inputs (noise model calibrated from each
  whole input frame); ``sim``, held-out frames of the sim microscope (seeds the training never
  drew: its kind of structure, its camera);
- in distribution for deconvolution: ``sim`` frames (the sim microscope, nuclei, PSF sigma
  1.6) and w2s-resim frames blurred by a Gaussian PSF, each deconvolved with the true PSF;
- out-of-distribution frames for the denoiser (each outside what the model was trained on or
  what the camera's noise model says): ``filaments`` and a ``test-pattern`` (Siemens star on a
  checkerboard, blurred 1.2 px as the training's frames were: structure classes absent from
  training), a ``sharp test pattern`` (blurred 0.3 px: pixel-sharp edges, finer than any
  training frame's 0.8-2.4 px blur), ``wrong-offset`` (the camera's offset
  moved 10-40 ADU from its calibration), ``saturated`` (a brighter W2S render clipped at a
  ceiling on 5-20 % of the pixels), ``bright`` (20-60x the W2S photon level: 5-1000x above the
  training's 4-400 photon peaks), ``correlated noise`` (the camera noise smoothed by a 0.8 px
  Gaussian at its variance, as interpolated or on-camera-filtered frames have), ``EMCCD`` (an
  undeclared multiplication register: noise variance 2x the declared camera's); for
  deconvolution a PSF too wide (x1.3-2) or too narrow (x0.5-0.75) and a wrong offset.

Thresholds: the 1 % quantile of the scores of the first half of the null frames; the false-alarm
rate is then measured on the other half (and on the real crops). The engine's
``THRESHOLDS`` constants were set from this output.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from livescope.bridges.sim import SimConfig, SimSample
from livescope.engines import FrameInfo, StreamSpec, create_engine
from livescope.engines import trust as T
from livescope.engines.calibrate import NoiseModel, calibrate_stack

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAPE = (128, 128)
GAIN, OFFSET, READ_E = 2.0, 100.0, 1.0  # the rendering camera: ADU/e-, ADU, e- rms
CAMERA = NoiseModel.from_camera(GAIN, OFFSET, READ_E * GAIN)


def camera(photons: np.ndarray, rng: np.random.Generator, offset: float = OFFSET) -> np.ndarray:
    e = rng.poisson(np.maximum(photons, 0)).astype(np.float32) + rng.normal(0, READ_E, photons.shape)
    return np.clip(np.rint(GAIN * e + offset), 0, 65535).astype(np.uint16)


class W2S:
    """Clean W2S scenes in photons at the noisy inputs' level."""

    def __init__(self) -> None:
        import tifffile

        self.scenes = []
        for pair in ("035_1", "085_1"):
            noisy = tifffile.imread(DATA / "w2s_pairs" / f"input_avg1_{pair}.tif").astype(np.float64)
            clean = tifffile.imread(DATA / "w2s_pairs" / f"target_avg400_{pair}.tif").astype(np.float64)
            a, b = np.polyfit(clean.ravel(), noisy.ravel(), 1)  # target -> input's scale
            m = calibrate_stack(noisy)
            dark = -m.intercept / m.slope  # where the line meets zero variance: the input's offset
            self.scenes.append(np.maximum(a * clean + b - dark, 0) / m.slope)
        self.inputs = [tifffile.imread(DATA / "w2s_pairs" / f"input_avg1_{p}.tif") for p in ("035_1", "085_1")]

    def crop(self, rng: np.random.Generator) -> np.ndarray:
        s = self.scenes[rng.integers(len(self.scenes))]
        y, x = rng.integers(0, s.shape[0] - SHAPE[0]), rng.integers(0, s.shape[1] - SHAPE[1])
        c = np.rot90(s[y : y + SHAPE[0], x : x + SHAPE[1]], rng.integers(4))
        return np.ascontiguousarray(c[:, ::-1] if rng.random() < 0.5 else c).astype(np.float32)


def filaments(rng: np.random.Generator, peak: float = 15.0) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float32)
    img = np.zeros(SHAPE, np.float32)
    for _ in range(rng.integers(8, 20)):
        y0, x0 = rng.uniform(0, SHAPE[0], 2)
        th, k = rng.uniform(0, np.pi), rng.uniform(-0.02, 0.02)
        u = (yy - y0) * np.sin(th) + (xx - x0) * np.cos(th)
        d = np.abs((yy - y0) * np.cos(th) - (xx - x0) * np.sin(th) + k * u**2)
        img += peak * rng.uniform(0.5, 1.5) * np.exp(-(d**2) / (2 * 0.7**2))
    return ndimage.gaussian_filter(img, 1.6) + rng.uniform(0.5, 3)


def test_pattern(rng: np.random.Generator, peak: float = 15.0, blur: float = 1.2) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]].astype(np.float32)
    cy, cx = rng.uniform(40, 88, 2)
    star = (np.sin(np.arctan2(yy - cy, xx - cx) * rng.integers(12, 36)) > 0).astype(np.float32)
    sq = int(rng.integers(8, 24))
    checker = np.where((yy // sq + xx // sq) % 2 == 0, 1.0, 0.4)
    return ndimage.gaussian_filter(peak * star * checker, blur) + 1.0


def saturated(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A brighter render clipped at a ceiling on 5-20 % of its pixels (a saturating camera)."""
    raw = camera(scene * rng.uniform(3, 8), rng)
    ceiling = np.quantile(raw, rng.uniform(0.8, 0.95))
    return np.minimum(raw, ceiling).astype(np.uint16)


def correlated_noise(scene: np.ndarray, rng: np.random.Generator, sigma: float = 0.8) -> np.ndarray:
    """The camera's noise smoothed by a Gaussian and scaled back to its variance: white per
    pixel no more (interpolated, resampled or on-camera-filtered frames)."""
    expected = GAIN * scene + OFFSET
    noise = camera(scene, rng).astype(np.float32) - expected
    smooth = ndimage.gaussian_filter(noise, sigma)
    smooth *= noise.std() / max(float(smooth.std()), 1e-6)
    return np.clip(np.rint(expected + smooth), 0, 65535).astype(np.uint16)


def emccd(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An EMCCD's multiplication register (gamma-distributed gain: excess noise F^2 = 2) that the
    declared camera model does not know about."""
    e = rng.poisson(np.maximum(scene, 0)).astype(np.float64)
    e = np.where(e > 0, rng.gamma(np.maximum(e, 1e-9), 1.0), 0.0) + rng.normal(0, READ_E, scene.shape)
    return np.clip(np.rint(GAIN * e + OFFSET), 0, 65535).astype(np.uint16)


def sim_frames(n: int, seed: int = 0) -> list[tuple[np.ndarray, NoiseModel]]:
    out = []
    per = 25
    for k in range((n + per - 1) // per):
        cfg = SimConfig(shape=SHAPE, seed=seed + k)
        s = SimSample(cfg)
        m = NoiseModel.from_camera(1 / cfg.gain, cfg.offset, cfg.read_noise / cfg.gain)
        out += [(s.render(t), m) for t in range(0, per * 3, 3)]
    return out[:n]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(an artefact frame scores lower than a good one): ROC AUC, ties counted half."""
    pos, neg = np.asarray(pos), np.asarray(neg)
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([-pos, -neg]))
    return float((r[: pos.size].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))


# --------------------------------------------------------------------------- runs


THREADS: int | None = None  # onnxruntime intra-op threads (--threads)


def run_denoise(frames, tta: bool, timings: dict) -> dict[str, np.ndarray]:
    eng = create_engine("denoise", backend="onnxruntime", tile=0, threads=THREADS)
    eng.setup(StreamSpec(shape=SHAPE))
    halves = create_engine("denoise", backend="onnxruntime", tile=0, threads=THREADS)  # the split check's own
    halves.setup(StreamSpec(shape=SHAPE))
    res: dict[str, list[float]] = {"score": [], "base": [], "tta": [], "features": [], "split": [], "split_tail": []}
    stats_f = eng._loaded.model.metadata["training_features"]
    for i, (raw, model) in enumerate(frames):
        eng._norm = None  # each crop is a stream of its own: normalisation fixed on its first frame
        t0 = time.perf_counter()
        den = eng.process(raw, FrameInfo(seq=i))["denoised"]
        t1 = time.perf_counter()
        _, score, stats = T.score_denoised(raw, den, model)
        t2 = time.perf_counter()
        timings.setdefault("denoise inference", []).append(t1 - t0)
        timings.setdefault("residual check", []).append(t2 - t1)
        res["score"].append(score)
        res["base"].append(-abs(np.log(stats["var"])))
        norm = eng._norm
        t4 = time.perf_counter()
        y = norm.forward(raw) * np.float32(norm.high - norm.low) + np.float32(norm.low)
        _, fscore, _ = T.feature_trust(y, stats_f, low=norm.low, noise=1.0 if norm.gain > 0 else None)
        timings.setdefault("feature check", []).append(time.perf_counter() - t4)
        res["features"].append(fscore)
        if tta:
            predict = _predictor(eng)
            t3 = time.perf_counter()
            preds = [den] + T.tta_predictions(predict, raw.astype(np.float32))
            tmap, _ = T.tta_trust(preds, model)
            res["tta"].append(T.frame_score(tmap))
            timings.setdefault("tta check (3 inferences)", []).append(time.perf_counter() - t3)
        halves._norm = None  # the halves are a half-dose stream of their own
        t5 = time.perf_counter()
        a, b = T.split_halves(raw, model, np.random.default_rng(i))
        ra = halves.process(a, FrameInfo(seq=i))["denoised"]
        rb = halves.process(b, FrameInfo(seq=i))["denoised"]
        smap, sstats = T.split_trust(ra, rb, model)
        timings.setdefault("split check (2 inferences)", []).append(time.perf_counter() - t5)
        res["split"].append(T.frame_score(smap))
        res["split_tail"].append(-sstats["split_tail"])
    return {k: np.asarray(v) for k, v in res.items()}


def _predictor(eng):
    from livescope.engines.inference import run_tiled

    loaded, norm = eng._loaded, eng._norm

    def predict(x):
        y = run_tiled(
            loaded.runner.run, norm.forward(np.ascontiguousarray(x))[None], multiple=loaded.model.multiple, tile=0
        )
        return norm.inverse(y)

    return predict


def run_deconvolve(frames, timings: dict) -> dict[str, np.ndarray]:
    res: dict[str, list[float]] = {"score": [], "base": [], "split": [], "split_tail": []}
    engines: dict[float, object] = {}
    for i, (raw, model, sigma, offset) in enumerate(frames):
        key = (round(sigma, 3), offset)
        if key not in engines:
            e = create_engine("deconvolve", psf_sigma=sigma, offset=offset)
            e.setup(StreamSpec(shape=SHAPE))
            engines[key] = e
        e = engines[key]
        t0 = time.perf_counter()
        dec = e.process(raw, FrameInfo(seq=i))["deconvolved"]
        t1 = time.perf_counter()
        _, score, stats = T.score_deconvolved(raw, dec, e._kernel, model, offset=offset)
        t2 = time.perf_counter()
        timings.setdefault("deconvolve (WB, 2 iterations)", []).append(t1 - t0)
        timings.setdefault("re-blur check", []).append(t2 - t1)
        res["score"].append(score)
        res["base"].append(-abs(np.log(stats["var"])))
        t3 = time.perf_counter()
        a, b = T.split_halves(raw, model, np.random.default_rng(i))
        ra, rb = (e.process(h, FrameInfo(seq=i))["deconvolved"] + offset for h in (a, b))  # offset back: ADU
        smap, sstats = T.split_trust(ra, rb, model, psf=e._kernel)
        timings.setdefault("split check (2 deconvolutions)", []).append(time.perf_counter() - t3)
        res["split"].append(T.frame_score(smap))
        res["split_tail"].append(-sstats["split_tail"])
    return {k: np.asarray(v) for k, v in res.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--null", type=int, default=2000, help="in-distribution frames per check (half derive, half test)")
    ap.add_argument("--artefacts", type=int, default=100, help="frames per artefact kind")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: its own choice)")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    if args.quick:
        args.null, args.artefacts = 200, 20
    if not DATA.exists():
        sys.exit(f"real data not found at {DATA}")
    rng = np.random.default_rng(0)
    w2s = W2S()
    timings: dict[str, list[float]] = {}
    t_start = time.perf_counter()

    # ---------------- denoising (shipped model) ----------------
    # real W2S inputs: crops on a 64-px grid in 8 orientations (one noise realisation each, so
    # not independent frames), noise model calibrated from each whole input frame
    real = []
    for img in w2s.inputs:
        m = calibrate_stack(img)
        for y in range(0, 512 - 127, 64):
            for x in range(0, 512 - 127, 64):
                c = img[y : y + 128, x : x + 128]
                for k in range(8):
                    o = np.rot90(c, k % 4)
                    real.append((np.ascontiguousarray(o[:, ::-1] if k >= 4 else o), m))
    if args.quick:
        real = real[::8]
    # held-out sim microscope frames: the kind of structure and camera the model was trained on
    sim_null = sim_frames(args.null // 4, seed=100)
    null = [
        (camera(w2s.crop(rng), rng), CAMERA) for _ in range(max(args.null - len(real) - len(sim_null), args.null // 4))
    ]
    na = args.artefacts
    off = [(camera(w2s.crop(rng), rng, OFFSET + rng.choice([-1, 1]) * rng.uniform(10, 40)), CAMERA) for _ in range(na)]
    artefacts = {
        "filaments": [(camera(filaments(rng), rng), CAMERA) for _ in range(na)],
        "test pattern (blur 1.2 px)": [(camera(test_pattern(rng), rng), CAMERA) for _ in range(na)],
        # pixel-sharp edges: the training's frames were all blurred by 0.8-2.4 px
        "sharp test pattern (blur 0.3 px)": [(camera(test_pattern(rng, blur=0.3), rng), CAMERA) for _ in range(na)],
        "wrong offset (10-40 ADU)": off,
        "saturated (5-20 % clipped)": [(saturated(w2s.crop(rng), rng), CAMERA) for _ in range(na)],
        "bright (20-60x W2S photons)": [(camera(w2s.crop(rng) * rng.uniform(20, 60), rng), CAMERA) for _ in range(na)],
        "correlated noise (0.8 px)": [(correlated_noise(w2s.crop(rng), rng), CAMERA) for _ in range(na)],
        "EMCCD, undeclared (F^2 = 2)": [(emccd(w2s.crop(rng), rng), CAMERA) for _ in range(na)],
    }
    r_sim = run_denoise(null, True, timings)
    r_real = run_denoise(real, True, timings)
    r_simn = run_denoise(sim_null, True, timings)
    r_null = {k: np.concatenate([r_sim[k], r_real[k], r_simn[k]]) for k in r_sim}
    source = np.array(["w2s-resim"] * len(null) + ["w2s-real"] * len(real) + ["sim"] * len(sim_null))
    r_art = {k: run_denoise(v, True, timings) for k, v in artefacts.items()}

    # ---------------- deconvolution (WB, 2 iterations) ----------------
    def dec_null(n):
        out = []
        sims = sim_frames(n // 2, seed=500)
        out += [(f, m, 1.6, 100.0) for f, m in sims]
        for _ in range(n - len(out)):
            sig = float(rng.uniform(1.2, 2.0))
            out.append((camera(ndimage.gaussian_filter(w2s.crop(rng), sig), rng), CAMERA, sig, OFFSET))
        return out

    dnull = dec_null(args.null)
    dsource = np.array(["sim"] * (args.null // 2) + ["w2s-resim blurred"] * (args.null - args.null // 2))
    dart = {}
    base = dec_null(3 * na)
    dart["PSF too wide (x1.3-2)"] = [(f, m, s * float(rng.uniform(1.3, 2.0)), o) for f, m, s, o in base[:na]]
    dart["PSF too narrow (x0.5-0.75)"] = [
        (f, m, s * float(rng.uniform(0.5, 0.75)), o) for f, m, s, o in base[na : 2 * na]
    ]
    dart["wrong offset (+-10-40 ADU)"] = [
        (f, m, s, o + float(rng.choice([-1, 1]) * rng.uniform(10, 40))) for f, m, s, o in base[2 * na :]
    ]
    d_null = run_deconvolve(dnull, timings)
    d_art = {k: run_deconvolve(v, timings) for k, v in dart.items()}

    # ---------------- thresholds, false alarms, ROC ----------------
    split = np.random.default_rng(1)

    def threshold(scores, src):
        """1 % quantile of a random half; false alarms on the other half, per source."""
        idx = split.permutation(scores.size)
        derive, held = idx[: scores.size // 2], idx[scores.size // 2 :]
        th = float(np.floor(np.quantile(scores[derive], 0.01) * 100) / 100)
        far = {
            s_: (float(np.mean(scores[held][src[held] == s_] < th)), int(np.sum(src[held] == s_)))
            for s_ in np.unique(src)
        }
        return th, far

    th_d, far_d = threshold(r_null["score"], source)
    th_t, far_t = threshold(r_null["tta"], source)
    th_f, far_f = threshold(r_null["features"], source)
    th_c, far_c = threshold(d_null["score"], dsource)
    th_s, far_s = threshold(r_null["split"], source)
    th_st, far_st = threshold(r_null["split_tail"], source)
    th_cs, far_cs = threshold(d_null["split"], dsource)
    th_cst, far_cst = threshold(d_null["split_tail"], dsource)
    print(
        f"# Trust scores ({platform.machine()}, {SHAPE[0]}x{SHAPE[1]} frames, {time.perf_counter() - t_start:.0f} s)\n"
    )
    print("## Thresholds (1 % quantile of a random half of the null frames) and false alarms on the other half\n")
    print("| check | null frames | threshold | false alarms (held-out half, per source) |")
    print("|---|---|---|---|")
    for name, r, th, far in (
        ("denoise residual", r_null["score"], th_d, far_d),
        ("tta", r_null["tta"], th_t, far_t),
        ("features", r_null["features"], th_f, far_f),
        ("deconvolve re-blur", d_null["score"], th_c, far_c),
        ("denoise split", r_null["split"], th_s, far_s),
        ("denoise split tail (-q99.9)", r_null["split_tail"], th_st, far_st),
        ("deconvolve split", d_null["split"], th_cs, far_cs),
        ("deconvolve split tail (-q99.9)", d_null["split_tail"], th_cst, far_cst),
    ):
        rates = "; ".join(f"{k}: {v:.1%} of {n}" for k, (v, n) in far.items())
        print(f"| {name} | {r.size} | {th:.2f} | {rates} |")
    for name, r in (
        ("denoise residual", r_null["score"]),
        ("tta", r_null["tta"]),
        ("features", r_null["features"]),
        ("deconvolve re-blur", d_null["score"]),
        ("denoise split", r_null["split"]),
        ("denoise split tail", r_null["split_tail"]),
        ("deconvolve split", d_null["split"]),
        ("deconvolve split tail", d_null["split_tail"]),
    ):
        q = np.quantile(r, [0.001, 0.01, 0.05, 0.5])
        print(f"\n{name}: null quantiles 0.1/1/5/50 %: " + ", ".join(f"{v:.3f}" for v in q), end="")
    print()
    print(f"\nengine defaults now: {T.THRESHOLDS}\n")

    print("## Separating artefact frames from good ones (ROC AUC; detected = below the threshold)\n")
    print(
        "| product | artefact | frames | residual/re-blur AUC | tta AUC | features AUC | baseline AUC (residual "
        "variance alone) | detected (residual) | detected (tta) | detected (features) | detected (any) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k, r in r_art.items():
        either = np.mean((r["score"] < th_d) | (r["tta"] < th_t) | (r["features"] < th_f))
        print(
            f"| denoised | {k} | {r['score'].size} | {auc(r['score'], r_null['score']):.3f} | "
            f"{auc(r['tta'], r_null['tta']):.3f} | {auc(r['features'], r_null['features']):.3f} | "
            f"{auc(r['base'], r_null['base']):.3f} | "
            f"{np.mean(r['score'] < th_d):.0%} | {np.mean(r['tta'] < th_t):.0%} | "
            f"{np.mean(r['features'] < th_f):.0%} | {either:.0%} |"
        )
    for k, r in d_art.items():
        print(
            f"| deconvolved | {k} | {r['score'].size} | {auc(r['score'], d_null['score']):.3f} | | | "
            f"{auc(r['base'], d_null['base']):.3f} | {np.mean(r['score'] < th_c):.0%} | | | |"
        )

    print("\n## The photon-split check against the existing checks (detected = below the threshold)\n")

    def any_of(r, checks):
        return np.logical_or.reduce([r[k] < th for k, th in checks])

    old = [("score", th_d), ("tta", th_t), ("features", th_f)]
    new = [*old, ("split", th_s)]
    tail = [*old, ("split_tail", th_st)]
    print(
        f"false alarms on all {r_null['score'].size} null frames: any existing check "
        f"{np.mean(any_of(r_null, old)):.1%}, any + split {np.mean(any_of(r_null, new)):.1%}, "
        f"any + split tail {np.mean(any_of(r_null, tail)):.1%}; split alone {np.mean(r_null['split'] < th_s):.1%}"
    )
    print(
        f"deconvolution, all {d_null['score'].size} null frames: re-blur {np.mean(d_null['score'] < th_c):.1%}, "
        f"re-blur or split {np.mean((d_null['score'] < th_c) | (d_null['split'] < th_cs)):.1%}\n"
    )

    # the same false-alarm rate: every check of a set at one common null quantile q, q chosen so that
    # "any check fires" on as many null frames as the existing three at their thresholds do
    def matched(null_r, checks, target):
        lo, hi = 0.0, 0.05
        for _ in range(40):
            q = (lo + hi) / 2
            ths = [(c, float(np.quantile(null_r[c], q))) for c in checks]
            lo, hi = (q, hi) if np.mean(any_of(null_r, ths)) <= target else (lo, q)
        return [(c, float(np.quantile(null_r[c], lo))) for c in checks]

    target = float(np.mean(any_of(r_null, old)))
    m_split = matched(r_null, ["score", "tta", "features", "split"], target)
    m_tail = matched(r_null, ["score", "tta", "features", "split_tail"], target)
    d_target = float(np.mean(d_null["score"] < th_c))
    dm_split = matched(d_null, ["score", "split"], d_target)
    dm_tail = matched(d_null, ["score", "split_tail"], d_target)
    print(
        f"matched to the existing checks' {target:.1%} (deconvolution {d_target:.1%}): with split, thresholds "
        + ", ".join(f"{c} {t:.3f}" for c, t in m_split)
        + f" ({np.mean(any_of(r_null, m_split)):.1%}); with split tail "
        + ", ".join(f"{c} {t:.3f}" for c, t in m_tail)
        + f" ({np.mean(any_of(r_null, m_tail)):.1%})\n"
    )
    print(
        "| product | artefact | detected (existing) | detected at the same false-alarm rate: existing + split | "
        "existing + split tail |"
    )
    print("|---|---|---|---|---|")
    for k, r in r_art.items():
        print(
            f"| denoised | {k} | {np.mean(any_of(r, old)):.0%} | {np.mean(any_of(r, m_split)):.0%} | "
            f"{np.mean(any_of(r, m_tail)):.0%} |"
        )
    for k, r in d_art.items():
        print(
            f"| deconvolved | {k} | {np.mean(r['score'] < th_c):.0%} | {np.mean(any_of(r, dm_split)):.0%} | "
            f"{np.mean(any_of(r, dm_tail)):.0%} |"
        )
    print()
    print(
        "| product | artefact | split AUC | split tail AUC | detected (split) | detected (split tail) | "
        "detected (any existing) | detected (any + split) | detected (any + split tail) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for k, r in r_art.items():
        print(
            f"| denoised | {k} | {auc(r['split'], r_null['split']):.3f} | "
            f"{auc(r['split_tail'], r_null['split_tail']):.3f} | {np.mean(r['split'] < th_s):.0%} | "
            f"{np.mean(r['split_tail'] < th_st):.0%} | {np.mean(any_of(r, old)):.0%} | "
            f"{np.mean(any_of(r, new)):.0%} | {np.mean(any_of(r, tail)):.0%} |"
        )
    for k, r in d_art.items():
        print(
            f"| deconvolved | {k} | {auc(r['split'], d_null['split']):.3f} | "
            f"{auc(r['split_tail'], d_null['split_tail']):.3f} | {np.mean(r['split'] < th_cs):.0%} | "
            f"{np.mean(r['split_tail'] < th_cst):.0%} | {np.mean(r['score'] < th_c):.0%} | "
            f"{np.mean((r['score'] < th_c) | (r['split'] < th_cs)):.0%} | "
            f"{np.mean((r['score'] < th_c) | (r['split_tail'] < th_cst)):.0%} |"
        )

    print("\n## Cost per 128x128 frame (median ms)\n")
    print("| step | ms |\n|---|---|")
    for k, v in timings.items():
        print(f"| {k} | {1000 * np.median(v):.2f} |")
    # the checks alone at 512x512
    big = camera(np.tile(w2s.crop(rng), (4, 4)), rng)
    den = ndimage.gaussian_filter(big.astype(np.float32), 1.5)
    psf = np.outer(*(2 * [np.exp(-(np.arange(-6, 7) ** 2) / (2 * 1.6**2))]))
    stab = CAMERA.stabilise(big.astype(np.float32))
    from livescope.engines import modelfile

    tstats = modelfile.load().training_features
    for name, fn in (
        ("residual check, 512x512", lambda: T.score_denoised(big, den, CAMERA)),
        ("feature check, 512x512", lambda: T.feature_trust(stab, tstats, low=float(stab.min()))),
        ("re-blur check, 512x512", lambda: T.score_deconvolved(big, den, psf, CAMERA, offset=OFFSET)),
    ):
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        print(f"| {name} | {1000 * np.median(ts):.2f} |")


if __name__ == "__main__":
    main()
