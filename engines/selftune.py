"""Restoration that tunes itself from the stream: photon splitting, and resolution by FRC.

A frame's photons can be split at random into two independent frames (binomial thinning: each
detected photon goes to part A with probability ``p``, else to part B). Both parts see the same
sample through the same optics; their noise is independent. So a restoration of A can be scored
against B, with no ground truth:

    score(setting) = | T f_A(setting) / p  -  T B / ((1-p) OTF) |^2   where |OTF| > otf_floor

with ``f_A`` part A restored with the setting, ``T`` the orthonormal transform in which the PSF
acts as a multiplier (the DCT for mirror boundaries) and ``T B / OTF`` an unbiased estimate of the
object from part B. B's noise is independent of f_A, so in expectation the score is f_A's own
squared error there plus a constant: the lowest score marks the best setting. (Scoring B's Poisson
likelihood given the re-blurred f_A instead, ``criterion="poisson"``, is blind to the noise a
setting amplifies where the PSF passes little, and picked 1-2 iterations too many: up to 1.4 dB
below the best; docs/selftune.md.) ``p``, the share of A, and ``otf_floor`` were chosen on a
calibration image only.

Richardson-Lucy's iterations are computed once per back projector and every iteration count is
scored on the way (:func:`livescope.engines.rl.rl_iterates`).

The same two parts give the resolution: the Fourier ring correlation (FRC) of two independent
images of one sample falls to 1/7 at the finest spatial frequency they still share
(Nieuwenhuizen et al. 2013); its inverse is the resolution, in pixels or, with the pixel size, in
nm. For a restored product, both parts are restored with the same setting and their FRC taken.

Camera values are turned into photons with the camera's gain (ADU per photo-electron) and offset
(``livescope calibrate`` measures both; the stream's own estimate otherwise). Read noise makes
the counts only approximately Poisson; at the light levels where tuning matters most (tens of
photons) it is small against the shot noise.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .rl import DEFAULT_START, DCTPlan, DeconvolutionPlan, check_start, choose_boundary, forward, make_plan, rl_iterates

__all__ = [
    "Candidate",
    "TuneResult",
    "frc_curve",
    "frc_resolution",
    "split_photons",
    "to_photons",
    "tune_deconvolution",
]

# the iteration counts scored per back projector (a search over the counts costs the largest)
RL_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48)
WB_COUNTS = (1, 2, 3, 4, 6)
WB_ALPHAS = (0.001, 0.01, 0.1)
STARTS = (DEFAULT_START,)  # the image start is not a candidate: measured, docs/selftune.md
FRC_THRESHOLD = 1.0 / 7.0


@dataclasses.dataclass(frozen=True)
class Candidate:
    method: str  # "rl" (classic back projector) or "wb" (Wiener-Butterworth)
    iterations: int
    alpha: float | None = None  # WB only
    start: str = DEFAULT_START  # the first estimate (rl.STARTS)
    denoised: bool = False  # deconvolve the denoiser's output (the chain's denoise first), not the raw

    def params(self) -> dict[str, Any]:
        """As the deconvolve engine's parameters (``start`` only where it is not the default)."""
        out: dict[str, Any] = {"method": self.method, "iterations": self.iterations}
        if self.method == "wb":
            out["alpha"] = self.alpha
        if self.start != DEFAULT_START:
            out["start"] = self.start
        return out


@dataclasses.dataclass
class TuneResult:
    best: Candidate
    scores: dict[Candidate, float]  # the criterion's score per setting (lower is better)
    p: float
    photons: float  # photons in the frame (after the offset)

    def summary(self) -> dict[str, Any]:
        ranked = sorted(self.scores.items(), key=lambda kv: kv[1])
        return {
            "best": self.best.params(),
            "p": self.p,
            "photons_per_pixel": self.photons,
            "denoise_first": self.best.denoised,
            "ranking": [{**c.params(), "denoised": c.denoised, "score": round(s, 6)} for c, s in ranked[:5]],
        }


# -- photons --------------------------------------------------------------------------------------
def to_photons(frame: Any, gain: float, offset: float) -> np.ndarray:
    """Camera values (ADU) as whole photo-electrons: (value - offset) / gain, rounded, >= 0."""
    if not gain > 0:
        raise ValueError(f"gain must be positive (ADU per photo-electron), got {gain!r}: run livescope calibrate")
    x = (np.asarray(frame, dtype=np.float64) - float(offset)) / float(gain)
    return np.maximum(np.rint(x), 0.0)


