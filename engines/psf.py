"""Point spread functions for deconvolution: measured, Gaussian or a widefield optical model.

Everything here runs once per stream on small arrays, so it is plain numpy/scipy on the host;
the deconvolution itself (``deconvolve.py``) moves the result to the frames' array backend.

Conventions: a PSF is a float64 numpy array of odd size along every axis, non-negative, summing
to 1, with its centroid on the central pixel. Axes are (y, x) or (z, y, x). Sizes in pixels
unless a name ends in ``_um`` / ``_nm``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import EngineError

__all__ = [
    "PSFError",
    "load_psf",
    "clean_psf",
    "centre_psf",
    "resample_psf",
    "psf_to_2d",
    "crop_psf",
    "gaussian_psf",
    "widefield_psf",
    "fwhm_px",
    "footprint_radius",
]

log = logging.getLogger(__name__)

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


class PSFError(EngineError):
    """A PSF cannot be used; the message says what is wrong with it and how to fix it."""


def load_psf(path: str | Path) -> np.ndarray:
    """Read a PSF from a TIFF file (2-D or 3-D; singleton axes are dropped)."""
    path = Path(path)
    if not path.is_file():
        raise PSFError(f"PSF file {str(path)!r} does not exist; pass --psf with a TIFF of a bead image")
    import tifffile

    try:
        data = tifffile.imread(path)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types; say which file failed
        raise PSFError(f"cannot read PSF file {str(path)!r} as TIFF: {exc}") from exc
    return np.asarray(data)


def _check(psf: Any, where: str) -> np.ndarray:
    """Refuse PSFs that cannot describe a blur, saying what is wrong."""
    a = np.asarray(psf)
    if a.dtype.kind not in "biuf":
        raise PSFError(f"{where}: PSF must be real numbers, got dtype {a.dtype}")
    a = np.squeeze(a.astype(np.float64, copy=False))
    if a.ndim not in (2, 3):
        raise PSFError(f"{where}: PSF must be 2-D (y, x) or 3-D (z, y, x), got shape {np.shape(psf)}")
    if a.size == 0:
        raise PSFError(f"{where}: PSF is empty (shape {np.shape(psf)})")
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise PSFError(
            f"{where}: PSF has {bad} NaN/inf values out of {a.size}; re-export it "
            "(an average of beads must not divide by zero) or pass another file"
        )
    pos = float(a[a > 0].sum())
    neg = float(-a[a < 0].sum())
    if pos == 0.0:
        raise PSFError(f"{where}: PSF is empty (no positive values); it cannot describe a blur")
    if neg > 0.5 * pos:
        raise PSFError(
            f"{where}: PSF is dominated by negative values (negative mass {neg:.3g} vs positive "
            f"{pos:.3g}); it looks background-subtracted twice or inverted. Pass the raw bead "
            "image: its background is subtracted here"
        )
    return a


def _border(a: np.ndarray, width: int = 2) -> np.ndarray:
    """The outer shell of the array (the PSF's background, far from the bead)."""
    mask = np.zeros(a.shape, bool)
    for ax, n in enumerate(a.shape):
        w = min(width, max(1, n // 4))
        sl = [slice(None)] * a.ndim
        sl[ax] = slice(0, w)
        mask[tuple(sl)] = True
        sl[ax] = slice(n - w, n)
        mask[tuple(sl)] = True
    return a[mask]


def clean_psf(psf: Any, *, threshold_sigmas: float = 3.0, where: str = "psf") -> np.ndarray:
    """A measured PSF made usable: background subtracted, thresholded, centred, normalised.

    Background is the median of the array's outer shell; values less than
    ``threshold_sigmas`` noise standard deviations (robust, from the same shell) above it are set
    to zero, so camera noise far from the bead is not taken for blur.
    """
    a = _check(psf, where)
    shell = _border(a)
    background = float(np.median(shell))
    noise = 1.4826 * float(np.median(np.abs(shell - background)))
    a = a - background
    keep = a > threshold_sigmas * noise
    if not np.any(keep):
        raise PSFError(
            f"{where}: PSF has no signal above its background ({background:.3g} +/- {noise:.3g}); "
            "crop the bead image closer to one bright bead"
        )
    # keep only the bead: the connected region around the brightest voxel; isolated noise
    # spikes above the threshold elsewhere would otherwise widen the PSF
    from scipy import ndimage

    labels, _ = ndimage.label(keep)
    bead = labels == labels[np.unravel_index(int(np.argmax(np.where(keep, a, -np.inf))), a.shape)]
    return centre_psf(np.where(bead, a, 0.0))


def centre_psf(psf: np.ndarray) -> np.ndarray:
    """Shift the PSF (sub-pixel, cubic spline) so its centroid is the central pixel of an odd-sized
    array just large enough to hold all of it; clip spline undershoot and normalise to sum 1.

    Centring matters: an off-centre PSF shifts the whole deconvolved image by the offset.
    """
    a = np.clip(np.asarray(psf, dtype=np.float64), 0.0, None)
    if not a.sum() > 0:
        raise PSFError("psf: PSF is empty after background subtraction; it cannot describe a blur")
    # twice: clipping the spline's undershoot moves the centroid by a few hundredths of a pixel
    return _centre_once(_centre_once(a))


def _centre_once(a: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    total = a.sum()
    grids: tuple[np.ndarray, ...] = np.indices(a.shape, sparse=True)  # one per axis, of any rank
    centroid = np.array([float((g * a).sum() / total) for g in grids])
    nz = np.nonzero(a)
    half = [int(math.ceil(max(c - idx.min(), idx.max() - c))) + 1 for c, idx in zip(centroid, nz, strict=True)]
    out_shape = tuple(2 * h + 1 for h in half)
    # output[o] = input[o + offset]; the centre of the output lands on the centroid
    offset = centroid - np.array(half, dtype=np.float64)
    out = ndimage.affine_transform(a, np.ones(a.ndim), offset=offset, output_shape=out_shape, order=3, mode="constant")
    out = np.clip(out, 0.0, None)
    return out / out.sum()


def resample_psf(psf: np.ndarray, from_spacing: Sequence[float], to_spacing: Sequence[float]) -> np.ndarray:
    """Resample a centred PSF from its own voxel size to the frames' (same units, per axis).

    Going to coarser pixels first smooths with a Gaussian (sigma = (factor - 1) / 2 pixels, as
    scikit-image's anti-aliasing does) so the result approximates what the coarser pixels
    integrate, rather than aliasing the PSF's peak.
    """
    from scipy import ndimage

    factors = np.array(from_spacing, float) / np.array(to_spacing, float)
    if np.allclose(factors, 1.0, rtol=1e-3):
        return psf
    a = np.asarray(psf, dtype=np.float64)
    sigmas = np.maximum(0.0, (1.0 / factors - 1.0) / 2.0)
    if np.any(sigmas > 0):
        a = ndimage.gaussian_filter(a, sigmas, mode="constant")
    # odd output sizes keep a well-defined central pixel
    out_shape = [max(1, int(round(n * f))) | 1 for n, f in zip(a.shape, factors, strict=True)]
    # map output pixel centres onto input coordinates about the two arrays' centres
    scale = 1.0 / factors
    in_c = (np.array(a.shape) - 1) / 2.0
    out_c = (np.array(out_shape) - 1) / 2.0
    out = ndimage.affine_transform(
        a, scale, offset=in_c - scale * out_c, output_shape=tuple(out_shape), order=1, mode="constant"
    )
    if not out.sum() > 0:
        raise PSFError(
            "psf: the PSF vanished when resampled to the frames' pixel size "
            f"(from {tuple(from_spacing)} to {tuple(to_spacing)}); check psf_pixel_size_um"
        )
    return centre_psf(out)


def psf_to_2d(psf: np.ndarray, rule: str = "plane") -> np.ndarray:
    """A 2-D PSF for single planes from a centred 3-D PSF.

    ``"plane"`` (default): the in-focus plane (the central plane, through the centroid). Right for
    thin samples and for confocal/light-sheet data, where out-of-focus light is rejected optically.
    ``"projection"``: the sum over z. Models a widefield image of a sample that extends through
    the whole PSF depth: the out-of-focus haze becomes a broad skirt on the 2-D PSF. 2-D
    deconvolution still cannot tell that haze from in-focus structure (see docs/deconvolution.md).
    """
    if psf.ndim == 2:
        return psf
    if rule == "plane":
        out = psf[psf.shape[0] // 2]
    elif rule == "projection":
        out = psf.sum(axis=0)
    else:
        raise PSFError(f"psf_2d must be 'plane' or 'projection', got {rule!r}")
    return centre_psf(out)


def crop_psf(psf: np.ndarray, energy: float = 0.9999) -> np.ndarray:
    """The smallest centred box holding ``energy`` of a centred PSF's flux (renormalised)."""
    a = psf
    centre = [n // 2 for n in a.shape]
    for r in range(0, max(a.shape) // 2 + 1):
        sl = tuple(slice(max(0, c - r), c + r + 1) for c in centre)
        if a[sl].sum() >= energy * a.sum():
            out = a[sl]
            return out / out.sum()
    return a / a.sum()


def _pixel_integrated_gaussian(n: int, sigma: float) -> np.ndarray:
    """1-D Gaussian integrated over each pixel (exact for small sigma, unlike sampling)."""
    from scipy.special import erf

    half = n // 2
    edges = np.arange(-half - 0.5, half + 1.0, 1.0)
    cdf = 0.5 * (1.0 + erf(edges / (math.sqrt(2.0) * sigma)))
    return np.diff(cdf)


def gaussian_psf(sigma: float | Sequence[float], ndim: int = 2, truncate: float = 4.0) -> np.ndarray:
    """A pixel-integrated Gaussian PSF; ``sigma`` in pixels, one value or one per axis."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (ndim,))
    if not np.all(np.isfinite(sig)) or np.any(sig <= 0):
        raise PSFError(f"psf_sigma must be positive pixels, got {sigma!r}")
    out = np.ones((1,) * ndim)
    for ax, s in enumerate(sig):
        n = 2 * int(math.ceil(truncate * s)) + 1
        shape = [1] * ndim
        shape[ax] = n
        out = out * _pixel_integrated_gaussian(n, float(s)).reshape(shape)
    return out / out.sum()


def widefield_psf(
    na: float,
    wavelength_nm: float,
    refractive_index: float,
    pixel_size_um: float,
    *,
    z_step_um: float | None = None,
    nz: int | None = None,
    size: int | None = None,
) -> np.ndarray:
    """Scalar widefield PSF (emission only) from a circular pupil with defocus.

    The pupil passes spatial frequencies up to NA/lambda; a plane at defocus z adds the phase
    2*pi*z*sqrt((n/lambda)^2 - k^2). The in-focus plane is the Airy pattern. The model is
    computed on pixels fine enough to sample the intensity band limit (2*NA/lambda) and then
    summed into the camera's pixels, so coarse pixels get the PSF they really integrate.
    Returns (y, x) when ``z_step_um`` is None, else (z, y, x) with ``nz`` planes (default: enough
    to cover +/- 3 axial resolutions).
    """
    if not (0 < na < refractive_index):
        raise PSFError(f"na must be between 0 and the refractive index ({refractive_index}), got {na}")
    if not (wavelength_nm > 0 and pixel_size_um > 0):
        raise PSFError("wavelength_nm and the pixel size must be positive")
    wl = wavelength_nm / 1000.0
    nyquist = wl / (4.0 * na)  # intensity cutoff is 2 NA / lambda
    over = max(1, int(math.ceil(pixel_size_um / nyquist)))
    dx = pixel_size_um / over
    airy_radius = 0.61 * wl / na
    if size is None:
        # enough for the Airy rings to carry < 1e-3 of the flux, and for the defocused disc
        reach = 6.0 * airy_radius
        if z_step_um is not None:
            z_extent = (nz or 1) * z_step_um / 2.0
            reach += z_extent * na / math.sqrt(refractive_index**2 - na**2)
        size = 2 * int(math.ceil(reach / pixel_size_um)) + 1
    size |= 1
    # a fine grid, itself padded so the pupil's FFT does not alias the rings back in
    n_fine = int(2 ** math.ceil(math.log2(max(64, 2 * size * over))))
    k = np.fft.fftfreq(n_fine, d=dx)
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    kmax = na / wl
    pupil = (k2 <= kmax**2).astype(np.complex128)
    kz = np.sqrt(np.clip((refractive_index / wl) ** 2 - k2, 0.0, None))
    if z_step_um is None:
        zs = [0.0]
    else:
        if nz is None:
            axial = 2.0 * refractive_index * wl / na**2
            nz = 2 * int(math.ceil(3.0 * axial / z_step_um)) + 1
        zs = [(i - nz // 2) * z_step_um for i in range(nz)]
    planes = []
    for z in zs:
        field = np.fft.ifft2(pupil * np.exp(2j * math.pi * z * kz))
        inten = np.fft.fftshift(np.abs(field) ** 2)
        # fine pixel grid centred on the peak at n_fine//2; bin 'over' x 'over' into camera pixels
        c = n_fine // 2
        # the central camera pixel is the block of 'over' fine pixels around the peak
        start = c - (size // 2) * over - (over - 1) // 2
        win = inten[start : start + size * over, start : start + size * over]
        planes.append(win.reshape(size, over, size, over).sum(axis=(1, 3)))
    out = np.stack(planes) if z_step_um is not None else planes[0]
    return centre_psf(out)


def fwhm_px(psf: np.ndarray) -> tuple[float, ...]:
    """Full width at half maximum along each axis, in pixels, through the brightest pixel
    (linear interpolation between samples; at least 1 pixel)."""
    peak = np.unravel_index(int(np.argmax(psf)), psf.shape)
    out = []
    for ax in range(psf.ndim):
        idx: list[Any] = list(peak)
        idx[ax] = slice(None)
        line = psf[tuple(idx)] / psf[peak]
        p = peak[ax]
        widths = []
        for step in (-1, 1):
            i = p
            while 0 <= i + step < line.size and line[i + step] >= 0.5:
                i += step
            if 0 <= i + step < line.size:
                frac = (line[i] - 0.5) / (line[i] - line[i + step])
                widths.append(abs(i - p) + frac)
            else:
                widths.append(abs(i - p) + 0.5)
        out.append(max(1.0, widths[0] + widths[1]))
    return tuple(out)


def footprint_radius(kernel: np.ndarray, mass: float = 1e-4) -> tuple[int, ...]:
    """Per axis, the half-width (pixels) outside which a centred kernel holds less than ``mass``
    of its absolute value. How far one convolution with it carries light."""
    a = np.abs(kernel)
    total = a.sum()
    out = []
    for ax in range(a.ndim):
        prof = a.sum(axis=tuple(i for i in range(a.ndim) if i != ax))
        n = prof.size
        c = n // 2
        r = 0
        while r < c:
            outside = prof[: c - r].sum() + prof[c + r + 1 :].sum()
            if outside <= mass * total:
                break
            r += 1
        out.append(r)
    return tuple(out)
