"""Learned multi-lag predictors for the decomposition: fit, package, run.

After the idea of predicting frame t from frames t-8, t-4, t-2 and t-1 with one small network per
lag. A plain sum of per-lag predictions does not decide which lag explains what (the t-1 network
can learn the background too), so the assignment is explicit: a **residual cascade**
(:class:`~livescope.engines.unet.MultiLag`). The t-8 network predicts the frame from t-8 alone;
the t-4 network predicts what is left from t-4 and the prediction so far; and so on down to t-1.
Each stage is trained on its own loss (the error of the prediction up to and including it) with
the earlier stages' output detached, so a stage can only take what the longer lags could not
explain. What no lag predicts (noise, sudden events) is the residual.

What each lag's share means follows from the cascade: the longest lag's share is what has not
changed for that long (the background); the shortest lags' shares are what changed within a few
frames but is still predictable from the frame before (fast objects); the lags between hold the
slow objects. :func:`components` makes that split with the ``fast_lag`` rule and
``docs/decomposition.md`` reports, for a movie with known components, the 3x4 matrix of
correlations that checks it.

Lag k's input is not the single frame t-k but the mean of its octave of frames, t-k ... t-2k+1
(t-1; t-2..t-3; t-4..t-7; t-8..t-15): every one of the last 15 frames counts once, and the long
lags, which carry the background, come in with their noise averaged down. Without that, the
t-8 network learns the background slowly and the t-4 network takes what it misses (measured:
the t-4 share then correlates best with the background, not the slow objects).

Frames are normalised per sample by the 1st and 99.8th percentiles of the shortest lag's frame
(the most recent one: the current frame is what is predicted, so it cannot be used), the same in
fitting and at run time. The graph is exported to ONNX like the denoiser's, in the same model file
format (architecture ``multilag2d``, task ``decompose``), and runs on the same backends.

Fitting needs torch (``pip install livescope[ml]``); running needs onnxruntime or torch.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .base import EngineError
from .modelfile import FORMAT, FORMAT_VERSION, ModelFile

__all__ = ["MultiLagPredictor", "components", "fit_multilag", "octave", "octave_inputs", "reference_scale"]

log = logging.getLogger(__name__)

_PERCENTILES = (1.0, 99.8)


def reference_scale(ref: np.ndarray) -> tuple[float, float]:
    """(low, scale) of the normalisation from the most recent lagged frame.

    A strided subsample keeps it cheap at 2048x2048 (the percentiles move little).
    """
    step = max(1, int(math.sqrt(ref.size / 65536)))
    sub = np.asarray(ref[::step, ::step], dtype=np.float32)
    lo, hi = np.percentile(sub, _PERCENTILES)
    return float(lo), float(max(hi - lo, 1e-6))


def components(lags_longest_first: Sequence[float], fast_lag: float) -> dict[str, list[int]]:
    """Which lag's share goes to which component: the longest lag is the background, lags of at
    most ``fast_lag`` intervals are fast, the lags between are slow."""
    lags = list(lags_longest_first)
    split: dict[str, list[int]] = {"background": [0], "slow": [], "fast": []}
    for i, lag in enumerate(lags[1:], start=1):
        split["fast" if lag <= fast_lag else "slow"].append(i)
    return split


def octave(lag: int) -> tuple[int, int]:
    """The frames lag ``lag`` averages, as (nearest, farthest) frames back: (k, 2k - 1)."""
    return int(lag), 2 * int(lag) - 1


def octave_inputs(
    frames: np.ndarray, t: int, lags: Sequence[int], region: tuple[slice, slice] = (slice(None), slice(None))
) -> list[np.ndarray]:
    """The cascade's inputs for frame ``t`` of a recorded movie (t, y, x), in the order of
    ``lags``: for each lag the mean of its :func:`octave` of frames (optionally of a region)."""
    out = []
    for lag in lags:
        near, far = octave(lag)
        out.append(np.asarray(frames[t - far : t - near + 1, region[0], region[1]], dtype=np.float32).mean(axis=0))
    return out


class MultiLagPredictor:
    """Runs a fitted cascade on numpy frames: lagged frames in, each lag's share out."""

    def __init__(self, model: ModelFile, backend: str = "auto", **options: Any) -> None:
        from .inference import Runner

        if model.task != "decompose" or model.arch.get("name") != "multilag2d":
            raise EngineError(
                f"model {model.hash} is a {model.task!r} model ({model.arch.get('name')}); the "
                "learned decomposition needs one fitted with `livescope fit --task decompose`"
            )
        self.model = model
        self.lags = [float(v) for v in model.arch["lags"]]  # longest first
        self.runner = Runner(model, backend, **options)

    @property
    def backend(self) -> str:
        return self.runner.name

    def predict(self, lagged: Sequence[np.ndarray]) -> np.ndarray:
        """``lagged``: one input per lag, longest lag first (each the mean of its :func:`octave`
        of frames). Returns (lags, y, x) float32 shares in the frames' units; their sum predicts
        the current frame."""
        from .inference import pad_multiple

        if len(lagged) != len(self.lags):
            raise EngineError(f"the model takes {len(self.lags)} lagged frames, got {len(lagged)}")
        lo, scale = reference_scale(lagged[-1])
        x = (np.stack([np.asarray(f, dtype=np.float32) for f in lagged]) - lo) * (1.0 / scale)
        xp, (h, w) = pad_multiple(x, self.model.multiple)
        y = self.runner.run(xp[None])[0, :, :h, :w] * scale
        y[0] += lo  # the longest lag's share carries the level; the others are differences
        return y.astype(np.float32, copy=False)