def split_photons(counts: Any, p: float = 0.5, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two independent images of the same sample: each photon goes to the first with probability
    ``p`` (binomial thinning), the rest to the second."""
    if not 0 < p < 1:
        raise ValueError(f"p must be between 0 and 1, got {p!r}")
    rng = rng if rng is not None else np.random.default_rng()
    n = np.asarray(counts)
    if n.dtype.kind == "f":
        n = np.rint(np.maximum(n, 0)).astype(np.int64)
    a = rng.binomial(n, p).astype(np.float32)
    return a, (n - a).astype(np.float32)


# -- scoring --------------------------------------------------------------------------------------
def _plan(psf: np.ndarray, shape: tuple[int, ...], method: str, alpha: float | None) -> DeconvolutionPlan | DCTPlan:
    import scipy.fft

    boundary = choose_boundary(psf, shape, scipy.fft, "auto")
    boundary = "dct" if boundary == "dct" else "periodic"
    wb = {} if alpha is None else {"alpha": alpha}
    return make_plan(psf, shape, method, np, boundary="dct" if boundary == "dct" else "reflect", **wb)


def _transform(plan: Any) -> Any:
    """The orthonormal transform in which the plan's OTF multiplies: DCT-II (mirror boundaries) or
    the real FFT (periodic)."""
    import scipy.fft

    if plan.boundary == "dct":
        return lambda x: scipy.fft.dctn(np.asarray(x, dtype=np.float64), norm="ortho")
    return lambda x: scipy.fft.rfftn(np.asarray(x, dtype=np.float64), norm="ortho")


def _object_error(est: np.ndarray, b_coeffs: np.ndarray, keep: np.ndarray, p: float, transform: Any) -> float:
    """Squared error of ``est`` (from part A) against an unbiased estimate of the object from part
    B (its DCT coefficients divided by the OTF), over the frequencies where the OTF passes at least
    ``keep``: in expectation the restoration's own error there plus a constant that does not depend
    on the setting, so the best setting has the lowest score. Unlike the likelihood of B given
    the re-blurred estimate, it sees the noise a setting amplifies where the PSF passes little."""
    diff = transform(est)[keep] / p - b_coeffs
    return float(np.mean(np.abs(diff) ** 2))


def _nll(pred: np.ndarray, target: np.ndarray) -> float:
    pred = np.maximum(pred, 1e-6)
    return float(np.mean(pred - target * np.log(pred)))


def candidates(
    rl_counts: Iterable[int] = RL_COUNTS,
    wb_counts: Iterable[int] = WB_COUNTS,
    wb_alphas: Iterable[float] = WB_ALPHAS,
    starts: Iterable[str] = STARTS,
) -> list[Candidate]:
    out: list[Candidate] = []
    for start in starts:
        out += [Candidate("rl", k, start=start) for k in rl_counts]
        out += [Candidate("wb", k, a, start=start) for a in wb_alphas for k in wb_counts]
    return out


def tune_deconvolution(
    counts: Any,
    psf: np.ndarray,
    *,
    p: float = 0.8,
    splits: int = 2,
    rng: np.random.Generator | None = None,
    rl_counts: Sequence[int] = RL_COUNTS,
    wb_counts: Sequence[int] = WB_COUNTS,
    wb_alphas: Sequence[float] = WB_ALPHAS,
    starts: Sequence[str] = STARTS,
    criterion: str = "object",
    otf_floor: float = 0.05,
    denoiser: Callable[[np.ndarray], Any] | None = None,
) -> TuneResult:
    """The deconvolution setting (back projector, its alpha, iteration count) that best predicts
    held-out photons of this frame. ``counts``: the frame in photons (:func:`to_photons`);
    ``splits``: independent splits averaged (the score's own noise halves with four);
    ``starts``: the first estimates tried (``rl.STARTS``; each one runs every back projector's
    iterations once more).

    ``denoiser`` (photons -> photons, e.g. the chain's denoise engine set up with gain 1 and
    offset 0): every setting is also scored on the denoised part A (``Candidate.denoised``), so
    the same criterion decides whether to denoise before deconvolving. Part B stays raw: its
    noise is independent of A's whatever A went through."""
    counts = np.asarray(counts, dtype=np.float32)
    rng = rng if rng is not None else np.random.default_rng(0)
    scale = (1.0 - p) / p
    totals: dict[Candidate, float] = {}
    plans: dict[tuple[str, float | None], DeconvolutionPlan | DCTPlan] = {}
    reference = _plan(psf, counts.shape, "rl", None)  # its OTF: the transform the criterion works in
    transform = _transform(reference)
    otf = np.asarray(reference.otf)
    keep = np.abs(otf) > otf_floor
    for _ in range(splits):
        a, b = split_photons(counts, p, rng)
        # an unbiased estimate of the object from part B, where the PSF passes enough of it
        b_coeffs = transform(b)[keep] / (otf[keep] * (1.0 - p))
        groups: list[tuple[str, float | None, Sequence[int]]] = [("rl", None, rl_counts)]
        groups += [("wb", alpha, wb_counts) for alpha in wb_alphas]
        sources = [(False, a)]
        if denoiser is not None:
            sources.append((True, np.maximum(np.asarray(denoiser(a), dtype=np.float32), 0.0)))
        for (denoised, source), (method, alpha, counts_k), start in itertools.product(
            sources, groups, [check_start(s) for s in starts]
        ):
            if not counts_k:
                continue
            plan = plans.get((method, alpha))
            if plan is None:
                plan = plans[(method, alpha)] = _plan(psf, a.shape, method, alpha)
            wanted = set(counts_k)
            for k, est in enumerate(rl_iterates(source, plan, max(counts_k), start=start), start=1):
                if k in wanted:
                    c = Candidate(method, k, alpha if method == "wb" else None, start=start, denoised=denoised)
                    if criterion == "object":
                        score = _object_error(est, b_coeffs, keep, p, transform)
                    else:
                        score = _nll(scale * forward(est, plan), b)
                    totals[c] = totals.get(c, 0.0) + score / splits
    best = min(totals, key=lambda c: totals[c])
    return TuneResult(best, totals, p, float(counts.mean()))


# -- resolution -----------------------------------------------------------------------------------
def _window(shape: tuple[int, int]) -> np.ndarray:
    """A Tukey window (10 % taper): the frame's edges do not read as shared high frequencies."""
    from scipy.signal.windows import tukey

    return np.outer(tukey(shape[0], 0.2), tukey(shape[1], 0.2)).astype(np.float32)


def frc_curve(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """The Fourier ring correlation of two images of one sample: (frequency in cycles per pixel,
    correlation) per ring of one frequency bin."""
    a = np.asarray(a, dtype=np.float32)
    b = np.asarray(b, dtype=np.float32)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"two 2-D images of one shape, got {a.shape} and {b.shape}")
    w = _window(a.shape)
    fa = np.fft.fft2((a - a.mean()) * w)
    fb = np.fft.fft2((b - b.mean()) * w)
    fy = np.fft.fftfreq(a.shape[0])[:, None]
    fx = np.fft.fftfreq(a.shape[1])[None, :]
    r = np.sqrt(fy**2 + fx**2)
    n = min(a.shape) // 2
    ring = np.minimum((r * 2 * n).astype(np.int64), 2 * n)  # bin width 1 / (2n) cycles per pixel
    num = np.bincount(ring.ravel(), (fa * np.conj(fb)).real.ravel(), minlength=n + 1)[: n + 1]
    da = np.bincount(ring.ravel(), (np.abs(fa) ** 2).ravel(), minlength=n + 1)[: n + 1]
    db = np.bincount(ring.ravel(), (np.abs(fb) ** 2).ravel(), minlength=n + 1)[: n + 1]
    frc = num / np.sqrt(np.maximum(da * db, 1e-30))
    freq = (np.arange(n + 1) + 0.5) / (2 * n)
    return freq[1:n], frc[1:n]  # without the mean's bin and the corners past Nyquist


def frc_resolution(a: Any, b: Any, pixel_size_nm: float | None = None, threshold: float = FRC_THRESHOLD) -> float:
    """The resolution two images of one sample share: 1 / the frequency where their FRC (smoothed
    over 3 rings) first falls below ``threshold``; in nm with ``pixel_size_nm``, else in pixels.
    ``nan`` when they share nothing past the lowest ring; the Nyquist limit (2 pixels) when the
    correlation never falls."""
    freq, frc = frc_curve(a, b)
    smooth = np.convolve(frc, np.ones(3) / 3, mode="same")
    below = np.nonzero(smooth < threshold)[0]
    if below.size and below[0] == 0:
        return math.nan
    if not below.size:
        f = 0.5
    else:
        i = int(below[0])  # interpolate between the last ring above and the first below
        f0, f1, c0, c1 = freq[i - 1], freq[i], smooth[i - 1], smooth[i]
        f = float(f0 + (c0 - threshold) * (f1 - f0) / max(c0 - c1, 1e-12))
    px = 1.0 / f
    return px * pixel_size_nm if pixel_size_nm else px
