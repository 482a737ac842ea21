"""The denoising engine: a compact U-Net on every frame, with one frame of delay at most.

Parameters (constructor keywords, ``--param denoise.key=value``):

- ``model``: path of a livescope model file; None is the shipped default
  (``engines/models/denoise_default.lsmodel``, trained by ``engines/models/train_default.py``);
  or a BioImage Model Zoo package (``PATH/rdf.yaml``, its folder or its zip; engines/modelzoo.py),
  which runs with its own pre- and postprocessing on every frame instead of the normalisation below;
- ``backend``: ``auto`` (tensorrt > onnxruntime > torch, the first that works), or one of those
  (a failing one falls back down that order, with the reason logged);
- ``tile``, ``overlap``: frames larger than ``tile`` run in overlapping tiles stitched without
  seams; ``tile`` 0 runs whole frames;
- ``offset``, ``gain``, ``read_noise``, ``excess_noise``: the camera: offset (ADU), gain (ADU per
  photoelectron), read noise (ADU rms), EMCCD excess-noise factor F (1 for CCD/sCMOS). None takes
  the stream's ``camera_offset`` / ``camera_gain`` (and ``spec.extra["camera_read_noise"]``),
  else fits the noise model on the first frame;
- ``calibration``: a camera calibration (the dict or JSON file of ``livescope calibrate``, or a
  :class:`~.calibrate.NoiseModel`); it wins over the keywords above. Without a parameter, a
  ``spec.extra["calibration"]`` that the daemon passes on is used the same way.

Which noise model the variance-stabilising transform uses, in order: ``calibration``;
``gain`` + ``offset`` + ``read_noise`` (all three: nothing is fitted); the stream's calibration
(``spec.extra``); ``gain`` (given or the stream's) with the read variance fitted from the frame;
everything fitted from the first frame. ``describe()["noise_source"]`` says which one ran.

Models may take ``k`` past frames of the same position and channel as extra inputs (causal);
until ``k`` frames have been seen the oldest available stands in. The normalisation is fixed
on the first frame of a stream so that past and current frames share it and the display does
not flicker; ``set_param("offset" | "gain", ...)`` or a new stream re-estimates it.

torch is not imported here: with the onnxruntime backend, torch need not be installed.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import modelfile, modelzoo
from ._array import to_numpy
from .base import (
    Applies,
    EngineBase,
    EngineError,
    FrameInfo,
    Param,
    Reach,
    StreamSpec,
    as_bool,
    is_none,
    optional,
    register_engine,
)
from .calibrate import NoiseModel
from .inference import ORDER, Normalisation, Runner, receptive_radius, run_tiled
from .modelzoo import BioImageModel

__all__ = ["Denoise"]

log = logging.getLogger(__name__)


def _tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


class _Loaded:
    """A model with its backend: swapped as one reference, so a frame never mixes two."""

    def __init__(self, model: modelfile.ModelFile, runner: Runner, path: str | None) -> None:
        self.model = model
        self.runner = runner
        self.path = path


def _model_path(value: Any) -> str | None:
    return None if is_none(value) or value == "default" else str(value)


def _check_backend(backend: str) -> str | None:
    if backend == "auto" or backend in ORDER:
        return None
    return f"unknown backend {backend!r}; choose auto, {', '.join(ORDER)}"


def _excess_noise(value: Any) -> float:
    return 1.0 if is_none(value) else float(value)


def _calibration(value: Any) -> Any:
    value = None if is_none(value) else value
    _noise_model(value)  # a bad file fails here, not on the first frame
    return value


def _show_calibration(value: Any) -> Any:
    if isinstance(value, NoiseModel):
        return value.as_dict()
    return str(value) if isinstance(value, Path) else value


@register_engine("denoise")
class Denoise(EngineBase):
    name: ClassVar[str] = "denoise"
    outputs: ClassVar[tuple[str, ...]] = ("denoised",)
    # a camera parameter changes the normalisation, which the next frame sets again
    parameters: ClassVar[dict[str, Param]] = {
        "model": Param(
            None,
            _model_path,
            setter="swap_model",
            attr="model_path",
            show=lambda path: path or "default",
            doc="a model file or a BioImage Model Zoo package (PATH/rdf.yaml); None: the shipped default",
        ),
        "backend": Param(
            "auto",
            str,
            check=_check_backend,
            applies=Applies.REBUILD,
            doc="auto (tensorrt > onnxruntime > torch) or one of them",
        ),
        "tile": Param(512, int, doc="frames larger than this run in overlapping tiles; 0: whole frames"),
        "overlap": Param(104, int),
        "offset": Param(None, optional(float), applies=Applies.RESET, doc="camera offset, ADU"),
        "gain": Param(None, optional(float), applies=Applies.RESET, doc="ADU per photoelectron"),
        "read_noise": Param(None, optional(float), applies=Applies.RESET, doc="ADU rms"),
        "excess_noise": Param(1.0, _excess_noise, applies=Applies.RESET, doc="EMCCD excess-noise factor F"),
        "calibration": Param(
            None,
            _calibration,
            applies=Applies.RESET,
            show=_show_calibration,
            doc="a camera calibration: livescope calibrate's dict or JSON file",
        ),
        "threads": Param(None, optional(int)),
        "pass_on": Param(
            True,
            as_bool,
            doc="hand the denoised frame to the next engine (false: it gets this engine's input, "
            "denoised is still an output); the self-tuner sets it when deconvolving raw frames wins",
        ),
    }

    # the parameters as ``_init_params`` sets them (converted and checked)
    model_path: str | None
    backend: str
    tile: int
    overlap: int
    offset: float | None
    gain: float | None
    read_noise: float | None
    excess_noise: float
    calibration: str | Path | dict[str, Any] | NoiseModel | None
    threads: int | None
    pass_on: bool

    def __init__(
        self,
        model: str | Path | None = None,
        backend: str = "auto",
        tile: int = 512,
        overlap: int = 104,
        offset: float | None = None,
        gain: float | None = None,
        read_noise: float | None = None,
        excess_noise: float = 1.0,
        calibration: str | Path | dict[str, Any] | NoiseModel | None = None,
        threads: int | None = None,
        pass_on: bool = True,
    ) -> None:
        self._init_params(locals())
        self._calibrated = _noise_model(self.calibration)
        self._noise_source = ""
        self.spec: StreamSpec | None = None
        self._norm: Normalisation | None = None
        self._past: collections.deque[np.ndarray] = collections.deque(maxlen=8)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._builder: threading.Thread | None = None

    # ------------------------------------------------------------------ protocol

    @property
    def passes(self) -> str | None:
        return "denoised" if self.pass_on else None

    @property
    def window(self) -> int:
        return self._model().k

    def reach(self) -> Reach:
        """Tiles need the U-Net's receptive field (or half the engine's own tile overlap, the
        larger) on each side, on the network's size multiple; the model's past frames as warm-up.
        The normalisation is fixed on the first frame and handed over (``export_state``)."""
        model = self._model()
        m = int(model.multiple)
        halo = max(int(self.overlap) // 2, receptive_radius(model.metadata.get("architecture", {})))
        if isinstance(model, BioImageModel):
            halo = max(halo, model.halo)
        return Reach(-(-halo // m) * m, int(model.k), m)

    def _model(self) -> modelfile.ModelFile:
        return self._loaded.model if self._loaded else modelzoo.load_model(self.model_path)

    def setup(self, spec: StreamSpec) -> None:
        self.spec = spec
        self._norm = None
        self._past.clear()
        self._swap(self._open(self.model_path))

    def process(self, frame: Any, info: FrameInfo) -> dict[str, Any]:
        if self._loaded is None:
            raise EngineError("denoise.process called before setup(spec)")
        loaded = self._loaded  # one reference for the whole frame: a swap lands between frames
        raw = np.asarray(to_numpy(frame), dtype=np.float32)
        if isinstance(loaded.model, BioImageModel):  # its own processing, with this frame's statistics
            return {"denoised": loaded.model.predict(raw, loaded.runner.run, tile=self.tile, overlap=self.overlap)}
        norm = self._norm
        if norm is None:
            norm = self._norm = self._estimate(raw, loaded.model)
        current = norm.forward(raw)
        k = loaded.model.k
        past = list(self._past)[-k:][::-1] if k else []  # most recent first
        while len(past) < k:
            past.append(past[-1] if past else current)
        x = np.stack([current, *past]) if k else current[None]
        y = run_tiled(loaded.runner.run, x, multiple=loaded.model.multiple, tile=self.tile, overlap=self.overlap)
        self._past.append(current)
        return {"denoised": norm.inverse(y)}

    def _rebuild(self, name: str) -> None:  # backend
        if self.spec is not None:
            self._swap(self._open(self.model_path))

    def _reset_state(self, name: str) -> None:  # the camera: the next frame sets the normalisation again
        if name == "calibration":
            self._calibrated = _noise_model(self.calibration)
        self._norm = None

    def _details(self) -> dict[str, Any]:
        loaded = self._loaded
        model = loaded.model if loaded else None
        return {
            "model_package": model.provenance if isinstance(model, BioImageModel) else None,
            "model_hash": model.hash if model else None,
            "model_training": model.metadata.get("training") if model else None,
            "past_frames": model.k if model else None,
            "backend_running": loaded.runner.name if loaded else None,
            "noise_model": self._calibrated.as_dict() if self._calibrated is not None else None,
            "noise_source": self._noise_source or None,
            "normalisation": self._norm.as_dict() if self._norm else None,
        }

    # ------------------------------------------------------------------ for checks and chunks

    @property
    def model_file(self) -> modelfile.ModelFile | None:
        """The model in use (None before setup)."""
        return self._loaded.model if self._loaded else None

    @property
    def normalisation(self) -> Normalisation | None:
        """The stream's input normalisation, fixed on its first frame (None before it)."""
        return self._norm

    def predict(self, frame: Any) -> np.ndarray:
        """The network's output for any frame under the stream's normalisation, without past
        frames and without touching the engine's state (trust's test-time augmentation)."""
        loaded, norm = self._loaded, self._norm
        if loaded is not None and isinstance(loaded.model, BioImageModel):
            raw = np.asarray(to_numpy(frame), dtype=np.float32)
            return loaded.model.predict(raw, loaded.runner.run, tile=self.tile, overlap=self.overlap)
        if loaded is None or norm is None:
            raise EngineError("denoise.predict needs the stream's first frame processed (it fixes the normalisation)")
        if loaded.model.k:
            raise EngineError(
                f"denoise.predict: the model takes {loaded.model.k} past frame(s); predict runs models that take none"
            )
        x = norm.forward(np.ascontiguousarray(to_numpy(frame)))[None]
        y = run_tiled(loaded.runner.run, x, multiple=loaded.model.multiple, tile=self.tile, overlap=self.overlap)
        return norm.inverse(y)

    def export_state(self) -> dict[str, Any]:
        """The normalisation fixed on the stream's first frame ({} before it)."""
        return {"normalisation": self._norm.as_dict()} if self._norm is not None else {}

    def import_state(self, state: Any) -> None:
        """Use the normalisation another instance fixed (after ``setup``, which forgets it)."""
        if state.get("normalisation"):
            self._norm = Normalisation(**state["normalisation"])

    def close(self) -> None:
        self._loaded = None

    # ------------------------------------------------------------------ hot swap

    def swap_model(self, path: str | Path | None) -> None:
        """Load a new model (and open its backend) now, then switch to it between two frames.

        A bad file raises here and leaves the running model in place.
        """
        path = None if path in (None, "", "default") else str(path)
        loaded = self._open(path)
        old = self._loaded
        self._swap(loaded)
        self.model_path = path
        if old is not None and bool(old.model.metadata["normalisation"].get("vst", True)) != bool(
            loaded.model.metadata["normalisation"].get("vst", True)
        ):
            self._norm = None
        log.info("denoise model swapped to %s (%s)", path or "default", loaded.model.hash)

    def _swap(self, loaded: _Loaded) -> None:
        with self._lock:
            self._loaded = loaded

    # ------------------------------------------------------------------ helpers

    def _estimate(self, raw: np.ndarray, model: modelfile.ModelFile) -> Normalisation:
        spec = self.spec
        extra = dict(spec.extra) if spec is not None else {}
        cfg = model.metadata["normalisation"]
        vst = bool(cfg.get("vst", True))
        percentiles = tuple(cfg.get("percentiles", (1.0, 99.8)))
        known = self._known_model(extra)
        if known is not None and vst:
            norm = _normalisation_from(known, raw, percentiles)
            return norm
        offset = self.offset if self.offset is not None else (spec.camera_offset if spec else None)
        gain = self.gain if self.gain is not None else (spec.camera_gain if spec else None)
        if gain is not None and gain > 0:
            gain = float(gain) * self.excess_noise**2  # the transform needs the photon-transfer slope
        self._noise_source = (
            ("fitted read variance, gain given" if gain else "fitted from the first frame")
            if vst
            else "no variance-stabilising transform (model)"
        )
        return Normalisation.estimate(raw, offset=offset, gain=gain, vst=vst, percentiles=percentiles)

    def _known_model(self, extra: dict[str, Any]) -> NoiseModel | None:
        """The camera's noise model when it is fully known (nothing left to fit), else None."""
        if self._calibrated is not None:
            self._noise_source = "calibration parameter"
            return self._calibrated
        if self.gain is not None and self.offset is not None and self.read_noise is not None:
            self._noise_source = "gain, offset, read_noise parameters"
            return NoiseModel.from_camera(self.gain, self.offset, self.read_noise, self.excess_noise)
        if self.gain is None and self.offset is None and extra.get("calibration") is not None:
            self._noise_source = "stream calibration (spec.extra)"
            return _noise_model(extra["calibration"])
        spec = self.spec
        gain = self.gain if self.gain is not None else (spec.camera_gain if spec else None)
        offset = self.offset if self.offset is not None else (spec.camera_offset if spec else None)
        read = self.read_noise if self.read_noise is not None else extra.get("camera_read_noise")
        if gain and offset is not None and read is not None:
            self._noise_source = "stream camera (gain, offset, read noise)"
            return NoiseModel.from_camera(float(gain), float(offset), float(read), self.excess_noise)
        return None

    def _input_shape(self, model: modelfile.ModelFile) -> tuple[int, int, int, int]:
        m = model.multiple
        h, w = self.spec.shape[-2:] if self.spec else (512, 512)
        h, w = h + (-h) % m, w + (-w) % m
        if self.tile > 0:
            t = max(m, self.tile - self.tile % m)
            h, w = min(h, t), min(w, t)
        return (1, 1 + model.k, h, w)

    def _open(self, path: str | None) -> _Loaded:
        model = modelzoo.load_model(path)
        if model.task != "denoise":
            # a deconvolution model normalises differently and predicts a correction: refuse it
            raise EngineError(
                f"{path} is a {model.task!r} model, not a denoiser: run it with the "
                "restore engine or deconvolve method=net, or give denoise a model fitted "
                "with `livescope fit` (task denoise)"
            )
        options: dict[str, Any] = {"shape": self._input_shape(model), "threads": self.threads}
        if self.backend in ("auto", "tensorrt") and _tensorrt_installed():
            # a TensorRT build takes seconds to minutes: serve with the next backend meanwhile
            runner = modelzoo.make_runner(model, ORDER[1], **options)
            loaded = _Loaded(model, runner, path)
            self._builder = threading.Thread(
                target=self._build_tensorrt, args=(loaded, options), name="denoise-tensorrt-build", daemon=True
            )
            self._builder.start()
            return loaded
        return _Loaded(model, modelzoo.make_runner(model, self.backend, **options), path)

    def _build_tensorrt(self, serving: _Loaded, options: dict[str, Any]) -> None:
        try:
            runner = modelzoo.make_runner(serving.model, "tensorrt", **options)
        except Exception as exc:  # never crash the stream over a faster backend
            log.warning("TensorRT backend not available (%s); staying on %s", exc, serving.runner.name)
            return
        if runner.name != "tensorrt":
            return
        with self._lock:
            if self._loaded is serving:  # not if the model was swapped meanwhile
                self._loaded = _Loaded(serving.model, runner, serving.path)
                log.info("denoise now runs on TensorRT")


