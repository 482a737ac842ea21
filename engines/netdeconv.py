"""Learned deconvolution: a U-Net taught by the classical Wiener-Butterworth RL on your own frames.

The network (``unet.UNet``, the denoiser's architecture and model file) maps a raw frame to what
the classical engine (``rl.deconvolve_array``, WB-RL) makes of it, in one pass:

- ``task="deconvolve"``: the target of frame t is WB-RL of frame t itself. Trained over many
  noisy frames, the network regresses to the average teacher output for a given input, which
  also averages away part of the noise WB-RL amplifies.
- ``task="restore"``: the target of frame t is WB-RL of the temporal mean of the frames
  t - w//2 .. t + w//2 (``restore_window`` w), i.e. the deconvolution of a frame with w times
  the photons; the network learns to denoise and deconvolve in one pass. This needs a scene
  that is still over the window (or ``denoised=`` targets, e.g. the denoise engine's output).

Spatially varying blur: ``psf`` may be a grid of PSFs (ny, nx, ky, kx), one per region of a
regular grid over the field. The teacher deconvolves the frame with each region's PSF and blends
the results with bilinear (tent) weights between region centres; the network then gets two extra
input channels, the normalised field coordinates (y, x), so it can learn which blur is where.
The model is bound to the field (sensor geometry) it was trained on: ``field_shape`` is stored.

Every frame can be checked: the output is re-blurred with the (regional) PSF and compared with
the raw frame under the Poisson-Gaussian noise model ``var = gain * signal + read_var``; the
binned, standardised residual (:func:`consistency_score`) is ~1 for a frame the network
explains and grows when the output does not account for the data. The threshold is measured at
fit time on the training frames and stored in the model file.

z-stacks (``volume=True``) are restored plane by plane with the 2-D network.

torch is imported only for fitting; the engines run on onnxruntime without it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np

from . import modelfile, modelzoo
from ._array import to_numpy
from .base import (
    Applies,
    EngineBase,
    EngineError,
    FrameInfo,
    Param,
    StreamSpec,
    as_bool,
    optional,
    register_engine,
)
from .calibrate import CameraOffset, estimate_offset
from .fit import FitResult
from .fit import augment as augment_batch  # fit_deconvolution has an `augment` keyword
from .inference import ORDER, Runner, estimate_noise, run_tiled
from .rl import deconvolve_array, wb_parameters

__all__ = [
    "NetDeconvolver",
    "PSFField",
    "Restore",
    "consistency_score",
    "fit_deconvolution",
    "psf_from_options",
    "radial_psf_grid",
    "teacher_targets",
]

log = logging.getLogger(__name__)

SCALE_PERCENTILE = 99.8  # input and output scale of the network: this percentile of the frame
# the network's correction is scaled by this while fitting, and the factor is folded into its
# last (1x1) layer afterwards: a fresh network then starts next to the identity instead of at a
# random correction as large as the residual itself. Without it the fit sat on the "predict no
# correction" plateau (L1 0.040) for 200-300+ steps, and in some runs never left it (the
# restore and bench deconvolve fits that did not learn); with it the loss leaves it by ~100
# steps and reaches 0.012 in 300 (tests/engines/test_netdeconv.py setting, docs).
RESIDUAL_GAIN = 0.1
CONSISTENCY_BIN = 8  # residuals are averaged in bin x bin blocks: noise averages down, structure does not
TASKS = ("deconvolve", "restore")


# --------------------------------------------------------------------------- PSF field


def _pad_to(k: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    py, px = size[0] - k.shape[0], size[1] - k.shape[1]
    return np.pad(k, ((py // 2, py - py // 2), (px // 2, px - px // 2)))


def _tent(n: int, regions: int) -> np.ndarray:
    """(regions, n): piecewise-linear weights between region centres, constant beyond the
    outer centres, summing to 1 at every pixel."""
    if regions == 1:
        return np.ones((1, n))
    centres = (np.arange(regions) + 0.5) * n / regions - 0.5
    pos = np.arange(n)
    return np.stack([np.interp(pos, centres, np.eye(regions)[i]) for i in range(regions)])


@dataclasses.dataclass(frozen=True)
class PSFField:
    """One PSF (grid 1 x 1) or a grid of PSFs, one per region of a regular grid over the field.

    ``kernels``: (ny, nx, ky, kx), odd ky and kx, each kernel non-negative and summing to 1.
    """

    kernels: np.ndarray

    @classmethod
    def of(cls, psf: Any) -> PSFField:
        if isinstance(psf, PSFField):
            return psf
        a = np.asarray(psf, dtype=np.float64)
        if a.ndim == 2:
            a = a[None, None]
        if a.ndim != 4:
            raise EngineError(f"psf must be one 2-D PSF (y, x) or a grid of PSFs (ny, nx, y, x), got shape {a.shape}")
        if not np.all(np.isfinite(a)) or (a < 0).any() or (a.sum(axis=(2, 3)) <= 0).any():
            raise EngineError("every PSF must be finite, non-negative and not empty")
        ky, kx = (n | 1 for n in a.shape[2:])  # odd, so the centre is a pixel
        grid = np.stack([np.stack([_pad_to(k, (ky, kx)) for k in row]) for row in a])
        return cls(grid / grid.sum(axis=(2, 3), keepdims=True))

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.kernels.shape[0]), int(self.kernels.shape[1])

    @property
    def varying(self) -> bool:
        return self.grid != (1, 1)

    def regions(self) -> list[tuple[int, int]]:
        return [(i, j) for i in range(self.grid[0]) for j in range(self.grid[1])]

    def weights(self, shape: tuple[int, int]) -> np.ndarray:
        """(ny, nx, h, w) blending weights of the regions; they sum to 1 at every pixel."""
        wy, wx = _tent(shape[0], self.grid[0]), _tent(shape[1], self.grid[1])
        return (wy[:, None, :, None] * wx[None, :, None, :]).astype(np.float32)

    def blur(self, image: np.ndarray) -> np.ndarray:
        """The field's blur: each region's PSF applied to the whole image, the blurred copies
        blended with the region weights. Outside the image continues by reflection, as the
        deconvolution assumes."""
        import scipy.signal

        img = np.asarray(image, dtype=np.float64)
        p = max(self.kernels.shape[2:]) // 2 + 1
        padded = np.pad(img, p, mode="symmetric")
        w = self.weights(img.shape)
        out = np.zeros(img.shape)
        for i, j in self.regions():
            b = scipy.signal.fftconvolve(padded, self.kernels[i, j], mode="same")[p:-p, p:-p]
            out += w[i, j] * b
        return out.astype(np.float32)

    def symmetric(self) -> bool:
        """True when every PSF is unchanged by the 8 flips and quarter turns, and the grid is
        square: only then are flipped or rotated training samples still true pairs."""
        k = self.kernels
        if self.varying or k.shape[2] != k.shape[3]:
            return False
        return bool(
            np.allclose(k, k[..., ::-1, :], atol=1e-6 * k.max())
            and np.allclose(k, np.swapaxes(k, 2, 3), atol=1e-6 * k.max())
        )

    def as_metadata(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "kernels": np.round(self.kernels, 8).tolist()}


def radial_psf_grid(shape: Sequence[int], sigma_centre: float, sigma_corner: float, regions: int = 3) -> np.ndarray:
    """(regions, regions, k, k) Gaussian PSFs for a blur whose sigma grows with the squared
    distance from the field centre (``sigma_centre``) to the corners (``sigma_corner``), each
    the PSF at its region's centre (what a bead there would show). The simulated microscope's
    ``psf_sigma_corner`` follows the same law."""
    from .psf import gaussian_psf

    h, w = int(shape[0]), int(shape[1])
    cy = (np.arange(regions) + 0.5) * h / regions - 0.5
    cx = (np.arange(regions) + 0.5) * w / regions - 0.5
    oy, ox = (h - 1) / 2, (w - 1) / 2

    def sigma(y: float, x: float) -> float:
        return sigma_centre + (sigma_corner - sigma_centre) * ((y - oy) ** 2 + (x - ox) ** 2) / (oy**2 + ox**2)

    ks = [[gaussian_psf(sigma(y, x)) for x in cx] for y in cy]
    size = max(k.shape[0] for row in ks for k in row)
    return np.array([[_pad_to(k, (size, size)) for k in row] for row in ks])


def psf_from_options(
    shape: Sequence[int],
    *,
    psf: str | Path | None = None,
    psf_sigma: float | None = None,
    psf_sigma_corner: float | None = None,
    regions: int = 3,
    na: float | None = None,
    wavelength_nm: float = 520.0,
    refractive_index: float = 1.515,
    pixel_size_um: float | None = None,
    psf_2d: str = "plane",
) -> tuple[np.ndarray, str]:
    """The teacher's PSF(s) from the options the ``deconvolve`` engine takes, and what it is.

    ``psf``: a TIFF of a bead (2-D, or 3-D reduced with ``psf_2d``; cleaned as the engine does) or
    a ``.npy`` holding one PSF or a grid (ny, nx, ky, kx); else the widefield model with ``na``
    (needs ``pixel_size_um``); else a Gaussian of ``psf_sigma`` px (1.5), growing to
    ``psf_sigma_corner`` in the corners on a ``regions`` x ``regions`` grid when that is given.
    """
    from .psf import clean_psf, crop_psf, gaussian_psf, load_psf, psf_to_2d, widefield_psf

    if psf is not None:
        path = Path(psf)
        if path.suffix.lower() == ".npy":
            if not path.is_file():
                raise EngineError(f"PSF file {str(path)!r} does not exist")
            a = np.load(path)
            if a.ndim == 4:
                return PSFField.of(a).kernels, f"PSF grid {a.shape[:2]} from {path}"
        else:
            a = load_psf(path)
        kernel = crop_psf(psf_to_2d(clean_psf(a, where=str(path)), psf_2d))
        return kernel, f"measured PSF {path}"
    if na is not None:
        if pixel_size_um is None:
            raise EngineError(
                "the widefield PSF model (--na) needs the pixel size: the movie does not say "
                "it; give --pixel-size, or use --psf-sigma"
            )
        kernel = crop_psf(widefield_psf(na, wavelength_nm, refractive_index, pixel_size_um))
        return kernel, f"widefield model NA {na}, {wavelength_nm} nm, n {refractive_index}, pixel {pixel_size_um} um"
    sigma = 1.5 if psf_sigma is None else float(psf_sigma)
    if psf_sigma_corner is not None:
        grid = radial_psf_grid(shape, sigma, float(psf_sigma_corner), int(regions))
        return grid, (
            f"gaussian sigma {sigma} px (centre) to {psf_sigma_corner} px (corners), {regions}x{regions} regions"
        )
    return gaussian_psf(sigma), f"gaussian sigma {sigma} px"


# --------------------------------------------------------------------------- teacher


def _teacher_params(teacher_params: dict[str, Any] | None) -> dict[str, Any]:
    p = {"method": "wb", "iterations": 2, "alpha": None, "beta": None, "order": None}
    unknown = set(teacher_params or {}) - set(p)
    if unknown:
        raise EngineError(f"unknown teacher parameter(s) {sorted(unknown)}; known: {sorted(p)}")
    p.update(teacher_params or {})
    if p["method"] not in ("wb", "rl"):
        raise EngineError(f"teacher method must be 'wb' or 'rl', got {p['method']!r}")
    return p


def teacher_deconvolve(data: np.ndarray, field: PSFField, teacher: dict[str, Any]) -> np.ndarray:
    """The classical engine on an offset-free frame: WB-RL (or RL) with each region's PSF over
    the whole frame, blended with the region weights (the result of a region is only used near
    it, where its PSF is right)."""
    data = np.asarray(data, dtype=np.float32)
    w = field.weights(data.shape)
    out = np.zeros(data.shape, dtype=np.float32)
    for i, j in field.regions():
        kernel = field.kernels[i, j]
        wb = wb_parameters(kernel, teacher["alpha"], teacher["beta"], teacher["order"])
        est = deconvolve_array(data, kernel, iterations=int(teacher["iterations"]), method=teacher["method"], wb=wb)
        out += w[i, j] * np.asarray(est, dtype=np.float32)
    return out


def teacher_targets(
    frames: np.ndarray,
    field: PSFField,
    teacher: dict[str, Any],
    *,
    task: str,
    window: int = 5,
    denoised: np.ndarray | None = None,
) -> np.ndarray:
    """Offset-free frames (t, y, x) -> the teacher's result for each (see the module doc)."""
    if task == "deconvolve":
        sources = frames
    elif denoised is not None:
        sources = np.maximum(np.asarray(denoised, dtype=np.float32), 0)
    else:
        if frames.shape[0] < 2:
            raise EngineError(
                "task='restore' needs a time-lapse of a still scene (the teacher "
                "deconvolves the temporal mean) or denoised= targets"
            )
        half = window // 2
        sources = np.stack([frames[max(0, t - half) : t + half + 1].mean(axis=0) for t in range(frames.shape[0])])
    return np.stack([teacher_deconvolve(s, field, teacher) for s in sources])


