"""Camera noise calibration: the noise model that variance-stabilising transforms and trust
checks need, measured from the stream itself (and from dark frames when there are some).

Noise model (ADU, raw camera values ``x`` with expectation ``mu``)::

    var(x) = slope * (mu - offset) + read_var,    slope = gain * F**2

- ``gain``: ADU per photoelectron (the convention of the ``denoise`` engine; the inverse of
  "electrons per ADU" that camera data sheets often quote);
- ``F``: the excess-noise factor of an EMCCD's multiplication register (about sqrt(2) at high EM
  gain: the photon-transfer slope then shows twice the true gain; 1 for CCD and sCMOS). It
  cannot be told from gain by the noise alone, so it is a parameter;
- ``offset`` and ``read_var`` (read variance, quantisation included) are separable only with dark
  frames: without them a photon-transfer curve gives the line ``var = slope * mu + intercept``
  whose intercept ``read_var - slope * offset`` is all a variance-stabilising transform needs.

Photon-transfer curve from a stream: consecutive frames ``a, b`` give, per ``patch x patch``
block, the mean of ``(a + b) / 2`` and the variance of ``(a - b) / 2`` (the difference cancels
the static structure, so patches need not be flat); binned by brightness, a robust (median) variance
per bin, and a weighted line fit. Moving objects inflate some patches: the medians ignore them.
A single frame (no pair yet) uses a Laplacian residual instead (less exact: edges leak in).

sCMOS: dark frames give per-pixel offset and variance maps (``offset_map``, ``var_map``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

__all__ = [
    "CameraOffset",
    "Calibrator",
    "NoiseModel",
    "calibrate_file",
    "calibrate_stack",
    "dark_calibration",
    "estimate_offset",
    "fit_ptc",
    "frame_points",
    "pair_points",
]

log = logging.getLogger(__name__)

QUANTISATION_VAR = 1.0 / 12.0  # variance that rounding to integer ADU adds (Sheppard)


# --------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class NoiseModel:
    """Poisson-Gaussian camera noise: ``var = slope * (mu - offset) + read_var`` (ADU^2).

    ``intercept`` is ``read_var - slope * offset``: always known; ``offset`` / ``read_var``
    only when dark frames (or the user) gave them. ``offset_map`` / ``var_map`` (sCMOS) replace
    the scalars per pixel when present and shaped like the frame.
    """

    gain: float  # ADU per photoelectron (excess noise removed)
    intercept: float  # variance (ADU^2) the line gives at raw value 0
    offset: float | None = None
    read_var: float | None = None
    excess_noise: float = 1.0  # F; the photon-transfer slope is gain * F**2
    offset_map: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    var_map: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    points: int = 0  # patches the fit used
    source: str = "given"

    @property
    def slope(self) -> float:
        return self.gain * self.excess_noise**2

    @classmethod
    def from_camera(
        cls, gain: float, offset: float, read_noise: float, excess_noise: float = 1.0, quantised: bool = True
    ) -> NoiseModel:
        """From data-sheet values: gain (ADU/e-), offset (ADU), read noise (ADU rms)."""
        read_var = float(read_noise) ** 2 + (QUANTISATION_VAR if quantised else 0.0)
        slope = float(gain) * float(excess_noise) ** 2
        return cls(
            gain=float(gain),
            intercept=read_var - slope * float(offset),
            offset=float(offset),
            read_var=read_var,
            excess_noise=float(excess_noise),
            source="given",
        )

    def variance(self, expected: Any, floor: float = 1e-3) -> Any:
        """Variance (ADU^2) of raw values whose expectation (raw ADU, offset included) is
        ``expected``; works on numpy and cupy arrays alike."""
        slope = float(self.slope)
        if self.var_map is not None and self.offset_map is not None and np.shape(self.var_map) == np.shape(expected):
            xp = _xp(expected)
            off, var = xp.asarray(self.offset_map), xp.asarray(self.var_map)
            v = slope * xp.clip(expected - off, 0, None) + var
        elif self.offset is not None and self.read_var is not None:
            xp = _xp(expected)
            v = slope * xp.clip(expected - float(self.offset), 0, None) + float(self.read_var)
        else:
            v = slope * expected + float(self.intercept)
        xp = _xp(v)
        return xp.clip(v, floor, None)

    def stabilise(self, x: Any) -> Any:
        """Generalised Anscombe transform: noise of this model becomes unit-variance Gaussian."""
        xp = _xp(x)
        a = float(self.slope)
        if a <= 0:
            return (x - (self.offset or 0.0)) / math.sqrt(max(self.intercept, 1e-6))
        return (2.0 / a) * xp.sqrt(xp.clip(a * x + 0.375 * a * a + float(self.intercept), 0, None))

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (maps summarised): for provenance, the store and ``livescope calibrate``."""
        d: dict[str, Any] = {
            "gain_adu_per_e": self.gain,
            "e_per_adu": (1.0 / self.gain) if self.gain > 0 else None,
            "excess_noise_factor": self.excess_noise,
            "ptc_slope": self.slope,
            "intercept_adu2": self.intercept,
            "offset_adu": self.offset,
            "read_var_adu2": self.read_var,
            "points": self.points,
            "source": self.source,
        }
        if self.read_var is not None:
            rn = math.sqrt(max(self.read_var - QUANTISATION_VAR, 0.0))
            d["read_noise_adu"] = rn  # quantisation removed (Sheppard's correction)
            d["read_noise_e"] = rn / self.gain if self.gain > 0 else None
        if self.offset_map is not None:
            d["offset_map"] = {
                "shape": list(np.shape(self.offset_map)),
                "mean": float(np.mean(self.offset_map)),
                "std": float(np.std(self.offset_map)),
            }
        if self.var_map is not None:
            d["var_map"] = {
                "shape": list(np.shape(self.var_map)),
                "mean": float(np.mean(self.var_map)),
                "p99": float(np.percentile(self.var_map, 99)),
            }
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | str | Path) -> NoiseModel:
        """Inverse of :meth:`as_dict` (maps are not stored there); also reads a JSON file path."""
        if isinstance(d, (str, Path)):
            d = cast("dict[str, Any]", json.loads(Path(d).read_text()))
        return cls(
            gain=float(d["gain_adu_per_e"]),
            intercept=float(d["intercept_adu2"]),
            offset=None if d.get("offset_adu") is None else float(d["offset_adu"]),
            read_var=None if d.get("read_var_adu2") is None else float(d["read_var_adu2"]),
            excess_noise=float(d.get("excess_noise_factor", 1.0)),
            points=int(d.get("points", 0)),
            source=str(d.get("source", "file")),
        )