def _samples(
    frames: np.ndarray, lags: Sequence[int], crop: int, batch: int, rng: np.random.Generator, scales: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    t_count, h, w = frames.shape
    longest = max(lags)
    ts = rng.integers(octave(longest)[1], t_count, batch)
    ys = rng.integers(0, h - crop + 1, batch)
    xs = rng.integers(0, w - crop + 1, batch)
    x = np.empty((batch, len(lags), crop, crop), np.float32)
    y = np.empty((batch, 1, crop, crop), np.float32)
    for i, (t, y0, x0) in enumerate(zip(ts, ys, xs, strict=True)):
        lo, scale = scales[t - min(lags)]  # the most recent lagged frame sets the scale
        region = (slice(y0, y0 + crop), slice(x0, x0 + crop))
        for j, inp in enumerate(octave_inputs(frames, t, lags, region)):
            x[i, j] = (inp - lo) / scale
        y[i, 0] = (frames[t, y0 : y0 + crop, x0 : x0 + crop] - lo) / scale
    if rng.random() < 0.5:  # flips: the cascade must not care about direction
        x, y = x[..., ::-1], y[..., ::-1]
    if rng.random() < 0.5:
        x, y = x[..., ::-1, :], y[..., ::-1, :]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def fit_multilag(
    frames: np.ndarray,
    *,
    lags: Sequence[int] = (1, 2, 4, 8),
    steps: int = 1000,
    time_budget_s: float | None = None,
    crop: int = 32,
    batch: int = 8,
    base: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    metadata: dict[str, Any] | None = None,
) -> ModelFile:
    """Fit the cascade on a recorded stream ``frames`` (t, y, x), lags in frames.

    Assumes a regular frame interval in the recording (lags count frames). The stages are
    fitted one after the other, longest lag first, each with ``steps / lags`` steps of a
    one-cycle learning rate (with ``time_budget_s``, a stage ends at its share of the time if
    that comes first). ``progress(step, steps, loss)`` is called every 25 steps.
    """
    try:
        import torch
    except ImportError as exc:
        raise EngineError("fitting the learned decomposition needs torch: pip install 'livescope[ml]'") from exc
    from .unet import MultiLag, export_onnx

    frames = np.asarray(frames, dtype=np.float32)
    lags_desc = sorted({int(v) for v in lags}, reverse=True)
    if frames.ndim != 3:
        raise EngineError(f"fit the decomposition on a (t, y, x) movie, got shape {frames.shape}")
    need = octave(lags_desc[0])[1] + 16
    if frames.shape[0] < need:
        raise EngineError(f"need at least {need} frames to fit lags {lags_desc}, got {frames.shape[0]}")
    crop = int(min(crop, frames.shape[1], frames.shape[2]))
    crop -= crop % 4
    if crop < 16:
        raise EngineError(f"frames of {frames.shape[1:]} are too small to fit on (16 px at least)")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    scales = np.array([reference_scale(f) for f in frames], dtype=np.float64)
    net = MultiLag(lags=len(lags_desc), base=base)
    # One intra-op thread: the batches are small, so more threads win little when the cores are
    # free and lose 5-15x when other processes load them (measured: 27 vs 205-490 ms per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        losses, step = _fit_stages(
            torch, net, frames, lags_desc, steps, time_budget_s, crop, batch, lr, rng, scales, progress
        )
    finally:
        torch.set_num_threads(threads)

    seconds = time.perf_counter() - t0
    net.eval()
    arch = {
        "name": "multilag2d",
        "lags": lags_desc,
        "depth": net.depth,
        "base": net.base,
        "max_channels": net.max_channels,
        "unshuffle": net.unshuffle,
    }
    weights = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in net.state_dict().items()}
    meta = dict(metadata or {})
    meta.update(
        format=FORMAT,  # the shared model file format (modelfile.py)
        format_version=FORMAT_VERSION,
        task="decompose",
        architecture=arch,
        inputs={
            "channels": len(lags_desc),
            "past_frames": len(lags_desc) - 1,
            "size_multiple": 2**net.depth,
            "layout": "NCHW float32, channel i = mean of frames t - lags[i] ... t - 2 lags[i] + 1, longest lag first",
        },
        normalisation={"vst": False, "percentiles": list(_PERCENTILES), "reference": "the most recent lagged frame"},
        training={
            "frames": int(frames.shape[0]),
            "shape": list(frames.shape[1:]),
            "steps": int(step),
            "seconds": round(seconds, 1),
            "crop": crop,
            "batch": batch,
            "lr": lr,
            "seed": seed,
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
        },
    )
    log.info(
        "multilag fit: %d steps in %.0f s, loss %.4f", step, seconds, meta["training"]["final_loss"] or float("nan")
    )
    model = ModelFile(meta, export_onnx(net), weights)
    model.to_bytes()  # fills in the hashes: the model's identity from here on
    return model


