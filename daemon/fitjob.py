"""Self-supervised fitting on the live stream (``fit`` on the control socket): collect frames,
fit a model on a thread while the stream goes on, save it in the output folder and hand it to
the daemon to swap into every running chain."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..engines import StreamSpec, create_engine
from .routing import Item

__all__ = ["FitJob"]

log = logging.getLogger(__name__)


class FitJob:
    """Self-supervised fitting on the live stream: collect the next N raw frames of the first
    (position, channel, z) that arrives, fit on a thread while the stream goes on, save the model
    in the output folder, and swap it into every running chain between two frames.

    ``task`` "denoise" fits the denoiser; "deconvolve" / "restore" fit the learned deconvolution
    (``engines.netdeconv``) with the running engine's PSF and classical settings as the teacher:
    those of its current model (``restore``, ``deconvolve --method net``), or of the classical
    ``deconvolve`` engine itself, which is then switched to ``method=net`` with the new model."""

    def __init__(
        self,
        engine: str,
        frames: int,
        steps: int,
        seconds: float,
        *,
        task: str = "denoise",
        params: dict[str, Any],
        spec_base: Callable[[], dict[str, Any]],
        out: Path | None,
        swap: Callable[[str], None],
    ) -> None:
        self.params = params  # the engine's parameters (its model, its method), as the daemon runs it
        self.spec_base = spec_base  # the stream's sampling and camera, once it has frames
        self.out = out
        self.swap = swap  # puts the fitted model into every running chain, between two frames
        self.engine = engine
        self.task = task
        self.n = frames
        self.steps = steps
        self.seconds = seconds
        self.state = "collecting"
        self.key: tuple | None = None
        self.frames: list[np.ndarray] = []
        self.losses: list[float] = []
        self.step = 0
        self.error = ""
        self.path: str | None = None
        self.started = time.time()
        self.lock = threading.Lock()

    @property
    def collecting(self) -> bool:
        return self.state == "collecting"

    def offer(self, item: Item) -> None:
        key = (item.p, item.c, item.z)
        if self.key is None:
            self.key = key
        if key != self.key or item.array.ndim != 2:
            return
        self.frames.append(np.array(item.array, dtype=np.float32))
        if len(self.frames) >= self.n:
            self.state = "fitting"
            threading.Thread(target=self._fit, name="livescope-fit", daemon=True).start()

    def _progress(self, step: int, loss: float) -> None:
        with self.lock:
            self.step = step + 1
            self.losses.append(float(loss))

    def _fit(self) -> None:
        try:
            from ..engines import modelfile

            stack = np.stack(self.frames)
            spec = self.spec_base()
            description = f"fitted live on {len(self.frames)} frames"
            if self.task == "denoise":
                from ..engines import fit as fitting

                base_model = modelfile.load(self.params.get("model"))
                result = fitting.fit(
                    stack,
                    model=base_model,
                    steps=self.steps,
                    time_budget_s=self.seconds,
                    offset=spec.get("camera_offset"),
                    gain=spec.get("camera_gain"),
                    progress=False,
                    callback=self._progress,
                    description=description,
                )
            else:
                result = self._fit_deconvolution(stack, spec, description)
            folder = (Path(self.out) / "models") if self.out else None
            if folder is None:
                import tempfile

                folder = Path(tempfile.mkdtemp(prefix="livescope-fit-"))
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / time.strftime(f"{self.task}-fit-%Y%m%d-%H%M%S.lsmodel")
            result.model.save(path)
            self.state = "swapping"
            self.swap(str(path))
            self.path = str(path)
            self.state = "done"
            log.info(
                "fitted model %s swapped in after %d steps (loss %.4g -> %.4g)",
                path,
                self.step,
                self.losses[0] if self.losses else float("nan"),
                self.losses[-1] if self.losses else float("nan"),
            )
        except Exception as exc:
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("live fitting failed")

    def _fit_deconvolution(self, stack: np.ndarray, spec: dict[str, Any], description: str) -> Any:
        from ..engines import modelfile
        from ..engines.netdeconv import fit_deconvolution

        params = self.params
        base_model = None
        if params.get("model") and (self.engine == "restore" or params.get("method") == "net"):
            # refit from the running model: its PSF(s) and teacher, its weights as the start
            base_model = modelfile.load(params["model"])
            psf: Any = np.asarray(base_model.metadata["psf"]["kernels"], dtype=np.float64)
            teacher = dict(base_model.metadata.get("teacher") or {})
        else:  # the classical engine: its PSF as it prepares it for this stream, its settings
            engine: Any = create_engine(self.engine, **params)  # a deconvolution engine: method, alpha, ...
            engine.setup(StreamSpec(shape=tuple(stack.shape[1:]), **spec))
            psf = getattr(engine, "kernel", None)
            if psf is None or np.ndim(psf) != 2:
                raise RuntimeError(
                    f"engine {self.engine} has no 2-D PSF to teach with (volume deconvolution?); "
                    "fit a model on planes from a file with livescope fit --task deconvolve and "
                    "swap it in"
                )
            teacher = {
                "method": engine.method,
                "iterations": engine.n_iterations,
                "alpha": engine.alpha,
                "beta": engine.beta,
                "order": engine.order,
            }
        if base_model is not None and base_model.metadata.get("field_shape") not in (None, list(stack.shape[1:])):
            base_model = None  # fitted on another field: its field coordinates do not carry over
        return fit_deconvolution(
            stack,
            psf=psf,
            teacher_params=teacher,
            task=self.task,
            model=base_model,
            steps=self.steps,
            time_budget_s=self.seconds,
            offset=spec.get("camera_offset"),
            gain=spec.get("camera_gain"),
            callback=self._progress,
            description=description,
        )

    def status(self) -> dict[str, Any]:
        with self.lock:
            losses = list(self.losses)
        stride = max(1, len(losses) // 100)
        return {
            "state": self.state,
            "engine": self.engine,
            "task": self.task,
            "collected": len(self.frames),
            "frames": self.n,
            "step": self.step,
            "steps": self.steps,
            "loss_curve": losses[::stride],
            "model": self.path,
            "error": self.error,
            "elapsed_s": round(time.time() - self.started, 1),
        }