# --------------------------------------------------------------------------- the offset alone


def estimate_offset(frame: Any) -> float:
    """Camera offset estimated as the 0.1th percentile of 4x4-binned means: the darkest regions,
    with shot and read noise averaged down so a single dark pixel does not set it."""
    a = np.asarray(frame, dtype=np.float32)
    if a.ndim == 3:
        a = a.reshape(-1, a.shape[-1])
    ny, nx = (a.shape[0] // 4) * 4, (a.shape[1] // 4) * 4
    if ny == 0 or nx == 0:
        return float(a.min())
    binned = a[:ny, :nx].reshape(ny // 4, 4, nx // 4, 4).mean(axis=(1, 3))
    return float(np.percentile(binned, 0.1))


@dataclasses.dataclass
class CameraOffset:
    """The camera offset a deconvolution subtracts, in order: the one given (the engine's
    ``offset`` parameter), the stream's (``StreamSpec.camera_offset``), else one estimated from
    the stream's first frame and kept for the stream (``estimated``; :meth:`reset` forgets it)."""

    estimated: float | None = None

    def __call__(self, frame: Any, given: float | None, stream: float | None) -> float:
        if given is not None:
            return float(given)
        if stream is not None:
            return float(stream)
        if self.estimated is None:
            self.estimated = estimate_offset(frame)
            log.info("camera offset not given; estimated %.1f from the first frame", self.estimated)
        return self.estimated

    def reset(self) -> None:
        self.estimated = None


def _xp(a: Any) -> Any:
    if isinstance(a, np.ndarray) or np.isscalar(a):
        return np
    from ._array import namespace

    return namespace(a)


# --------------------------------------------------------------------------- measurements


def _blocks(a: np.ndarray, patch: int) -> np.ndarray:
    """(ny, nx, patch*patch) view of the frame cut into whole patches."""
    ny, nx = a.shape[0] // patch, a.shape[1] // patch
    a = a[: ny * patch, : nx * patch]
    return a.reshape(ny, patch, nx, patch).swapaxes(1, 2).reshape(ny, nx, patch * patch)


def _laplacian_residual(x: np.ndarray) -> np.ndarray:
    """(4 x - 4 neighbours) / sqrt(20), one pixel cropped at each edge: white noise keeps its
    variance, a locally linear signal cancels exactly."""
    return (4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]) / math.sqrt(20.0)


def pair_points(a: Any, b: Any, patch: int = 8, saturation: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Photon-transfer points from two frames of the same scene: per patch the mean of
    ``(a + b) / 2`` and the variance of ``(a - b) / 2`` (one frame's noise variance; the static
    structure cancels). Returns ``(means, variances, dof)``; saturated patches are left out."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pair_points needs two (y, x) frames of one shape, got {a.shape} and {b.shape}")
    # structure that moved between the frames leaves a smooth, locally linear difference: the
    # Laplacian residual removes it and keeps the variance of white noise unchanged
    d = _laplacian_residual(a - b)
    s = _blocks(((a + b) / 2)[1:-1, 1:-1], patch)
    means = s.mean(axis=-1).ravel()
    # var(a - b) = 2 var(one frame): halve it
    varis = (_blocks(d, patch).var(axis=-1, ddof=1) / 2).ravel()
    keep = np.ones(means.shape, bool)
    if saturation is not None:
        top = np.maximum(_blocks(a[1:-1, 1:-1], patch).max(axis=-1), _blocks(b[1:-1, 1:-1], patch).max(axis=-1)).ravel()
        keep &= top < saturation
    return means[keep], varis[keep], patch * patch - 1


def frame_points(frame: Any, patch: int = 8, saturation: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Photon-transfer points from one frame: per patch the mean and the variance of a
    Laplacian residual ``(4 x - 4 neighbours) / sqrt(20)`` (white noise keeps its variance,
    smooth signal cancels; edges leak in, which the binned medians of :func:`fit_ptc` resist)."""
    x = np.asarray(frame, dtype=np.float64)
    r = _laplacian_residual(x)
    c = x[1:-1, 1:-1]
    means = _blocks(c, patch).mean(axis=-1).ravel()
    # neighbouring residuals are correlated, so fewer effective degrees of freedom: the median
    # correction below is small either way
    varis = _blocks(r, patch).var(axis=-1, ddof=1).ravel()
    keep = np.ones(means.shape, bool)
    if saturation is not None:
        keep &= _blocks(c, patch).max(axis=-1).ravel() < saturation
    return means[keep], varis[keep], patch * patch - 1


def _median_bias(dof: int) -> float:
    """median(chi2_k / k): the median of a sample variance sits this fraction below the variance."""
    from scipy.stats import chi2

    return float(chi2.median(dof) / dof)


def fit_ptc(
    means: np.ndarray,
    variances: np.ndarray,
    dof: int,
    *,
    nbins: int = 24,
    excess_noise: float = 1.0,
    offset: float | None = None,
    read_var: float | None = None,
    source: str = "ptc",
) -> NoiseModel:
    """Fit the photon-transfer line ``var = slope * mean + intercept`` to patch points.

    Points are binned by mean (equal counts), each bin's variance is its median corrected for
    the median's bias, and the line is fitted with weights ``n / var^2`` (the variance of a
    bin's estimate). With ``offset`` and ``read_var`` from dark frames only the slope is fitted,
    through the dark point. The gain is the slope divided by ``excess_noise**2``.
    """
    means = np.asarray(means, np.float64)
    variances = np.asarray(variances, np.float64)
    ok = np.isfinite(means) & np.isfinite(variances)
    means, variances = means[ok], variances[ok]
    if means.size < 16:
        raise ValueError(f"too few patches ({means.size}) for a photon-transfer fit; give larger or more frames")
    nb = int(max(2, min(nbins, means.size // 16)))
    order = np.argsort(means)
    bias = _median_bias(dof)
    bm, bv, bn = [], [], []
    for idx in np.array_split(order, nb):
        bm.append(float(np.median(means[idx])))
        bv.append(float(np.median(variances[idx])) / bias)
        bn.append(idx.size)
    bm_a, bv_a, bn_a = np.asarray(bm), np.asarray(bv), np.asarray(bn, np.float64)
    w = bn_a / np.maximum(bv_a, 1e-6) ** 2
    if offset is not None and read_var is not None:
        dx = bm_a - offset
        dy = bv_a - read_var
        use = dx > 0
        if not np.any(use):
            raise ValueError("no patch brighter than the dark offset: the frames hold no signal to fit a gain")
        slope = float(np.sum(w[use] * dx[use] * dy[use]) / np.sum(w[use] * dx[use] ** 2))
        intercept = read_var - slope * offset
    else:
        # a flat scene still spreads the patch means by their noise (+-2.5 sigma over the bins)
        mean_sigma = math.sqrt(max(float(np.median(variances)), 1e-12) / (dof + 1))
        if np.ptp(bm_a) < 10 * mean_sigma:
            raise ValueError(
                "all patches have the same brightness: the gain needs a range of signal "
                "(a scene with structure, or several illumination levels)"
            )
        A = np.stack([bm_a, np.ones_like(bm_a)], axis=1) * np.sqrt(w)[:, None]
        slope, intercept = (float(v) for v in np.linalg.lstsq(A, bv_a * np.sqrt(w), rcond=None)[0])
    if slope <= 0:
        log.warning(
            "photon-transfer slope %.3g <= 0: the noise does not grow with the signal "
            "(too little signal range, or a scene that changed between frames)",
            slope,
        )
    gain = max(slope, 0.0) / float(excess_noise) ** 2
    return NoiseModel(
        gain=gain,
        intercept=float(intercept),
        offset=offset,
        read_var=read_var,
        excess_noise=float(excess_noise),
        points=int(means.size),
        source=source,
    )


def dark_calibration(darks: Any) -> dict[str, Any]:
    """Offset and read noise from dark frames ((t, y, x) or one (y, x) frame).

    With two frames or more: per-pixel temporal mean (``offset_map``) and variance (``var_map``,
    the sCMOS maps); ``offset`` is the map's mean, ``read_var`` the mean temporal variance. One
    frame: the spatial mean and variance (fixed-pattern noise then counts as read noise).
    """
    d = np.asarray(darks, dtype=np.float64)
    if d.ndim == 2:
        return {
            "offset": float(d.mean()),
            "read_var": float(d.var(ddof=1)),
            "offset_map": None,
            "var_map": None,
            "frames": 1,
        }
    d = d.reshape(-1, *d.shape[-2:])
    if d.shape[0] < 2:
        return dark_calibration(d[0])
    offset_map = d.mean(axis=0)
    var_map = d.var(axis=0, ddof=1)
    return {
        "offset": float(offset_map.mean()),
        "read_var": float(var_map.mean()),
        "offset_map": offset_map.astype(np.float32),
        "var_map": var_map.astype(np.float32),
        "frames": int(d.shape[0]),
    }


# --------------------------------------------------------------------------- incremental


class Calibrator:
    """Photon-transfer calibration that updates as frames arrive.

    ``add_frame`` pairs each frame with the previous one (same shape) and keeps the patch
    points of the last ``max_points``; ``add_dark`` accumulates per-pixel dark statistics
    (Welford); ``model()`` fits on what has been seen (a single frame: Laplacian residual).
    """

    def __init__(
        self, patch: int = 8, max_points: int = 200_000, excess_noise: float = 1.0, saturation: float | None = None
    ) -> None:
        self.patch = int(patch)
        self.max_points = int(max_points)
        self.excess_noise = float(excess_noise)
        self.saturation = saturation
        self._prev: np.ndarray | None = None
        self._means: list[np.ndarray] = []
        self._vars: list[np.ndarray] = []
        self._n = 0
        self._single: tuple[np.ndarray, np.ndarray, int] | None = None
        self.frames = 0
        self._dark_n = 0
        self._dark_mean: np.ndarray | None = None
        self._dark_m2: np.ndarray | None = None

    def add_frame(self, frame: Any) -> None:
        f = np.asarray(frame, dtype=np.float32)
        if f.ndim != 2:
            raise ValueError(f"Calibrator.add_frame takes (y, x) frames, got shape {f.shape}")
        self.frames += 1
        if self._prev is not None and self._prev.shape == f.shape:
            m, v, _ = pair_points(self._prev, f, self.patch, self.saturation)
            self._means.append(m)
            self._vars.append(v)
            self._n += m.size
            while self._n - self._means[0].size >= self.max_points:  # keep the most recent points
                self._n -= self._means.pop(0).size
                self._vars.pop(0)
        elif self._single is None:
            self._single = frame_points(f, self.patch, self.saturation)
        self._prev = f

    def add_dark(self, frame: Any) -> None:
        f = np.asarray(frame, dtype=np.float64)
        for plane in f.reshape(-1, *f.shape[-2:]):
            if self._dark_mean is None or self._dark_mean.shape != plane.shape:
                self._dark_n, self._dark_mean, self._dark_m2 = 0, np.zeros_like(plane), np.zeros_like(plane)
            self._dark_n += 1
            delta = plane - self._dark_mean
            self._dark_mean += delta / self._dark_n
            self._dark_m2 += delta * (plane - self._dark_mean)

    @property
    def pairs(self) -> int:
        return len(self._means)

    def dark(self) -> dict[str, Any] | None:
        if self._dark_n < 2 or self._dark_mean is None or self._dark_m2 is None:
            return None
        var_map = self._dark_m2 / (self._dark_n - 1)
        return {
            "offset": float(self._dark_mean.mean()),
            "read_var": float(var_map.mean()),
            "offset_map": self._dark_mean.astype(np.float32),
            "var_map": var_map.astype(np.float32),
            "frames": self._dark_n,
        }

    def points(self) -> tuple[np.ndarray, np.ndarray, int]:
        """The photon-transfer points seen so far: frame pairs, else the first frame's."""
        if self._means:
            return np.concatenate(self._means), np.concatenate(self._vars), self.patch * self.patch - 1
        if self._single is not None:
            return self._single
        raise ValueError("Calibrator has seen no frame yet")

    def model(self) -> NoiseModel:
        dark = self.dark()
        kw: dict[str, Any] = {"excess_noise": self.excess_noise}
        if dark is not None:
            kw.update(offset=dark["offset"], read_var=dark["read_var"])
        source = f"ptc, {self.pairs} frame pairs" if self._means else "single frame (Laplacian residual)"
        model = fit_ptc(*self.points(), source=source, **kw)
        if dark is not None:
            model = dataclasses.replace(
                model,
                offset_map=dark["offset_map"],
                var_map=dark["var_map"],
                source=model.source + f", {dark['frames']} dark frames",
            )
        return model


# --------------------------------------------------------------------------- files


def calibrate_stack(
    frames: Any, darks: Any = None, *, patch: int = 8, excess_noise: float = 1.0, saturation: float | None = None
) -> NoiseModel:
    """The noise model of a (t, y, x) stream (or one (y, x) frame), with optional dark frames."""
    cal = Calibrator(patch=patch, excess_noise=excess_noise, saturation=saturation)
    f = np.asarray(frames)
    for plane in f.reshape(-1, *f.shape[-2:]):
        cal.add_frame(plane)
    if darks is not None:
        d = np.asarray(darks)
        if d.reshape(-1, *d.shape[-2:]).shape[0] < 2:
            one = dark_calibration(d)  # a single dark frame: spatial statistics only
            return fit_ptc(
                *cal.points(),
                excess_noise=excess_noise,
                offset=one["offset"],
                read_var=one["read_var"],
                source="ptc + 1 dark frame",
            )
        cal.add_dark(d)
    return cal.model()


def calibrate_file(
    path: str | Path, dark: str | Path | None = None, *, patch: int = 8, excess_noise: float = 1.0
) -> dict[str, Any]:
    """``livescope calibrate INPUT [--dark DARK.tif]``: the noise model of a TIFF time-lapse
    (frames of one field, (t, y, x)), as plain numbers.

    Integer data saturating at ``2**bits - 1`` is detected from the dtype (patches touching the
    top value are left out).
    """
    import tifffile

    frames = tifffile.imread(str(path))
    if frames.ndim < 2:
        raise ValueError(f"{path}: not an image (shape {frames.shape})")
    sat = float(np.iinfo(frames.dtype).max) if frames.dtype.kind in "ui" else None
    darks = tifffile.imread(str(dark)) if dark is not None else None
    model = calibrate_stack(frames, darks, patch=patch, excess_noise=excess_noise, saturation=sat)
    out = model.as_dict()
    out["input"] = str(path)
    out["dark"] = None if dark is None else str(dark)
    out["frames"] = int(np.prod(frames.shape[:-2])) if frames.ndim > 2 else 1
    out["shape"] = list(frames.shape)
    if excess_noise == 1.0:
        out["note"] = (
            "for an EMCCD pass the excess-noise factor (about 1.41 at high EM gain): "
            "its noise doubles the apparent gain"
        )
    return out