def _fit_stages(
    torch: Any,
    net: Any,
    frames: np.ndarray,
    lags_desc: list[int],
    steps: int,
    time_budget_s: float | None,
    crop: int,
    batch: int,
    lr: float,
    rng: np.random.Generator,
    scales: np.ndarray,
    progress: Callable[[int, int, float], None] | None,
) -> tuple[list[float], int]:
    """Greedy, one stage after the other: the t-8 network is fitted alone, then frozen; then the
    t-4 network on what it leaves; and so on. Fitted together, a shorter lag learns what a longer
    one has not learned yet (a slow blob is as visible at t-2 as at t-4) and keeps some of it:
    measured, the t-2 share then holds the slow objects."""
    stages = len(lags_desc)
    losses: list[float] = []
    step = 0
    for stage in range(stages):
        opt = torch.optim.AdamW(list(net.nets[stage].parameters()), lr=lr)
        first = stage * steps // stages
        last = (stage + 1) * steps // stages
        s_t0 = time.perf_counter()
        s_budget = None if not time_budget_s else time_budget_s / stages
        for step in range(first + 1, last + 1):
            # one-cycle per stage on its fraction done, by steps or time, whichever is further
            done = (step - first) / max(last - first, 1)
            if s_budget:
                done = max(done, (time.perf_counter() - s_t0) / s_budget)
            if done >= 1.0:
                break
            warm = 0.25  # linear warm-up, then a cosine down to nearly zero
            if done < warm:
                rate = lr * (0.04 + 0.96 * done / warm)
            else:
                rate = lr * max(0.5 * (1 + math.cos(math.pi * (done - warm) / (1 - warm))), 1e-3)
            for group in opt.param_groups:
                group["lr"] = rate
            x, y = _samples(frames, lags_desc, crop, batch, rng, scales)
            out = net(torch.from_numpy(x), upto=stage + 1)
            pred = torch.sum(out, dim=1, keepdim=True)
            loss = ((pred - torch.from_numpy(y)) ** 2).mean()  # this stage's own error
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None and step % 25 == 0:
                progress(step, steps, float(np.mean(losses[-25:])))
    return losses, step
