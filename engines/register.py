"""Registration: live drift correction by phase correlation.

Each frame's translation against a reference is estimated by phase correlation of band-passed,
edge-tapered frames, refined to sub-pixel precision by a local upsampled DFT around the peak
(Guizar-Sicairos et al., Opt. Lett. 33, 156, 2008), and undone by a Fourier shift. The
correlation uses real FFTs (``rfftn``) in float32 and one forward FFT of the raw frame, one of the
tapered frame, one inverse FFT for the correlation and one for the registered frame.

Sign conventions, used everywhere in livescope:

- ``shift`` (``shift_y``, ``shift_x``, ``shift_z``) is the *drift*: where the frame's content sits
  relative to the reference, ``frame(p) ~ ref(p - shift)``, in pixels, numpy axis order.
  ``apply_shift(frame, shift)`` moves content by ``+shift``; the registered frame is
  ``apply_shift(frame, -shift)``. (``skimage.registration.phase_cross_correlation`` returns the
  opposite: the shift that registers ``moving`` onto ``reference``.)
- ``drift_to_stage_um`` returns the relative stage move, in micrometres and stage (x, y) order,
  that brings the sample back to where the reference saw it; see its docstring.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any, ClassVar, cast

from ._array import fft_module, fft_workers, namespace
from .base import (
    Applies,
    EngineBase,
    EngineError,
    FrameInfo,
    Param,
    Reach,
    StreamSpec,
    as_bool,
    optional,
    register_engine,
)

log = logging.getLogger(__name__)

__all__ = ["Register", "apply_shift", "drift_to_stage_um", "estimate_shift"]

_FILLS = ("nearest", "zero", "wrap")
_REFERENCES = ("first", "rolling")
# Filter parameters whose change also invalidates the reference spectrum (it is stored tapered).
_TAPERED = ("taper", "log_offset")


# -- the portable core ---------------------------------------------------------------------------


def _fft_kwargs(fft: Any) -> dict[str, Any]:
    # scipy.fft parallelises over the leading axes with worker threads; the others take no such
    # argument.
    return {"workers": fft_workers()} if getattr(fft, "__name__", "") == "scipy.fft" else {}


def _fast_len(n: int) -> int:
    """Smallest length >= n whose prime factors are 2, 3 and 5."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def _freq_index(xp: Any, n: int, half: bool) -> Any:
    """Integer frequency indices (float64) of an FFT axis of length n; ``half`` for rfft's last."""
    k = xp.arange(n // 2 + 1 if half else n, dtype=xp.float64)
    return k if half else xp.where(k < (n + 1) // 2, k, k - n)


def _along(xp: Any, v: Any, axis: int, ndim: int) -> Any:
    """A 1-D vector reshaped to broadcast along ``axis`` of an ndim array."""
    shape = [1] * ndim
    shape[axis] = v.shape[0]
    return xp.reshape(v, tuple(shape))


def _tukey(xp: Any, n: int, taper: float) -> Any:
    """Tukey window: flat in the middle, cosine tapers over ``taper / 2`` of each end."""
    w = xp.ones((n,), dtype=xp.float64)
    m = int(round(taper * n / 2))
    if m < 1 or n < 4:
        return xp.astype(w, xp.float32)
    i = xp.arange(n, dtype=xp.float64)
    edge = xp.minimum(i, n - 1 - i)  # distance to the nearest end
    ramp = 0.5 * (1.0 - xp.cos(math.pi * (edge + 0.5) / m))
    return xp.astype(xp.where(edge < m, ramp, w), xp.float32)


class _Correlator:
    """What depends only on the frame shape and the filter settings: built once per stream."""

    def __init__(
        self,
        like: Any,
        shape: tuple[int, ...],
        *,
        noise_sigma_px: float = 1.0,
        background_sigma_px: float = 20.0,
        whiten: float = 1.0,
        taper: float = 0.25,
        log_offset: float | None = 0.1,
        axis_scale: Sequence[float] | None = None,
    ) -> None:
        xp = namespace(like)
        self.xp = xp
        self.log_offset = None if log_offset is None or log_offset < 0 else float(log_offset)
        self.fft = fft_module(like)
        self.fft_kw = _fft_kwargs(self.fft)
        # The FFT grid: each axis zero-padded to a length with small prime factors (a z-stack
        # of 41 planes would otherwise take a slow prime-length transform).
        self.frame_shape = tuple(int(n) for n in shape)
        self.shape = tuple(_fast_len(n) for n in self.frame_shape)
        self.ndim = len(self.shape)
        self.axes = tuple(range(self.ndim))
        self.whiten = float(whiten)
        # Per-axis frequency indices: full axes first, rfft's half axis last.
        self.k = [_freq_index(xp, n, half=(i == self.ndim - 1)) for i, n in enumerate(self.shape)]
        # Band-pass: a difference of Gaussians in Fourier space, squared because both the frame
        # and the reference are filtered. Zero at DC, so the mean and any slowly varying
        # background (uneven illumination, a dimming lamp) drop out of the correlation.
        scale = list(axis_scale) if axis_scale is not None else [1.0] * self.ndim
        r2: Any = None
        for i, n in enumerate(self.shape):
            f = self.k[i] / n * scale[i]
            term = _along(xp, f * f, i, self.ndim)
            r2 = term if r2 is None else r2 + term
        two_pi2 = 2.0 * math.pi**2
        lo = xp.exp(-two_pi2 * noise_sigma_px**2 * r2)
        hi = xp.exp(-two_pi2 * background_sigma_px**2 * r2) if background_sigma_px > 0 else 0.0
        band = lo - hi
        self.band2 = xp.astype(band * band, xp.float32)
        # Edge taper: the frame border does not move with the sample; untapered, its
        # discontinuity is a static feature that pulls every estimate towards zero.
        window = None
        for i, n in enumerate(self.frame_shape):
            term = _along(xp, _tukey(xp, n, taper), i, self.ndim)
            window = term if window is None else window * term
        self.window = window
        # Hermitian weights of the half axis: columns other than 0 and Nyquist stand for two.
        n_last = self.shape[-1]
        kl = self.k[-1]
        single = (kl == 0) | (kl == n_last / 2)  # n/2 is a column only for even n
        self.half_weight = xp.where(single, xp.ones_like(kl), 2.0 * xp.ones_like(kl))

    # spectra ---------------------------------------------------------------------------------

    def spectrum(self, frame: Any) -> Any:
        return self.fft.rfftn(frame, s=self.shape, axes=self.axes, **self.fft_kw)

    def tapered_spectrum(self, frame: Any) -> Any:
        """Spectrum of the frame as the correlation sees it: log-compressed, tapered."""
        xp = self.xp
        if self.log_offset is not None:
            # In log units a cell ten times brighter than its surroundings has the same
            # contrast as they do: brightness is an additive constant that the band-pass
            # removes. Without it one bright moving cell dominates the whitened spectrum and
            # drags the estimate along.
            pos = xp.maximum(frame, 0.0)
            offset = self.log_offset * float(xp.mean(pos))
            frame = xp.log(pos + (offset if offset > 0 else 1.0))
        return self.spectrum((frame - xp.mean(frame)) * self.window)

    def cross_power(self, f_frame: Any, f_ref: Any) -> Any:
        """Band-passed, (partly) whitened cross-power spectrum; its peak sits at the drift."""
        xp = self.xp
        x = f_frame * xp.conj(f_ref)
        if self.whiten == 0.0:
            return x * self.band2
        mag = xp.abs(x)
        eps = xp.max(mag) * 1e-7 + 1e-30
        norm = mag + eps if self.whiten == 1.0 else (mag + eps) ** self.whiten
        return x * (self.band2 / norm)

    def correlation(self, x: Any) -> Any:
        return self.fft.irfftn(x, s=self.shape, axes=self.axes, **self.fft_kw)

    # peaks -----------------------------------------------------------------------------------

    def wrap(self, idx: Sequence[int]) -> list[int]:
        return [int(i) - n if int(i) > n // 2 else int(i) for i, n in zip(idx, self.shape, strict=True)]

    def argmax(self, c: Any) -> tuple[list[int], float]:
        xp = self.xp
        flat = int(xp.argmax(xp.reshape(c, (-1,))))
        idx = []
        for n in reversed(self.shape):
            idx.append(flat % n)
            flat //= n
        idx.reverse()
        return self.wrap(idx), float(c[tuple(idx)])

    def local_peak(self, c: Any, centre: Sequence[float], radius: int) -> tuple[list[int], float] | None:
        """Highest local maximum of ``c`` within ``radius`` pixels of ``centre``, or None.

        A true local maximum, not merely the highest value in the window: the shoulder of a
        stronger peak just outside the window must not pass for the sample's own peak.
        """
        xp = self.xp
        sub = c
        starts = []
        for axis, (m, n) in enumerate(zip(centre, self.shape, strict=True)):
            r = min(radius + 1, (n - 1) // 2)
            start = int(round(m)) - r
            idx = xp.asarray([(start + j) % n for j in range(2 * r + 1)])
            sub = xp.take(sub, idx, axis=axis)
            starts.append(start)
        inner = tuple(slice(1, -1) for _ in range(sub.ndim))
        core = sub[inner]
        is_peak = None
        for offset in _neighbour_offsets(sub.ndim):
            nb = sub[tuple(slice(1 + o, sub.shape[i] - 1 + o) for i, o in enumerate(offset))]
            ge = core >= nb
            is_peak = ge if is_peak is None else is_peak & ge
        if is_peak is None or not bool(xp.any(is_peak)):
            return None
        masked = xp.where(is_peak, core, -xp.inf)
        rel, value = _Correlator.argmax_plain(xp, masked)
        return self.wrap([(s + 1 + j) % n for s, j, n in zip(starts, rel, self.shape, strict=True)]), value

    @staticmethod
    def argmax_plain(xp: Any, a: Any) -> tuple[list[int], float]:
        flat = int(xp.argmax(xp.reshape(a, (-1,))))
        idx = []
        for n in reversed(a.shape):
            idx.append(flat % n)
            flat //= n
        idx.reverse()
        return idx, float(a[tuple(idx)])

    def significance(self, c: Any, value: float) -> float:
        """Peak height in standard deviations of the correlation (its mean is ~0: no DC)."""
        xp = self.xp
        sd = float(xp.sqrt(xp.mean(c * c)))
        return value / sd if sd > 0 else 0.0

    def refine(self, x: Any, peak: Sequence[int], upsample: int) -> list[float]:
        """Sub-pixel peak by a local upsampled DFT of the cross-power spectrum ``x``.

        Evaluates the band-limited correlation on a grid of 1/upsample pixel over +-0.75 px
        around the integer peak, by one DFT contraction per axis (no zero-padded FFT), then a
        parabola through the three best grid points of each axis: with the peak a few pixels
        wide, upsample=4 already reaches 0.01 px on clean data.
        """
        xp = self.xp
        if upsample <= 1:
            return [float(p) for p in peak]
        n_out = int(math.ceil(1.5 * upsample)) | 1  # odd: the integer peak sits in the middle
        offsets = (xp.arange(n_out, dtype=xp.float64) - n_out // 2) / upsample
        grids: list[Any] = []
        out = x
        for axis in reversed(range(self.ndim)):
            n = self.shape[axis]
            r = float(peak[axis]) + offsets
            grids.insert(0, r)
            k = self.k[axis]
            phase = (2.0 * math.pi / n) * (xp.reshape(r, (-1, 1)) * xp.reshape(k, (1, -1)))
            re, im = xp.cos(phase), -xp.sin(phase)  # conjugated: vecdot conjugates its first
            if axis == self.ndim - 1:
                w = xp.reshape(self.half_weight, (1, -1))
                re, im = w * re, w * im
            kernel = xp.astype(re, xp.complex64) + xp.astype(im, xp.complex64) * 1j  # (n_out, N)
            # Bring this axis last; the axes before it are still the original ones. vecdot
            # broadcasts without a temporary of size N x n_out and, unlike a threaded BLAS
            # product, keeps its speed when the cores are busy.
            perm = [*range(axis), *range(axis + 1, out.ndim), axis]
            out = xp.permute_dims(out, tuple(perm)) if perm != list(range(out.ndim)) else out
            out = xp.vecdot(kernel, out[..., None, :])  # (..., n_out)
        out = xp.permute_dims(out, tuple(reversed(range(self.ndim))))
        corr = xp.real(out)
        idx, _ = _Correlator.argmax_plain(xp, corr)
        shift = []
        for axis in range(self.ndim):
            j = idx[axis]
            delta = 0.0
            if 0 < j < n_out - 1:
                lo_i = list(idx)
                hi_i = list(idx)
                lo_i[axis] -= 1
                hi_i[axis] += 1
                c0 = float(corr[tuple(idx)])
                cm = float(corr[tuple(lo_i)])
                cp = float(corr[tuple(hi_i)])
                den = cm - 2.0 * c0 + cp
                if den < 0:
                    delta = 0.5 * (cm - cp) / den
            shift.append(float(grids[axis][j]) + delta / upsample)
        return shift

    # shifting --------------------------------------------------------------------------------

    def ramp_factors(self, shift: Sequence[float]) -> list[Any]:
        """Per-axis phase factors whose product moves content by ``shift``."""
        xp = self.xp
        factors = []
        for axis, (s, n) in enumerate(zip(shift, self.shape, strict=True)):
            k = self.k[axis]
            phase = (-2.0 * math.pi * float(s) / n) * k
            re = xp.cos(phase)
            im = xp.sin(phase)
            if n % 2 == 0 and axis < self.ndim - 1:
                # The Nyquist row is its own Hermitian partner: keep it real.
                im = xp.where(k == -(n // 2), 0.0, im)
            f = xp.astype(re, xp.complex64) + xp.astype(im, xp.complex64) * 1j
            factors.append(_along(xp, f, axis, self.ndim))
        return factors

    def shifted(self, f: Any, factors: list[Any]) -> Any:
        for g in factors:
            f = f * g
        return f

    def to_image(self, f: Any) -> Any:
        img = self.correlation(f)
        if self.shape != self.frame_shape:
            img = img[tuple(slice(0, n) for n in self.frame_shape)]
        return self.xp.astype(img, self.xp.float32)


def _neighbour_offsets(ndim: int) -> list[tuple[int, ...]]:
    offsets: list[tuple[int, ...]] = [()]
    for _ in range(ndim):
        offsets = [(*o, d) for o in offsets for d in (-1, 0, 1)]
    return [o for o in offsets if any(o)]


def _fill_edges(xp: Any, img: Any, shift: Sequence[float], fill: str) -> Any:
    """Replace the strips that a circular shift wrapped around from the opposite side."""
    if fill == "wrap":
        return img
    for axis, s in enumerate(shift):
        n = img.shape[axis]
        m = min(int(math.ceil(abs(float(s)) - 1e-6)), n)
        if m <= 0:
            continue
        strip = [slice(None)] * img.ndim
        src = [slice(None)] * img.ndim
        if s > 0:  # content moved towards higher indices: the low edge is wrapped
            strip[axis] = slice(0, m)
            src[axis] = slice(m, m + 1)
        else:
            strip[axis] = slice(n - m, n)
            src[axis] = slice(n - m - 1, n - m)
        if fill == "zero" or m >= n:
            img[tuple(strip)] = 0.0
        else:
            img[tuple(strip)] = img[tuple(src)]
    return img


def _as_float(xp: Any, a: Any) -> Any:
    return a if a.dtype == xp.float32 else xp.astype(a, xp.float32)


# Defaults that differ between planes and stacks. Planes (chosen on cell images): phase
# correlation of log-compressed frames low-passed at 1 px, static taper. Stacks (chosen on the
# bead stack and a nuclei phantom of bench/bench_register.py, checked on held-out stacks there):
# a narrower low-pass and linear intensities (sparse point-like objects lose their peaks to
# both), partial whitening (|X|**0.3: full whitening gives the many near-empty high z
# frequencies of a stack as much weight as the well-measured ones) and one refinement pass on
# the registered stack (a static taper on 30-40 planes biases z by up to 20 % of the drift).
_PLANE_DEFAULTS: dict[str, Any] = {
    "noise_sigma_px": 1.0,
    "whiten": 1.0,
    "log_offset": 0.1,
    "refine_passes": 0,
}
_STACK_DEFAULTS: dict[str, Any] = {
    "noise_sigma_px": 0.5,
    "whiten": 0.3,
    "log_offset": None,
    "refine_passes": 1,
}


def _defaults(ndim: int) -> dict[str, Any]:
    return _STACK_DEFAULTS if ndim >= 3 else _PLANE_DEFAULTS


def _refine_on_registered(
    corr: _Correlator,
    f_raw: Any,
    f_ref: Any,
    shift: Sequence[float],
    passes: int,
    upsample: int,
    fill: str = "nearest",
) -> tuple[list[float], Any]:
    """Re-measure the drift on the frame registered by the current estimate.

    The taper is fixed to the frame while the content slides under it, which pulls the
    estimate towards zero in proportion to the drift (up to 20 % on a 32-plane stack). After
    registering, what is left to measure is small, and so is its bias: one pass takes most of
    it. The peak is known, so a pass costs two FFTs and the local upsampled DFT. Returns the
    drift and the tapered spectrum of the frame registered by it (moved by the last small
    correction in Fourier space), as the reference is built: taper in the reference's place.
    """
    xp = corr.xp
    shift = [float(v) for v in shift]
    f_tap = None
    for _ in range(passes):
        back = [-v for v in shift]
        registered = _fill_edges(xp, corr.to_image(corr.shifted(f_raw, corr.ramp_factors(back))), back, fill)
        f_tap = corr.tapered_spectrum(registered)
        x = corr.cross_power(f_tap, f_ref)
        residual = corr.refine(x, [0] * corr.ndim, upsample)
        shift = [s + r for s, r in zip(shift, residual, strict=True)]
    if f_tap is not None:
        f_tap = corr.shifted(f_tap, corr.ramp_factors([-r for r in residual]))
    return shift, f_tap


def _axis_scale(spacing: Sequence[float] | None, ndim: int) -> list[float] | None:
    if spacing is None:
        return None
    if len(spacing) != ndim or any(float(v) <= 0 for v in spacing):
        raise ValueError(f"spacing needs {ndim} positive sizes (one per axis), got {spacing}")
    return [float(spacing[-1]) / float(v) for v in spacing]


def estimate_shift(
    ref: Any,
    frame: Any,
    upsample: int = 10,
    *,
    noise_sigma_px: float | None = None,
    background_sigma_px: float = 20.0,
    whiten: float | None = None,
    taper: float = 0.25,
    log_offset: float | str | None = "default",
    refine_passes: int | None = None,
    spacing: Sequence[float] | None = None,
) -> tuple[float, ...]:
    """Drift of ``frame`` relative to ``ref`` in pixels, numpy axis order ((y, x) or (z, y, x)).

    ``frame(p) ~ ref(p - shift)``; register with ``apply_shift(frame, [-s for s in shift])``.
    Precision is about 1/upsample pixel from the grid, better after the parabolic step; the
    band-pass (Gaussian ``noise_sigma_px`` minus Gaussian ``background_sigma_px``) suppresses
    shot noise and uneven background. ``whiten``: 1 is phase correlation, 0 plain
    cross-correlation of the band-passed frames. The frames are correlated in log units,
    ``log(frame + log_offset * mean)``, so that a bright moving cell weighs no more than dim
    structure of the same contrast; ``log_offset=None`` (or negative) correlates them linearly.
    ``refine_passes`` re-measures the drift that many times on the frame registered by the
    estimate so far (removes the bias of the static taper, which grows with the drift).
    Left out, these take the plane defaults (1 px, 1.0, 0.1, 0 passes) for
    2-D frames and the stack defaults (0.5 px, 0.3, linear, 1 pass) for 3-D ones.
    ``spacing``: the voxel size per axis (any one unit, e.g. ``(z_step_um, px_um, px_um)``);
    the filter widths are then in pixels of the last axis on every axis.
    Works for numpy, cupy and array-API arrays.
    """
    xp = namespace(ref, frame)
    ref = _as_float(xp, ref)
    frame = _as_float(xp, frame)
    if tuple(ref.shape) != tuple(frame.shape):
        raise ValueError(f"reference {tuple(ref.shape)} and frame {tuple(frame.shape)} differ")
    d = _defaults(frame.ndim)
    noise_sigma_px = d["noise_sigma_px"] if noise_sigma_px is None else noise_sigma_px
    whiten = d["whiten"] if whiten is None else whiten
    if isinstance(log_offset, str) and log_offset == "default":
        log_offset = d["log_offset"]
    passes = d["refine_passes"] if refine_passes is None else int(refine_passes)
    corr = _Correlator(
        frame,
        tuple(frame.shape),
        noise_sigma_px=noise_sigma_px,
        background_sigma_px=background_sigma_px,
        whiten=whiten,
        taper=taper,
        log_offset=cast("float | None", log_offset),  # "default" resolved above
        axis_scale=_axis_scale(spacing, frame.ndim),
    )
    f_ref = corr.tapered_spectrum(ref)
    x = corr.cross_power(corr.tapered_spectrum(frame), f_ref)
    peak, _ = corr.argmax(corr.correlation(x))
    shift = corr.refine(x, peak, int(upsample))
    if passes > 0:
        f_raw = corr.spectrum(frame)
        shift, _ = _refine_on_registered(corr, f_raw, f_ref, shift, passes, int(upsample))
    return tuple(shift)


def apply_shift(frame: Any, shift: Sequence[float], fill: str = "nearest") -> Any:
    """Move the frame's content by ``shift`` pixels (Fourier shift): ``out(p) = frame(p - shift)``.

    Exact for band-limited content, no interpolation blur. The strip that a circular shift wraps
    in from the opposite edge is replaced: ``fill="nearest"`` repeats the nearest valid row,
    ``"zero"`` blanks it, ``"wrap"`` leaves the circular result. Returns float32.
    """
    xp = namespace(frame)
    frame = _as_float(xp, frame)
    if len(shift) != frame.ndim:
        raise ValueError(f"shift {tuple(shift)} does not match a frame of {frame.ndim} axes")
    if fill not in _FILLS:
        raise ValueError(f"fill must be one of {_FILLS}, got {fill!r}")
    corr = _Correlator(frame, tuple(frame.shape), taper=0.0)
    out = corr.to_image(corr.shifted(corr.spectrum(frame), corr.ramp_factors(shift)))
    return _fill_edges(xp, out, shift, fill)


# -- stage feedback ------------------------------------------------------------------------------


def drift_to_stage_um(
    shift_yx_px: Sequence[float],
    pixel_size_um: float | None,
    affine: Sequence[float] | None = None,
) -> tuple[float, float]:
    """Relative XY stage move (dx_um, dy_um) that brings a drifted sample back.

    ``shift_yx_px`` is the measured drift (dy, dx) in pixels, as ``estimate_shift`` and the
    engine's ``shift_y``/``shift_x`` report it. ``affine`` is Micro-Manager's / pymmcore-plus's
    pixel-size affine, ``core.getPixelSizeAffine()``: six numbers (a, b, tx, c, d, ty), the first
    two rows of a 3x3 matrix that maps camera pixels (x, y) to stage micrometres,
    ``stage_x = a x + b y + tx``, ``stage_y = c x + d y + ty``; it includes the pixel size.
    Moving the stage by ``A @ dp`` moves the image content by ``-dp`` (Micro-Manager's
    ``XYNavigator`` negates ``A @ dp`` to move the sample on display by ``+dp``), so the move that
    undoes a drift ``dp`` is ``+A @ dp``: pass the result to ``setRelativeXYPosition(dx, dy)``.

    Without an affine (or with Micro-Manager's uncalibrated identity, or one whose scale
    disagrees with ``pixel_size_um`` by more than 10 %, which Micro-Manager also distrusts), the
    camera axes are taken as the stage axes: ``(pixel_size_um * dx, pixel_size_um * dy)``.
    """
    dy, dx = float(shift_yx_px[0]), float(shift_yx_px[1])
    m = _stage_matrix(pixel_size_um, affine)
    return (m[0] * dx + m[1] * dy, m[2] * dx + m[3] * dy)


def _stage_matrix(pixel_size_um: float | None, affine: Sequence[float] | None) -> tuple[float, ...]:
    if affine is not None:
        if isinstance(affine, str):  # --param register.stage_affine=a,b,tx,c,d,ty
            affine = [float(v) for v in affine.replace("(", "").replace(")", "").split(",")]
        if len(affine) != 6:
            raise ValueError(f"pixel-size affine has 6 numbers (a, b, tx, c, d, ty), got {len(affine)}")
        a, b, _tx, c, d, _ty = (float(v) for v in affine)
        scale = math.sqrt(abs(a * d - b * c))  # Micro-Manager's deducePixelSize, near enough
        uncalibrated = (a, b, c, d) in ((1.0, 0.0, 0.0, 1.0), (0.0, 0.0, 0.0, 0.0))
        if not uncalibrated and (pixel_size_um is None or abs(scale - pixel_size_um) <= 0.1 * pixel_size_um):
            return (a, b, c, d)
        if not uncalibrated:
            log.warning(
                "pixel-size affine scale %.4g um/px disagrees with pixel size %.4g um; "
                "using the pixel size and camera axes",
                scale,
                pixel_size_um,
            )
    if not pixel_size_um or pixel_size_um <= 0:
        raise ValueError(
            "need the camera's pixel size (um) or a calibrated pixel-size affine to convert "
            "drift to a stage move; set them in the acquisition (Micro-Manager pixel size "
            "calibration) or pass pixel_size_um"
        )
    p = float(pixel_size_um)
    return (p, 0.0, 0.0, p)


# -- the engine ----------------------------------------------------------------------------------


def _log_offset(value: Any) -> float | str | None:
    """ "default" (the plane or stack default), a number (< 0: none), or none."""
    if isinstance(value, str):  # --param register.log_offset=none
        text = value.strip().lower()
        if text == "default":
            return "default"
        value = None if text in ("", "none", "off") else float(text)
    return None if value is None or value < 0 else float(value)


def _stage_affine(value: Any) -> tuple[float, ...] | None:
    if isinstance(value, str):
        value = value.strip() or None
    if value is None:
        return None
    _stage_matrix(None, value)  # validates
    if isinstance(value, str):
        value = [float(v) for v in value.strip("()[]").split(",")]
    return tuple(float(v) for v in value)


def _check(ok: Any, message: str) -> Any:
    """A parameter check: None when the value (or None) is fine, else ``message`` ({v!r}: the value)."""
    return lambda v: None if v is None or ok(v) else message.format(v=v)


_REBUILD = Applies.REBUILD  # the band-pass and taper are computed again (and the reference, for the taper)
_RESET = Applies.RESET  # a new reference


@register_engine("register")
class Register(EngineBase):
    """Drift correction against a reference; one instance per (position, channel[, plane])."""

    name: ClassVar[str] = "register"
    outputs: ClassVar[tuple[str, ...]] = ("registered", "shift_y", "shift_x")
    scalar_outputs: ClassVar[tuple[str, ...]] = ("shift_y", "shift_x")

    # None (and log_offset "default") take the plane or stack default (_PLANE_DEFAULTS, _STACK_DEFAULTS)
    parameters: ClassVar[dict[str, Param]] = {
        "reference": Param(
            "first",
            str,
            applies=_RESET,
            check=_check(lambda v: v in _REFERENCES, f"register: reference must be one of {_REFERENCES}, got {{v!r}}"),
        ),
        "reference_frames": Param(
            5, int, applies=_RESET, check=_check(lambda v: v >= 1, "register: reference_frames must be at least 1")
        ),
        "rolling_weight": Param(
            0.05, float, check=_check(lambda v: 0.0 < v <= 1.0, "register: rolling_weight must be in (0, 1]")
        ),
        "upsample": Param(10, int, doc="sub-pixel precision: 1 / upsample px"),
        "noise_sigma_px": Param(None, optional(float), applies=_REBUILD),
        "background_sigma_px": Param(20.0, float, applies=_REBUILD),
        "whiten": Param(
            None,
            optional(float),
            applies=_REBUILD,
            check=_check(lambda v: 0.0 <= v <= 1.0, "register: whiten must be in [0, 1] (1 = phase correlation)"),
        ),
        "taper": Param(
            0.25,
            float,
            applies=_REBUILD,
            check=_check(lambda v: 0.0 <= v <= 1.0, "register: taper must be in [0, 1] (fraction of each axis)"),
        ),
        "log_offset": Param("default", _log_offset, applies=_REBUILD),
        "refine_passes": Param(
            None, optional(int), check=_check(lambda v: v >= 0, "register: refine_passes must be 0 or more")
        ),
        "max_step_px": Param(1.0, float),
        "min_significance": Param(8.0, float),
        "relock_frames": Param(5, int),
        "fill": Param(
            "nearest", str, check=_check(lambda v: v in _FILLS, f"register: fill must be one of {_FILLS}, got {{v!r}}")
        ),
        "volume": Param(
            False,
            as_bool,
            applies=Applies.FIXED,
            fixed="register: volume is fixed per instance (it changes what the daemon sends); "
            "restart the engine with --param register.volume=...",
        ),
        "feedback": Param(False, as_bool, doc="send drift events to move the stage"),
        "feedback_threshold_px": Param(2.0, float),
        "feedback_holdoff_frames": Param(3, int),
        "stage_affine": Param(
            None,
            _stage_affine,
            show=lambda a: list(a) if a else None,
            doc="Micro-Manager's pixel-size affine a,b,tx,c,d,ty",
        ),
    }

    # the parameters as ``_init_params`` sets them (converted and checked; the None and "default"
    # of noise_sigma_px, whiten, refine_passes and log_offset resolved by ``_validate``)
    reference: str
    reference_frames: int
    rolling_weight: float
    upsample: int
    noise_sigma_px: float
    background_sigma_px: float
    whiten: float
    taper: float
    log_offset: float | None
    refine_passes: int
    max_step_px: float
    min_significance: float
    relock_frames: int
    fill: str
    volume: bool
    feedback: bool
    feedback_threshold_px: float
    feedback_holdoff_frames: int
    stage_affine: tuple[float, ...] | None

    def __init__(
        self,
        reference: str = "first",
        reference_frames: int = 5,
        rolling_weight: float = 0.05,
        upsample: int = 10,
        noise_sigma_px: float | None = None,
        background_sigma_px: float = 20.0,
        whiten: float | None = None,
        taper: float = 0.25,
        log_offset: float | str | None = "default",
        refine_passes: int | None = None,
        max_step_px: float = 1.0,
        min_significance: float = 8.0,
        relock_frames: int = 5,
        fill: str = "nearest",
        volume: bool = False,
        feedback: bool = False,
        feedback_threshold_px: float = 2.0,
        feedback_holdoff_frames: int = 3,
        stage_affine: Sequence[float] | str | None = None,
    ) -> None:
        self._init_params(locals())
        # The shape of the data and the outputs follow ``volume`` (fixed per instance).
        axes = ("z", "y", "x") if self.volume else ("y", "x")
        self.scalar_outputs = tuple(f"shift_{a}" for a in axes)  # type: ignore[misc]
        self.outputs = ("registered", *self.scalar_outputs)  # type: ignore[misc]
        self.spec: StreamSpec | None = None
        self._corr: _Correlator | None = None
        self._reset()

    def _validate(self) -> None:
        # Defaults differ by dimension (planes or stacks): see _PLANE_DEFAULTS, _STACK_DEFAULTS.
        d = _defaults(3 if self.volume else 2)
        if self.noise_sigma_px is None:
            self.noise_sigma_px = float(d["noise_sigma_px"])
        if self.whiten is None:
            self.whiten = float(d["whiten"])
        if self.refine_passes is None:
            self.refine_passes = int(d["refine_passes"])
        if self.log_offset == "default":
            self.log_offset = cast("float | None", _log_offset(d["log_offset"]))  # a number or None, not "default"

    # -- engine protocol -----------------------------------------------------------------------

    @property
    def needs_volume(self) -> bool:
        return self.volume

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec
        self._corr = None
        self._reset()
        if self.feedback:
            self._stage_scale()  # fail now, not at the first drift, when units are unknown

    def _rebuild(self, name: str) -> None:
        self._corr = None
        if name in _TAPERED:
            self._reset_state(name)

    def _reset_state(self, name: str) -> None:
        log.info("register: %s changed, starting a new reference", name)
        self._reset()

    def reach(self) -> Reach:
        return Reach(None, None)  # the reference comes from the stream's first frames

    def _details(self) -> dict[str, Any]:
        return {
            "method": "phase correlation, DoG band-pass, Tukey taper, upsampled-DFT sub-pixel "
            "peak (re-measured on the registered frame refine_passes times), Fourier shift",
            "frames": self._n,
            "held_frames": self._held_total,
        }

    def close(self) -> None:
        self._corr = None
        self._reset()

    # -- state ---------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._n = 0
        self._ref: Any = None  # tapered spectrum of the reference, aligned to frame 0
        self._ref_count = 0
        self._shift: list[float] | None = None  # last accepted drift
        self._jumps: deque[list[int]] = deque(maxlen=max(1, self.relock_frames))
        self._held_total = 0
        self._since_event = 10**9
        self.last_significance = 0.0
        self.last_held = False

    def _correlator(self, frame: Any) -> _Correlator:
        shape = tuple(frame.shape)
        if self._corr is not None and self._corr.frame_shape != shape:
            log.warning("register: frame shape changed to %s, starting a new reference", shape)
            self._corr = None
            self._reset()
        if self._corr is None:
            self._corr = _Correlator(
                frame,
                shape,
                noise_sigma_px=self.noise_sigma_px,
                background_sigma_px=self.background_sigma_px,
                whiten=self.whiten,
                taper=self.taper,
                log_offset=self.log_offset,
                axis_scale=self._axis_scale(len(shape)),
            )
        return self._corr

    def _axis_scale(self, ndim: int) -> list[float]:
        """Filter widths are in xy pixels; z planes are usually thicker than pixels are wide."""
        scale = [1.0] * ndim
        if ndim == 3 and self.spec is not None:
            px, dz = self.spec.pixel_size_um, self.spec.z_step_um
            if px and dz:
                scale[0] = px / dz  # cycles per plane -> cycles per xy pixel
        return scale

    # -- per frame -----------------------------------------------------------------------------

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        xp = namespace(frame)
        raw = _as_float(xp, frame)
        want = 3 if self.volume else 2
        if raw.ndim != want:
            raise EngineError(
                f"register: expected {'(z, y, x) stacks' if self.volume else '(y, x) planes'}, "
                f"got shape {tuple(raw.shape)}; set --param register.volume="
                f"{'false' if self.volume else 'true'} to match the stream"
            )
        corr = self._correlator(raw)
        f_raw = corr.spectrum(raw)
        f_tap = corr.tapered_spectrum(raw)
        f_aligned = None  # tapered spectrum registered onto the reference, when there is one

        if self._ref is None:  # the first frame defines the coordinates: zero drift
            shift = [0.0] * raw.ndim
            held = False
            self.last_significance = 0.0
        else:
            shift, held = self._estimate(corr, f_tap)
            if not held and self.refine_passes > 0:
                # The reference then takes the registered frame with the taper in the
                # reference's place, not the raw frame's tapered spectrum shifted (whose taper
                # sits off the reference's by the drift).
                shift, f_aligned = _refine_on_registered(
                    corr, f_raw, self._ref, shift, self.refine_passes, self.upsample, self.fill
                )
        self.last_held = held

        factors = corr.ramp_factors([-s for s in shift])
        registered = _fill_edges(xp, corr.to_image(corr.shifted(f_raw, factors)), [-s for s in shift], self.fill)
        if not held:
            if f_aligned is None:
                f_aligned = corr.shifted(f_tap, factors)
            self._update_reference(corr, f_aligned)
        self._shift = shift
        self._n += 1

        out: dict[str, Any] = {"registered": registered}
        for name, s in zip(self.scalar_outputs, shift, strict=True):
            out[name] = float(s)
        out["events"] = self._events(shift, info)
        return out

    def _estimate(self, corr: _Correlator, f_tap: Any) -> tuple[list[float], bool]:
        """Drift of this frame, or the previous drift when the measurement is not trusted."""
        prev = self._shift or [0.0] * corr.ndim
        x = corr.cross_power(f_tap, self._ref)
        c = corr.correlation(x)
        # Track the sample: the best peak near the last drift wins over a stronger one further
        # away (a bright cell moving faster than the drift), as long as it stands out of the
        # correlation's noise.
        radius = int(math.ceil(self.max_step_px)) + 1
        found = corr.local_peak(c, prev, radius)
        near, near_value = found if found is not None else (None, 0.0)
        near_sig = corr.significance(c, near_value)
        if near is not None and near_sig >= self.min_significance:
            self._jumps.clear()
            self.last_significance = near_sig
            return corr.refine(x, near, self.upsample), False
        # Nothing near the last drift: a glitch (focus lost, shutter, a frame from elsewhere) or
        # a real jump of the stage. Follow the strongest peak only once it has stayed put for
        # relock_frames frames; hold the last drift until then.
        peak, value = corr.argmax(c)
        if self._jumps and max(abs(p - q) for p, q in zip(peak, self._jumps[-1], strict=True)) > 1:
            self._jumps.clear()
        self._jumps.append(peak)
        if len(self._jumps) >= self.relock_frames:
            self._jumps.clear()
            self.last_significance = corr.significance(c, value)
            log.info("register: drift jumped to %s px and stayed; following it", peak)
            return corr.refine(x, peak, self.upsample), False
        self._held_total += 1
        self.last_significance = near_sig
        log.debug("register: no peak near %s (best %s), holding the last drift", prev, peak)
        return list(prev), True

    def _update_reference(self, corr: _Correlator, f_aligned: Any) -> None:
        """Average the first frames (aligned to frame 0), then freeze or follow slowly."""
        if self._ref is None:
            self._ref = f_aligned
            self._ref_count = 1
            return
        if self._ref_count < self.reference_frames:
            self._ref_count += 1
            self._ref = self._ref + (f_aligned - self._ref) * (1.0 / self._ref_count)
        elif self.reference == "rolling":
            a = self.rolling_weight
            self._ref = self._ref * (1.0 - a) + f_aligned * a

    # -- feedback ------------------------------------------------------------------------------

    def _stage_scale(self) -> tuple[tuple[float, ...], float | None]:
        spec = self.spec
        px = spec.pixel_size_um if spec is not None else None
        affine = self.stage_affine
        if affine is None and spec is not None:
            affine = spec.extra.get("pixel_size_affine")
        try:
            m = _stage_matrix(px, affine)
        except ValueError as exc:
            raise EngineError(f"register: feedback=True but {exc}") from None
        dz = spec.z_step_um if spec is not None else None
        return m, dz

    def _events(self, shift: list[float], info: FrameInfo) -> list[dict[str, Any]]:
        self._since_event += 1
        if not self.feedback or self.last_held:
            return []
        if max(abs(s) for s in shift) <= self.feedback_threshold_px:
            return []
        # The stage needs a few frames to move; sending again before the correction shows up
        # would correct twice.
        if self._since_event <= self.feedback_holdoff_frames:
            return []
        m, dz = self._stage_scale()
        dy, dx = shift[-2], shift[-1]
        stage = [m[0] * dx + m[1] * dy, m[2] * dx + m[3] * dy]
        axes = ["x", "y"]
        if self.volume and dz:
            stage.append(shift[0] * dz)  # planes are ordered by increasing focus position
            axes.append("z")
        self._since_event = 0
        return [
            {
                "kind": "drift",
                "seq": int(info.seq),
                "shift_px": [float(s) for s in shift],
                "stage_um": stage,
                "stage_axes": axes,
            }
        ]