def _noise_model(calibration: Any) -> NoiseModel | None:
    if calibration is None or isinstance(calibration, NoiseModel):
        return calibration
    try:
        return NoiseModel.from_dict(calibration)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise EngineError(
            f"denoise: cannot read the camera calibration {calibration!r} ({exc}); give the "
            "dict or JSON file that `livescope calibrate INPUT --out cal.json` writes"
        ) from exc


def _normalisation_from(model: NoiseModel, raw: np.ndarray, percentiles: tuple[float, ...]) -> Normalisation:
    """The generalised Anscombe transform of a known camera: ``var = slope (x - offset) + read_var``.

    Without dark frames a calibration knows only the intercept ``read_var - slope * offset``: the
    transform then takes offset 0 and the intercept as its read variance (the same line).
    """
    if model.slope <= 0:
        raise EngineError(
            "denoise: the calibration has no photon-transfer slope (gain 0); calibrate again on frames with signal"
        )
    if model.offset is not None and model.read_var is not None:
        norm = Normalisation(offset=float(model.offset), gain=float(model.slope), read_var=float(model.read_var))
    else:
        norm = Normalisation(offset=0.0, gain=float(model.slope), read_var=float(model.intercept))
    y = norm.forward(raw)  # low 0, high 1: the stabilised frame itself
    lo, hi = np.percentile(y, list(percentiles))
    if not hi > lo:
        hi = lo + 1.0
    return dataclasses.replace(norm, low=float(lo), high=float(hi))
