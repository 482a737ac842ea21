"""The built-in simulated microscope: a real pymmcore-plus MDA on ``UniMMCore`` with Python
camera and stage devices, whose camera renders a fluorescence time-lapse with known ground truth.

The scene (in photons per pixel before blur):

- ``background``: a static structure taken from a real image shipped with livescope
  (nuclei of migrating cancer cells, Tinevez & Jacquemet, CC BY 4.0), smoothly upsampled;
- ``slow``: a few large cells drifting slowly (``slow_speed`` px/frame, smooth wandering);
- ``fast``: small particles diffusing fast (``fast_step`` px/frame rms per axis);
- optional sample drift (``drift`` px/frame) that the XY stage can compensate, and
  photobleaching (``bleach_tau`` frames).

The optical image is the scene blurred by a Gaussian PSF (wider out of focus for z planes; with
``psf_sigma_corner`` the in-focus sigma also grows with the squared distance from the field
centre, as field curvature and off-axis aberrations make it), then Poisson shot noise, Gaussian
read noise, gain and offset, clipped to ``bits``. Frames are reproducible: the noise of frame
(t, c, z) depends only on the seed and those indices, so tests regenerate any frame independently.
``truth(t, c, z)`` returns the components; ``test_psf_sigma`` gives a deliberately mismatched PSF
for engines' tests (no inverse crime).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from .mmcore import release_core

__all__ = ["SimConfig", "SimSample", "SimMicroscope", "sample_image"]

log = logging.getLogger(__name__)

CHANNELS = ("GFP", "mCherry")


def sample_image() -> np.ndarray:
    """The real image shipped with livescope for the sim's static structure."""
    import tifffile

    return tifffile.imread(Path(__file__).resolve().parents[1] / "data" / "sample_nuclei.tif")


@dataclasses.dataclass
class SimConfig:
    shape: tuple[int, int] = (256, 256)
    bits: int = 12
    gain: float = 2.0  # electrons per ADU
    offset: float = 100.0  # ADU
    read_noise: float = 1.6  # electrons rms
    photons: float = 120.0  # peak photons/pixel of the background structure
    n_slow: int = 6
    slow_sigma: float = 6.0
    slow_speed: float = 0.3  # px/frame
    slow_photons: float = 150.0
    n_fast: int = 30
    fast_sigma: float = 1.2
    fast_step: float = 2.5  # px/frame rms per axis
    fast_photons: float = 200.0
    psf_sigma: float = 1.6  # px, in focus
    psf_mismatch: float = 0.15  # engines' tests get psf_sigma * (1 + mismatch)
    # field-varying blur: the in-focus sigma (px) in the corners; it grows with the squared
    # distance from the centre, where it is psf_sigma. None: one PSF over the whole field
    psf_sigma_corner: float | None = None
    defocus_px_per_um: float = 2.0  # extra blur sigma per micrometre out of focus
    drift: tuple[float, float] = (0.0, 0.0)  # sample drift in px/frame (y, x)
    bleach_tau: float | None = None  # frames
    pixel_size_um: float = 0.1
    z_step_um: float = 0.5
    interval_s: float = 0.0
    seed: int = 0

    @property
    def test_psf_sigma(self) -> float:
        return self.psf_sigma * (1 + self.psf_mismatch)


