"""Decomposition on a family of ground-truth movies: baselines side by side, tuning vs held-out.

Movies: ``bench_decompose_movies.family`` (11 types x 2 movies; the held-out part has its own
seeds, parameter draws and size, and is never tuned on). Score: correlation of each component
with its truth over all pixels of frames 16 on (after a 16-frame warm-up), per movie, then the
mean per type and over the part.

Methods:

- ``median subtraction`` (offline): whole-movie per-pixel median as background, the difference
  as both slow and fast;
- ``median/clip`` (offline; the common recipe): whole-movie median background, the foreground
  clipped at 0, slow = its centred running temporal median over ``k`` frames, fast = the rest
  clipped at 0 (``k`` chosen on the tuning part);
- ``two-scale rolling median`` (causal): medians of the last ``s`` and the last ``l`` frames,
  background = their minimum, slow = short - background, fast = frame - short clipped at 0
  (``s``, ``l`` chosen on the tuning part);
- ``robust PCA`` (offline): principal component pursuit (inexact ALM), low rank = background,
  sparse = slow and fast;
- ``decompose`` with ``smooth=0, slow_reach=0`` (no spatial smoothing, no motion reach), the
  current default (see docs/decomposition.md; the background follows stage drift), and the
  default with ``follow_drift=False`` (the background stays put, as before #26's drift gate).

Run:  python bench/bench_decompose_family.py [--quick] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decompose_movies import COMPONENTS, TYPES, family  # noqa: E402

WARMUP = 16


def corr(a, b):
    a = np.ravel(a).astype(np.float64)
    b = np.ravel(b).astype(np.float64)
    a = a - a.mean()
    b = b - b.mean()
    den = np.sqrt((a @ a) * (b @ b))
    return float(a @ b / den) if den > 0 else 0.0


def score(out, truth):
    return {k: corr(out[k][WARMUP:], truth[k][WARMUP:]) for k in COMPONENTS}


# -- baselines -----------------------------------------------------------------------------


def median_subtraction(frames):
    bg = np.median(frames, 0)
    fg = frames - bg
    return {"background": np.broadcast_to(bg, frames.shape), "slow": fg, "fast": fg}


def median_clip(frames, k=9, cache=None):
    cache = {} if cache is None else cache
    if "median" not in cache:
        cache["median"] = np.median(frames, 0)
    bg = cache["median"]
    fg = np.clip(frames - bg, 0, None)
    n = len(frames)
    slow = np.stack([np.median(fg[max(0, t - k // 2) : min(n, t + k // 2 + 1)], 0) for t in range(n)])
    return {"background": np.broadcast_to(bg, frames.shape), "slow": slow, "fast": np.clip(fg - slow, 0, None)}


def rolling_median(frames, window):
    """Per-pixel median of the last ``window`` frames (fewer at the start), for every frame."""
    return np.stack([np.median(frames[max(0, t - window + 1) : t + 1], 0) for t in range(len(frames))])


def two_scale_rolling_median(frames, short=9, long=96, cache=None):
    """Causal: background = min(short median, long median), slow = short median - background,
    fast = frame - short median clipped at 0. ``cache``: window -> rolling medians (tuning)."""
    cache = {} if cache is None else cache
    for w in (short, long):
        if w not in cache:
            cache[w] = rolling_median(frames, w)
    ms, ml = cache[short], cache[long]
    bg = np.minimum(ms, ml)
    return {"background": bg, "slow": ms - bg, "fast": np.clip(frames - ms, 0, None)}


def pcp(m, lam=None, tol=1e-6, max_iter=100):
    """Principal component pursuit by inexact ALM (Lin, Chen & Ma 2010)."""
    n1, n2 = m.shape
    lam = lam or 1.0 / np.sqrt(max(n1, n2))
    norm2 = np.linalg.norm(m, 2)
    y = m / max(norm2, np.abs(m).max() / lam)
    mu, rho = 1.25 / norm2, 1.5
    low = np.zeros_like(m)
    sparse = np.zeros_like(m)
    mnorm = np.linalg.norm(m)
    for _ in range(max_iter):
        t = m - low + y / mu
        sparse = np.sign(t) * np.maximum(np.abs(t) - lam / mu, 0)
        u, s, vt = np.linalg.svd(m - sparse + y / mu, full_matrices=False)
        s = np.maximum(s - 1 / mu, 0)
        r = int((s > 0).sum())
        low = (u[:, :r] * s[:r]) @ vt[:r]
        z = m - low - sparse
        y = y + mu * z
        mu = min(mu * rho, 1e7)
        if np.linalg.norm(z) / mnorm < tol:
            break
    return low, sparse


def robust_pca(frames):
    n = len(frames)
    m = frames.reshape(n, -1).astype(np.float64)
    low, sparse = pcp(m)
    low = low.reshape(frames.shape)
    sparse = sparse.reshape(frames.shape)
    return {"background": low, "slow": sparse, "fast": sparse}


def run_engine(frames, **params):
    from livescope.engines.base import FrameInfo, StreamSpec, create_engine

    engine = create_engine("decompose", **params)
    engine.setup(StreamSpec(shape=frames.shape[1:], dtype="float32", interval_s=1.0, camera_offset=100.0))
    out = {k: np.empty(frames.shape, np.float32) for k in COMPONENTS}
    for t, frame in enumerate(frames):
        res = engine.process(frame, FrameInfo(seq=t, timestamp=float(t)))
        for k in COMPONENTS:
            out[k][t] = res[k]
    return out


PREVIOUS = {"smooth": 0.0, "slow_reach": 0.0}  # no smoothing, no reach (the history merging stays)


# -- tuning --------------------------------------------------------------------------------


def mean_scores(rows):
    return {k: float(np.mean([r[k] for r in rows])) for k in COMPONENTS}


def tune(movies, method, grid):
    """The grid point with the best mean of the three component correlations on ``movies``
    (``method`` gets a per-movie ``cache`` dict it may fill to share work between grid points)."""
    best = None
    caches = [{} for _ in movies]
    for values in itertools.product(*grid.values()):
        kw = dict(zip(grid, values, strict=True))
        rows = [score(method(f, cache=c, **kw), tr) for (_, f, tr, _), c in zip(movies, caches, strict=True)]
        m = mean_scores(rows)
        total = sum(m.values())
        if best is None or total > best[0]:
            best = (total, kw, m)
    return best[1], best[2]


def table(results, methods, title):
    lines = [f"### {title}", ""]
    lines.append("| movie type | " + " | ".join(methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    kinds = sorted({name.split("/")[0] for name in results[methods[0]]}, key=[k for k, _ in TYPES].index)
    for kind in kinds:
        cells = []
        for m in methods:
            rows = [v for name, v in results[m].items() if name.split("/")[0] == kind]
            s = mean_scores(rows)
            cells.append(" / ".join(f"{s[k]:.3f}" for k in ("fast", "slow", "background")))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    cells = []
    for m in methods:
        s = mean_scores(list(results[m].values()))
        cells.append(" / ".join(f"**{s[k]:.3f}**" for k in ("fast", "slow", "background")))
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small family, no robust PCA")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    size = "small" if args.quick else "full"
    t0 = time.perf_counter()
    tune_set = list(family("tune", size))
    held_set = list(family("heldout", size))
    print(f"{len(tune_set)} tuning and {len(held_set)} held-out movies, made in {time.perf_counter() - t0:.0f} s")

    # Baseline settings: chosen on the tuning part only.
    two_kw, _ = tune(tune_set, two_scale_rolling_median, {"short": [5, 9, 13, 17], "long": [48, 96]})
    clip_kw, _ = tune(tune_set, median_clip, {"k": [3, 5, 9, 15, 25]})
    print("tuned on the tuning part: two-scale", two_kw, "median/clip", clip_kw)

    methods = {
        "median subtraction": median_subtraction,
        f"median/clip (k={clip_kw['k']})": lambda f: median_clip(f, **clip_kw),
        f"two-scale rolling median ({two_kw['short']}, {two_kw['long']})": lambda f: two_scale_rolling_median(
            f, **two_kw
        ),
        "robust PCA": robust_pca,
        "decompose, smooth=0 slow_reach=0": lambda f: run_engine(f, **PREVIOUS),
        "decompose (default)": lambda f: run_engine(f),
        "decompose, follow_drift=False": lambda f: run_engine(f, follow_drift=False),
    }
    if args.quick:
        methods.pop("robust PCA")
    report = {}
    for part, movies in (("tuning", tune_set), ("held-out", held_set)):
        results: dict[str, dict] = {m: {} for m in methods}
        seconds = {m: 0.0 for m in methods}
        for name, frames, truth, _ in movies:
            for m, fn in methods.items():
                t = time.perf_counter()
                results[m][name] = score(fn(frames), truth)
                seconds[m] += time.perf_counter() - t
        print()
        print(table(results, list(methods), f"{part} part (fast / slow / background)"))
        print("seconds per movie:", {m: round(s / len(movies), 2) for m, s in seconds.items()})
        report[part] = results
    if args.json:
        args.json.write_text(json.dumps({"two_scale": two_kw, "median_clip": clip_kw, **report}, indent=1))


if __name__ == "__main__":
    main()
