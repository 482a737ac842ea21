"""The ``deconvolve`` engine: Richardson-Lucy deconvolution of every frame (or z-stack) as it arrives.

The numerical core (Wiener-Butterworth and classic RL, the ``dct`` / ``reflect`` / ``periodic``
boundaries, tiling under a memory budget) is :mod:`.rl`; its names are re-exported here for
scripts that import them from this module. ``method="net"`` runs a fitted network instead
(:mod:`.netdeconv`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import _array
from .base import (
    Applies,
    EngineBase,
    EngineError,
    FrameInfo,
    Param,
    StreamSpec,
    as_bool,
    is_none,
    optional,
    register_engine,
)
from .calibrate import CameraOffset, estimate_offset
from .netdeconv import NetDeconvolve
from .psf import (
    PSFError,
    clean_psf,
    crop_psf,
    gaussian_psf,
    load_psf,
    psf_to_2d,
    resample_psf,
    widefield_psf,
)
from .rl import (
    BOUNDARIES,
    BYTES_PER_VOXEL,
    DEFAULT_START,
    PAD_MASS,
    STARTS,
    TINY,
    DCTPlan,
    DeconvolutionPlan,
    choose_boundary,
    dct_shape,
    deconvolve_array,
    edge_pad,
    is_mirror_symmetric,
    make_plan,
    padded_shape,
    reaches,
    richardson_lucy,
    wb_parameters,
)

__all__ = [
    "BOUNDARIES",
    "BYTES_PER_VOXEL",
    "DCTPlan",
    "DEFAULT_ITERATIONS",
    "Deconvolve",
    "DeconvolutionPlan",
    "PAD_MASS",
    "STARTS",
    "TINY",
    "choose_boundary",
    "dct_shape",
    "deconvolve_array",
    "edge_pad",
    "estimate_offset",
    "is_mirror_symmetric",
    "make_plan",
    "padded_shape",
    "richardson_lucy",
    "wb_parameters",
]

log = logging.getLogger(__name__)

DEFAULT_ITERATIONS = {"wb": 2, "rl": 20}
_reaches = reaches  # the name bench/bench_deconvolve.py uses; rl.reaches is the one to use


# --------------------------------------------------------------------------- engine


_R = Applies.REBUILD  # the PSF, or what derives from it (plans, the network), is made again


def _psf_value(value: Any) -> Any:
    return None if is_none(value) else value


def _show_psf(psf: Any) -> str | None:
    if psf is None:
        return None
    if isinstance(psf, (str, Path)):
        return str(psf)
    return f"array{tuple(np.shape(psf))}"


def _lower(value: Any) -> str:
    return str(value).lower()


def _cutoff(value: Any) -> float | tuple[float, ...]:
    """One cutoff for every axis, or one per axis ("0.2,0.3" on a command line)."""
    if isinstance(value, str):
        value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        return float(value[0]) if len(value) == 1 else tuple(float(v) for v in value)
    if np.ndim(value) == 0:
        return float(value)
    return tuple(float(v) for v in value)


def _one_of(name: str, choices: tuple[str, ...]) -> Any:
    def check(value: str) -> str | None:
        if value in choices:
            return None
        return f"{name} must be " + " or ".join(repr(c) for c in choices) + f", got {value!r}"

    return check


def _check_method(method: str) -> str | None:
    if method == "net" or method in DEFAULT_ITERATIONS:
        return None
    return f"method must be 'wb' (Wiener-Butterworth) or 'rl' (classic), got {method!r}"


def _check_iterations(n: int | None) -> str | None:
    return None if n is None or n >= 0 else f"iterations must be >= 0, got {n}"


def _check_boundary(boundary: str) -> str | None:
    if boundary in BOUNDARIES:
        return None
    return f"boundary must be one of {', '.join(BOUNDARIES)}, got {boundary!r}"


def _check_budget(mb: float | None) -> str | None:
    return None if mb is None or mb > 0 else "memory_budget_mb must be positive (or None for no tiling)"


@register_engine("deconvolve")
class Deconvolve(EngineBase):
    """Deblur each frame (or z-stack with ``volume=True``) as it arrives.

    PSF, in order of precedence: ``psf`` (a TIFF path or an array; a measured bead image is
    background-subtracted, thresholded, centred and normalised, then resampled from
    ``psf_pixel_size_um`` / ``psf_z_step_um`` to the frames' pixel size and z step), the
    widefield model when ``na`` is given (with ``wavelength_nm``, ``refractive_index`` and the
    stream's pixel size), else a Gaussian of ``psf_sigma`` pixels (default 1.5; ``psf_sigma_z``
    planes for stacks, default 2). ``StreamSpec.pixel_size_um`` is the size of the frames'
    pixels as delivered (binning applied, as Micro-Manager reports it); ``psf_sigma`` is given at
    binning 1 and divided by the stream's binning.
    The camera offset (``offset``; else the stream's ``camera_offset``; else estimated once from
    the first frame) is subtracted before deconvolving; the output has no offset.
    """

    name: ClassVar[str] = "deconvolve"
    outputs: ClassVar[tuple[str, ...]] = ("deconvolved",)

    parameters: ClassVar[dict[str, Param]] = {
        "psf": Param(
            None, _psf_value, applies=_R, show=_show_psf, doc="a measured PSF: TIFF path or array (z, y, x) / (y, x)"
        ),
        "psf_sigma": Param(1.5, float, applies=_R, doc="Gaussian PSF sigma, pixels at binning 1"),
        "psf_sigma_z": Param(None, optional(float), applies=_R, doc="Gaussian PSF sigma along z, planes (2)"),
        "na": Param(None, optional(float), applies=_R, doc="numerical aperture: the widefield PSF model"),
        "wavelength_nm": Param(520.0, float, applies=_R),
        "refractive_index": Param(1.515, float, applies=_R),
        "psf_pixel_size_um": Param(None, optional(float), applies=_R, doc="the measured PSF's pixel size"),
        "psf_z_step_um": Param(None, optional(float), applies=_R, doc="the measured PSF's z step"),
        "psf_2d": Param(
            "plane",
            str,
            applies=_R,
            check=_one_of("psf_2d", ("plane", "projection")),
            doc="a 3-D PSF on planes: its in-focus plane or its projection",
        ),
        "method": Param(
            "wb",
            _lower,
            applies=_R,
            check=_check_method,
            doc="wb (Wiener-Butterworth), rl (classic) or net (a fitted model)",
        ),
        "iterations": Param(None, optional(int), check=_check_iterations, doc="RL iterations (wb 2, rl 20)"),
        "alpha": Param(None, optional(float), applies=_R, doc="Wiener constant (1e-2)"),
        "beta": Param(None, optional(float), applies=_R, doc="back projector's gain at the cutoff"),
        "order": Param(None, optional(int), applies=_R, doc="Butterworth order (10)"),
        "cutoff": Param(None, optional(_cutoff), applies=_R, doc="cycles per pixel, per axis (1 / FWHM)"),
        "offset": Param(None, optional(float), applies=Applies.RESET, doc="camera offset, ADU"),
        "memory_budget_mb": Param(
            1024.0, optional(float), check=_check_budget, doc="tile frames larger than this; None: never"
        ),
        "volume": Param(False, as_bool, applies=_R, doc="deconvolve (z, y, x) stacks"),
        "device": Param("cpu", _lower, applies=_R, check=_one_of("device", ("cpu", "gpu"))),
        "model": Param(None, optional(str), applies=_R, doc='method="net": a fitted model file'),
        "boundary": Param("auto", _lower, applies=_R, check=_check_boundary),
        "start": Param(
            DEFAULT_START,
            _lower,
            check=_one_of("start", STARTS),
            doc="first estimate: flat (one back projection, 2 FFTs fewer) or image (the frame)",
        ),
    }
    # the parameters whose change leaves the PSF as it is
    _KEEP_PSF = ("iterations", "offset", "memory_budget_mb", "device", "model", "boundary", "start")

    # the parameters as ``_init_params`` sets them (converted and checked)
    psf: str | Path | Any | None
    psf_sigma: float
    psf_sigma_z: float | None
    na: float | None
    wavelength_nm: float
    refractive_index: float
    psf_pixel_size_um: float | None
    psf_z_step_um: float | None
    psf_2d: str
    method: str
    iterations: int | None
    alpha: float | None
    beta: float | None
    order: int | None
    cutoff: float | tuple[float, ...] | None
    offset: float | None
    memory_budget_mb: float | None
    volume: bool
    device: str
    model: str | None
    boundary: str
    start: str

    def __init__(
        self,
        psf: str | Path | Any | None = None,
        psf_sigma: float = 1.5,
        psf_sigma_z: float | None = None,
        na: float | None = None,
        wavelength_nm: float = 520.0,
        refractive_index: float = 1.515,
        psf_pixel_size_um: float | None = None,
        psf_z_step_um: float | None = None,
        psf_2d: str = "plane",
        method: str = "wb",
        iterations: int | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        order: int | None = None,
        cutoff: float | Sequence[float] | None = None,
        offset: float | None = None,
        memory_budget_mb: float | None = 1024.0,
        volume: bool = False,
        device: str = "cpu",
        model: str | Path | None = None,
        boundary: str = "auto",
        start: str = DEFAULT_START,
    ) -> None:
        self._init_params(locals())
        self.spec: StreamSpec | None = None
        self._kernel: np.ndarray | None = None  # the PSF as used, at the frames' sampling
        self._psf_source = ""
        self._wb: dict[str, Any] = {}
        self._footprint: tuple[int, ...] = ()  # tiles' overlap per iteration (99.9 % reach)
        self._pad: tuple[int, ...] = ()  # reflected border (99 % reach)
        self._plans: dict[tuple[str, tuple[int, ...]], DeconvolutionPlan | DCTPlan] = {}  # (boundary, shape)
        self._offset = CameraOffset()
        self._boundary_used: str | None = None
        self._boundaries: dict[tuple[int, ...], str] = {}  # frame shape -> boundary (auto resolved)
        self._net: NetDeconvolve | None = None  # method="net", built in setup

    # ---- protocol

    @property
    def needs_volume(self) -> bool:
        return self.volume

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec
        if self.method == "net":  # the learned deconvolution (netdeconv.py); no PSF to prepare here
            self._net = self._open_net()
            self._net.setup(spec)
            return
        self._offset.reset()
        self._prepare()

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        if self.method == "net":
            if self._net is None:
                self.setup(self.spec or StreamSpec(shape=tuple(np.shape(frame))))
            assert self._net is not None  # setup opened it
            return self._net.process(frame, info)
        if self._kernel is None:
            if self.spec is None:
                self.setup(StreamSpec(shape=tuple(np.shape(frame))))
            else:
                self._prepare()
        assert self._kernel is not None
        data = np.asarray(frame, dtype=np.float32)
        if data.ndim != self._kernel.ndim:
            raise EngineError(
                f"deconvolve got a frame of shape {data.shape} but its PSF is {self._kernel.ndim}-D; "
                + ("set volume=False for single planes" if self.volume else "set volume=True for z-stacks")
            )
        offset = self.camera_offset(data)
        data = np.maximum(data - np.float32(offset), np.float32(0.0))
        xp_data = self._to_device(data)
        used = self._boundaries.get(data.shape)  # the PSF's symmetry is checked once per shape, not per frame
        if used is None:
            used = self._boundaries[data.shape] = choose_boundary(
                self._kernel, data.shape, _array.fft_module(xp_data), self.boundary
            )
        self._boundary_used = used
        out = deconvolve_array(
            xp_data,
            self._kernel,
            iterations=self.n_iterations,
            method=self.method,
            wb=self._wb,
            plans=self._plans,
            footprint=self._footprint,
            pad=self._pad,
            memory_budget_mb=self.memory_budget_mb,
            boundary=self._boundary_used,
            start=self.start,
        )
        return {"deconvolved": np.asarray(_array.to_numpy(out), dtype=np.float32)}

    def _rebuild(self, name: str) -> None:
        if name in ("model", "method"):
            self._net = None  # reopened on the next frame
        if name in ("boundary", "device"):
            self._plans, self._boundaries = {}, {}
        elif name not in self._KEEP_PSF:  # the PSF follows this parameter
            self._kernel = None
            self._plans = {}
            if self.spec is not None:
                self._prepare()

    def _reset_state(self, name: str) -> None:  # offset
        self._offset.reset()
        self._net = None  # it subtracts the offset too: reopened on the next frame

    def _details(self) -> dict[str, Any]:
        d: dict[str, Any] = {"iterations_used": self.n_iterations, "psf_source": self._psf_source}
        if self._kernel is not None:
            d["psf_shape"] = tuple(self._kernel.shape)
            d["psf_sha1"] = hashlib.sha1(np.ascontiguousarray(self._kernel).tobytes()).hexdigest()
            d["wb"] = {k: v for k, v in self._wb.items()}
            d["footprint_px"] = self._footprint
            d["pad_px"] = self._pad
        d["offset_used"] = self._offset.estimated
        d["boundary_used"] = self._boundary_used
        return d

    # ---- state handed to chunks that start later in the stream (CarriesState)

    def export_state(self) -> dict[str, Any]:
        """The camera offset estimated on the stream's first frame, when neither the ``offset``
        parameter nor the stream gave one ({} otherwise)."""
        if self.offset is None and self._offset.estimated is not None:
            return {"offset_used": float(self._offset.estimated)}
        return {}

    def import_state(self, state: Any) -> None:
        """Use the offset another instance estimated (after ``setup``, which forgets it)."""
        if state.get("offset_used") is not None:
            self._offset.estimated = float(state["offset_used"])

    def close(self) -> None:
        self._plans = {}

    # ---- helpers

    @property
    def n_iterations(self) -> int:
        return DEFAULT_ITERATIONS.get(self.method, 0) if self.iterations is None else self.iterations

    def _validate(self) -> None:
        if self.method == "net" and self.model is None:
            raise EngineError(
                "method='net' needs model=PATH of a model fitted with livescope.engines.netdeconv.fit_deconvolution"
            )

    @property
    def kernel(self) -> np.ndarray | None:
        """The PSF as used, at the frames' sampling (None before setup, and for method="net")."""
        return self._kernel

    def swap_model(self, path: str | Path) -> None:
        """Open a fitted deconvolution model now and run it from the next frame on (a classical
        run switches to method="net"). A bad file raises here and the running method stays."""
        net = NetDeconvolve(model=str(path), offset=self.offset)
        if self.spec is not None:
            net.setup(self.spec)
        self.model, self.method, self._net = str(path), "net", net
        log.info("deconvolve: model %s in use", path)

    def _open_net(self) -> NetDeconvolve:
        return NetDeconvolve(model=self.model, offset=self.offset)

    def _to_device(self, data: np.ndarray) -> Any:
        if self.device == "cpu":
            return data
        try:
            import cupy
        except ImportError as exc:
            raise EngineError(
                "device='gpu' needs cupy: install livescope[gpu] on a machine with an NVIDIA GPU"
            ) from exc
        return cupy.asarray(data)

    def camera_offset(self, frame: Any) -> float:
        """The camera offset subtracted from ``frame``: the ``offset`` parameter, else the stream's,
        else estimated from the stream's first frame and kept (HasKernel)."""
        return self._offset(frame, self.offset, self.spec.camera_offset if self.spec is not None else None)

    def _prepare(self) -> None:
        spec = self.spec
        assert spec is not None
        ndim = 3 if self.volume else 2
        binning = max(1, int(spec.binning or 1))
        pixel = spec.pixel_size_um  # already includes the binning (Micro-Manager's convention)
        z_step = spec.z_step_um
        if self.psf is not None:
            kernel = self._measured_psf(pixel, z_step, ndim)
        elif self.na is not None:
            if pixel is None:
                raise EngineError(
                    "the widefield PSF model (na=...) needs the pixel size: the stream does not say "
                    "it; set pixel_size_um in the acquisition metadata (for a saved movie: `livescope "
                    "process --pixel-size UM`), or use psf_sigma"
                )
            if ndim == 3 and z_step is None:
                raise EngineError(
                    "volume deconvolution with the widefield model needs the stream's z_step_um "
                    "(for a saved movie: `livescope process --z-step UM`)"
                )
            kernel = widefield_psf(
                self.na, self.wavelength_nm, self.refractive_index, pixel,
                z_step_um=z_step if ndim == 3 else None,
            )  # fmt: skip
            self._psf_source = (
                f"widefield model NA {self.na}, {self.wavelength_nm} nm, n {self.refractive_index}, "
                f"pixel {pixel} um" + (f", z step {z_step} um" if ndim == 3 else "")
            )
        else:
            sig = self.psf_sigma / binning
            if ndim == 3:
                sz = 2.0 if self.psf_sigma_z is None else self.psf_sigma_z
                kernel = gaussian_psf((sz, sig, sig), ndim=3)
                self._psf_source = f"gaussian sigma {sig} px, sigma_z {sz} planes"
            else:
                kernel = gaussian_psf(sig, ndim=2)
                self._psf_source = f"gaussian sigma {sig} px"
        kernel = crop_psf(kernel)
        self._wb = wb_parameters(kernel, self.alpha, self.beta, self.order, self.cutoff)
        self._footprint, self._pad = reaches(kernel, self.method, self._wb, (1e-3, PAD_MASS))
        self._kernel = kernel
        self._plans, self._boundaries = {}, {}
        log.info("deconvolve: %s; PSF %s, FWHM %s px", self._psf_source, kernel.shape,
                 tuple(round(f, 2) for f in self._wb["fwhm_px"]))  # fmt: skip

    def _measured_psf(self, pixel: float | None, z_step: float | None, ndim: int) -> np.ndarray:
        if isinstance(self.psf, (str, Path)):
            raw = load_psf(self.psf)
            where = f"psf file {str(self.psf)!r}"
        else:
            raw = np.asarray(self.psf)
            where = "psf array"
        psf = clean_psf(raw, where=where)
        if ndim == 3 and psf.ndim == 2:
            raise PSFError(f"{where}: volume deconvolution needs a 3-D PSF (z, y, x), got a 2-D one")
        if self.psf_pixel_size_um is not None:
            if pixel is None:
                raise EngineError(
                    "psf_pixel_size_um is set but the stream does not say its pixel size; give it "
                    "(`--pixel-size UM` of livescope process / daemon, or pixel_size_um in the "
                    "acquisition metadata), or drop psf_pixel_size_um if the "
                    "PSF was measured at the frames' own pixel size"
                )
            src = [self.psf_pixel_size_um] * 2
            dst = [pixel] * 2
            if psf.ndim == 3:
                zs = self.psf_z_step_um
                if ndim == 3 and zs is not None and z_step is not None:
                    src, dst = [zs] + src, [z_step] + dst
                else:
                    if ndim == 3:
                        log.warning("PSF z step or stream z step unknown: using the PSF's planes as the stream's")
                    src, dst = [1.0] + src, [1.0] + dst
            psf = resample_psf(psf, src, dst)
        if ndim == 2 and psf.ndim == 3:
            psf = psf_to_2d(psf, self.psf_2d)
        self._psf_source = f"{where}, {self.psf_2d if ndim == 2 and raw.ndim == 3 else 'as is'}"
        return psf
