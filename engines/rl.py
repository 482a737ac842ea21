"""Richardson-Lucy with a matched or a Wiener-Butterworth back projector: the numerical core.

Shared by the ``deconvolve`` engine (deconvolve.py) and the learned deconvolution's teacher
(netdeconv.py); engine-free, so both import it at the top.

RL refines an estimate ``f`` of the object from the data ``g`` blurred by the PSF ``h``::

    f <- f * B(g / H(f))

where ``H`` convolves with the PSF (the forward projector) and ``B`` with the back projector.
Classic RL uses the matched back projector (the flipped PSF, OTF* in Fourier space) and needs
tens of iterations. Guo et al. (Nat. Biotechnol. 38, 1337-1346, 2020) replace it with an
unmatched one, a Wiener filter rolled off by a Butterworth low-pass at the resolution limit::

    W(k) = OTF*(k) / (|OTF(k)|^2 + alpha)          (OTF normalised to 1 at k = 0)
    BW(k) = 1 / sqrt(1 + eps^2 * (|k| / kc)^(2 n))   (per-axis kc, the PSF's resolution)
    B(k) = W(k) * BW(k) * (1 + alpha)                (gain 1 at k = 0 keeps flux)

which reaches in 1-2 iterations what matched RL reaches after tens. ``eps`` is chosen so that
the back projector's gain at the cutoff is ``beta`` (default: the OTF's own gain there).

Everything per PSF is computed once per transform shape and cached (OTF and back projector).
From the flat start (the default; ``start="image"`` starts from the data: docs/deconvolution.md,
"Start") the first iteration is a single back projection of the data (2 transforms, not 4).
Edges, three ways (``boundary``):

- ``dct`` (the default for mirror-symmetric PSFs: Gaussians, the widefield model): the frame
  continues by reflection to infinity, exactly, with no padding at all. A convolution with an
  even kernel under symmetric extension is diagonal in the DCT-II basis (Martucci's symmetric
  convolution), so each projection is one ``dctn`` and one ``idctn`` of the bare frame, with the
  OTF sampled at k / 2N (:class:`DCTPlan`).
- ``reflect`` (any PSF): the frame is padded by reflection by the reach of one RL step (99 % of
  its light, :func:`edge_pad`) and rounded up to a 5-smooth FFT length, so the periodic FFT does
  not wrap one edge's light onto the other (OTFs in the real-FFT half spectrum).
- ``periodic`` (any PSF; only when asked for): the bare frame or stack, no padding: each edge
  sees the opposite one. Right where the borders are empty (beads, sparse cells on a dark
  background: the padding a measured bead PSF needs multiplies a small stack's voxels, and the
  work); wrong where structure touches an edge (the full-field W2S frame of the benchmark loses
  PSNR against ``dct``/``reflect``, WB and RL alike). Never chosen by ``auto``. Measured:
  docs/deconvolution.md, section "Algorithm" (Edges, ``periodic`` boundary).

Frames larger than the memory budget are split into overlapping tiles cut from the same
extended domain and stitched by cropping; the overlap grows with the iterations, because each RL
step carries light one PSF plus one back-projector footprint further.

The core (:func:`richardson_lucy`, :func:`deconvolve_array`) is written against the array API
and runs on numpy (scipy.fft with worker threads), cupy (cupyx.scipy.fft) or array_api_strict
(whose ``fft`` extension has no DCT: there ``boundary="auto"`` means ``reflect``).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _array
from .base import EngineError
from .psf import footprint_radius, fwhm_px

__all__ = [
    "BOUNDARIES",
    "BYTES_PER_VOXEL",
    "DCTPlan",
    "DEFAULT_START",
    "DeconvolutionPlan",
    "PAD_MASS",
    "STARTS",
    "TINY",
    "back_projector_kernel",
    "check_start",
    "choose_boundary",
    "dct_shape",
    "deconvolve_array",
    "edge_pad",
    "fast_len",
    "forward",
    "rl_iterates",
    "fast_shape",
    "fft_workers",
    "has_dct",
    "is_mirror_symmetric",
    "make_plan",
    "padded_shape",
    "reaches",
    "richardson_lucy",
    "step_footprint",
    "tile_margin",
    "wb_parameters",
]

log = logging.getLogger(__name__)

DEFAULT_ALPHA = 1e-2  # Wiener constant; chosen on simulations (docs/deconvolution.md)
DEFAULT_ORDER = 10  # Butterworth order n in (k/kc)^(2n); Guo et al.'s code default
BYTES_PER_VOXEL = 40  # float32 estimate, data, blurred, ratio + two complex64 half spectra + FFT scratch
TINY = 1e-6  # below this the blurred estimate is taken as zero (data are photon-like counts)
BOUNDARIES = ("auto", "dct", "reflect", "periodic")
STARTS = ("flat", "image")  # the first estimate: flat, or the data (richardson_lucy)
DEFAULT_START = "flat"  # measured against "image" on real data: docs/deconvolution.md, "Start"
SYMMETRY_TOL = 1e-6  # a PSF is mirror-symmetric when flipping any axis moves it by less (of its peak)


# --------------------------------------------------------------------------- FFT helpers


def _is_scipy(fft: Any) -> bool:
    return getattr(fft, "__name__", "") == "scipy.fft"


THREADED_FFT_SIZE = 2**20  # voxels; smaller FFTs run on one thread (fft_workers)


def fft_workers(shape: Sequence[int]) -> int:
    """Threads for scipy's FFTs of this shape: one below ~1024x1024 voxels.

    Measured on the 2-core VM for a 600x600 rfft + irfft pair: 2 threads gain ~5 % when the
    machine is idle (1.68 vs 1.77 ms) but lose ~1.6x in the median when another process holds
    one core (4.1 vs 2.6 ms: the transform waits for its slower thread), as in a daemon that
    runs several engines; large transforms gain from threads (docs/deconvolution.md)."""
    return 1 if math.prod(shape) < THREADED_FFT_SIZE else _array.fft_workers()


def _rfftn(fft: Any, a: Any, axes: tuple[int, ...]) -> Any:
    if _is_scipy(fft):
        return fft.rfftn(a, axes=axes, workers=fft_workers(a.shape), overwrite_x=False)
    return fft.rfftn(a, axes=axes)


def _irfftn(fft: Any, a: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    if _is_scipy(fft):
        return fft.irfftn(a, s=shape, axes=axes, workers=fft_workers(shape), overwrite_x=True)
    return fft.irfftn(a, s=shape, axes=axes)


def _dctn(fft: Any, a: Any, axes: tuple[int, ...]) -> Any:
    if _is_scipy(fft):
        return fft.dctn(a, type=2, axes=axes, workers=fft_workers(a.shape), overwrite_x=False)
    return fft.dctn(a, type=2, axes=axes)


def _idctn(fft: Any, a: Any, axes: tuple[int, ...]) -> Any:
    if _is_scipy(fft):
        return fft.idctn(a, type=2, axes=axes, workers=fft_workers(a.shape), overwrite_x=True)
    return fft.idctn(a, type=2, axes=axes)


def has_dct(fft: Any) -> bool:
    """Whether this FFT module has the DCT the ``dct`` boundary needs (scipy.fft, cupyx.scipy.fft;
    not the array API's ``fft`` extension)."""
    return hasattr(fft, "dctn") and hasattr(fft, "idctn")


def fast_len(n: int) -> int:
    """The next product of 2, 3 and 5 (``real=True``), on every axis: the lengths with factors 7
    or 11 that ``next_fast_len`` allows for complex axes were slower here (a 539x539 rfft +
    irfft pair took 1.95 ms, 540x540 1.42 ms)."""
    import scipy.fft

    return int(scipy.fft.next_fast_len(int(n), real=True))


def fast_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """Each axis rounded up to a length the FFTs transform fast (a product of 2, 3 and 5)."""
    return tuple(fast_len(n) for n in shape)


def padded_shape(shape: Sequence[int], pad: Sequence[int]) -> tuple[int, ...]:
    """The FFT shape of a frame padded by ``pad`` on each side: the periodic domain it runs in."""
    return fast_shape([int(n) + 2 * int(p) for n, p in zip(shape, pad, strict=True)])


def dct_shape(shape: Sequence[int], pad: Sequence[int]) -> tuple[int, ...]:
    """The DCT shape of a frame under the ``dct`` boundary: each axis as it is when its length is
    5-smooth (exact symmetric extension, no padding; 512, 1024, 2048, 2304, 1200 ...), else
    extended by reflection at its far end by at least ``pad`` to a 5-smooth length (a DCT of 539
    took 1.5x as long as one of 540): there the extension is exact for ``pad`` pixels past the
    edge, as in ``reflect``."""
    out = []
    for n, p in zip(shape, pad, strict=True):
        n = int(n)
        out.append(n if fast_len(n) == n else fast_len(n + int(p)))
    return tuple(out)


def is_mirror_symmetric(psf: np.ndarray, tol: float = SYMMETRY_TOL) -> bool:
    """True when the PSF has odd length on every axis and is its own mirror image along each
    (the Gaussians and the widefield model are; a measured bead PSF almost never is)."""
    a = np.asarray(psf, dtype=np.float64)
    if any(n % 2 == 0 for n in a.shape):
        return False
    peak = float(np.abs(a).max()) or 1.0
    return all(float(np.abs(a - np.flip(a, axis=ax)).max()) <= tol * peak for ax in range(a.ndim))


# --------------------------------------------------------------------------- OTFs


def _otf(psf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Half-spectrum OTF of a centred PSF on an FFT grid of ``shape`` (host, complex128)."""
    import scipy.fft

    if any(p > s for p, s in zip(psf.shape, shape, strict=True)):
        raise EngineError(f"PSF {psf.shape} is larger than the FFT grid {shape}")
    grid = np.zeros(shape, dtype=np.float64)
    grid[tuple(slice(0, n) for n in psf.shape)] = psf
    # move the PSF's central pixel to the origin, so deconvolution does not shift the image
    grid = np.roll(grid, [-(n // 2) for n in psf.shape], axis=tuple(range(psf.ndim)))
    return scipy.fft.rfftn(grid)


def _freq_grid(shape: tuple[int, ...], cutoff: Sequence[float]) -> np.ndarray:
    """(|k| / kc)^2 summed over axes on the half-spectrum grid (k in cycles per pixel)."""
    w = np.zeros(shape[:-1] + (shape[-1] // 2 + 1,))
    for ax, n in enumerate(shape):
        k = np.fft.rfftfreq(n) if ax == len(shape) - 1 else np.fft.fftfreq(n)
        sh = [1] * len(shape)
        sh[ax] = k.size
        w = w + (k.reshape(sh) / cutoff[ax]) ** 2
    return w


def _gain_at(psf: np.ndarray, ax: int, k: float) -> float:
    """|OTF| at frequency k (cycles/pixel) along one axis, exactly (1-D DTFT of the marginal)."""
    prof = psf.sum(axis=tuple(i for i in range(psf.ndim) if i != ax))
    x = np.arange(prof.size) - prof.size // 2
    return float(abs(np.sum(prof * np.exp(-2j * math.pi * min(k, 0.5) * x))) / prof.sum())


def wb_parameters(
    psf: np.ndarray,
    alpha: float | None = None,
    beta: float | None = None,
    order: int | None = None,
    cutoff: float | Sequence[float] | None = None,
) -> dict[str, Any]:
    """Wiener-Butterworth parameters with defaults derived from the PSF (Guo et al. 2020).

    cutoff: per axis, 1 / FWHM of the PSF in cycles per pixel (the resolution limit);
    beta: the back projector's gain at the cutoff; default the OTF's gain there (Guo's choice);
    alpha: the Wiener constant; order: the Butterworth order.
    """
    fwhm = fwhm_px(psf)
    if cutoff is None:
        kc = tuple(1.0 / f for f in fwhm)
    else:
        kc = tuple(float(c) for c in np.broadcast_to(np.asarray(cutoff, float), (psf.ndim,)))
    if any(not (c > 0) for c in kc):
        raise EngineError(f"cutoff must be positive (cycles per pixel), got {cutoff!r}")
    gains = [_gain_at(psf, ax, kc[ax]) for ax in range(psf.ndim)]
    beta_fp = float(np.mean(gains))
    a = DEFAULT_ALPHA if alpha is None else float(alpha)
    b = beta_fp if beta is None else float(beta)
    n = DEFAULT_ORDER if order is None else int(order)
    if a <= 0 or not (0 < b < 1) or n < 1:
        raise EngineError(f"need alpha > 0, 0 < beta < 1, order >= 1; got {a}, {b}, {n}")
    # Wiener gain at the cutoff, relative to its own gain at k = 0 (1 / (1 + alpha))
    wiener_kc = float(np.mean([g / (g * g + a) for g in gains])) * (1.0 + a)
    # choose eps so that the WB gain at the cutoff is beta: wiener_kc / sqrt(1 + eps^2) = beta
    eps2 = max(0.0, (wiener_kc / b) ** 2 - 1.0)
    return {
        "alpha": a,
        "beta": b,
        "order": n,
        "cutoff": kc,
        "eps2": eps2,
        "fwhm_px": tuple(float(f) for f in fwhm),
        "otf_gain_at_cutoff": beta_fp,
    }


def _back_projector_otf(otf: np.ndarray, shape: tuple[int, ...], method: str, wb: dict[str, Any]) -> np.ndarray:
    if method == "rl":
        return np.conj(otf)
    a = wb["alpha"]
    wiener = np.conj(otf) / (np.abs(otf) ** 2 + a)
    butterworth = 1.0 / np.sqrt(1.0 + wb["eps2"] * _freq_grid(shape, wb["cutoff"]) ** wb["order"])
    return wiener * butterworth * (1.0 + a)


def back_projector_kernel(psf: np.ndarray, method: str, wb: dict[str, Any]) -> np.ndarray:
    """The back projector in real space, centred, on a grid 8x the PSF (for its footprint)."""
    import scipy.fft

    shape = tuple(max(64, 8 * n) | 1 for n in psf.shape)
    bp = _back_projector_otf(_otf(psf, shape), shape, method, wb)
    kernel = scipy.fft.irfftn(bp, s=shape)
    return np.roll(kernel, [n // 2 for n in shape], axis=tuple(range(len(shape))))


def _otf_dct(psf: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The OTF of a mirror-symmetric PSF at the DCT-II frequencies k / 2N of ``shape`` (real).

    For an even kernel the symmetric extension of period 2N turns convolution into a product in
    the DCT-II basis, with the kernel's DFT on the 2N grid at bins 0..N-1 as multipliers. That
    DFT of an even kernel is a DCT-I of its one-sided quadrant: ``x_0 + 2 sum_n x_n cos(pi k n /
    N)`` per axis, computed here once on the (N + 1)-long grid (host, float64)."""
    import scipy.fft

    centre = [n // 2 for n in psf.shape]
    quadrant = psf[tuple(slice(c, None) for c in centre)]
    if any(q >= n for q, n in zip(quadrant.shape, shape, strict=True)):
        raise EngineError(_dct_refused(f"the PSF {tuple(psf.shape)} reaches past the frame {tuple(shape)}"))
    grid = np.zeros([n + 1 for n in shape], dtype=np.float64)
    grid[tuple(slice(0, q) for q in quadrant.shape)] = quadrant
    lam = scipy.fft.dctn(grid, type=1)
    return lam[tuple(slice(0, n) for n in shape)]


def _dct_freq_grid(shape: tuple[int, ...], cutoff: Sequence[float]) -> np.ndarray:
    """(|k| / kc)^2 at the DCT-II frequencies k / 2N cycles per pixel."""
    w = np.zeros(shape)
    for ax, n in enumerate(shape):
        sh = [1] * len(shape)
        sh[ax] = n
        w = w + ((np.arange(n) / (2.0 * n)).reshape(sh) / cutoff[ax]) ** 2
    return w


def _back_projector_dct(otf: np.ndarray, shape: tuple[int, ...], method: str, wb: dict[str, Any]) -> np.ndarray:
    """:func:`_back_projector_otf` for a real (even) OTF at the DCT frequencies."""
    if method == "rl":
        return otf
    a = wb["alpha"]
    butterworth = 1.0 / np.sqrt(1.0 + wb["eps2"] * _dct_freq_grid(shape, wb["cutoff"]) ** wb["order"])
    return otf / (otf * otf + a) * butterworth * (1.0 + a)


class DeconvolutionPlan:
    """OTF and back projector of one PSF on one FFT shape, on the frames' array backend
    (``reflect`` boundary: real-FFT half spectra, complex)."""

    boundary = "reflect"

    def __init__(self, psf: np.ndarray, shape: tuple[int, ...], method: str, wb: dict[str, Any], xp: Any) -> None:
        otf = _otf(psf, shape)
        bp = _back_projector_otf(otf, shape, method, wb)
        self.shape = shape
        self.otf = xp.asarray(otf.astype(np.complex64))
        self.otf_bp = xp.asarray(bp.astype(np.complex64))


class DCTPlan:
    """OTF and back projector of one mirror-symmetric PSF at the DCT-II frequencies of one shape
    (``dct`` boundary: real multipliers, float32), on the frames' array backend."""

    boundary = "dct"

    def __init__(self, psf: np.ndarray, shape: tuple[int, ...], method: str, wb: dict[str, Any], xp: Any) -> None:
        if not is_mirror_symmetric(psf):
            raise EngineError(_dct_refused(_NOT_SYMMETRIC))
        otf = _otf_dct(psf, shape)
        bp = _back_projector_dct(otf, shape, method, wb)
        self.shape = shape
        self.otf = xp.asarray(otf.astype(np.float32))
        self.otf_bp = xp.asarray(bp.astype(np.float32))


def make_plan(psf: np.ndarray, shape: tuple[int, ...], method: str = "wb", xp: Any = np,
              boundary: str = "reflect", **wb: Any) -> DeconvolutionPlan | DCTPlan:  # fmt: skip
    """Convenience for scripts and tests: WB parameters derived from the PSF unless given."""
    cls = DCTPlan if boundary == "dct" else DeconvolutionPlan
    return cls(psf, tuple(shape), method, wb_parameters(psf, **wb), xp)


# --------------------------------------------------------------------------- core


def check_start(start: str) -> str:
    """The start as given, or an EngineError naming the choices."""
    if start not in STARTS:
        raise EngineError(f"start must be one of {', '.join(STARTS)}; got {start!r}")
    return start


def _first_iterate(xp: Any, fft: Any, data: Any, plan: DeconvolutionPlan | DCTPlan, start: str) -> Any:
    """The estimate after one iteration from the given start.

    ``flat``: from a flat start ``c`` the first iteration needs no forward projection and
    forgets ``c``: the PSF sums to 1, so ``H c = c`` and ``c * B(g / c) = B(g)``, one back
    projection of the data (two transforms). ``image``: from the data itself (Guo et al.'s
    code), floored at ``TINY`` so that zero pixels may still grow: a full step, four transforms.
    """
    axes = tuple(range(data.ndim))
    shape = tuple(data.shape)
    project = _project_dct if plan.boundary == "dct" else _project
    if check_start(start) == "flat":
        return _maximum(xp, project(fft, data, plan.otf_bp, shape, axes), 0.0)
    est = xp.maximum(data, TINY)  # a new array: the caller's data stay as they are
    blurred = _maximum(xp, project(fft, est, plan.otf, shape, axes), TINY)
    correction = project(fft, _divide_into(xp, data, blurred), plan.otf_bp, shape, axes)
    return _maximum(xp, _multiply_into(xp, est, correction), 0.0)


def richardson_lucy(
    data: Any, plan: DeconvolutionPlan | DCTPlan, iterations: int, *, fft: Any = None, start: str = DEFAULT_START
) -> Any:
    """RL iterations on an array already of the plan's shape: periodic boundaries for a
    :class:`DeconvolutionPlan`, symmetric (mirror) ones for a :class:`DCTPlan`.

    ``start``: ``flat`` (default, as scikit-image does) makes the first iteration one back
    projection of the data, two FFTs instead of four; ``image`` starts from the data, as Guo et
    al.'s code does. Measured on real data (docs/deconvolution.md, "Start"). The estimate is
    kept non-negative: the WB back projector has negative lobes.
    """
    xp = _array.namespace(data)
    fft = fft if fft is not None else _array.fft_module(data)
    axes = tuple(range(data.ndim))
    shape = tuple(data.shape)
    if shape != plan.shape:
        raise ValueError(f"data shape {shape} does not match the plan's FFT shape {plan.shape}")
    check_start(start)
    if iterations == 0:
        return data
    project = _project_dct if plan.boundary == "dct" else _project
    est = _first_iterate(xp, fft, data, plan, start)
    for _ in range(iterations - 1):
        blurred = _maximum(xp, project(fft, est, plan.otf, shape, axes), TINY)
        correction = project(fft, _divide_into(xp, data, blurred), plan.otf_bp, shape, axes)
        est = _maximum(xp, _multiply_into(xp, est, correction), 0.0)
    return est


def rl_iterates(
    data: Any, plan: DeconvolutionPlan | DCTPlan, iterations: int, *, fft: Any = None, start: str = DEFAULT_START
) -> Any:
    """Each iterate of :func:`richardson_lucy` in turn (1, 2, ... ``iterations``): a search over
    iteration counts (``engines.selftune``) runs the iterations once, not once per count. The
    iterates are new arrays (a caller may keep them)."""
    xp = _array.namespace(data)
    fft = fft if fft is not None else _array.fft_module(data)
    axes = tuple(range(data.ndim))
    shape = tuple(data.shape)
    if shape != plan.shape:
        raise ValueError(f"data shape {shape} does not match the plan's FFT shape {plan.shape}")
    project = _project_dct if plan.boundary == "dct" else _project
    est = _first_iterate(xp, fft, data, plan, check_start(start))
    yield est
    for _ in range(iterations - 1):
        blurred = _maximum(xp, project(fft, est, plan.otf, shape, axes), TINY)
        correction = project(fft, data / blurred, plan.otf_bp, shape, axes)
        est = _maximum(xp, est * correction, 0.0)
        yield est


def forward(est: Any, plan: DeconvolutionPlan | DCTPlan, *, fft: Any = None) -> Any:
    """The estimate blurred by the plan's PSF (what the camera would see of it, without noise)."""
    fft = fft if fft is not None else _array.fft_module(est)
    project = _project_dct if plan.boundary == "dct" else _project
    return project(fft, est, plan.otf, tuple(est.shape), tuple(range(est.ndim)))


def _project(fft: Any, a: Any, transfer: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """Periodic convolution: irfft(rfft(a) * transfer), the spectrum multiplied in place."""
    spectrum = _rfftn(fft, a, axes)
    spectrum *= transfer
    return _irfftn(fft, spectrum, shape, axes)


def _project_dct(fft: Any, a: Any, transfer: Any, shape: tuple[int, ...], axes: tuple[int, ...]) -> Any:
    """Convolution with an even kernel under symmetric extension: idct(dct(a) * transfer)."""
    coeffs = _dctn(fft, a, axes)
    coeffs *= transfer
    return _idctn(fft, coeffs, axes)


# Elementwise steps write into a frame-sized buffer the iteration already owns, on numpy and
# cupy (``out=``), instead of allocating a new one per step (the array API has no ``out=``;
# other backends, array_api_strict in the tests, get new arrays).


def _in_place(a: Any) -> Any:
    """The module whose ufuncs take ``out=`` for this array (numpy or cupy), else None."""
    if isinstance(a, np.ndarray):
        return np
    if _array.is_cupy(a):
        import cupy

        return cupy
    return None


def _maximum(xp: Any, a: Any, floor: float) -> Any:
    m = _in_place(a)
    if m is None:
        return xp.maximum(a, floor)
    return m.maximum(a, a.dtype.type(floor), out=a)


def _divide_into(xp: Any, num: Any, den: Any) -> Any:
    """num / den, written into den."""
    m = _in_place(den)
    return num / den if m is None else m.divide(num, den, out=den)


def _multiply_into(xp: Any, a: Any, b: Any) -> Any:
    """a * b, written into a."""
    m = _in_place(a)
    return a * b if m is None else m.multiply(a, b, out=a)


def _symmetric(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices reflected into [0, n) with edge pixels repeated (d c b a | a b c d | d c ...)."""
    m = np.mod(idx, 2 * n)
    return np.where(m >= n, 2 * n - 1 - m, m)


def _gather(xp: Any, a: Any, index: Sequence[np.ndarray], pad: Sequence[int]) -> Any:
    """a[ix0][:, ix1]... with per-axis integer index arrays (array-API ``take``).

    An axis indexed as the whole frame with one reflection on each side (the untiled case) is
    assembled from flipped slices instead (``concat``): 0.08 vs 0.21 ms at 512 -> 600 px."""
    out = a
    for ax, idx in enumerate(index):
        n = a.shape[ax]
        if idx.size == n and np.array_equal(idx, np.arange(n)):
            continue
        before, after = pad[ax], idx.size - n - pad[ax]
        if 0 <= before <= n and 0 <= after <= n and np.array_equal(idx, _reflect_index(n, before, after)):
            out = _reflect_pad(xp, out, ax, before, after)
        else:
            out = xp.take(out, xp.asarray(idx.astype(np.int64)), axis=ax)
    return out


def _reflect_index(n: int, before: int, after: int) -> np.ndarray:
    return np.concatenate([np.arange(before)[::-1], np.arange(n), np.arange(n - after, n)[::-1]])


def _reflect_pad(xp: Any, a: Any, ax: int, before: int, after: int) -> Any:
    """``a`` with ``before`` / ``after`` pixels mirrored on each side of one axis (edge repeated)."""
    n = a.shape[ax]

    def part(start: int, stop: int) -> Any:
        return a[tuple(slice(start, stop) if i == ax else slice(None) for i in range(a.ndim))]

    return xp.concat([xp.flip(part(0, before), axis=ax), a, xp.flip(part(n - after, n), axis=ax)], axis=ax)


def deconvolve_array(
    data: Any,
    psf: np.ndarray,
    *,
    iterations: int,
    method: str = "wb",
    wb: dict[str, Any] | None = None,
    plans: dict[tuple[str, tuple[int, ...]], DeconvolutionPlan | DCTPlan] | None = None,
    footprint: Sequence[int] | None = None,
    pad: Sequence[int] | None = None,
    memory_budget_mb: float | None = None,
    conserve_flux: bool = True,
    boundary: str = "auto",
    start: str = DEFAULT_START,
) -> Any:
    """Deconvolve one offset-free, non-negative frame or stack (any array-API backend).

    ``plans`` caches OTFs per (boundary, transform shape) across calls; ``footprint`` is the
    per-axis reach of one RL step (PSF plus back projector, 99.9 % of its light: the tiles'
    overlap) and ``pad`` the reflected border of the ``reflect`` boundary (99 % of it,
    :func:`edge_pad`); all are derived here when not given. ``boundary``: ``dct`` (exact mirror
    extension, no padding; mirror-symmetric PSFs), ``reflect`` (padding; any PSF), ``periodic``
    (no padding, edges wrap: data with empty borders) or ``auto`` (:func:`choose_boundary`).
    ``start``: the first estimate, ``flat`` or ``image`` (:func:`richardson_lucy`); each tile
    starts from its own window of the data.
    """
    xp = _array.namespace(data)
    fft = _array.fft_module(data)
    if data.ndim != psf.ndim:
        raise EngineError(f"a {psf.ndim}-D PSF cannot deconvolve {data.ndim}-D data of shape {tuple(data.shape)}")
    check_start(start)
    wb = wb if wb is not None else wb_parameters(psf)
    plans = plans if plans is not None else {}
    if footprint is None or pad is None:
        fp, pd = reaches(psf, method, wb, (1e-3, PAD_MASS))
        footprint = fp if footprint is None else footprint
        pad = pd if pad is None else pad
    shape = tuple(int(n) for n in data.shape)
    pad = tuple(int(r) for r in pad)
    boundary = choose_boundary(psf, shape, fft, boundary)
    if boundary == "dct":
        # the DCT itself continues the frame by reflection: no border, tiles start at the frame
        domain, pad = dct_shape(shape, pad), (0,) * len(shape)
        plan_cls: type[DeconvolutionPlan] | type[DCTPlan] = DCTPlan
    elif boundary == "periodic":
        # the bare frame is the period: tiles wrap around it, no border to crop
        if any(p > n for p, n in zip(psf.shape, shape, strict=True)):
            raise EngineError(f"boundary='periodic' needs the PSF {tuple(psf.shape)} to fit in the frame "
                              f"{shape}; use boundary='reflect' (or 'auto')")  # fmt: skip
        domain, pad, plan_cls = shape, (0,) * len(shape), DeconvolutionPlan
    else:
        # the padded, periodic domain every tile is cut from: reflection beyond the edges
        domain, plan_cls = padded_shape(shape, pad), DeconvolutionPlan
    budget = math.inf if memory_budget_mb is None else memory_budget_mb * 2**20 / BYTES_PER_VOXEL

    def run(window_start: Sequence[int], window: tuple[int, ...]) -> Any:
        if boundary == "dct":
            index = [_symmetric(s + np.arange(w), n) for s, w, n in zip(window_start, window, shape, strict=True)]
        else:
            index = [
                _symmetric(np.mod(s + np.arange(w), big) - p, n)
                for s, w, big, p, n in zip(window_start, window, domain, pad, shape, strict=True)
            ]
        block = _gather(xp, data, index, pad)
        key = (boundary, window)
        plan = plans.get(key)
        if plan is None:
            log.debug("computing OTF and back projector for %s shape %s", boundary, window)
            plan = plans[key] = plan_cls(psf, window, method, wb, xp)
        return richardson_lucy(block, plan, iterations, fft=fft, start=start)

    if math.prod(domain) <= budget:
        out = run([0] * len(shape), domain)
        out = out[tuple(slice(p, p + n) for p, n in zip(pad, shape, strict=True))]
    else:
        out = _tiled(run, shape, domain, pad, footprint, iterations, budget, memory_budget_mb, xp)
    if conserve_flux:
        # RL conserves flux only with the matched back projector; the WB one (and clipping its
        # negative lobes) does not. One factor per frame restores it, tiled or not alike. The
        # multiplication also makes the cropped view a compact array (0.1 ms at 512x512).
        total = float(xp.sum(out))
        if total > 0:
            factor = float(xp.sum(data)) / total
            m = _in_place(out)
            if m is not None and out.flags["C_CONTIGUOUS"] and out.flags["OWNDATA"]:
                m.multiply(out, out.dtype.type(factor), out=out)  # the dct boundary's own buffer
            else:
                out = out * factor
    return out


_NOT_SYMMETRIC = "the PSF is not mirror-symmetric (a measured PSF rarely is)"


def _dct_refused(why: str) -> str:
    return f"boundary='dct' cannot run here: {why}; use boundary='reflect' (or 'auto')"


def choose_boundary(psf: np.ndarray, shape: Sequence[int], fft: Any, boundary: str = "auto") -> str:
    """``dct`` where it is exact and available (a mirror-symmetric PSF that fits in the frame,
    an FFT module with a DCT), else ``reflect``. An explicit ``dct`` is only checked for the DCT
    here (cheap, every call): its PSF is checked once, when its :class:`DCTPlan` is built, and
    refused there with the reason."""
    if boundary not in BOUNDARIES:
        raise EngineError(f"boundary must be one of {', '.join(BOUNDARIES)}; got {boundary!r}")
    if boundary in ("reflect", "periodic"):
        return boundary
    if not has_dct(fft):
        if boundary == "dct":
            raise EngineError(_dct_refused(f"{getattr(fft, '__name__', fft)!s} has no DCT"))
        return "reflect"
    if boundary == "dct":
        return boundary
    fits = all(n // 2 < int(s) for n, s in zip(psf.shape, shape, strict=True))
    return "dct" if fits and is_mirror_symmetric(psf) else "reflect"


def _tiled(run: Any, shape: tuple[int, ...], domain: tuple[int, ...], pad: tuple[int, ...],
           footprint: Sequence[int], iterations: int, budget: float,
           memory_budget_mb: float | None, xp: Any) -> Any:  # fmt: skip
    """Deconvolve in overlapping windows of the padded domain and keep each window's core.

    Each RL step carries light up to one footprint further, so the margin grows with the
    iterations (:func:`tile_margin`); Guo et al.'s chunk-and-stitch.
    """
    margin = tile_margin(footprint, iterations)
    core, window = _tiling(shape, domain, margin, budget)
    if core is None or window is None:  # both None, or neither
        raise EngineError(
            f"deconvolving {shape} with {iterations} iterations needs tiles with {margin} px of "
            f"overlap that do not fit in memory_budget_mb={memory_budget_mb}; raise "
            "memory_budget_mb or lower iterations"
        )
    window_t = tuple(window)
    out = xp.zeros(shape, dtype=xp.float32)
    starts = [list(range(0, n, c)) for n, c in zip(shape, core, strict=True)]
    log.debug("tiling %s into cores %s, windows %s", shape, core, window_t)
    for corner in itertools.product(*starts):
        wstart = []
        crop = []
        dest = []
        for ax, c0 in enumerate(corner):
            c1 = min(c0 + core[ax], shape[ax])
            if window_t[ax] >= domain[ax]:  # axis not split: the whole periodic domain
                wstart.append(0)
                crop.append(slice(pad[ax] + c0, pad[ax] + c1))
            else:
                wstart.append(pad[ax] + c0 - margin[ax])
                crop.append(slice(margin[ax], margin[ax] + c1 - c0))
            dest.append(slice(c0, c1))
        res = run(wstart, window_t)
        out[tuple(dest)] = res[tuple(crop)]
    return out


def tile_margin(footprint: Sequence[int], iterations: int) -> tuple[int, ...]:
    """Overlap each tile needs per side: ``footprint * ceil(sqrt(iterations))``.

    The worst case is one footprint per iteration, but the disturbance RL spreads from a cut
    decays much faster than that bound: measured on a real 512x512 image, one footprint of
    margin already kept tiled and untiled within 5e-5 of the mean for 50 RL iterations
    (docs/deconvolution.md). The square root keeps a safety factor that still grows with the
    iterations, without tiles of mostly margin."""
    k = max(1, math.ceil(math.sqrt(max(1, iterations))))
    return tuple(k * int(r) for r in footprint)


def _tiling(
    shape: tuple[int, ...], domain: tuple[int, ...], margin: tuple[int, ...], budget: float
) -> tuple[list[int], list[int]] | tuple[None, None]:
    """Core and window (FFT) sizes per axis so one window fits the budget: halve the cores along
    the axis with the largest window until it fits; an axis whose window stops shrinking (the
    margins dominate) is left whole."""
    nd = len(shape)
    core, window = list(shape), list(domain)
    whole: set[int] = set()
    while math.prod(window) > budget:
        candidates = [ax for ax in range(nd) if ax not in whole and core[ax] > 8]
        if not candidates:
            return None, None
        ax = max(candidates, key=lambda i: window[i])
        new_core = math.ceil(core[ax] / 2)
        new_window = fast_len(new_core + 2 * margin[ax])
        if new_window >= window[ax]:
            whole.add(ax)
            continue
        core[ax], window[ax] = new_core, new_window
    return core, window


PAD_MASS = 1e-2  # light of one RL step allowed past the reflected border (edge_pad)


def edge_pad(psf: np.ndarray, method: str, wb: dict[str, Any]) -> tuple[int, ...]:
    """Reflected border per side: the reach of one RL step holding 99 % of its light.

    The frame continues by reflection, which the FFT's periodic domain turns into a seam one
    pad beyond each edge; only light crossing the seam is wrong. Measured on the real 512x512
    benchmark image (Airy NA 0.8 and NA 1.4, Gaussian sigma 1.5 and 3 px; WB 1-5 and RL 20
    iterations) this pad changes the result by at most 0.4 % of its maximum and the PSNR by
    under 0.005 dB (edge band included) against the 99.9 % footprint, while the FFT domain of a
    512x512 frame with the NA 0.8 PSF shrinks from 625x625 to 600x600 (docs/deconvolution.md)."""
    return reaches(psf, method, wb, (PAD_MASS,))[0]


def step_footprint(psf: np.ndarray, method: str, wb: dict[str, Any], mass: float = 1e-3) -> tuple[int, ...]:
    """How far one RL step carries light, per axis: PSF reach plus back-projector reach."""
    return reaches(psf, method, wb, (mass,))[0]


def reaches(psf: np.ndarray, method: str, wb: dict[str, Any], masses: Sequence[float]) -> list[tuple[int, ...]]:
    """:func:`step_footprint` for several masses from one back-projector kernel (for a 3-D PSF that
    kernel is an FFT of ~360^3 voxels: computed once)."""
    bp = back_projector_kernel(psf, method, wb)
    out = []
    for mass in masses:
        r_psf = footprint_radius(psf, mass)
        r_bp = footprint_radius(bp, mass)
        out.append(tuple(max(1, a + b) for a, b in zip(r_psf, r_bp, strict=True)))
    return out
