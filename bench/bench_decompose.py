"""Benchmark the rolling decomposition against background subtraction and robust PCA.

Side by side in one run:

1. synthetic movies with known components (static filaments, slowly drifting blobs, fast
   diffusing particles, noise; a second movie where blobs and particles have the same size and
   brightness): correlation and normalised RMSE of each component with its ground truth, and
   seconds per frame, for
   - ``decompose`` (this engine, live: causal, one frame at a time),
   - per-pixel temporal median background subtraction (offline, whole movie),
   - per-pixel rolling median over the engine's background window (causal, the live peer),
   - per-pixel temporal mean background subtraction (offline),
   - robust PCA, principal component pursuit by inexact ALM (offline, whole movie);
   background subtraction and RPCA only split off a foreground, so their foreground stands for
   both ``slow`` and ``fast``;
2. the real time-lapse ``cancer_cell_migration_crop.tif``: a figure of the components, the
   novelty trace and the false-alarm rate (events per 100 frames);
3. frames/s at 512x512.

4. the learned multi-lag predictors (``method="learned"``) on a movie whose objects move at the
   lags' time scales: the 3x4 matrix, the components against the same peers, inference speed.

Run:  python bench/bench_decompose.py [--figures docs/img] [--quick] [--learned-only]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from livescope.engines.base import FrameInfo, StreamSpec, create_engine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "engines"))
from movies import lag_movie, spots  # noqa: E402  (the movies the tests use)

DATA = ROOT.parent / "shared" / "data"
COMPONENTS = ("background", "slow", "fast")


# -- synthetic movies with known components ------------------------------------------------


def synthetic_movie(
    n_frames,
    shape,
    slow_sigma=2.5,
    fast_sigma=1.3,
    n_slow=6,
    n_fast=12,
    slow_speed=0.12,
    fast_step=3.0,
    amp=60.0,
    noise=5.0,
    seed=0,
):
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    static = np.full(shape, 100.0)
    for _ in range(6):
        a, c = rng.uniform(0, np.pi), rng.uniform(0.2, 0.8) * h
        d = (yy - c) * np.cos(a) - (xx - w / 2) * np.sin(a)
        static += 80 * np.exp(-(d**2) / 2.0)
    slow_pos = rng.uniform(8, h - 8, (n_slow, 2))
    angle = rng.uniform(0, 2 * np.pi, n_slow)
    slow_vel = slow_speed * np.stack([np.sin(angle), np.cos(angle)], 1)
    fast_pos = rng.uniform(4, h - 4, (n_fast, 2))
    truth = {k: np.zeros((n_frames, h, w), np.float32) for k in COMPONENTS}
    for t in range(n_frames):
        truth["background"][t] = static
        truth["slow"][t] = spots(shape, slow_pos + t * slow_vel, slow_sigma, amp)
        truth["fast"][t] = spots(shape, fast_pos, fast_sigma, amp)
        fast_pos = fast_pos + rng.normal(0, fast_step, fast_pos.shape)
        fast_pos = np.where(fast_pos < 2, 4 - fast_pos, fast_pos)
        fast_pos = np.where(fast_pos > h - 3, 2 * (h - 3) - fast_pos, fast_pos)
    clean = truth["background"] + truth["slow"] + truth["fast"]
    frames = (clean + rng.normal(0, noise, clean.shape)).astype(np.float32)
    return frames, truth


def corr(a, b):
    a = np.ravel(a).astype(np.float64)
    b = np.ravel(b).astype(np.float64)
    a -= a.mean()
    b -= b.mean()
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def nrmse(est, truth):
    """RMSE over the truth's standard deviation (after removing the mean offset of the error,
    which background subtraction cannot know)."""
    err = np.asarray(est, np.float64) - truth
    return float(np.sqrt(np.mean((err - err.mean()) ** 2)) / np.std(truth))


# -- methods -------------------------------------------------------------------------------


def run_decompose(frames, interval_s=1.0, **params):
    engine = create_engine("decompose", **params)
    engine.setup(StreamSpec(shape=frames.shape[1:], dtype=str(frames.dtype), interval_s=interval_s))
    out = {k: np.empty(frames.shape, np.float32) for k in COMPONENTS}
    novelty = np.empty(len(frames))
    events = []
    t0 = time.perf_counter()
    for t, frame in enumerate(frames):
        res = engine.process(frame, FrameInfo(seq=t, timestamp=t * interval_s))
        for k in COMPONENTS:
            out[k][t] = res[k]
        novelty[t] = res["novelty"]
        events += res["events"]
    seconds = (time.perf_counter() - t0) / len(frames)
    return out, novelty, events, seconds, engine


def median_subtraction(frames):
    t0 = time.perf_counter()
    bg = np.median(frames, 0)
    fg = frames - bg
    seconds = (time.perf_counter() - t0) / len(frames)
    return {"background": np.broadcast_to(bg, frames.shape), "slow": fg, "fast": fg}, seconds


def mean_subtraction(frames):
    t0 = time.perf_counter()
    bg = frames.mean(0)
    fg = frames - bg
    seconds = (time.perf_counter() - t0) / len(frames)
    return {"background": np.broadcast_to(bg, frames.shape), "slow": fg, "fast": fg}, seconds


def rolling_median_subtraction(frames, window):
    t0 = time.perf_counter()
    bg = np.stack([np.median(frames[max(0, t - window + 1) : t + 1], 0) for t in range(len(frames))])
    fg = frames - bg
    seconds = (time.perf_counter() - t0) / len(frames)
    return {"background": bg, "slow": fg, "fast": fg}, seconds


def pcp(m, lam=None, tol=1e-6, max_iter=300):
    """Principal component pursuit, inexact augmented Lagrange multipliers (Lin, Chen & Ma 2010;
    Candes, Li, Ma & Wright 2011): m = low rank + sparse."""
    n1, n2 = m.shape
    lam = 1.0 / np.sqrt(max(n1, n2)) if lam is None else lam
    norm_fro = np.linalg.norm(m)
    norm_two = np.linalg.norm(m, 2)
    y = m / max(norm_two, np.abs(m).max() / lam)
    mu, rho = 1.25 / norm_two, 1.5
    mu_bar = mu * 1e7
    sparse = np.zeros_like(m)
    low = np.zeros_like(m)
    for it in range(max_iter):  # noqa: B007 (the count is returned after the loop)
        u, s, vt = np.linalg.svd(m - sparse + y / mu, full_matrices=False)
        s = np.maximum(s - 1.0 / mu, 0)
        r = int((s > 0).sum())
        low = (u[:, :r] * s[:r]) @ vt[:r]
        v = m - low + y / mu
        sparse = np.sign(v) * np.maximum(np.abs(v) - lam / mu, 0)
        z = m - low - sparse
        y += mu * z
        mu = min(mu * rho, mu_bar)
        if np.linalg.norm(z) / norm_fro < tol:
            break
    return low, sparse, it + 1, r


def rpca_subtraction(frames):
    t0 = time.perf_counter()
    m = frames.reshape(len(frames), -1).T.astype(np.float64)  # pixels x frames
    low, sparse, iters, rank = pcp(m)
    bg = low.T.reshape(frames.shape).astype(np.float32)
    fg = sparse.T.reshape(frames.shape).astype(np.float32)
    seconds = (time.perf_counter() - t0) / len(frames)
    return {"background": bg, "slow": fg, "fast": fg}, seconds, iters, rank


# -- parts of the benchmark ----------------------------------------------------------------


def synthetic_table(n_frames, shape, quick):
    print(
        f"\n### Synthetic movies ({n_frames} frames of {shape[0]}x{shape[1]}, noise sigma 5, "
        "scored after the engine's 128-frame background window)\n"
    )
    print(
        "| movie | method | corr background | corr slow | corr fast | NRMSE background | "
        "NRMSE slow | NRMSE fast | s/frame |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = {
        "typical (blob sigma 2.5, particle sigma 1.3)": {},
        "same size and brightness (sigma 2)": dict(slow_sigma=2.0, fast_sigma=2.0),
    }
    for label, kw in cases.items():
        frames, truth = synthetic_movie(n_frames, shape, **kw)
        later = slice(128, None)
        ours, _, _, sec, engine = run_decompose(frames)
        methods = [("decompose (live)", ours, sec)]
        methods.append(("median subtraction (offline)", *median_subtraction(frames)))
        methods.append(
            ("rolling median, 128 frames (live)", *rolling_median_subtraction(frames, engine.background_window))
        )
        methods.append(("mean subtraction (offline)", *mean_subtraction(frames)))
        if not quick:
            rp, sec_rp, iters, rank = rpca_subtraction(frames)
            methods.append((f"robust PCA, PCP inexact ALM (offline; {iters} it., rank {rank})", rp, sec_rp))
        for name, est, sec in methods:
            c = [corr(est[k][later], truth[k][later]) for k in COMPONENTS]
            e = [nrmse(est[k][later], truth[k][later]) for k in COMPONENTS]
            print(
                f"| {label} | {name} | "
                + " | ".join(f"{v:.3f}" for v in c)
                + " | "
                + " | ".join(f"{v:.2f}" for v in e)
                + f" | {sec:.2g} |"
            )


def real_movie(figures):
    path = DATA / "cancer_cell_migration_crop.tif"
    if not path.exists():
        print(f"\n(real data not found at {path}: skipped)")
        return
    import tifffile

    movie = tifffile.imread(path)
    out, novelty, events, sec, _ = run_decompose(movie)
    rate = 100.0 * len(events) / len(movie)
    print(f"\n### Real time-lapse: {path.name} {movie.shape} {movie.dtype}\n")
    print(
        f"- events: {len(events)} in {len(movie)} frames = {rate:.1f} per 100 frames "
        f"(seqs {[e['seq'] for e in events]})"
    )
    print(
        f"- novelty: median {np.median(novelty[8:]):.2f}, max {novelty.max():.2f} at frame "
        f"{int(novelty.argmax())}; {sec * 1e3:.2f} ms/frame at {movie.shape[1]}x{movie.shape[2]}"
    )
    for thr in (4.0, 5.0, 6.0):
        _, _, ev, _, _ = run_decompose(movie, event_threshold=thr)
        print(
            f"- with event_threshold={thr:g}: {100.0 * len(ev) / len(movie):.1f} events per 100 "
            f"frames (seqs {[e['seq'] for e in ev]})"
        )
    # Sensitivity: the same movie with a bright spot pasted in from frame 30 on (a nucleus-sized
    # object appearing), at a few brightnesses; the nuclei themselves peak near 30000.
    yy, xx = np.mgrid[: movie.shape[1], : movie.shape[2]]
    spot = np.exp(-((yy - 40) ** 2 + (xx - 90) ** 2) / (2 * 10.0**2))
    for amp in (10000.0, 20000.0, 30000.0):
        probe = movie.astype(np.float32)
        probe[30:] += amp * spot
        _, probe_novelty, probe_events, _, _ = run_decompose(probe)
        spots = [(e["seq"], [round(v) for v in e["centroid"]]) for e in probe_events]
        print(
            f"- spot (peak {amp:.0f}, sigma 10 px) appearing at frame 30 at (40, 90): novelty "
            f"{probe_novelty[30]:.1f}, events {spots}"
        )
    if figures is None:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures.mkdir(parents=True, exist_ok=True)
    shown = (12, 30, 47)
    fig, axes = plt.subplots(len(shown), 5, figsize=(10, 6.2))
    for row, t in enumerate(shown):
        frame = movie[t].astype(np.float32)
        lo, hi = np.percentile(frame, (1, 99.5))
        panels = [("frame", frame, "gray", (lo, hi)), ("background", out["background"][t], "gray", (lo, hi))]
        for k in ("slow", "fast"):
            m = max(np.percentile(np.abs(out[k][t]), 99.5), 1.0)
            panels.append((k, out[k][t], "RdBu_r", (-m, m)))
        # Composite: background in grey, slow in magenta, fast in green.
        grey = np.clip((out["background"][t] - lo) / (hi - lo), 0, 1) * 0.6
        s = np.clip(out["slow"][t] / max(np.percentile(out["slow"][t], 99.5), 1.0), 0, 1)
        f = np.clip(out["fast"][t] / max(np.percentile(out["fast"][t], 99.5), 1.0), 0, 1)
        rgb = np.clip(np.stack([grey + s, grey + f, grey + s], -1), 0, 1)
        panels.append(("composite", rgb, None, None))
        for col, (title, img, cmap, lim) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(img, cmap=cmap, vmin=None if lim is None else lim[0], vmax=None if lim is None else lim[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"frame {t}", fontsize=9)
    fig.suptitle("decompose on cancer_cell_migration_crop.tif (slow: magenta, fast: green)", fontsize=10)
    fig.tight_layout()
    fig.savefig(figures / "decompose_components.png", dpi=64)
    plt.close(fig)
    from PIL import Image  # comes with matplotlib; a 256-colour palette keeps the PNG small

    with Image.open(figures / "decompose_components.png") as img:
        small = img.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    small.save(figures / "decompose_components.png", optimize=True)

    fig, ax = plt.subplots(figsize=(7, 2.4))
    ax.plot(novelty, "k.-", lw=1, label="real movie")
    ax.plot(probe_novelty, "r--", lw=1, label="with a spot (peak 30000) pasted in at frame 30")
    for e in events:
        ax.axvline(e["seq"], color="k", alpha=0.3)
    for e in probe_events:
        ax.axvline(e["seq"], color="r", alpha=0.3)
    ax.set_xlabel("frame")
    ax.set_ylabel("novelty")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figures / "decompose_novelty.png", dpi=80)
    plt.close(fig)
    print(f"- figures: {figures / 'decompose_components.png'}, {figures / 'decompose_novelty.png'}")


def speed_table(n_frames):
    print("\n### Frames/s at 512x512 (uint16, Poisson noise + spots)\n")
    rng = np.random.default_rng(0)
    pool = rng.poisson(200, (16, 512, 512)).astype(np.uint16)
    print("| method | ms/frame | frames/s |")
    print("|---|---|---|")
    # The default (the background follows stage drift once it is seen: on these static frames
    # only the measurement runs) and without drift following, in turns, best of 2.
    for label, kw in (
        ("decompose (rolling, lags 1,2,4,8, window 128)", {}),
        ("decompose, follow_drift=False", {"follow_drift": False}),
    ):
        best = float("inf")
        for _ in range(2):
            engine = create_engine("decompose", **kw)
            engine.setup(StreamSpec(shape=(512, 512), interval_s=0.02))
            for t in range(160):  # past the background window: the steady state
                engine.process(pool[t % 16], FrameInfo(seq=t, timestamp=0.02 * t))
            t0 = time.perf_counter()
            for t in range(160, 160 + n_frames):
                engine.process(pool[t % 16], FrameInfo(seq=t, timestamp=0.02 * t))
            best = min(best, (time.perf_counter() - t0) / n_frames)
        print(f"| {label} | {best * 1e3:.1f} | {1 / best:.0f} |")
    # Live peer: a running mean background (exponential), subtracted.
    bg = pool[0].astype(np.float32)
    t0 = time.perf_counter()
    for t in range(n_frames):
        f = pool[t % 16].astype(np.float32)
        bg += (f - bg) * (1 / 128)
        _ = f - bg
    dt = (time.perf_counter() - t0) / n_frames
    print(f"| running-mean background subtraction | {dt * 1e3:.1f} | {1 / dt:.0f} |")
    # Live peer: rolling median over the last 128 frames (recomputed every frame).
    ring = np.repeat(pool[:8].astype(np.float32), 16, axis=0)  # 128 frames
    n_med = max(3, n_frames // 20)
    t0 = time.perf_counter()
    for t in range(n_med):
        ring[t % 128] = pool[t % 16]
        _ = pool[t % 16] - np.median(ring, 0)
    dt = (time.perf_counter() - t0) / n_med
    print(f"| rolling median over 128 frames, every frame | {dt * 1e3:.0f} | {1 / dt:.1f} |")


# -- learned multi-lag predictors -----------------------------------------------------------


def learned_table(quick, real=True):
    """Fit the cascade on one lag-matched movie, test on another: the 3x4 matrix (each lag's
    share against each true component), the components against the rolling method and the
    peers, and inference speed at 512x512."""
    from livescope.engines import modelfile
    from livescope.engines.multilag import MultiLagPredictor, fit_multilag, octave_inputs

    size, n_fit, n_test, steps = (64, 300, 120, 1000) if quick else (96, 400, 240, 3000)
    train, _ = lag_movie(n_fit, shape=(size, size), seed=1)
    frames, truth = lag_movie(n_test, shape=(size, size), seed=2)
    t0 = time.perf_counter()
    model = fit_multilag(train, steps=steps, seed=0)
    fit_s = time.perf_counter() - t0
    path = Path("/tmp") / f"bench_multilag_{model.hash}.lsmodel"
    model.save(path)
    predictor = MultiLagPredictor(modelfile.load(path), "onnxruntime")
    lags = [int(v) for v in predictor.lags]
    first = 2 * max(lags) - 1
    shares = np.stack([predictor.predict(octave_inputs(frames, t, lags)) for t in range(first, n_test)])
    print(
        f"\n### Learned multi-lag predictors: the 3x4 matrix\n\nFitted on a {n_fit}-frame "
        f"{size}x{size} movie ({steps} steps, {fit_s:.0f} s on this CPU), tested on another "
        f"({n_test} frames, other seed): correlation of each lag's share (columns) with each "
        "true component (rows). Bold: the best row of each column; the rule (`fast_lag=1`) maps "
        "lag 8 to background, lags 4 and 2 to slow, lag 1 to fast.\n"
    )
    print("| component | " + " | ".join(f"lag {v} share" for v in lags) + " |")
    print("|---|" + "---|" * len(lags))
    matrix = np.array([[corr(shares[:, j], truth[k][first:]) for j in range(len(lags))] for k in COMPONENTS])
    best = np.argmax(matrix, axis=0)
    for i, k in enumerate(COMPONENTS):
        cells = [f"**{v:.3f}**" if best[j] == i else f"{v:.3f}" for j, v in enumerate(matrix[i])]
        print(f"| {k} | " + " | ".join(cells) + " |")
    resid = frames[first:] - shares.sum(axis=1)
    print(f"\nResidual (frame minus all shares) std {resid.std():.2f} (noise sigma 5.0).")

    print("\n| method on the lag-matched movie | corr background | corr slow | corr fast | s/frame |")
    print("|---|---|---|---|---|")
    later = slice(128, None) if n_test > 160 else slice(first, None)
    learned, _, _, sec_l, _ = run_decompose(frames, method="learned", model=str(path))
    rolling, _, _, sec_r, engine = run_decompose(frames)
    methods = [
        ("decompose, learned (live)", learned, sec_l),
        ("decompose, rolling (live)", rolling, sec_r),
        ("median subtraction (offline)", *median_subtraction(frames)),
        ("rolling median, 128 frames (live)", *rolling_median_subtraction(frames, engine.background_window)),
    ]
    if not quick:
        rp, sec_rp, iters, rank = rpca_subtraction(frames)
        methods.append((f"robust PCA (offline; {iters} it., rank {rank})", rp, sec_rp))
    for name, est, sec in methods:
        c = [corr(est[k][later], truth[k][later]) for k in COMPONENTS]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in c) + f" | {sec:.2g} |")

    print("\n### Learned inference at 512x512 (4 lags, one cascade graph)\n")
    print("| backend | ms/frame | frames/s |")
    print("|---|---|---|")
    rng = np.random.default_rng(0)
    lagged = [rng.poisson(200, (512, 512)).astype(np.float32) for _ in lags]
    for backend in ("onnxruntime", "torch"):
        p = MultiLagPredictor(modelfile.load(path), backend)
        p.predict(lagged)
        n = 10 if quick else 40
        t0 = time.perf_counter()
        for _ in range(n):
            p.predict(lagged)
        dt = (time.perf_counter() - t0) / n
        print(f"| {backend} | {dt * 1e3:.1f} | {1 / dt:.1f} |")
    engine = create_engine("decompose", method="learned", model=str(path))
    engine.setup(StreamSpec(shape=(512, 512), interval_s=0.02))
    pool = rng.poisson(200, (16, 512, 512)).astype(np.uint16)
    for t in range(16):
        engine.process(pool[t], FrameInfo(seq=t, timestamp=0.02 * t))
    n = 10 if quick else 40
    t0 = time.perf_counter()
    for t in range(16, 16 + n):
        engine.process(pool[t % 16], FrameInfo(seq=t, timestamp=0.02 * t))
    dt = (time.perf_counter() - t0) / n
    print(f"| whole engine (onnxruntime + bleach, novelty, events) | {dt * 1e3:.1f} | {1 / dt:.1f} |")
    if real and not quick:
        learned_real(steps)


def learned_real(steps):
    """The real movie has 48 frames only: the cascade is fitted on the whole movie (the
    self-supervised use: fit on the stream, then decompose it) and the false alarms counted on
    the frames with a full history (from frame 15 on, and events need 8 scores before them)."""
    path = DATA / "cancer_cell_migration_crop.tif"
    if not path.exists():
        return
    import tifffile

    from livescope.engines.multilag import fit_multilag

    movie = tifffile.imread(path).astype(np.float32)
    movie = movie.reshape(-1, *movie.shape[-2:])
    t0 = time.perf_counter()
    model = fit_multilag(movie, steps=steps, seed=0)
    fit_s = time.perf_counter() - t0
    mpath = Path("/tmp") / f"bench_multilag_real_{model.hash}.lsmodel"
    model.save(mpath)
    first = 15
    rows = []
    for name, params in (
        ("rolling", {}),
        ("learned (fitted on this movie)", {"method": "learned", "model": str(mpath)}),
    ):
        _, novelty, events, sec, _ = run_decompose(movie, **params)
        late = [e for e in events if e["seq"] >= first]
        rows.append((name, len(late), len(late) * 100.0 / (len(movie) - first), float(np.median(novelty[first:])), sec))
    print(
        f"\n### Learned vs rolling on the real migration movie ({len(movie)} frames of "
        f"{movie.shape[1]}x{movie.shape[2]}; cascade fitted on the movie in {fit_s:.0f} s, "
        f"{steps} steps; events counted from frame {first})\n"
    )
    print("| method | events | events per 100 frames | median novelty | s/frame |")
    print("|---|---|---|---|---|")
    for name, n, rate, med, sec in rows:
        print(f"| {name} | {n} | {rate:.1f} | {med:.3f} | {sec:.2g} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--figures", type=Path, default=None, help="write PNG figures here")
    ap.add_argument("--quick", action="store_true", help="small movies, no robust PCA")
    ap.add_argument("--learned-only", action="store_true", help="only the learned predictors")
    args = ap.parse_args()
    if args.learned_only:
        learned_table(args.quick)
        return
    print(f"## decompose benchmark ({platform.machine()}, {platform.python_version()}, numpy {np.__version__})")
    if args.quick:
        synthetic_table(200, (48, 48), quick=True)
    else:
        synthetic_table(320, (96, 96), quick=False)
    real_movie(args.figures)
    speed_table(40 if args.quick else 300)
    learned_table(args.quick)


if __name__ == "__main__":
    main()