# --------------------------------------------------------------------------- network input


def _scale(data: np.ndarray) -> float:
    # a subsample is enough for a percentile and keeps it cheap on large frames
    step = max(1, int(math.sqrt(data.size / 65536)))
    s = float(np.percentile(data[::step, ::step], SCALE_PERCENTILE))
    return s if s > 0 else float(data.max()) or 1.0


def _coordinates(shape: Sequence[int], field_shape: Sequence[int] | None) -> np.ndarray:
    """(2, h, w) field coordinates in [-1, 1] (y then x), of the trained field's geometry."""
    fh, fw = field_shape if field_shape else shape
    ys = np.linspace(-1.0, 1.0, int(fh), dtype=np.float32)[: shape[0]]
    xs = np.linspace(-1.0, 1.0, int(fw), dtype=np.float32)[: shape[1]]
    return np.stack(np.broadcast_arrays(ys[:, None], xs[None, :])).astype(np.float32)


def network_input(data: np.ndarray, scale: float, coords: bool, field_shape: Sequence[int] | None = None) -> np.ndarray:
    """(c, h, w): the offset-free frame divided by its scale, then the coordinates if used."""
    x = (np.asarray(data, dtype=np.float32) / np.float32(scale))[None]
    if coords:
        x = np.concatenate([x, _coordinates(data.shape, field_shape)])
    return x


