"""Fitting a denoising model on the user's own frames, no clean images needed.

Three ways, mixed per batch as the data allow:

- Noise2Void (Krull et al. 2019): a few pixels of the current frame are replaced by a random
  neighbour and the network must predict their original noisy value from the surroundings.
  Noise is independent between pixels, so the best prediction is the clean value.
- temporal pairs (as in DeepCAD-RT): in a time-lapse the neighbouring frame is a second noisy
  view of nearly the same scene, so every pixel of frame t +- 1 is a target for frame t.
- supervised "crappify" (PSSR, Fang et al. 2021): for users with clean images, noisy inputs are
  made from them (Poisson-Gaussian noise, blur, down- and up-sampling) and the clean image is
  the target.

``fit`` returns the packaged model and its loss curve; progress shows with tqdm. The model file
also records statistics of its training frames' features (``metadata["training_features"]``),
against which the ``trust`` engine measures how far a live frame lies from the training data.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .inference import Normalisation
from .modelfile import ModelFile

__all__ = ["FitResult", "augment", "crappify", "fit", "n2v_mask"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class FitResult:
    model: ModelFile
    losses: list[float]  # one value per step (training loss, normalised units)
    seconds: float


def n2v_mask(
    patches: np.ndarray, fraction: float, rng: np.random.Generator, radius: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Blind-spot masking of (n, y, x) patches: returns the masked copy and the boolean mask.

    About ``fraction`` of the pixels, one per cell of a regular grid (so masked pixels never
    neighbour each other), take the value of a random other pixel within ``radius``.
    """
    n, h, w = patches.shape
    step = max(1, int(round(1.0 / np.sqrt(fraction))))
    grid_y, grid_x = np.meshgrid(np.arange(0, h, step), np.arange(0, w, step), indexing="ij")
    gy, gx = grid_y.ravel(), grid_x.ravel()
    m = gy.size
    ys = np.minimum(gy[None] + rng.integers(0, step, (n, m)), h - 1)
    xs = np.minimum(gx[None] + rng.integers(0, step, (n, m)), w - 1)
    dy = rng.integers(-radius, radius + 1, (n, m))
    dx = rng.integers(-radius, radius + 1, (n, m))
    same = (dy == 0) & (dx == 0)
    dx[same] = rng.choice([-1, 1], same.sum())  # never the pixel itself
    sy = np.clip(ys + dy, 0, h - 1)
    sx = np.clip(xs + dx, 0, w - 1)
    idx = np.arange(n)[:, None]
    masked = patches.copy()
    masked[idx, ys, xs] = patches[idx, sy, sx]
    mask = np.zeros(patches.shape, dtype=bool)
    mask[idx, ys, xs] = True
    return masked, mask


def crappify(
    clean: np.ndarray,
    rng: np.random.Generator,
    *,
    photons: tuple[float, float] = (5.0, 100.0),
    read_sigma: float = 2.0,
    blur_sigma: float = 0.0,
    downsample: int = 1,
) -> np.ndarray:
    """A noisy (and optionally blurred, downsampled) version of a clean frame in the clean
    frame's units: Poisson noise at a random peak of ``photons`` plus Gaussian read noise."""
    from scipy import ndimage

    x = np.asarray(clean, dtype=np.float32)
    lo, hi = np.percentile(x, [0.5, 99.9])
    scale = max(float(hi - lo), 1e-6)
    s = np.clip((x - lo) / scale, 0, None)
    if blur_sigma > 0:
        s = ndimage.gaussian_filter(s, blur_sigma)
    if downsample > 1:
        small = ndimage.zoom(s, 1.0 / downsample, order=1)
        s = ndimage.zoom(small, np.array(s.shape) / np.array(small.shape), order=1)
    peak = rng.uniform(*photons)
    noisy = rng.poisson(s * peak).astype(np.float32) + rng.normal(0.0, read_sigma, s.shape)
    return (noisy / peak * scale + lo).astype(np.float32)


