"""Restoration that tunes itself while the stream runs, and a live resolution readout.

On its own thread, never in the per-frame path (``tune`` in the configuration):

- every ``tune_every_s`` seconds, the newest raw frame of each slot with a deconvolution is split
  into two photon halves and the deconvolution setting that best restores one half as judged by
  the other is chosen (:func:`livescope.engines.selftune.tune_deconvolution`); a setting that
  differs from the running one is applied like a ``set`` command, so it is recorded in the store's
  provenance with the frame it applies from and the saved products (completion, ``livescope
  complete``) follow it;
- every ``resolution_every_s`` seconds, the Fourier ring correlation of the two halves gives the
  resolution of raw, and of the deconvolved product (both halves restored with the running
  setting), in nm when the stream says its pixel size: per-frame scalars ``resolution_raw_nm`` /
  ``resolution_deconvolved_nm`` (``_px`` without a pixel size), stored with the frame, shown by
  the viewer and ``livescope status``.

Both need the camera's gain and offset to count photons: ``--calibration`` or the stream's own
``camera`` metadata; without a gain the tuner says so once and stays idle.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..engines import StreamSpec, create_engine
from ..engines.selftune import frc_resolution, split_photons, to_photons, tune_deconvolution

__all__ = ["Tuner"]

log = logging.getLogger(__name__)

ENGINE = "deconvolve"
CROP = 512  # px: the largest region tuned and read out


def _centre(frame: np.ndarray, size: int) -> np.ndarray:
    h, w = frame.shape[-2:]
    y0, x0 = max(0, (h - size) // 2), max(0, (w - size) // 2)
    return frame[..., y0 : y0 + size, x0 : x0 + size]


class Tuner:
    """``newest``: () -> {slot key: the newest routed item} ; ``engine_params``: () -> the
    deconvolution's parameters now ; ``apply``: (engine, param, value) -> a reply as a ``set``
    command's ; ``publish``: (item, scalars) -> stores and shows per-frame scalars;
    ``denoise_params``: () -> the parameters of the denoiser that runs before the deconvolution
    (None: the chain has none), so the tuner also decides whether the deconvolution takes the
    denoised frame (``denoise.pass_on``) or the raw one."""

    def __init__(
        self,
        *,
        newest: Callable[[], dict[tuple, Any]],
        engine_params: Callable[[], dict[str, Any] | None],
        apply: Callable[[str, str, Any], dict[str, Any]],
        publish: Callable[[Any, dict[str, float]], None],
        calibration: dict[str, Any] | None,
        tune: bool,
        every_s: float,
        resolution_every_s: float,
        stop: threading.Event,
        denoise_params: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.newest = newest
        self.engine_params = engine_params
        self.denoise_params = denoise_params or (lambda: None)
        self._denoiser_key: tuple | None = None
        self._denoiser_engine: Any = None
        self.apply = apply
        self.publish = publish
        self.calibration = calibration or {}
        self.tune = tune
        self.every_s = every_s
        self.resolution_every_s = resolution_every_s
        self.stop = stop
        self.last: dict[str, Any] | None = None  # the last decision
        self.changes = 0
        self.runs = 0
        self.cpu_s = 0.0  # thread CPU time spent tuning and measuring
        self.idle_reason = ""
        self._said: set[str] = set()
        self._seen: dict[tuple, int] = {}  # slot -> seq of the frame last measured

    def status(self) -> dict[str, Any]:
        return {
            "tune": self.tune,
            "runs": self.runs,
            "changes": self.changes,
            "last": self.last,
            "cpu_s": round(self.cpu_s, 2),
            "idle": self.idle_reason or None,
        }

    def _say_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(msg, *args)

    def run(self) -> None:
        next_tune = time.monotonic() + min(2.0, self.every_s)
        next_res = time.monotonic() + min(1.0, self.resolution_every_s)
        while not self.stop.wait(0.1):
            now = time.monotonic()
            if self.tune and now >= next_tune:
                next_tune = now + self.every_s
                self._step(tune=True)
            if self.resolution_every_s > 0 and now >= next_res:
                next_res = now + self.resolution_every_s
                self._step(tune=False)

    def _camera(self, item: Any) -> tuple[float, float] | None:
        spec = item.segment.spec_base
        gain = self.calibration.get("gain") or spec.get("camera_gain")
        offset = self.calibration.get("offset")
        if offset is None:
            offset = spec.get("camera_offset")
        if not gain or offset is None:
            self.idle_reason = "no camera gain and offset: give --calibration (livescope calibrate) or send camera"
            self._say_once("camera", "self-tuning and the resolution readout are idle: %s", self.idle_reason)
            return None
        return float(gain), float(offset)

    def _step(self, tune: bool) -> None:
        t_cpu = time.thread_time()
        try:
            for key, item in list(self.newest().items()):
                if item.array is None or item.array.ndim != 2:
                    continue  # planes only (a volume chain is not tuned yet)
                camera = self._camera(item)
                if camera is None:
                    return
                # a centred crop: the choice and the readout need a region, not the whole frame
                # (a 2048x2048 frame took 22 s of CPU per tuning run, a 512x512 crop ~1 s)
                counts = to_photons(_centre(item.array, CROP), *camera)
                if tune:
                    self._tune(counts, item)
                elif self._seen.get(key) != item.frame.seq:
                    self._seen[key] = item.frame.seq
                    self._resolution(counts, item)
        except Exception as exc:  # never the acquisition's problem
            self._say_once(f"error:{type(exc).__name__}", "self-tuning failed (%r); it goes on", exc)
        finally:
            self.cpu_s += time.thread_time() - t_cpu

    def _engine(self, item: Any, params: dict[str, Any]) -> Any:
        shape = tuple(_centre(item.array, CROP).shape)
        eng = create_engine(ENGINE, **{**params, "offset": 0.0})
        eng.setup(StreamSpec(shape=shape, **{**item.segment.spec_base, "camera_offset": 0.0}))
        return eng

    def _tune(self, counts: np.ndarray, item: Any) -> None:
        params = self.engine_params()
        if params is None:
            return
        if params.get("method") == "net":
            self.idle_reason = "a fitted network deconvolves: nothing to tune"
            return
        eng = self._engine(item, params)
        psf = getattr(eng, "kernel", None)
        if psf is None or np.ndim(psf) != 2:
            return
        dparams = self.denoise_params()
        denoiser = self._denoiser(item, dparams) if dparams is not None else None
        res = tune_deconvolution(counts, np.asarray(psf), rng=np.random.default_rng(item.frame.seq), denoiser=denoiser)
        self.runs += 1
        self.last = {**res.summary(), "seq": item.frame.seq, "t": item.t, "time": time.time()}
        best = res.best.params()
        now = {
            "method": params.get("method", "wb"),
            "iterations": params.get("iterations"),
            "alpha": params.get("alpha"),
        }
        wanted = {(ENGINE, k): v for k, v in best.items() if now.get(k) != v}
        if dparams is not None and bool(dparams.get("pass_on", True)) != res.best.denoised:
            wanted[("denoise", "pass_on")] = res.best.denoised  # first: the input, then its setting
        if not wanted:
            return
        order = [("denoise", "pass_on")] + [(ENGINE, k) for k in ("method", "alpha", "iterations")]
        for key in order:  # the back projector before the iterations: they are checked against it
            if key in wanted:
                reply = self.apply(key[0], key[1], wanted[key])
                if not reply.get("ok"):
                    log.warning("self-tuning could not set %s.%s=%r: %s", *key, wanted[key], reply.get("error"))
                    return
        self.changes += 1
        log.info(
            "self-tuning: deconvolution now %s%s (%.1f photons per pixel)",
            best,
            "" if dparams is None else (" of the denoised frame" if res.best.denoised else " of the raw frame"),
            res.photons,
        )

    def _denoiser(self, item: Any, dparams: dict[str, Any]) -> Callable[[np.ndarray], Any] | None:
        """The chain's denoiser (its model, backend and tiles) for frames counted in photons: its
        own instance on this thread, rebuilt when the model or the frame shape changes."""
        from ..engines import FrameInfo

        shape = tuple(_centre(item.array, CROP).shape)
        key = (dparams.get("model"), dparams.get("backend"), dparams.get("tile"), shape)
        if key != self._denoiser_key:
            if self._denoiser_engine is not None:
                self._denoiser_engine.close()
            gain = self.calibration.get("gain") or item.segment.spec_base.get("camera_gain")
            read_var = self.calibration.get("read_var")  # ADU^2, in a `livescope calibrate` file
            read = self.calibration.get("read_noise") or (float(read_var) ** 0.5 if read_var else None)
            try:
                self._denoiser_engine = create_engine(
                    "denoise",
                    model=dparams.get("model"),
                    backend=dparams.get("backend", "auto"),
                    tile=dparams.get("tile", 512),
                    overlap=dparams.get("overlap", 104),
                    excess_noise=dparams.get("excess_noise", 1.0),
                    gain=1.0,
                    offset=0.0,
                    read_noise=float(read) / float(gain) if read and gain else None,
                )
            except Exception as exc:
                self._say_once("denoiser", "self-tuning cannot run the denoiser (%r): it tunes the raw path only", exc)
                self._denoiser_key, self._denoiser_engine = key, None
                return None
            self._denoiser_key = key
        eng = self._denoiser_engine
        if eng is None:
            return None

        def run(frame: np.ndarray) -> Any:
            eng.setup(StreamSpec(shape=frame.shape, camera_offset=0.0, camera_gain=1.0))  # its own normalisation
            return eng.process(frame.astype(np.float32), FrameInfo(seq=item.frame.seq))["denoised"]

        return run

    def _resolution(self, counts: np.ndarray, item: Any) -> None:
        a, b = split_photons(counts, 0.5, np.random.default_rng(item.frame.seq))
        pixel_nm = item.segment.spec_base.get("pixel_size_um")
        pixel_nm = float(pixel_nm) * 1000.0 if pixel_nm else None
        unit = "nm" if pixel_nm else "px"
        scalars = {f"resolution_raw_{unit}": frc_resolution(a, b, pixel_nm)}
        params = self.engine_params()
        if params is not None and params.get("method") != "net":
            eng = self._engine(item, params)
            from ..engines import FrameInfo

            info = FrameInfo(seq=item.frame.seq, timestamp=item.frame.timestamp, index={"t": item.t})
            ra = eng.process(a, info)["deconvolved"]
            rb = eng.process(b, info)["deconvolved"]
            scalars[f"resolution_deconvolved_{unit}"] = frc_resolution(ra, rb, pixel_nm)
        self.publish(item, {k: float(v) for k, v in scalars.items()})