# --------------------------------------------------------------------------- consistency


def consistency_score(
    raw: np.ndarray, restored: np.ndarray, field: PSFField, gain: float, read_var: float, bin: int = CONSISTENCY_BIN
) -> float:
    """How well the re-blurred output explains the offset-free raw frame, ~1 when it does.

    Residuals are standardised by the Poisson-Gaussian noise ``var = gain * model + read_var``,
    averaged in ``bin x bin`` blocks and scaled back by ``bin`` (unit variance for white noise),
    and their mean square is returned: noise alone gives ~1, structure the output does not
    account for adds up coherently within a block and gives more.
    """
    model = field.blur(restored)
    var = np.maximum(gain * np.maximum(model, 0) + read_var, 1e-6)
    z = (np.asarray(raw, dtype=np.float32) - model) / np.sqrt(var)
    h, w = (z.shape[0] // bin) * bin, (z.shape[1] // bin) * bin
    blocks = z[:h, :w].reshape(h // bin, bin, w // bin, bin).mean(axis=(1, 3)) * bin
    return float(np.mean(blocks**2))


def _noise_model(data: np.ndarray, gain: float | None) -> tuple[float, float]:
    a, b = estimate_noise(data)
    if gain is not None and gain > 0:
        b = b + (a - gain) * float(np.median(data))  # the fitted line's variance at the median
        a = float(gain)
    return float(a), float(max(b, 1e-6))


# --------------------------------------------------------------------------- fitting


def _scale_head(net: Any, factor: float) -> None:
    """Multiply the network's output (its last 1x1 convolution) by ``factor``, in place."""
    import torch

    with torch.no_grad():
        net.head.weight.mul_(factor)
        if net.head.bias is not None:
            net.head.bias.mul_(factor)


def fit_deconvolution(
    frames: np.ndarray | Sequence[np.ndarray],
    *,
    psf: Any,
    teacher_params: dict[str, Any] | None = None,
    task: str = "deconvolve",
    steps: int = 400,
    time_budget_s: float | None = None,
    offset: float | None = None,
    gain: float | None = None,
    restore_window: int = 5,
    denoised: np.ndarray | None = None,
    coords: bool | None = None,
    augment: bool | None = None,
    model: modelfile.ModelFile | None = None,
    base: int = 16,
    depth: int = 3,
    max_channels: int = 64,
    batch: int = 8,
    patch: int = 64,
    lr: float = 2e-3,
    holdout: float = 0.2,
    seed: int = 0,
    progress: bool = False,
    callback: Callable[[int, float], None] | None = None,
    threads: int | None = None,
    description: str = "",
) -> FitResult:
    """Fit a network to the classical engine's results on ``frames`` (t, y, x) raw camera values
    (or a list of (y, x) frames, or a list of (t, y, x) time-lapses of several fields of view;
    all of one field size, the sensor geometry the blur belongs to).

    ``psf``: one PSF or a grid (ny, nx, ky, kx) of per-region PSFs. ``teacher_params``: method
    (``wb``), iterations (2), alpha, beta, order, as the ``deconvolve`` engine takes them.
    ``coords`` (default: when the PSF varies) feeds the field coordinates; ``augment`` (default:
    only when every PSF is flip/rotation symmetric and does not vary) flips and rotates samples.
    The last ``holdout`` fraction of frames is kept out of training and sets the consistency
    threshold (see :func:`calibrate_consistency`). Stops after ``steps`` or ``time_budget_s``.
    """
    import torch

    from .unet import UNet

    if task not in TASKS:
        raise EngineError(f"task must be one of {TASKS}, got {task!r}")
    if threads:
        torch.set_num_threads(int(threads))
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    field = PSFField.of(psf)
    teacher = _teacher_params(teacher_params)
    if isinstance(frames, np.ndarray):
        stacks = [frames[None] if frames.ndim == 2 else frames]
    elif all(np.ndim(f) == 3 for f in frames):
        stacks = list(frames)  # several time-lapses (fields of view): restore windows stay within each
    else:
        stacks = [np.stack(list(frames))]
    if any(np.ndim(s) != 3 or np.shape(s)[1:] != np.shape(stacks[0])[1:] for s in stacks):
        raise EngineError(
            "frames must be (t, y, x), a list of (y, x) frames or a list of (t, y, x) "
            "time-lapses, all of one field size"
        )
    raw = np.concatenate([np.asarray(s, dtype=np.float32) for s in stacks])
    off = float(offset) if offset is not None else estimate_offset(raw[0])
    data = np.maximum(raw - np.float32(off), 0)
    if denoised is not None or len(stacks) == 1:
        targets = teacher_targets(data, field, teacher, task=task, window=restore_window, denoised=denoised)
    else:
        bounds = np.cumsum([0] + [len(s) for s in stacks])
        targets = np.concatenate(
            [
                teacher_targets(data[a:b], field, teacher, task=task, window=restore_window)
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        )
    teacher_s = time.perf_counter() - t_start
    use_coords = field.varying if coords is None else bool(coords)
    do_augment = field.symmetric() if augment is None else bool(augment)
    field_shape = tuple(int(n) for n in data.shape[1:])

    n_train = max(1, int(round(data.shape[0] * (1.0 - holdout)))) if data.shape[0] > 1 else 1
    scales = np.array([_scale(d) for d in data], dtype=np.float32)
    # training tensors: (t, c + 1, h, w): the network input channels, then the target
    coord = _coordinates(field_shape, field_shape) if use_coords else np.zeros((0, *field_shape), np.float32)
    inputs = data[:n_train] / scales[:n_train, None, None]
    goals = targets[:n_train] / scales[:n_train, None, None]

    if model is not None:
        net = model.build_torch().train()
    else:
        net = UNet(1 + 2 * use_coords, base, depth, max_channels)
    if net.in_channels != 1 + 2 * use_coords:
        raise EngineError(
            f"the model takes {net.in_channels} input channels; coords={use_coords} needs {1 + 2 * use_coords}"
        )
    m = 2**net.depth
    patch = max(m, min(patch, *field_shape) // m * m)

    def sample() -> np.ndarray:
        out = np.empty((batch, net.in_channels + 1, patch, patch), dtype=np.float32)
        for i in range(batch):
            t = int(rng.integers(n_train))
            y0 = int(rng.integers(0, field_shape[0] - patch + 1))
            x0 = int(rng.integers(0, field_shape[1] - patch + 1))
            win = (slice(y0, y0 + patch), slice(x0, x0 + patch))
            out[i, 0] = inputs[t][win]
            out[i, 1:-1] = coord[(slice(None), *win)]
            out[i, -1] = goals[t][win]
        return augment_batch(out, rng) if do_augment else out

    if model is not None:  # into training units: net * RESIDUAL_GAIN gives the model's own output
        _scale_head(net, 1.0 / RESIDUAL_GAIN)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses: list[float] = []
    t0 = time.perf_counter()
    net.train()
    for step in range(steps):
        frac = step / steps
        if time_budget_s:
            frac = max(frac, (time.perf_counter() - t0) / time_budget_s)
        frac = min(frac, 1.0)
        for group in opt.param_groups:  # warm-up then cosine, as fit.fit
            group["lr"] = lr * min(1.0, frac / 0.05) * 0.5 * (1 + math.cos(math.pi * frac)) + lr * 0.01
        data_b = torch.from_numpy(sample())
        # residual: the network learns target - input (the deblurring correction), which it
        # reaches in far fewer steps than the whole image; inference adds the input back
        pred = net(data_b[:, :-1]) * RESIDUAL_GAIN + data_b[:, :1]
        # L1: the teacher's output has heavy-tailed noise; the median is a steadier target
        loss = (pred[:, 0] - data_b[:, -1]).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
        if progress and step % 50 == 0:
            log.info("fit_deconvolution step %d loss %.4f", step, np.mean(losses[-50:]))
        if time_budget_s is not None and time.perf_counter() - t0 > time_budget_s:
            log.info("fit_deconvolution stopped at step %d: time budget %.0f s spent", step + 1, time_budget_s)
            break
    net.eval()
    _scale_head(net, RESIDUAL_GAIN)
    seconds = time.perf_counter() - t0
    meta: dict[str, Any] = {
        "task": task,
        "training": {
            "data": description or f"{raw.shape[0]} frame(s) of {field_shape}, {n_train} for training",
            "method": f"teacher ({teacher['method']}, {teacher['iterations']} it.)"
            + (
                f" on the temporal mean of {restore_window} frames"
                if task == "restore" and denoised is None
                else " on denoised frames"
                if task == "restore"
                else ""
            ),
            "steps": len(losses),
            "batch": batch,
            "patch": patch,
            "lr": lr,
            "loss": "L1",
            "augment": do_augment,
            "seconds": round(seconds, 1),
            "teacher_seconds": round(teacher_s, 1),
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
        },
        "teacher": {k: v for k, v in teacher.items()},
        "normalisation": {
            "vst": False,
            "percentiles": [SCALE_PERCENTILE],
            "rule": f"(raw - offset) / p{SCALE_PERCENTILE} of the frame; output times the same",
        },
        "psf": field.as_metadata(),
        "field_shape": list(field_shape),
        "residual": True,  # output = input channel 0 + network
        "offset": off,
    }
    try:
        from importlib.metadata import version

        meta["livescope_version"] = str(version("livescope"))
    except Exception:
        meta["livescope_version"] = "unknown"
    packaged = modelfile.ModelFile.from_net(net, meta)
    packaged.metadata["inputs"].update(
        past_frames=0,
        coordinates=2 if use_coords else 0,
        layout="NCHW float32, channel 0 = offset-free frame / scale"
        + (", 1-2 = field y, x in [-1, 1]" if use_coords else ""),
    )
    # the consistency threshold, measured with the fitted network on frames it was not fitted on
    # when there are any (else on the training frames, which flatters the network)
    calib = data[n_train:] if n_train < data.shape[0] else data
    packaged.metadata["consistency"] = calibrate_consistency(packaged, calib, gain=gain)
    return FitResult(packaged, losses, time.perf_counter() - t_start)


def calibrate_consistency(
    model: modelfile.ModelFile, frames: np.ndarray, *, gain: float | None = None, backend: str = "torch"
) -> dict[str, Any]:
    """Scores of offset-free frames the network should explain, and the threshold set from them:
    ``max(2 x the largest score, median + 10 MAD)`` (a frame must be clearly worse than any seen
    in calibration; the factor 2 guards the few-frame case)."""
    net = NetDeconvolver(model, backend=backend, tile=0)
    scores = [cast(float, net.restore(f, gain=gain)[1]) for f in frames]  # check=True: always a score
    med = float(np.median(scores))
    mad = float(np.median(np.abs(np.asarray(scores) - med))) * 1.4826
    return {
        "threshold": max(2.0 * max(scores), med + 10.0 * mad),
        "calibration_scores": scores,
        "bin": CONSISTENCY_BIN,
        "rule": "max(2 * max, median + 10 MAD) of held-out frames",
    }


# --------------------------------------------------------------------------- running


class NetDeconvolver:
    """A fitted model with its backend: offset-free frame in, deconvolved (restored) frame out,
    plus the consistency score. Used by the ``restore`` engine and ``deconvolve --method net``."""

    def __init__(
        self,
        model: modelfile.ModelFile | str | Path,
        *,
        backend: str = "auto",
        tile: int = 512,
        overlap: int = 48,
        threads: int | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        if not isinstance(model, modelfile.ModelFile) and modelzoo.is_package(model):
            raise EngineError(
                f"{model} is a BioImage Model Zoo package: run it with the denoise engine "
                "(denoise.model=PATH/rdf.yaml runs any image-to-image package with its own processing); "
                "restore and deconvolve --method net need livescope's PSF and consistency metadata "
                "(fit one with `livescope fit --task restore`)"
            )
        self.model = model if isinstance(model, modelfile.ModelFile) else modelfile.load(model)
        task = self.model.task
        if task not in TASKS:
            raise EngineError(
                f"model {getattr(model, 'name', '')} was fitted for {task!r}, not deconvolution; "
                "fit one with livescope.engines.netdeconv.fit_deconvolution"
            )
        meta = self.model.metadata
        self.task = task
        self.field = PSFField.of(np.asarray(meta["psf"]["kernels"], dtype=np.float64))
        self.field_shape = tuple(meta.get("field_shape") or ())
        self.coords = int(meta["inputs"].get("coordinates", 0)) > 0
        self.residual = bool(meta.get("residual", False))
        self.tile, self.overlap = int(tile), int(overlap)
        m = self.model.multiple
        h, w = shape or self.field_shape or (512, 512)
        h, w = h + (-h) % m, w + (-w) % m
        if self.tile > 0:
            t = max(m, self.tile - self.tile % m)
            h, w = min(h, t), min(w, t)
        self.runner = Runner(
            self.model, backend, shape=(1, self.model.metadata["inputs"]["channels"], h, w), threads=threads
        )
        self._noise: tuple[float, float] | None = None
        self._warned_shape = False

    def restore(
        self, data: np.ndarray, *, gain: float | None = None, check: bool = True
    ) -> tuple[np.ndarray, float | None]:
        """Offset-free frame -> (deconvolved frame, consistency score or None)."""
        data = np.maximum(np.asarray(data, dtype=np.float32), 0)
        if self.coords and tuple(data.shape) != self.field_shape and not self._warned_shape:
            log.warning(
                "frame %s differs from the field %s the model was fitted on: the field-varying "
                "blur is placed by pixel position, results off the trained field are unchecked",
                data.shape,
                self.field_shape,
            )
            self._warned_shape = True
        scale = _scale(data)
        x = network_input(data, scale, self.coords, self.field_shape)
        y = run_tiled(self.runner.run, x, multiple=self.model.multiple, tile=self.tile, overlap=self.overlap)
        if self.residual:
            y = y + x[0]
        out = np.maximum(y * np.float32(scale), 0)
        total = float(out.sum())
        if total > 0:  # the teacher conserves flux per frame; so does its student
            out *= np.float32(float(data.sum()) / total)
        score = None
        if check:
            if self._noise is None:
                self._noise = _noise_model(data, gain)
            score = consistency_score(data, out, self.field, *self._noise)
        return out.astype(np.float32), score

    @property
    def threshold(self) -> float | None:
        c = self.model.metadata.get("consistency")
        return float(c["threshold"]) if c else None


def _check_backend(backend: str) -> str | None:
    if backend == "auto" or backend in ORDER:
        return None
    return f"unknown backend {backend!r}; choose auto, {', '.join(ORDER)}"


@register_engine("restore")
class Restore(EngineBase):
    """Denoise and deconvolve in one network pass (a model fitted with ``task='restore'``;
    a ``deconvolve`` model runs too). With ``volume=True`` it takes z-stacks and restores them
    plane by plane (the network is 2-D).

    Outputs ``restored`` (offset-free, camera units like the ``deconvolve`` engine's output) and
    the per-frame ``consistency`` score (NaN with ``check=False``); a frame scoring above
    ``threshold`` (default: the one measured at fit time) raises a ``consistency`` event.
    """

    name: ClassVar[str] = "restore"
    outputs: ClassVar[tuple[str, ...]] = ("restored", "consistency")
    scalar_outputs: ClassVar[tuple[str, ...]] = ("consistency",)
    _output = "restored"

    parameters: ClassVar[dict[str, Param]] = {
        "model": Param(None, optional(str), setter="swap_model", doc="a model file fitted with fit_deconvolution"),
        "backend": Param("auto", str, check=_check_backend, applies=Applies.REBUILD),
        "tile": Param(512, int, applies=Applies.REBUILD, doc="frames larger than this run in tiles; 0: whole"),
        "overlap": Param(48, int, applies=Applies.REBUILD),
        "offset": Param(None, optional(float), applies=Applies.RESET, doc="camera offset, ADU"),
        "gain": Param(None, optional(float), applies=Applies.REBUILD, doc="ADU per photoelectron (the check's noise)"),
        "threads": Param(None, optional(int), applies=Applies.REBUILD),
        "check": Param(True, as_bool, doc="score each frame's consistency with the data"),
        "threshold": Param(None, optional(float), doc="consistency score that raises an event (fit time's)"),
        "volume": Param(False, as_bool, doc="take z-stacks, restored plane by plane"),
    }

    # the parameters as ``_init_params`` sets them (converted and checked; ``_validate`` refuses
    # a missing model)
    model: str
    backend: str
    tile: int
    overlap: int
    offset: float | None
    gain: float | None
    threads: int | None
    check: bool
    threshold: float | None
    volume: bool

    def __init__(
        self,
        model: str | Path | None = None,
        backend: str = "auto",
        tile: int = 512,
        overlap: int = 48,
        offset: float | None = None,
        gain: float | None = None,
        threads: int | None = None,
        check: bool = True,
        threshold: float | None = None,
        volume: bool = False,
    ) -> None:
        self._init_params(locals())
        self.spec: StreamSpec | None = None
        self._net: NetDeconvolver | None = None
        self._offset = CameraOffset()
        self._lock = threading.Lock()

    def _validate(self) -> None:
        if self.model in (None, "default"):
            raise EngineError(
                f"{self.name} needs model=PATH of a model fitted with "
                "livescope.engines.netdeconv.fit_deconvolution (no default model is shipped)"
            )

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec
        self._offset.reset()
        self._net = self._open(self.model)

    @property
    def needs_volume(self) -> bool:
        return self.volume

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        if self._net is None:
            self.setup(StreamSpec(shape=tuple(np.shape(frame))))
        net = self._net  # one reference per frame: a swap lands between frames
        assert net is not None
        raw = np.asarray(to_numpy(frame), dtype=np.float32)
        data = np.maximum(raw - np.float32(self._camera_offset(raw)), 0)
        gain = self.gain if self.gain is not None else (self.spec.camera_gain if self.spec else None)
        thr = self.threshold if self.threshold is not None else net.threshold
        # a z-stack (volume=True) is restored plane by plane with the 2-D network: the model
        # was fitted on planes, and the in-focus PSF is what it learned to undo
        planes = data[None] if data.ndim == 2 else data
        outs, scores = [], []
        events: list[dict[str, Any]] = []
        for z, plane in enumerate(planes):
            out, score = net.restore(plane, gain=gain, check=self.check)
            outs.append(out)
            scores.append(score)
            if score is not None and thr is not None and score > thr:
                events.append(
                    {
                        "kind": "consistency",
                        "engine": self.name,
                        "seq": info.seq,
                        "score": score,
                        "threshold": thr,
                        "model_hash": net.model.hash,
                        **({"z": z} if data.ndim == 3 else {}),
                        "message": "the network's output, re-blurred with the PSF, does not explain this "
                        "frame: it may differ from the frames the model was fitted on",
                    }
                )
        result: dict[str, Any] = {self._output: outs[0] if data.ndim == 2 else np.stack(outs)}
        if self._output == "restored":  # a stack scores as its worst plane
            checked = [s for s in scores if s is not None]  # every plane's score, or none (check=False)
            result["consistency"] = float(max(checked)) if checked else float("nan")
            if thr is not None:  # the viewer's badge compares the score with it
                result["consistency_threshold"] = float(thr)
        if events:
            result["events"] = events
        return result

    def _rebuild(self, name: str) -> None:  # backend, tile, overlap, threads, gain: a new runner
        if self.spec is not None:
            self._net = self._open(self.model)

    def _reset_state(self, name: str) -> None:  # offset
        self._offset.reset()

    def swap_model(self, path: str | Path) -> None:
        """Open the new model first (a bad file raises and the running one stays), then switch."""
        net = self._open(str(path))
        with self._lock:
            self._net, self.model = net, str(path)

    def _details(self) -> dict[str, Any]:
        net = self._net
        return {
            "model_hash": net.model.hash if net else None,
            "task": net.task if net else None,
            "model_training": net.model.metadata.get("training") if net else None,
            "teacher": net.model.metadata.get("teacher") if net else None,
            "psf_grid": list(net.field.grid) if net else None,
            "backend_running": net.runner.name if net else None,
            "offset_used": self._offset.estimated,
            "threshold_used": self.threshold if self.threshold is not None else (net.threshold if net else None),
        }

    def close(self) -> None:
        self._net = None

    def _open(self, path: str) -> NetDeconvolver:
        shape = tuple(self.spec.shape[-2:]) if self.spec else None
        return NetDeconvolver(
            path, backend=self.backend, tile=self.tile, overlap=self.overlap, threads=self.threads, shape=shape
        )

    def _camera_offset(self, raw: np.ndarray) -> float:
        return self._offset(raw, self.offset, self.spec.camera_offset if self.spec is not None else None)


class NetDeconvolve(Restore):
    """The network behind ``deconvolve --method net``: same as ``restore``, output
    ``deconvolved`` only (the consistency check still raises events)."""

    name: ClassVar[str] = "deconvolve"
    outputs: ClassVar[tuple[str, ...]] = ("deconvolved",)
    scalar_outputs: ClassVar[tuple[str, ...]] = ()
    _output = "deconvolved"