def _as_stack(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 2:
        return a[None]
    if a.ndim != 3:
        raise ValueError(f"expected a frame (y, x) or a time-lapse (t, y, x), got shape {a.shape}")
    return a


def augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random quarter turn and mirror of the last two axes, the same for every channel of a
    sample (input and target stay aligned)."""
    k = int(rng.integers(4))
    batch = np.rot90(batch, k, axes=(-2, -1))
    if rng.random() < 0.5:
        batch = batch[..., ::-1]
    return np.ascontiguousarray(batch)


def fit(
    sources: np.ndarray | Sequence[np.ndarray],
    *,
    model: ModelFile | None = None,
    past_frames: int = 0,
    base: int = 16,
    depth: int = 3,
    max_channels: int = 64,
    steps: int = 400,
    batch: int = 16,
    patch: int = 64,
    lr: float | None = None,
    mask_fraction: float = 0.03,
    temporal: bool | None = None,
    clean: Sequence[np.ndarray] | None = None,
    offset: float | None = None,
    gain: float | None = None,
    vst: bool = True,
    time_budget_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "",
    callback: Callable[[int, float], None] | None = None,
    threads: int | None = None,
) -> FitResult:
    """Fit a model on ``sources``: frames (y, x) or time-lapses (t, y, x) of raw camera values.

    ``model`` continues from an existing model (its architecture wins over base/depth);
    ``temporal`` None uses neighbouring frames as targets whenever a source has more than one
    frame; ``clean`` switches to supervised training on crappified copies of those images.
    Stops after ``steps`` or ``time_budget_s``, whichever comes first. ``lr`` (the peak learning
    rate) defaults to 2e-3 from scratch and 5e-4 when continuing from ``model``: fine-tuning the
    shipped model on a held-out stream at 2e-3 ended 0.13 dB lower after 30 s (docs/denoising.md).
    """
    import torch

    from .unet import UNet

    if threads:
        torch.set_num_threads(int(threads))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    if lr is None:
        lr = 2e-3 if model is None else 5e-4
    if model is not None:
        net = model.build_torch().train()
        past_frames = model.k
        vst = bool(model.metadata["normalisation"].get("vst", True))
    else:
        net = UNet(1 + past_frames, base, depth, max_channels)
    k = past_frames
    patch = max(2**net.depth, patch - patch % 2**net.depth)

    supervised = clean is not None
    stacks: list[np.ndarray] = []
    seen: list[tuple[np.ndarray, Normalisation]] = []  # raw training frames and their normalisation
    if clean is not None:  # supervised
        stacks = [np.asarray(c, dtype=np.float32) for c in clean]
        src_desc = f"supervised on {len(stacks)} clean image(s), crappified"
    else:
        src = [sources] if isinstance(sources, np.ndarray) else list(sources)
        for s in src:
            s = _as_stack(s)
            norm = Normalisation.estimate(s, offset=offset, gain=gain, vst=vst)
            stacks.append(norm.forward(s))
            seen += [(f, norm) for f in s[:: max(1, len(s) // 8)][:8]]
        src_desc = ", ".join(f"{s.shape}" for s in stacks)
    for s in stacks:
        if min(s.shape[-2:]) < patch:
            raise ValueError(f"frames of {s.shape[-2:]} are smaller than the patch {patch}; lower patch")
    # every source equally often: a long time-lapse must not drown a single frame
    weights = np.full(len(stacks), 1.0 / len(stacks))

    def sample() -> tuple[np.ndarray, np.ndarray]:
        """(batch, 1 + k [+ 1 target], patch, patch): channels current, past..., [next]."""
        out = np.empty((batch, 2 + k, patch, patch), dtype=np.float32)
        has_next = np.zeros(batch, dtype=bool)
        for i in range(batch):
            s = stacks[rng.choice(len(stacks), p=weights)]
            if supervised:
                y0 = rng.integers(0, s.shape[-2] - patch + 1)
                x0 = rng.integers(0, s.shape[-1] - patch + 1)
                c = s[y0 : y0 + patch, x0 : x0 + patch] if s.ndim == 2 else s[0, y0 : y0 + patch, x0 : x0 + patch]
                noisy = crappify(c, rng)
                norm = Normalisation.estimate(noisy, vst=vst)
                out[i, 0] = norm.forward(noisy)
                out[i, 1 : 1 + k] = out[i, 0]
                out[i, -1] = norm.forward(c)
                has_next[i] = True
                continue
            t_count = s.shape[0]
            t = int(rng.integers(0, t_count))
            y0 = rng.integers(0, s.shape[-2] - patch + 1)
            x0 = rng.integers(0, s.shape[-1] - patch + 1)
            view = s[:, y0 : y0 + patch, x0 : x0 + patch]
            out[i, 0] = view[t]
            for j in range(1, k + 1):
                out[i, j] = view[max(t - j, 0)]
            use_pairs = temporal if temporal is not None else t_count > 1
            if use_pairs and t_count > 1:
                # the neighbouring frame; for k > 0 only the next one (t - 1 is an input)
                nxt: int | None
                if k == 0 and (t == t_count - 1 or (t > 0 and rng.random() < 0.5)):
                    nxt = t - 1
                else:
                    nxt = min(t + 1, t_count - 1) if t + 1 < t_count else None
                if nxt is not None:
                    out[i, -1] = view[nxt]
                    has_next[i] = True
        return augment(out, rng), has_next

    opt = torch.optim.Adam(net.parameters(), lr=lr)
    # a step count alone: one-cycle over the steps; with a time budget the schedule follows
    # whichever runs out first, so a run stopped by its budget still ends at a low learning rate
    one_cycle = (
        None
        if time_budget_s
        else torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    )

    def schedule(step: int) -> float:
        """Warm-up then cosine decay over whichever runs out first, steps or the time budget, so
        a run stopped by its budget still ends at a low learning rate."""
        frac = step / steps
        if time_budget_s:
            frac = max(frac, (time.perf_counter() - t0) / time_budget_s)
        frac = min(frac, 1.0)
        warm = min(1.0, frac / 0.05)
        return lr * warm * 0.5 * (1 + np.cos(np.pi * frac)) + lr * 0.01

    losses: list[float] = []
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="fitting denoiser", unit="step")
    net.train()
    for step in range(steps):
        data, has_next = sample()
        current = data[:, 0]
        if supervised:
            inp = data[:, : 1 + k]
            loss_mask = np.zeros_like(current, dtype=bool)
        else:
            masked, loss_mask = n2v_mask(current, mask_fraction, rng)
            inp = data[:, : 1 + k].copy()
            inp[:, 0] = masked
        pred = net(torch.from_numpy(inp))[:, 0]
        terms = []
        if loss_mask.any():
            m = torch.from_numpy(loss_mask)
            terms.append(((pred - torch.from_numpy(current)) ** 2)[m].mean())
        if has_next.any():
            sel = torch.from_numpy(has_next)
            terms.append(((pred[sel] - torch.from_numpy(data[:, -1])[sel]) ** 2).mean())
        loss = sum(terms)
        if one_cycle is None:
            for group in opt.param_groups:
                group["lr"] = schedule(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if one_cycle is not None:
            one_cycle.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            log.info("fitting stopped at step %d: time budget %.0f s spent", step + 1, time_budget_s)
            break
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    net.eval()
    meta: dict[str, Any] = {
        "training": {
            "data": description or src_desc,
            "method": "supervised-crappify"
            if supervised
            else (
                "noise2void"
                + ("+temporal-pairs" if any(s.shape[0] > 1 for s in stacks) and temporal is not False else "")
            ),
            "steps": len(losses),
            "batch": batch,
            "patch": patch,
            "lr": lr,
            "mask_fraction": mask_fraction,
            "seconds": round(seconds, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
        },
        "normalisation": {
            "vst": vst,
            "percentiles": [1.0, 99.8],
            "rule": "offset, generalised Anscombe with fitted or given gain, percentiles",
        },
    }
    features = _training_features(seen, stacks if supervised else [], vst, rng)
    if features is not None:
        meta["training_features"] = features
    try:
        from importlib.metadata import version

        ls_version = version("livescope")
    except Exception:
        ls_version = "unknown"
    meta["livescope_version"] = str(ls_version)
    return FitResult(ModelFile.from_net(net, meta), losses, seconds)


def _training_features(
    seen: list[tuple[np.ndarray, Normalisation]], clean: list[np.ndarray], vst: bool, rng: np.random.Generator
) -> dict[str, Any] | None:
    """Feature statistics of the training frames for the trust engine's distance check (None,
    logged, when the frames are too small for them). Supervised: noisy copies of the clean
    images, as the network saw them."""
    from .trust import FEATURE_TILE, feature_statistics, normalised_features

    for c in clean:
        img = c if c.ndim == 2 else c[0]
        noisy = crappify(img, rng)
        seen.append((noisy, Normalisation.estimate(noisy, vst=vst)))
    feats = [
        normalised_features(np.asarray(f, np.float32), n, shifts=True)
        for f, n in seen
        if min(np.shape(f)[-2:]) >= FEATURE_TILE
    ]
    try:
        return feature_statistics(feats) if feats else None
    except ValueError as exc:
        log.warning("no training feature statistics in the model (%s): its trust feature check will be off", exc)
        return None