class SimSample:
    """The scene and its rendering; pure numpy, usable without pymmcore-plus."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.cfg = config or SimConfig()
        self._slow: list[np.ndarray] = []
        self._fast: list[np.ndarray] = []
        rng = np.random.default_rng(self.cfg.seed)
        h, w = self.cfg.shape
        self._slow_pos0 = rng.uniform([0.15 * h, 0.15 * w], [0.85 * h, 0.85 * w], (self.cfg.n_slow, 2))
        self._slow_phase = rng.uniform(0, 2 * np.pi, (self.cfg.n_slow, 2))
        self._fast.append(rng.uniform([0, 0], [h, w], (self.cfg.n_fast, 2)))
        self._rng_fast = np.random.default_rng(self.cfg.seed + 1)

    @cached_property
    def background(self) -> np.ndarray:
        img = sample_image().astype(np.float64)
        lo, hi = np.percentile(img, [5, 99.5])
        img = np.clip((img - lo) / (hi - lo), 0, 1)
        zoom = (self.cfg.shape[0] / img.shape[0], self.cfg.shape[1] / img.shape[1])
        img = ndimage.zoom(img, zoom, order=3, mode="reflect")[: self.cfg.shape[0], : self.cfg.shape[1]]
        return (np.clip(img, 0, 1) * self.cfg.photons).astype(np.float32)

    def slow_positions(self, t: float) -> np.ndarray:
        cfg = self.cfg
        # smooth wandering: a slow sinusoidal velocity of amplitude slow_speed
        ang = self._slow_phase + 2 * np.pi * t / 200.0
        period = 200.0 / (2 * np.pi)
        return self._slow_pos0 + cfg.slow_speed * period * (np.sin(ang) - np.sin(self._slow_phase))

    def fast_positions(self, t: int) -> np.ndarray:
        h, w = self.cfg.shape
        while len(self._fast) <= t:
            step = self._rng_fast.normal(0, self.cfg.fast_step, (self.cfg.n_fast, 2))
            nxt = np.mod(self._fast[-1] + step, [h, w])
            self._fast.append(nxt)
        return self._fast[t]

    def _splat(self, pos: np.ndarray, sigma: float, photons: float) -> np.ndarray:
        h, w = self.cfg.shape
        img = np.zeros((h, w), np.float32)
        y, x = pos[:, 0], pos[:, 1]
        y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
        fy, fx = y - y0, x - x0
        for dy, wy in ((0, 1 - fy), (1, fy)):
            for dx, wx in ((0, 1 - fx), (1, fx)):
                yy, xx = y0 + dy, x0 + dx
                ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                np.add.at(img, (yy[ok], xx[ok]), (wy * wx)[ok])
        # normalise so a spot's peak is `photons`
        return ndimage.gaussian_filter(img, sigma, mode="constant") * np.float32(photons * 2 * np.pi * sigma**2)

    def components(self, t: int, channel: int = 0) -> dict[str, np.ndarray]:
        """Ground-truth scene components (photons/pixel, before drift, blur, bleaching)."""
        cfg = self.cfg
        bg = self.background if channel == 0 else np.ascontiguousarray(self.background[::-1, ::-1]) * 0.6
        slow = self._splat(self.slow_positions(t), cfg.slow_sigma, cfg.slow_photons * (1.0 if channel == 0 else 1.5))
        fast = self._splat(self.fast_positions(t), cfg.fast_sigma, cfg.fast_photons * (1.0 if channel == 0 else 0.3))
        return {"background": bg, "slow": slow, "fast": fast}

    def drift_px(self, t: int) -> np.ndarray:
        return np.asarray(self.cfg.drift, float) * t

    def clean(
        self, t: int, channel: int = 0, z_um: float = 0.0, stage_yx_um: Sequence[float] = (0.0, 0.0)
    ) -> np.ndarray:
        """Expected camera signal in ADU above offset, noise-free."""
        cfg = self.cfg
        comp = self.components(t, channel)
        scene = comp["background"] + comp["slow"] + comp["fast"]
        if cfg.bleach_tau:
            scene = scene * np.float32(math.exp(-t / cfg.bleach_tau))
        shift = self.drift_px(t) - np.asarray(stage_yx_um, float) / cfg.pixel_size_um
        if np.any(np.abs(shift) > 1e-6):
            scene = ndimage.shift(scene, shift, order=1, mode="nearest")
        return self.blur(scene, z_um) / np.float32(cfg.gain)

    def psf_sigma_map(self, z_um: float = 0.0) -> np.ndarray:
        """(h, w) Gaussian PSF sigma in px at every pixel (constant without ``psf_sigma_corner``)."""
        cfg = self.cfg
        h, w = cfg.shape
        if cfg.psf_sigma_corner is None:
            focus = np.full((h, w), cfg.psf_sigma)
        else:
            y, x = np.mgrid[:h, :w]
            cy, cx = (h - 1) / 2, (w - 1) / 2
            r2 = ((y - cy) ** 2 + (x - cx) ** 2) / (cy**2 + cx**2)  # 0 at the centre, 1 in the corners
            focus = cfg.psf_sigma + (cfg.psf_sigma_corner - cfg.psf_sigma) * r2
        return np.hypot(focus, cfg.defocus_px_per_um * z_um)

    def blur(self, scene: np.ndarray, z_um: float = 0.0) -> np.ndarray:
        """The optics: Gaussian blur of ``psf_sigma_map(z_um)``, edges continued by reflection.
        A varying sigma is rendered by blurring copies at sigma levels <= 0.1 px apart and
        interpolating, per pixel, between the two copies that bracket its sigma."""
        cfg = self.cfg
        if cfg.psf_sigma_corner is None:
            sigma = math.hypot(cfg.psf_sigma, cfg.defocus_px_per_um * z_um)
            return ndimage.gaussian_filter(scene, sigma, mode="reflect")
        sig = self.psf_sigma_map(z_um)
        lo, hi = float(sig.min()), float(sig.max())
        levels = np.linspace(lo, hi, max(2, int(math.ceil((hi - lo) / 0.1)) + 1))
        copies = np.stack([ndimage.gaussian_filter(scene, s, mode="reflect") for s in levels])
        pos = np.clip((sig - lo) / (levels[1] - levels[0]), 0, len(levels) - 1 - 1e-9)
        i = pos.astype(int)
        f = (pos - i).astype(np.float32)
        yy, xx = np.indices(sig.shape)
        return ((1 - f) * copies[i, yy, xx] + f * copies[i + 1, yy, xx]).astype(np.float32)

    def render(
        self,
        t: int,
        channel: int = 0,
        z_index: int = 0,
        z_um: float | None = None,
        stage_yx_um: Sequence[float] = (0.0, 0.0),
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """One noisy uint16 camera frame; reproducible for (seed, t, channel, z_index)."""
        cfg = self.cfg
        if z_um is None:
            z_um = 0.0
        clean_e = self.clean(t, channel, z_um, stage_yx_um) * np.float32(cfg.gain)
        rng = np.random.default_rng([cfg.seed, t, channel, z_index])
        electrons = rng.poisson(np.maximum(clean_e, 0)).astype(np.float32)
        electrons += rng.normal(0, cfg.read_noise, electrons.shape).astype(np.float32)
        adu = np.rint(electrons / np.float32(cfg.gain) + np.float32(cfg.offset))
        np.clip(adu, 0, 2**cfg.bits - 1, out=adu)
        if out is None:
            out = np.empty(cfg.shape, np.uint16)
        out[...] = adu
        return out


class SimMicroscope:
    """A UniMMCore with a Python camera, XY stage and focus drive rendering a :class:`SimSample`.

    >>> scope = SimMicroscope(SimConfig(shape=(128, 128)))
    >>> seq = scope.sequence(frames=10, channels=("GFP",))
    >>> scope.core.mda.run(seq)
    """

    # set by _build_core: the Python devices, and the event the MDA runner is on (the camera
    # renders the frame of that t and z)
    camera: Any
    xy_stage: Any
    focus: Any
    _current_t: int
    _current_z: int

    def __init__(self, config: SimConfig | None = None) -> None:
        self.sample = SimSample(config)
        self.cfg = self.sample.cfg
        self.core = _build_core(self)
        import atexit

        atexit.register(self.close)

    def sequence(
        self,
        frames: int = 100,
        channels: Sequence[str] = ("GFP",),
        z_planes: int = 1,
        interval_s: float | None = None,
    ) -> Any:
        from useq import MDASequence

        kwargs: dict[str, Any] = {
            "time_plan": {"interval": self.cfg.interval_s if interval_s is None else interval_s, "loops": frames},
            "axis_order": "tpcz",
        }
        if len(channels) > 1 or channels[0] != "GFP":
            kwargs["channels"] = [{"config": c, "group": "Channel"} for c in channels]
        else:
            kwargs["channels"] = [{"config": "GFP", "group": "Channel"}]
        if z_planes > 1:
            kwargs["z_plan"] = {"range": self.cfg.z_step_um * (z_planes - 1), "step": self.cfg.z_step_um}
        return MDASequence(**kwargs)

    def close(self) -> None:
        """Unload the Python devices and stop the core's notification thread. Without it the
        process can abort at interpreter exit ("exception not rethrown", "terminate called without
        an active exception"): in CMMCore's destructor, or in a notification still being
        delivered into Python (see :func:`livescope.bridges.mmcore.release_core`). Also run at exit."""
        import atexit

        atexit.unregister(self.close)
        core, self.core = getattr(self, "core", None), None
        if core is not None:
            release_core(core)

    def endless(self, channels: Sequence[str] = ("GFP",), z_planes: int = 1, interval_s: float | None = None):
        """MDA events for a time-lapse that runs until cancelled (``core.mda.cancel()``): a
        ``useq.MDASequence`` of a huge loop count would be built eagerly and never start."""
        import time as _time

        from useq import MDAEvent

        interval = self.cfg.interval_s if interval_s is None else interval_s
        self._n_z = z_planes
        t0 = _time.monotonic()
        t = 0
        while True:
            due = t0 + t * interval
            delay = due - _time.monotonic()
            if delay > 0:
                _time.sleep(delay)
            for c, name in enumerate(channels):
                for z in range(z_planes):
                    index = {"t": t} | ({"c": c} if len(channels) > 1 else {}) | ({"z": z} if z_planes > 1 else {})
                    z_pos = (z - (z_planes - 1) / 2) * self.cfg.z_step_um if z_planes > 1 else None
                    yield MDAEvent.model_validate(
                        {"index": index, "channel": {"config": name, "group": "Channel"}, "z_pos": z_pos}
                    )
            t += 1

    def camera_metadata(self) -> dict[str, Any]:
        """As the wire protocol has it: offset and read noise in ADU, gain in ADU per
        photoelectron (the sim's ``gain`` is electrons per ADU, as camera sheets quote it)."""
        return {
            "offset": self.cfg.offset,
            "gain": 1.0 / self.cfg.gain,
            "read_noise": self.cfg.read_noise / self.cfg.gain,
        }


def _build_core(scope: SimMicroscope) -> Any:
    from pymmcore_plus.experimental.unicore import (
        SimpleCameraDevice,
        StageDevice,
        UniMMCore,
        XYStageDevice,
        pymm_property,
    )

    class SimXYStage(XYStageDevice):
        def __init__(self) -> None:
            super().__init__()
            self.pos = (0.0, 0.0)

        def set_position_um(self, x: float, y: float) -> None:
            self.pos = (float(x), float(y))

        def get_position_um(self) -> tuple[float, float]:
            return self.pos

        def set_origin_x(self) -> None:
            self.pos = (0.0, self.pos[1])

        def set_origin_y(self) -> None:
            self.pos = (self.pos[0], 0.0)

        def home(self) -> None:
            self.pos = (0.0, 0.0)

        def stop(self) -> None:
            pass

    class SimFocus(StageDevice):
        def __init__(self) -> None:
            super().__init__()
            self.z = 0.0

        def set_position_um(self, val: float) -> None:
            self.z = float(val)

        def get_position_um(self) -> float:
            return self.z

        def set_origin(self) -> None:
            self.z = 0.0

        def home(self) -> None:
            self.z = 0.0

        def stop(self) -> None:
            pass

    xy, focus = SimXYStage(), SimFocus()

    class SimCamera(SimpleCameraDevice):
        def __init__(self) -> None:
            super().__init__()
            self._exposure = 10.0
            self._channel = CHANNELS[0]
            self.t = 0
            self._last_key: tuple | None = None

        @pymm_property(allowed_values=list(CHANNELS))
        def sim_channel(self) -> str:
            return self._channel

        @sim_channel.setter  # type: ignore[no-redef]  # pymm_property's setter: mypy allows the pattern for @property only
        def sim_channel(self, value: str) -> None:
            self._channel = value

        def get_exposure(self) -> float:
            return self._exposure

        def set_exposure(self, exposure: float) -> None:
            self._exposure = float(exposure)

        def sensor_shape(self) -> tuple[int, int]:
            h, w = scope.cfg.shape
            return (h, w)

        def dtype(self) -> Any:
            return np.uint16

        def snap(self, buffer: np.ndarray) -> Mapping:
            c = CHANNELS.index(self._channel)
            # the MDA tells the camera nothing of t: the runner's event does (see frame index)
            # the camera is told nothing of t or z by the MDA: the runner's current event is
            t = scope._current_t
            z_index = scope._current_z
            z_um = (z_index - (scope._n_z - 1) / 2) * scope.cfg.z_step_um  # stack centred on focus
            x_um, y_um = xy.pos
            scope.sample.render(t, c, z_index, z_um, (y_um, x_um), out=buffer)
            return {"sim_t": t, "sim_channel": self._channel}

    core_log = logging.getLogger("pymmcore-plus")
    old = core_log.level
    core_log.setLevel(logging.CRITICAL)  # UniMMCore looks for a Micro-Manager install it does not need
    from .mmcore import psygnal_signals

    try:
        with psygnal_signals():
            core = UniMMCore()
    finally:
        core_log.setLevel(old)
    core.setAutoShutter(False)
    cam = SimCamera()
    core.loadPyDevice("Camera", cam)
    core.initializeDevice("Camera")
    core.setCameraDevice("Camera")
    core.loadPyDevice("XY", xy)
    core.initializeDevice("XY")
    core.setXYStageDevice("XY")
    core.loadPyDevice("Z", focus)
    core.initializeDevice("Z")
    core.setFocusDevice("Z")
    for ch in CHANNELS:
        core.defineConfig("Channel", ch, "Camera", "sim_channel", ch)
    core.setChannelGroup("Channel")
    core.definePixelSizeConfig("sim")
    core.setPixelSizeUm("sim", scope.cfg.pixel_size_um)
    core.setPixelSizeConfig("sim")
    scope._current_t = 0
    scope._current_z = 0
    scope.camera = cam
    scope.xy_stage = xy
    scope.focus = focus

    @core.mda.events.eventStarted.connect
    def _on_event(event: Any) -> None:
        scope._current_t = int(event.index.get("t", 0))
        scope._current_z = int(event.index.get("z", 0))

    @core.mda.events.sequenceStarted.connect
    def _on_seq(seq: Any, *_: Any) -> None:
        generated = type(seq).__name__ == "GeneratorMDASequence"  # an iterable of events: no sizes
        scope._n_z = 1 if generated else int(seq.sizes.get("z", 1) or 1)

    scope._n_z = 1
    # the camera learns t and z from each event; a hardware-sequenced burst would start only one
    # event for many frames, so every frame is its own event here
    engine = core.mda.engine
    assert engine is not None  # the runner comes with UniMMCore's engine
    engine.use_hardware_sequencing = False
    return core
