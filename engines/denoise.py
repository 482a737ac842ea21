"""The denoising engine: a compact U-Net on every frame, with one frame of delay at most.

Parameters (constructor keywords, ``--param denoise.key=value``):

- ``model``: path of a livescope model file; None is the shipped default
  (``engines/models/denoise_default.lsm``, trained by ``engines/models/train_default.py``);
- ``backend``: ``auto`` (tensorrt > onnxruntime > torch, the first that works), or one of those
  (a failing one falls back down that order, with the reason logged);
- ``tile``, ``overlap``: frames larger than ``tile`` run in overlapping tiles stitched without
  seams; ``tile`` 0 runs whole frames;
- ``offset``, ``gain``: camera offset (ADU) and gain (ADU per photoelectron); None takes the
  stream's ``camera_offset`` / ``camera_gain``, else fits the noise model on the first frame.

Models may take ``k`` past frames of the same position and channel as extra inputs (causal);
until ``k`` frames have been seen the oldest available stands in. The normalisation is fixed
on the first frame of a stream so that past and current frames share it and the display does
not flicker; ``set_param("offset" | "gain", ...)`` or a new stream re-estimates it.

torch is not imported here: with the onnxruntime backend, torch need not be installed.
"""

from __future__ import annotations

import collections
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from . import modelfile
from ._array import to_numpy
from .base import EngineError, FrameInfo, StreamSpec, register_engine
from .inference import ORDER, Normalisation, Runner, run_tiled

__all__ = ["Denoise"]

log = logging.getLogger(__name__)

_PARAMS = ("model", "backend", "tile", "overlap", "offset", "gain", "threads")


def _tensorrt_installed() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


class _Loaded:
    """A model with its backend: swapped as one reference, so a frame never mixes two."""

    def __init__(self, model: modelfile.ModelFile, runner: Runner, path: str | None) -> None:
        self.model = model
        self.runner = runner
        self.path = path


@register_engine("denoise")
class Denoise:
    name: ClassVar[str] = "denoise"
    outputs: ClassVar[tuple[str, ...]] = ("denoised",)

    def __init__(self, model: str | Path | None = None, backend: str = "auto", tile: int = 512,
                 overlap: int = 104, offset: float | None = None, gain: float | None = None,
                 threads: int | None = None) -> None:
        if backend != "auto" and backend not in ORDER:
            raise EngineError(f"unknown backend {backend!r}; choose auto, {', '.join(ORDER)}")
        self.model_path = None if model in (None, "", "default") else str(model)
        self.backend = backend
        self.tile = int(tile)
        self.overlap = int(overlap)
        self.offset = None if offset is None else float(offset)
        self.gain = None if gain is None else float(gain)
        self.threads = None if threads is None else int(threads)
        self.spec: StreamSpec | None = None
        self._norm: Normalisation | None = None
        self._past: collections.deque[np.ndarray] = collections.deque(maxlen=8)
        self._lock = threading.Lock()
        self._loaded: _Loaded | None = None
        self._builder: threading.Thread | None = None

    # ------------------------------------------------------------------ protocol

    @property
    def window(self) -> int:
        return self._loaded.model.k if self._loaded else modelfile.load(self.model_path).k

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
        norm = self._norm
        if norm is None:
            norm = self._norm = self._estimate(raw, loaded.model)
        current = norm.forward(raw)
        k = loaded.model.k
        past = list(self._past)[-k:][::-1] if k else []  # most recent first
        while len(past) < k:
            past.append(past[-1] if past else current)
        x = np.stack([current, *past]) if k else current[None]
        y = run_tiled(loaded.runner.run, x, multiple=loaded.model.multiple,
                      tile=self.tile, overlap=self.overlap)
        self._past.append(current)
        return {"denoised": norm.inverse(y)}

    def set_param(self, name: str, value: Any) -> None:
        if name not in _PARAMS:
            raise KeyError(f"denoise has no parameter {name!r}; it has: {', '.join(_PARAMS)}")
        if name == "model":
            self.swap_model(value)
        elif name == "backend":
            self.backend = str(value)
            if self.spec is not None:
                self._swap(self._open(self.model_path))
        elif name in ("offset", "gain"):
            setattr(self, name, None if value in (None, "", "none", "None") else float(value))
            self._norm = None
        elif name == "threads":
            self.threads = int(value)
        else:
            setattr(self, name, int(value))

    def describe(self) -> dict[str, Any]:
        loaded = self._loaded
        model = loaded.model if loaded else None
        return {
            "model": self.model_path or "default",
            "model_hash": model.hash if model else None,
            "model_training": model.metadata.get("training") if model else None,
            "past_frames": model.k if model else None,
            "backend": self.backend,
            "backend_running": loaded.runner.name if loaded else None,
            "tile": self.tile,
            "overlap": self.overlap,
            "offset": self.offset,
            "gain": self.gain,
            "normalisation": self._norm.as_dict() if self._norm else None,
        }

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
                loaded.model.metadata["normalisation"].get("vst", True)):
            self._norm = None
        log.info("denoise model swapped to %s (%s)", path or "default", loaded.model.hash)

    def _swap(self, loaded: _Loaded) -> None:
        with self._lock:
            self._loaded = loaded

    # ------------------------------------------------------------------ helpers

    def _estimate(self, raw: np.ndarray, model: modelfile.ModelFile) -> Normalisation:
        spec = self.spec
        offset = self.offset if self.offset is not None else (spec.camera_offset if spec else None)
        gain = self.gain if self.gain is not None else (spec.camera_gain if spec else None)
        cfg = model.metadata["normalisation"]
        return Normalisation.estimate(raw, offset=offset, gain=gain, vst=bool(cfg.get("vst", True)),
                                      percentiles=tuple(cfg.get("percentiles", (1.0, 99.8))))

    def _input_shape(self, model: modelfile.ModelFile) -> tuple[int, int, int, int]:
        m = model.multiple
        h, w = (self.spec.shape[-2:] if self.spec else (512, 512))
        h, w = h + (-h) % m, w + (-w) % m
        if self.tile > 0:
            t = max(m, self.tile - self.tile % m)
            h, w = min(h, t), min(w, t)
        return (1, 1 + model.k, h, w)

    def _open(self, path: str | None) -> _Loaded:
        model = modelfile.load(path)
        options: dict[str, Any] = {"shape": self._input_shape(model), "threads": self.threads}
        if self.backend in ("auto", "tensorrt") and _tensorrt_installed():
            # a TensorRT build takes seconds to minutes: serve with the next backend meanwhile
            runner = Runner(model, ORDER[1], **options)
            loaded = _Loaded(model, runner, path)
            self._builder = threading.Thread(target=self._build_tensorrt, args=(loaded, options),
                                             name="denoise-tensorrt-build", daemon=True)
            self._builder.start()
            return loaded
        return _Loaded(model, Runner(model, self.backend, **options), path)

    def _build_tensorrt(self, serving: _Loaded, options: dict[str, Any]) -> None:
        try:
            runner = Runner(serving.model, "tensorrt", **options)
        except Exception as exc:  # never crash the stream over a faster backend
            log.warning("TensorRT backend not available (%s); staying on %s", exc, serving.runner.name)
            return
        if runner.name != "tensorrt":
            return
        with self._lock:
            if self._loaded is serving:  # not if the model was swapped meanwhile
                self._loaded = _Loaded(serving.model, runner, serving.path)
                log.info("denoise now runs on TensorRT")
