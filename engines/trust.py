"""Trust: every restored frame says how far to believe it.

The ``trust`` engine wraps a restoration engine (``restore="denoise"`` or ``"deconvolve"``),
runs it, and checks its product against the raw frame under the camera's noise model
(:mod:`.calibrate`):

- **residual** (denoising): ``raw - denoised`` must look like the camera's noise: standardised
  by the model's variance it should have unit variance and no spatial correlation. Structure
  left in it means signal was removed or invented;
- **re-blur** (deconvolution): the result blurred again with the engine's own PSF (plus the
  offset it removed) must reproduce the raw frame up to the noise: the same two tests;
- **tta** (networks): the model's prediction under flips and a rotation, mapped back, must
  agree: disagreement as a fraction of the noise's sigma. It costs three more inferences, so it
  runs on every ``tta_every``-th frame only;
- **features** (networks): how far the frame lies from the model's training data: per 32x32
  tile, eight statistics of the frame in the variance-stabilised units the model's
  normalisation gives (noise sigma 1: structure per scale, contrast, orientation coherence,
  skewness), and their Mahalanobis distance from the training tiles' mean and covariance, which
  ``fit`` stores in the model file (``training_features``). Runs on every ``feature_every``-th
  frame; a model file without the statistics has no feature score (``describe()`` says so);
- **split** (off by default, ``split_every``): the frame's photons split into two independent
  half-dose frames (binomial thinning, :mod:`.selftune`), each restored; where the two
  restorations disagree as much as two raw half-dose frames would, the restoration follows the
  noise (invents structure). Two extra restorations per checked frame.

Each check gives a map in [0, 1] (1: consistent with the noise) over windows of
``(2 radius + 1)^2`` pixels, and a frame score: the map's ``area`` quantile (the trust that all
but 1 % of the frame reaches). A score under its threshold adds an event
``{"kind": "trust", "product", "score", "threshold", ...}`` for the feedback channel.

Outputs for product ``P`` (``denoised`` / ``deconvolved``): the inner engine's outputs, the map
``trust_P`` (float32 image: the minimum of the maps of the checks run on the frame), the
scalars ``trust_P_score`` (residual or re-blur check), ``trust_P_tta`` and ``trust_P_features``
(sampled frames of networks only), ``trust_P_split`` (sampled frames, when on) and ``trust_P_ok``
(1.0 when every check computed on the frame passed). ``passes`` is the inner product, so the
chain continues with it.

The core functions are written against the array API (numpy, cupy, array_api_strict).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import _array
from .base import (
    Applies,
    Configurable,
    EngineBase,
    EngineError,
    FrameInfo,
    HasKernel,
    Param,
    RunsNetwork,
    StreamSpec,
    create_engine,
    engine_factory,
    is_none,
    optional,
    register_engine,
)
from .calibrate import Calibrator, NoiseModel
from .selftune import split_photons, to_photons

__all__ = [
    "FEATURE_NAMES",
    "THRESHOLDS",
    "Trust",
    "box_mean",
    "feature_statistics",
    "feature_trust",
    "frame_score",
    "normalised_features",
    "reblur",
    "residual_trust",
    "score_deconvolved",
    "score_denoised",
    "split_halves",
    "split_trust",
    "standardised_residual",
    "tile_features",
    "tta_predictions",
    "tta_trust",
]

log = logging.getLogger(__name__)

# Default thresholds on the frame scores, measured by `python bench/bench_trust.py --threads 2`
# (2000 in-distribution 128x128 frames: W2S renders, real W2S crops, held-out sim microscope
# frames; 1 % quantile of a random half, false alarms on the other half) with the shipped
# supervised denoiser (eeebda16ead25e30, 2026-12-02): residual 0.57 (0.0-1.3 % per source), tta
# 0.82 (sim 0.8 %, W2S 0 %). features: that run's half-sample 1 % quantile, 0.51, alarms on 6.5 %
# of held-out sim frames, so it is set to the 1 % quantile of all null frames, 0.48, fewer false
# alarms at the cost of some detections. The deconvolve re-blur threshold is the earlier
# full-bench value (0.52 in this run). The photon-split check (off by default: at the same
# false-alarm rate it catches no more artefacts, 2026-12-06) has the 1 % quantiles of all null
# frames, 0.60 (denoise; its half-sample quantile 0.61 alarms on 5 % of sim frames) and 0.50
# (deconvolve). Retraining the model means re-measuring these (docs/trust.md).
THRESHOLDS: dict[str, float] = {
    "denoise": 0.57,
    "deconvolve": 0.51,
    "tta": 0.82,
    "features": 0.48,
    "split_denoise": 0.60,
    "split_deconvolve": 0.50,
}

TRANSFORMS = ("fliplr", "flipud", "rot90")

# --------------------------------------------------------------------------- array helpers


def box_mean(a: Any, radius: int) -> Any:
    """Mean over a (2 radius + 1)^2 window, windows clipped at the frame's edges; an integral
    image, so it runs on any array-API namespace (no ndimage needed)."""
    xp = _array.namespace(a)
    h, w = a.shape
    c = xp.cumulative_sum(xp.cumulative_sum(xp.astype(a, xp.float64), axis=0), axis=1)
    c = xp.concat([xp.zeros((1, w), dtype=c.dtype), c], axis=0)
    c = xp.concat([xp.zeros((h + 1, 1), dtype=c.dtype), c], axis=1)
    iy = np.arange(h)
    ix = np.arange(w)
    y0, y1 = np.clip(iy - radius, 0, h), np.clip(iy + radius + 1, 0, h)
    x0, x1 = np.clip(ix - radius, 0, w), np.clip(ix + radius + 1, 0, w)

    def take(yy: np.ndarray, xx: np.ndarray) -> Any:
        rows = xp.take(c, xp.asarray(yy, dtype=xp.int64), axis=0)
        return xp.take(rows, xp.asarray(xx, dtype=xp.int64), axis=1)

    s = take(y1, x1) - take(y0, x1) - take(y1, x0) + take(y0, x0)
    count = xp.asarray(((y1 - y0)[:, None] * (x1 - x0)[None, :]).astype(np.float64))
    return xp.astype(s / count, a.dtype if a.dtype in (xp.float32, xp.float64) else xp.float32)


def _pad_last(p: Any, axis: int) -> Any:
    """Repeat the last row/column: lag products are one shorter than the frame."""
    xp = _array.namespace(p)
    last = p[-1:, :] if axis == 0 else p[:, -1:]
    return xp.concat([p, last], axis=axis)


def frame_score(trust_map: Any, area: float = 0.01, stride: int = 4) -> float:
    """The trust that all but ``area`` of the frame reaches (a low quantile of the map; the
    map is smooth over its windows, so every ``stride``-th pixel is enough)."""
    xp = _array.namespace(trust_map)
    sub = xp.reshape(trust_map[::stride, ::stride], (-1,))
    s = xp.sort(sub)
    k = int(min(max(math.floor(area * s.shape[0]), 0), s.shape[0] - 1))
    return float(s[k])


# --------------------------------------------------------------------------- checks


def standardised_residual(raw: Any, expected: Any, model: NoiseModel) -> Any:
    """``(raw - expected) / sigma(expected)``: unit-variance white noise when ``expected`` is
    the true signal and the noise model is right."""
    xp = _array.namespace(raw, expected)
    raw = xp.astype(raw, xp.float32)
    expected = xp.astype(expected, xp.float32)
    return (raw - expected) / xp.sqrt(model.variance(expected))


def residual_trust(z: Any, radius: int = 8) -> tuple[Any, dict[str, float]]:
    """Trust map of a standardised residual: local variance ``v`` (should be 1) and lag-1
    autocorrelation ``rho`` (should be 0): ``min(v, 1/v) * (1 - |rho|)``, clipped to [0, 1].

    The statistics are not centred on the local mean on purpose: a residual with a local bias
    (a removed or invented blob) is structure, and raises both ``v`` and ``rho``.
    Also returns the whole frame's ``var`` and ``rho`` (the naive baseline is ``var`` alone).
    """
    xp = _array.namespace(z)
    z = xp.astype(z, xp.float32)
    z2 = z * z
    px = _pad_last(z[:, 1:] * z[:, :-1], 1)
    py = _pad_last(z[1:, :] * z[:-1, :], 0)
    v = box_mean(z2, radius)
    rho = (box_mean(px, radius) + box_mean(py, radius)) / (2 * xp.clip(v, 1e-6, None))
    tmap = xp.minimum(v, 1.0 / xp.clip(v, 1e-6, None)) * (1.0 - xp.clip(xp.abs(rho), 0.0, 1.0))
    tmap = xp.clip(tmap, 0.0, 1.0)
    var = float(xp.mean(z2))
    rho_all = float((xp.mean(px) + xp.mean(py)) / (2 * max(var, 1e-6)))
    return xp.astype(tmap, xp.float32), {"var": var, "rho": rho_all}


def reblur(image: Any, psf: Any) -> Any:
    """``image`` convolved with the centred ``psf`` (same ndim), edges reflected so light does
    not wrap around; FFT-based (scipy.fft / cupyx / the namespace's fft)."""
    xp = _array.namespace(image)
    psf_np = np.asarray(_array.to_numpy(psf), dtype=np.float64)
    psf_np = psf_np / psf_np.sum()
    pads = [n // 2 + 1 for n in psf_np.shape]
    idx = []
    for n, p in zip(image.shape, pads, strict=True):
        i = np.arange(-p, n + p)
        i = np.abs(i)  # symmetric reflection, valid while p < n
        i = np.where(i > n - 1, 2 * (n - 1) - i, i)
        idx.append(np.clip(i, 0, n - 1))
    ext = image
    for ax, i in enumerate(idx):
        ext = xp.take(ext, xp.asarray(i, dtype=xp.int64), axis=ax)
    shape = tuple(ext.shape)
    grid = np.zeros(shape, dtype=np.float64)
    grid[tuple(slice(0, n) for n in psf_np.shape)] = psf_np
    grid = np.roll(grid, [-(n // 2) for n in psf_np.shape], axis=tuple(range(psf_np.ndim)))
    fft = _array.fft_module(image)
    otf = xp.asarray(np.fft.rfftn(grid).astype(np.complex64))
    ext = xp.astype(ext, xp.float32)
    axes = tuple(range(len(shape)))
    out = fft.irfftn(fft.rfftn(ext, axes=axes) * otf, s=shape, axes=axes)
    crop = tuple(slice(p, p + n) for p, n in zip(pads, image.shape, strict=True))
    return xp.astype(out[crop], xp.float32)


def score_denoised(
    raw: Any, denoised: Any, model: NoiseModel, *, radius: int = 8, area: float = 0.01
) -> tuple[Any, float, dict[str, float]]:
    """Residual check of a denoised frame: (map, frame score, whole-frame statistics)."""
    z = standardised_residual(raw, denoised, model)
    tmap, stats = residual_trust(z, radius)
    return tmap, frame_score(tmap, area), stats


def score_deconvolved(
    raw: Any, deconvolved: Any, psf: Any, model: NoiseModel, *, offset: float = 0.0, radius: int = 8, area: float = 0.01
) -> tuple[Any, float, dict[str, float]]:
    """Re-blur check of a deconvolved frame (offset removed, as the deconvolve engine gives it):
    ``reblur(deconvolved, psf) + offset`` against the raw frame under the noise model."""
    expected = reblur(deconvolved, psf) + offset
    return score_denoised(raw, expected, model, radius=radius, area=area)


def _apply(name: str, a: Any, inverse: bool = False) -> Any:
    xp = _array.namespace(a)
    if name == "fliplr":
        return xp.flip(a, axis=-1)
    if name == "flipud":
        return xp.flip(a, axis=-2)
    if name == "rot90":  # transpose then flip: its inverse is flip then transpose
        if inverse:
            return xp.permute_dims(xp.flip(a, axis=-1), (1, 0))
        return xp.flip(xp.permute_dims(a, (1, 0)), axis=-1)
    if name == "identity":
        return a
    raise EngineError(f"unknown test-time transform {name!r}; choose from {', '.join(TRANSFORMS)}")


def tta_predictions(predict: Callable[[Any], Any], raw: Any, transforms: Sequence[str] = TRANSFORMS) -> list[Any]:
    """The model's predictions on the transformed frame, each mapped back to the frame."""
    return [_apply(t, predict(_apply(t, raw)), inverse=True) for t in transforms]


def tta_trust(predictions: Sequence[Any], model: NoiseModel, radius: int = 8) -> tuple[Any, dict[str, float]]:
    """Agreement map of predictions under test-time augmentation:
    ``1 - sqrt(local mean of their variance / local mean of the noise variance)``, clipped to
    [0, 1]: 0 where the predictions disagree by as much as the camera noise itself."""
    xp = _array.namespace(*predictions)
    stack = xp.stack([xp.astype(p, xp.float32) for p in predictions])
    mean = xp.mean(stack, axis=0)
    spread = xp.var(stack, axis=0, correction=1)
    noise = model.variance(mean)
    ratio = box_mean(spread, radius) / box_mean(xp.astype(noise, xp.float32), radius)
    tmap = xp.clip(1.0 - xp.sqrt(xp.clip(ratio, 0.0, None)), 0.0, 1.0)
    return xp.astype(tmap, xp.float32), {"disagreement": float(xp.sqrt(xp.mean(spread) / xp.mean(noise)))}


# --------------------------------------------------------------------------- photon splitting


def split_halves(raw: Any, model: NoiseModel, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two independent half-dose frames of one raw frame, in the camera's ADU: its photons
    (``(raw - offset) / gain``, rounded) split by binomial thinning with p = 0.5, each part put
    back through the camera's gain and offset. Without a known offset (a stream calibration
    without dark frames) the offset is where the noise line meets zero variance,
    ``-intercept / slope`` (read noise then counts as a fraction of a photon)."""
    frame = np.asarray(_array.to_numpy(raw), dtype=np.float32)
    offset: Any
    if model.offset_map is not None and np.shape(model.offset_map) == frame.shape:
        offset = np.asarray(model.offset_map, dtype=np.float32)
    elif model.offset is not None:
        offset = float(model.offset)
    else:
        offset = -float(model.intercept) / float(model.slope)
    gain = float(model.gain)
    a, b = split_photons(to_photons(frame - offset, gain, 0.0), 0.5, rng)
    return (gain * a + offset).astype(np.float32), (gain * b + offset).astype(np.float32)


def split_trust(
    restored_a: Any, restored_b: Any, model: NoiseModel, radius: int = 8, psf: Any = None
) -> tuple[Any, dict[str, float]]:
    """Agreement of the restorations of two half-dose frames of one frame (:func:`split_halves`).

    Their photon noise is independent, so where the restoration keeps only the signal they
    agree; where it invents structure from the noise they disagree. The disagreement is measured
    against what two raw half-dose frames would show, ``2 var_model``:
    ``1 - sqrt(local mean of (a - b)^2 / local mean of 2 var_model((a + b) / 2))``, clipped to
    [0, 1]: 0 where the restorations differ as much as the raw halves do. Statistics:
    ``split_disagreement`` (the whole frame's ratio, as a sigma) and ``split_tail`` (the 99.9 %
    quantile of the standardised difference over its own robust sigma: isolated outliers).

    ``psf``: deconvolutions (offset added back) are compared re-blurred with it, in the data's
    units: deconvolution amplifies noise beyond the raw frame's wherever the PSF passes little."""
    xp = _array.namespace(restored_a, restored_b)
    a = xp.astype(restored_a, xp.float32)
    b = xp.astype(restored_b, xp.float32)
    if psf is not None:
        a, b = reblur(a, psf), reblur(b, psf)
    d = a - b
    noise = xp.astype(2.0 * model.variance((a + b) / 2), xp.float32)
    ratio = box_mean(d * d, radius) / box_mean(noise, radius)
    tmap = xp.clip(1.0 - xp.sqrt(xp.clip(ratio, 0.0, None)), 0.0, 1.0)
    s = np.abs(np.asarray(_array.to_numpy(d / xp.sqrt(noise)), dtype=np.float64))
    robust = max(1.4826 * float(np.median(s)), 1e-6)
    stats = {
        "split_disagreement": float(xp.sqrt(xp.mean(d * d) / xp.mean(noise))),
        "split_tail": float(np.quantile(s / robust, 0.999)),
    }
    return xp.astype(tmap, xp.float32), stats


# --------------------------------------------------------------------------- features

FEATURE_VERSION = 1
FEATURE_TILE = 32
FEATURE_NAMES = ("contrast", "level", "fine", "band_1_2", "band_2_4", "band_4_8", "coherence", "skewness")
_FINE_NOISE_GAIN: float | None = None  # variance white noise keeps in ``y - gaussian(y, 1)``


def _fine_noise_gain() -> float:
    global _FINE_NOISE_GAIN
    if _FINE_NOISE_GAIN is None:
        from scipy import ndimage

        d = np.zeros((33, 33))
        d[16, 16] = 1.0
        _FINE_NOISE_GAIN = float(np.sum((d - ndimage.gaussian_filter(d, 1.0)) ** 2))
    return _FINE_NOISE_GAIN


def _tile_means(a: Any, tile: int) -> Any:
    """Means over non-overlapping ``tile x tile`` blocks (the frame cropped to whole tiles)."""
    xp = _array.namespace(a)
    ny, nx = a.shape[0] // tile, a.shape[1] // tile
    b = xp.reshape(a[: ny * tile, : nx * tile], (ny, tile, nx, tile))
    return xp.mean(xp.mean(b, axis=3), axis=1)


def tile_features(stabilised: Any, *, low: float = 0.0, noise: float | None = 1.0, tile: int = FEATURE_TILE) -> Any:
    """Per ``tile x tile`` block, the :data:`FEATURE_NAMES` statistics of a frame in
    variance-stabilised units (the model's normalisation before its percentile scaling), as a
    (ny, nx, 8) float64 array:

    ``contrast`` log of the block's standard deviation; ``level`` asinh of its mean above ``low``
    (the frame's 1 % level); ``fine`` and ``band_*`` log energies of the detail the frame holds
    at each scale (differences of Gaussians, sigma 0-1, 1-2, 2-4, 4-8 px); ``coherence`` of the
    structure tensor (0 isotropic, 1 one orientation: lines); ``skewness`` (sparse bright
    structure). All in units of the noise ``noise`` (1 after a variance-stabilising transform;
    None estimates it from the finest scale, which then says nothing of the noise itself).
    numpy or cupy (scipy / cupyx ndimage).
    """
    xp = _array.namespace(stabilised)
    nd = _array.ndimage_module(stabilised)
    y = xp.astype(stabilised, xp.float32)
    if min(y.shape) < tile:
        raise ValueError(f"frame {tuple(y.shape)} is smaller than one feature tile ({tile} px)")
    g = [nd.gaussian_filter(y, s) for s in (1.0, 2.0, 4.0, 8.0)]
    fine = y - g[0]
    if noise is None:
        # median absolute deviation: structure touches few pixels of the finest scale
        med = float(np.median(_array.to_numpy(xp.abs(fine))))
        noise = max(1.4826 * med / math.sqrt(_fine_noise_gain()), 1e-6)
    inv = 1.0 / float(noise) ** 2
    eps = 1e-3  # log floor: a band with no detail at all (a flat test image) stays finite

    def energy(a: Any) -> Any:
        return xp.log(_tile_means(a * a, tile) * inv + eps)

    m = _tile_means(y, tile)
    ny, nx = m.shape
    crop = y[: ny * tile, : nx * tile]
    centred = crop - xp.reshape(xp.broadcast_to(m[:, None, :, None], (ny, tile, nx, tile)), crop.shape)
    var = _tile_means(centred * centred, tile)
    third = _tile_means(centred * centred * centred, tile)
    gx = nd.sobel(g[0], axis=1)
    gy = nd.sobel(g[0], axis=0)
    jxx, jyy, jxy = _tile_means(gx * gx, tile), _tile_means(gy * gy, tile), _tile_means(gx * gy, tile)
    coherence = xp.sqrt((jxx - jyy) ** 2 + 4 * jxy * jxy) / (jxx + jyy + 1e-6)
    feats = [
        0.5 * xp.log(var * inv + eps),
        xp.asinh((m - float(low)) / float(noise)),
        energy(fine),
        energy(g[0] - g[1]),
        energy(g[1] - g[2]),
        energy(g[2] - g[3]),
        coherence,
        third / (var + 1e-6) ** 1.5,
    ]
    return xp.astype(xp.stack(feats, axis=-1), xp.float64)


def normalised_features(raw: Any, norm: Any, *, shifts: bool = False, tile: int = FEATURE_TILE) -> Any:
    """:func:`tile_features` of a raw frame under a model's normalisation ``norm`` (an
    ``inference.Normalisation``: its variance-stabilised units, before the percentile scaling);
    ``shifts`` adds the tilings shifted by half a tile (4x the tiles: for training statistics).
    Returns (n_tiles, 8)."""
    xp = _array.namespace(raw)
    y = norm.forward(raw) * np.float32(norm.high - norm.low) + np.float32(norm.low)
    noise = 1.0 if float(getattr(norm, "gain", 0.0)) > 0 else None
    offsets = [(0, 0), (0, tile // 2), (tile // 2, 0), (tile // 2, tile // 2)] if shifts else [(0, 0)]
    parts = [
        xp.reshape(tile_features(y[dy:, dx:], low=float(norm.low), noise=noise, tile=tile), (-1, len(FEATURE_NAMES)))
        for dy, dx in offsets
        if min(y.shape[0] - dy, y.shape[1] - dx) >= tile
    ]
    return xp.concat(parts, axis=0)


def _mahalanobis_z(features: np.ndarray, stats: dict[str, Any]) -> np.ndarray:
    """RMS z-distance ``sqrt(d^2 / n_features)`` of each feature row from the training tiles."""
    f = np.asarray(features, np.float64).reshape(-1, len(stats["mean"]))
    diff = f - np.asarray(stats["mean"], np.float64)
    prec = np.linalg.inv(np.asarray(stats["cov"], np.float64))
    d2 = np.einsum("ij,jk,ik->i", diff, prec, diff)
    return np.sqrt(np.maximum(d2, 0.0) / f.shape[1])


def feature_statistics(features: Sequence[Any], *, shrinkage: float = 0.05, description: str = "") -> dict[str, Any]:
    """What a model file stores about its training data: mean and covariance of the training
    frames' tile features (:func:`tile_features`, any number of (..., 8) arrays), the covariance
    shrunk towards its diagonal so that a few hundred tiles give a stable inverse, and the
    quantiles of the training tiles' own z-distances (the map's scale)."""
    rows = np.concatenate(
        [np.asarray(_array.to_numpy(f), np.float64).reshape(-1, len(FEATURE_NAMES)) for f in features]
    )
    if rows.shape[0] < 4 * len(FEATURE_NAMES):
        raise ValueError(
            f"{rows.shape[0]} training tiles are too few for feature statistics; "
            f"need {4 * len(FEATURE_NAMES)} ({FEATURE_TILE}x{FEATURE_TILE} px each)"
        )
    mean = rows.mean(axis=0)
    cov = np.cov(rows, rowvar=False)
    cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov)) + 1e-6 * np.eye(cov.shape[0])
    stats: dict[str, Any] = {
        "version": FEATURE_VERSION,
        "names": list(FEATURE_NAMES),
        "tile": FEATURE_TILE,
        "units": "variance-stabilised (noise sigma 1)",
        "tiles": int(rows.shape[0]),
        "mean": mean.tolist(),
        "cov": cov.tolist(),
    }
    z = _mahalanobis_z(rows, stats)
    stats["z_quantiles"] = {q: float(np.quantile(z, float(q) / 100)) for q in ("50", "90", "99", "99.9")}
    if description:
        stats["data"] = description
    return stats


def feature_trust(
    stabilised: Any, stats: dict[str, Any], *, low: float = 0.0, noise: float | None = 1.0, area: float = 0.01
) -> tuple[Any, float, dict[str, float]]:
    """Distance of a frame from a model's training data: (map, frame score, statistics).

    Per tile, ``(z99 / z)^2`` clipped to 1, where ``z`` is the tile's RMS z-distance from the
    training tiles and ``z99`` the 99 % quantile of the training tiles' own: 1 for a tile as
    typical as 99 % of the training data, falling as the inverse squared distance beyond. The
    frame score is the ``area`` quantile of the tiles (the least typical tile on small frames);
    the map is the tiles' values spread over their pixels, smoothed over half a tile.
    """
    if int(stats.get("version", 0)) > FEATURE_VERSION or list(stats.get("names", ())) != list(FEATURE_NAMES):
        raise EngineError(
            "the model file's training feature statistics were written by a newer livescope "
            "(other features); upgrade livescope or refit the model"
        )
    xp = _array.namespace(stabilised)
    tile = int(stats.get("tile", FEATURE_TILE))
    feats = np.asarray(_array.to_numpy(tile_features(stabilised, low=low, noise=noise, tile=tile)))
    ny, nx = feats.shape[:2]
    z = _mahalanobis_z(feats, stats).reshape(ny, nx)
    z99 = float(stats["z_quantiles"]["99"])
    tiles = np.clip((z99 / np.maximum(z, 1e-6)) ** 2, 0.0, 1.0)
    flat = np.sort(tiles.reshape(-1))
    score = float(flat[int(min(max(math.floor(area * flat.size), 0), flat.size - 1))])
    h, w = stabilised.shape
    up = np.repeat(np.repeat(tiles, tile, axis=0), tile, axis=1)
    up = np.pad(up, ((0, h - up.shape[0]), (0, w - up.shape[1])), mode="edge").astype(np.float32)
    tmap = box_mean(xp.asarray(up), tile // 4)
    info = {"feature_z_median": float(np.median(z)), "feature_z_max": float(z.max()), "z99_training": z99}
    return xp.astype(tmap, xp.float32), score, info


# --------------------------------------------------------------------------- engine

_CAMERA = ("gain", "offset", "read_noise", "excess_noise", "calibration")  # also the inner engine's, if it takes them


def _check_restore(restore: str) -> str | None:
    if restore == "trust":
        return "trust cannot wrap itself; restore= names a restoration engine (denoise, deconvolve)"
    return None


def _transforms(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [t.strip() for t in value.split(",") if t.strip()]
    transforms = tuple(str(t) for t in value)
    for t in transforms:
        _apply(t, np.zeros((2, 2)))  # unknown names fail here, not mid-stream
    return transforms


def _excess_noise(value: Any) -> float:
    return 1.0 if is_none(value) else float(value)


def _calibration(value: Any) -> Any:
    return None if is_none(value) else value


def _show_calibration(value: Any) -> Any:
    if isinstance(value, NoiseModel):
        return value.as_dict()
    return str(value) if isinstance(value, Path) else value


def _inner_parameters(engine: Any) -> set[str]:
    if isinstance(engine, Configurable):
        return set(engine.parameters)
    return set(inspect.signature(type(engine)).parameters)


def _product(restore: str) -> str:
    outs = tuple(engine_factory(restore).outputs)  # type: ignore[attr-defined]
    return outs[0]


@register_engine("trust")
class Trust(EngineBase):
    """Run a restoration engine and say how far to believe each of its frames.

    ``create_engine("trust", restore="denoise", backend="onnxruntime", tile=0)``: keywords that
    are not the trust engine's own go to the inner engine (``gain``/``offset`` go to both when
    the inner engine takes them). Noise model, in order: ``calibration`` (a dict or JSON file
    from ``livescope calibrate``), else ``gain`` + ``offset`` + ``read_noise`` (ADU/e-, ADU, ADU
    rms; ``excess_noise`` F for an EMCCD), else calibrated from the stream's first
    ``calibrate_frames`` frames (photon-transfer curve of consecutive pairs), then held fixed so
    a later change of the camera shows.
    """

    name: ClassVar[str] = "trust"
    # class-level declaration for the default restore="denoise"; instances set their own
    outputs: ClassVar[tuple[str, ...]] = (
        "denoised",
        "trust_denoised",
        "trust_denoised_score",
        "trust_denoised_tta",
        "trust_denoised_features",
        "trust_denoised_split",
        "trust_denoised_ok",
    )
    scalar_outputs: ClassVar[tuple[str, ...]] = (
        "trust_denoised_score",
        "trust_denoised_tta",
        "trust_denoised_features",
        "trust_denoised_split",
        "trust_denoised_ok",
    )
    saved_by_default: ClassVar[tuple[str, ...] | None] = ("denoised", "trust_denoised")  # and where to trust it

    # the camera's parameters start the noise model over (and go to the inner engine too when it
    # takes them); None thresholds take the measured defaults (THRESHOLDS)
    parameters: ClassVar[dict[str, Param]] = {
        "restore": Param(
            "denoise",
            str,
            check=_check_restore,
            applies=Applies.FIXED,
            fixed="trust: restore cannot change live; start the stream with the other engine",
        ),
        "gain": Param(None, optional(float), applies=Applies.RESET, doc="ADU per photoelectron"),
        "offset": Param(None, optional(float), applies=Applies.RESET, doc="camera offset, ADU"),
        "read_noise": Param(None, optional(float), applies=Applies.RESET, doc="ADU rms"),
        "excess_noise": Param(1.0, _excess_noise, applies=Applies.RESET, doc="EMCCD excess-noise factor F"),
        "calibration": Param(
            None,
            _calibration,
            applies=Applies.RESET,
            show=_show_calibration,
            doc="livescope calibrate's dict or JSON file",
        ),
        "calibrate_frames": Param(16, int, applies=Applies.RESET, doc="frames the noise model is fitted on"),
        "radius": Param(8, int, doc="trust windows of (2 radius + 1)^2 px"),
        "area": Param(0.01, float, doc="the frame score: the map's area quantile"),
        "threshold": Param(None, optional(float), doc="residual / re-blur score under which an event fires"),
        "tta_threshold": Param(None, optional(float)),
        "tta_every": Param(10, int, doc="test-time augmentation on every n-th frame; 0: never"),
        "tta_transforms": Param(TRANSFORMS, _transforms, show=list),
        "feature_every": Param(5, int, doc="feature distance on every n-th frame; 0: never"),
        "feature_threshold": Param(None, optional(float)),
        "split_every": Param(0, int, doc="photon-split check on every n-th frame (two restorations); 0: never"),
        "split_threshold": Param(None, optional(float)),
    }

    # the parameters as ``_init_params`` sets them (converted and checked; the None thresholds
    # resolved by ``_validate``)
    restore: str
    gain: float | None
    offset: float | None
    read_noise: float | None
    excess_noise: float
    calibration: str | Path | dict[str, Any] | None
    calibrate_frames: int
    radius: int
    area: float
    threshold: float
    tta_threshold: float
    tta_every: int
    tta_transforms: tuple[str, ...]
    feature_every: int
    feature_threshold: float
    split_every: int
    split_threshold: float

    def __init__(
        self,
        restore: str = "denoise",
        gain: float | None = None,
        offset: float | None = None,
        read_noise: float | None = None,
        excess_noise: float = 1.0,
        calibration: str | Path | dict[str, Any] | None = None,
        calibrate_frames: int = 16,
        radius: int = 8,
        area: float = 0.01,
        threshold: float | None = None,
        tta_threshold: float | None = None,
        tta_every: int = 10,
        tta_transforms: Sequence[str] | str = TRANSFORMS,
        feature_every: int = 5,
        feature_threshold: float | None = None,
        split_every: int = 0,
        split_threshold: float | None = None,
        **inner_params: Any,
    ) -> None:
        self._init_params(locals())  # trust's own; inner_params go to the inner engine
        factory = engine_factory(self.restore)
        accepted = set(inspect.signature(factory).parameters)
        self.inner_params = dict(inner_params)
        for key in _CAMERA:  # camera facts the inner engine may use too (denoise: its normalisation)
            if getattr(self, key) is not None and key in accepted and key not in self.inner_params:
                self.inner_params[key] = getattr(self, key)
        unknown = set(self.inner_params) - accepted
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values()):
            raise EngineError(
                f"trust: neither trust nor {self.restore} has parameter(s) {', '.join(sorted(unknown))}; "
                f"trust has: {', '.join(self.parameters)}"
            )
        self.inner = create_engine(self.restore, **self.inner_params)
        self.product = _product(self.restore)
        p = self.product
        scalars = (
            f"trust_{p}_score",
            f"trust_{p}_tta",
            f"trust_{p}_features",
            f"trust_{p}_split",
            f"trust_{p}_ok",
        )
        self.outputs = (*self.inner.outputs, f"trust_{p}", *scalars)  # type: ignore[misc]
        self.scalar_outputs = (*getattr(self.inner, "scalar_outputs", ()), *scalars)  # type: ignore[misc]
        self.spec: StreamSpec | None = None
        self._model: NoiseModel | None = None
        self._calibrator: Calibrator | None = None
        self._fixed = False
        self._warned_tta = False
        self._warned_features = False
        self._warned_split = False
        self._halves: Any = None  # the split check's own instance of a network (its own normalisation)

    def _validate(self) -> None:
        if self.threshold is None:
            self.threshold = float(THRESHOLDS.get(self.restore, THRESHOLDS["denoise"]))
        if self.tta_threshold is None:
            self.tta_threshold = float(THRESHOLDS["tta"])
        if self.feature_threshold is None:
            self.feature_threshold = float(THRESHOLDS["features"])
        if self.split_threshold is None:
            self.split_threshold = float(
                THRESHOLDS["split_deconvolve" if self.restore == "deconvolve" else "split_denoise"]
            )

    # ------------------------------------------------------------------ protocol

    @property
    def passes(self) -> str:  # the chain continues with the inner engine's product
        return self.product

    @property
    def needs_volume(self) -> bool:
        return bool(getattr(self.inner, "needs_volume", False))

    @property
    def window(self) -> int:
        return int(getattr(self.inner, "window", 0))

    def setup(self, spec: StreamSpec) -> None:
        if self.needs_volume:
            raise EngineError("trust checks single planes; run the inner engine with volume=False")
        self.spec = spec
        self.inner.setup(spec)
        if self._halves is not None:
            self._halves.setup(spec)
        self._reset_model()

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        out = dict(self.inner.process(frame, info))
        restored = out[self.product]
        raw = np.asarray(_array.to_numpy(frame), dtype=np.float32)
        model = self._noise_model(raw)
        p = self.product
        if self.restore == "deconvolve":
            psf, offset = self._inner_psf(raw)
            tmap, score, stats = score_deconvolved(
                raw,
                np.asarray(_array.to_numpy(restored)),
                psf,
                model,
                offset=offset,
                radius=self.radius,
                area=self.area,
            )
        else:
            tmap, score, stats = score_denoised(
                raw, np.asarray(_array.to_numpy(restored)), model, radius=self.radius, area=self.area
            )
        events: list[dict[str, Any]] = []
        ok = score >= self.threshold
        if not ok:
            events.append(
                self._event(
                    "residual" if self.restore != "deconvolve" else "reblur", score, self.threshold, info, stats
                )
            )
        out[f"trust_{p}_score"] = score
        if self.tta_every > 0 and info.seq % self.tta_every == 0:
            predict = self._predictor()
            if predict is not None:
                preds = [np.asarray(_array.to_numpy(restored), np.float32)]
                preds += tta_predictions(predict, raw, self.tta_transforms)
                tmap_tta, tstats = tta_trust(preds, model, self.radius)
                tscore = frame_score(tmap_tta, self.area)
                out[f"trust_{p}_tta"] = tscore
                tmap = np.minimum(tmap, tmap_tta)
                if tscore < self.tta_threshold:
                    ok = False
                    events.append(self._event("tta", tscore, self.tta_threshold, info, tstats))
        if self.feature_every > 0 and info.seq % self.feature_every == 0:
            found = self._features_input(raw)
            if found is not None:
                stabilised, stats, low, noise = found
                fmap, fscore, fstats = feature_trust(stabilised, stats, low=low, noise=noise, area=self.area)
                out[f"trust_{p}_features"] = fscore
                tmap = np.minimum(tmap, fmap)
                if fscore < self.feature_threshold:
                    ok = False
                    events.append(self._event("features", fscore, self.feature_threshold, info, fstats))
        if self.split_every > 0 and info.seq % self.split_every == 0:
            halves = self._restore_halves(raw, model, info)
            if halves is not None:
                split_psf = self._inner_psf(raw)[0] if self.restore == "deconvolve" else None
                smap, sstats = split_trust(*halves, model, self.radius, psf=split_psf)
                sscore = frame_score(smap, self.area)
                out[f"trust_{p}_split"] = sscore
                tmap = np.minimum(tmap, smap)
                if sscore < self.split_threshold:
                    ok = False
                    events.append(self._event("split", sscore, self.split_threshold, info, sstats))
        out[f"trust_{p}"] = np.asarray(tmap, dtype=np.float32)
        out[f"trust_{p}_ok"] = 1.0 if ok else 0.0
        if events:
            out["events"] = list(out.get("events") or []) + events
        return out

    def set_param(self, name: str, value: Any) -> None:
        """Trust's own parameters here, the camera's to the inner engine too (when it takes them),
        the rest to the inner engine."""
        if name not in self.parameters:
            try:
                self.inner.set_param(name, value)  # type: ignore[attr-defined]
            except KeyError as exc:
                raise KeyError(
                    f"neither trust nor {self.restore} has parameter {name!r}; trust has: "
                    f"{', '.join(self.parameters)} ({exc.args[0] if exc.args else ''})"
                ) from None
            if self._halves is not None:  # the split check's instance follows the stream's
                self._halves.set_param(name, value)
            return
        if name in _CAMERA and name in _inner_parameters(self.inner):
            self.inner.set_param(name, value)  # type: ignore[attr-defined]
            if self._halves is not None:
                self._halves.set_param(name, value)
        super().set_param(name, value)

    def _reset_state(self, name: str) -> None:  # the camera: the noise model starts over
        self._reset_model()

    def _details(self) -> dict[str, Any]:
        model = self._model
        return {
            "inner": self.inner.describe() if hasattr(self.inner, "describe") else {},
            "noise_model": model.as_dict() if model is not None else None,
            "noise_model_fixed": self._fixed,
            "feature_check": self._feature_status(),
            "split_check": f"on, every {self.split_every} frame(s)" if self.split_every > 0 else "off (split_every 0)",
            "thresholds_source": "bench/bench_trust.py (docs/trust.md)",
        }

    def close(self) -> None:
        for eng in (self.inner, self._halves):
            if hasattr(eng, "close"):
                eng.close()

    # ------------------------------------------------------------------ helpers

    @property
    def noise_model(self) -> NoiseModel | None:
        return self._model

    def _reset_model(self) -> None:
        self._model, self._calibrator, self._fixed = None, None, False
        calibration = self.calibration
        if calibration is None and self.spec is not None:  # the daemon's --calibration FILE
            calibration = dict(self.spec.extra or {}).get("calibration")
        if calibration is not None:
            self._model = NoiseModel.from_dict(calibration)
            self._fixed = True
        elif self.gain is not None and self.offset is not None and self.read_noise is not None:
            self._model = NoiseModel.from_camera(self.gain, self.offset, self.read_noise, self.excess_noise)
            self._fixed = True
        else:
            sat = float(self.spec.saturation) if self.spec is not None else None
            self._calibrator = Calibrator(excess_noise=self.excess_noise, saturation=sat)

    def _noise_model(self, raw: np.ndarray) -> NoiseModel:
        if self._fixed and self._model is not None:
            return self._model
        if self._calibrator is None:
            self._reset_model()
            return self._noise_model(raw)
        cal = self._calibrator
        if cal.frames < self.calibrate_frames:
            cal.add_frame(raw)
            try:
                self._model = cal.model()
            except ValueError as exc:
                if self._model is None:
                    raise EngineError(
                        f"trust: cannot calibrate the camera noise from this frame ({exc}); "
                        "give calibration=FILE.json (livescope calibrate) or gain, offset "
                        "and read_noise"
                    ) from exc
            if cal.frames >= self.calibrate_frames:
                self._fixed = True
                log.info("trust: noise model fixed after %d frames: %s", cal.frames, self._model)
        assert self._model is not None
        return self._model

    def _inner_psf(self, raw: np.ndarray) -> tuple[np.ndarray, float]:
        inner = self.inner
        psf = inner.kernel if isinstance(inner, HasKernel) else None
        if psf is None or not isinstance(inner, HasKernel):
            raise EngineError(
                "trust: the deconvolve engine exposes no PSF (its kernel: method='net' has none); cannot re-blur"
            )
        return np.asarray(psf), float(inner.camera_offset(raw))

    def _network(self) -> RunsNetwork | None:
        return self.inner if isinstance(self.inner, RunsNetwork) else None

    def _predictor(self) -> Callable[[np.ndarray], np.ndarray] | None:
        """A stateless prediction of the inner network on any frame (its ``predict``, under the
        stream's fixed normalisation); None for classical engines, before the stream's first
        frame, and for models that take past frames."""
        net = self._network()
        if net is None or net.model_file is None or net.normalisation is None:
            return None
        if net.model_file.k:
            if not self._warned_tta:
                log.warning("trust: test-time augmentation skipped: the model takes past frames")
                self._warned_tta = True
            return None
        return net.predict

    def _restore_halves(self, raw: np.ndarray, model: NoiseModel, info: FrameInfo) -> tuple[Any, Any] | None:
        """The frame's photons split into two half-dose frames, each restored (in ADU, the offset
        back on a deconvolution); None for models that take past frames (said once). A network
        restores them in an instance of its own: its normalisation is fixed on the first half-dose
        frame, as the stream's is on its first frame; a classical engine keeps no state."""
        net = self._network()
        if net is not None and net.model_file is not None and net.model_file.k:
            if not self._warned_split:
                log.warning("trust: photon-split check skipped: the model takes past frames")
                self._warned_split = True
            return None
        eng = self.inner
        if net is not None:
            if self._halves is None:
                self._halves = create_engine(self.restore, **self.inner_params)
                self._halves.setup(self.spec or StreamSpec(shape=raw.shape))
            eng = self._halves
        a, b = split_halves(raw, model, np.random.default_rng(info.seq))
        key = self.product
        ra, rb = (np.asarray(_array.to_numpy(eng.process(h, info)[key]), np.float32) for h in (a, b))
        if self.restore == "deconvolve":
            offset = float(self.inner.camera_offset(raw)) if isinstance(self.inner, HasKernel) else 0.0
            ra, rb = ra + np.float32(offset), rb + np.float32(offset)
        return ra, rb

    def _training_features(self) -> dict[str, Any] | None:
        net = self._network()
        if net is None or net.model_file is None:
            return None
        return net.model_file.metadata.get("training_features")

    def _feature_status(self) -> str:
        net = self._network()
        if net is None:
            return f"unavailable: {self.restore} is not a network"
        if net.model_file is None:
            return "not yet known (before setup)"
        stats = self._training_features()
        if stats is None:
            return (
                "unavailable: the model file has no training feature statistics (fitted before "
                "livescope stored them); refit it or run engines/models/add_feature_stats.py --model FILE"
            )
        if self.feature_every <= 0:
            return "off (feature_every 0)"
        return f"on, every {self.feature_every} frame(s): {stats.get('tiles')} training tiles" + (
            f" of {stats['data']}" if stats.get("data") else ""
        )

    def _features_input(self, raw: np.ndarray) -> tuple[np.ndarray, dict[str, Any], float, float | None] | None:
        """The frame in the model's variance-stabilised units, the training statistics, and the
        normalisation's low level and noise; None when the check cannot run (said once)."""
        stats = self._training_features()
        net = self._network()
        norm = net.normalisation if net is not None else None
        if stats is None or norm is None or min(raw.shape) < int(stats.get("tile", FEATURE_TILE)):
            if not self._warned_features and net is not None and net.model_file is not None:
                log.warning(
                    "trust: feature check skipped: %s",
                    self._feature_status() if stats is None else "the frame is smaller than one feature tile",
                )
                self._warned_features = True
            return None
        stabilised = norm.forward(raw) * np.float32(norm.high - norm.low) + np.float32(norm.low)
        noise = 1.0 if float(norm.gain) > 0 else None
        return stabilised, stats, float(norm.low), noise

    def _event(
        self, check: str, score: float, threshold: float, info: FrameInfo, stats: dict[str, float]
    ) -> dict[str, Any]:
        ev = {
            "kind": "trust",
            "product": self.product,
            "check": check,
            "score": float(score),
            "threshold": float(threshold),
            "seq": int(info.seq),
        }
        ev.update({k: float(v) for k, v in stats.items()})
        ev.update({k: int(v) for k, v in info.index.items()})
        return ev
