"""Frame sources the daemon can start itself: the ``sim`` microscope and ``file:PATH`` replay.

Both stream into the daemon's own ingest socket over the wire protocol, exactly as an external
publisher (``--source zmq``) would, so the demo exercises the real path.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bridges.files import tiff_info
from ..bridges.mmcore import attach
from ..bridges.sim import SimConfig, SimMicroscope
from ..bridges.transport import FramePublisher
from .config import DaemonConfig

__all__ = ["FileSource", "SimSource", "make_source", "read_movie"]

log = logging.getLogger(__name__)


class SimSource:
    """A real pymmcore-plus MDA on the built-in simulated microscope (or, with ``mm_config``, on a
    real Micro-Manager configuration), run in-process on its own thread and streamed to the daemon
    through the pymmcore-plus bridge."""

    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.sim_config = SimConfig(shape=tuple(cfg.sim_shape), drift=tuple(cfg.sim_drift), seed=cfg.sim_seed,
                                    interval_s=cfg.sim_interval_s)
        camera: dict[str, Any] | None = None
        bits: int | None = None
        if cfg.mm_config:
            self.scope = None
            self.core = _load_mm_config(cfg.mm_config)
        else:
            self.scope = SimMicroscope(self.sim_config)
            self.core = self.scope.core
            camera, bits = self.scope.camera_metadata(), self.sim_config.bits
        if cfg.sequence:
            from useq import MDASequence

            self.sequence = MDASequence.from_file(cfg.sequence)
        elif self.scope is not None and cfg.frames:
            self.sequence = self.scope.sequence(frames=cfg.frames, channels=cfg.sim_channels, z_planes=cfg.sim_z)
        elif self.scope is not None:  # until stopped
            self.sequence = self.scope.endless(channels=cfg.sim_channels, z_planes=cfg.sim_z,
                                               interval_s=cfg.sim_interval_s)
        else:
            from useq import MDASequence

            self.sequence = MDASequence(time_plan={"interval": cfg.sim_interval_s, "loops": cfg.frames or 1_000_000})
        self.bridge = attach(self.core, cfg.ingest, stream="sim" if self.scope else "mmcore", camera=camera,
                             bits=bits)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="livescope-sim-mda", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.core.mda.run(self.sequence)
        except Exception:
            log.exception("the MDA failed")

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.core.mda.cancel()
            self._thread.join(10)
        self.bridge.close()
        if self.scope is not None:
            self.scope.close()

    def stats(self) -> dict[str, Any]:
        return {"bridge": self.bridge.stats()}


def _load_mm_config(path: str | Path) -> Any:
    from pymmcore_plus import CMMCorePlus

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Micro-Manager configuration {path} does not exist")
    from ..bridges.mmcore import psygnal_signals

    with psygnal_signals():
        core = CMMCorePlus()
    try:
        core.loadSystemConfiguration(str(path))
    except Exception as exc:
        raise RuntimeError(
            f"could not load {path}: {exc}. A real rig needs Micro-Manager's device adapters: install them "
            "with `mmcore install` (pymmcore-plus), or run without --config to use the built-in microscope"
        ) from exc
    return core


def read_movie(path: str | Path) -> tuple[Any, list[str], dict[str, Any]]:
    """A lazily readable (t, [c,] [z,] y, x) movie from TIFF / OME-TIFF or OME-Zarr, its axes and
    what is known of its physical sizes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    info: dict[str, Any] = {}
    if path.is_dir() or path.suffix == ".zarr":
        from ..bridges.files import ome_zarr_image

        arr, axes, _, info = ome_zarr_image(path)
        return arr, axes, info
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = [a.lower() for a in series.axes.replace("I", "T").replace("Q", "T").replace("S", "C")]
        info.update(tiff_info(tif))
        try:
            data = tif.asarray(out="memmap")
        except ValueError:
            data = tif.asarray()
    if data.ndim == 2:
        data, axes = data[None], ["t", "y", "x"]
    if axes[0] != "t":  # a single stack with no time axis: each plane becomes a time point
        axes = ["t"] + axes[1:]
    return data, axes, info


class FileSource:
    """Replay a saved movie into the daemon at ``rate_fps`` (as fast as possible if None)."""

    def __init__(self, cfg: DaemonConfig, path: str | Path) -> None:
        self.cfg = cfg
        self.path = Path(path)
        self.data, self.axes, self.info = read_movie(self.path)
        self.publisher = FramePublisher(cfg.ingest, stream=f"file:{self.path.name}", block=True, hwm=16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="livescope-file-replay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        axes, data = self.axes, self.data
        n_t = data.shape[0] if self.cfg.frames is None else min(self.cfg.frames, data.shape[0])
        lead = [a for a in axes if a not in ("y", "x")]
        sizes = {a: int(s) for a, s in zip(axes, data.shape) if a in ("t", "c", "z")}
        period = 1.0 / self.cfg.rate_fps if self.cfg.rate_fps else 0.0
        interval = self.info.get("interval_s") or (period or None)
        t0 = time.monotonic()
        try:
            for t in range(n_t):
                if self._stop.is_set():
                    break
                block = np.asarray(data[t])
                for rest in np.ndindex(*block.shape[:-2]):
                    index = {"t": t, **{a: int(i) for a, i in zip(lead[1:], rest)}}
                    plane = np.ascontiguousarray(block[rest])
                    if plane.dtype.kind == "f" and plane.dtype != np.float32:
                        plane = plane.astype(np.float32)
                    elif plane.dtype == np.int64 or plane.dtype == np.uint64:
                        plane = plane.astype(np.uint32)
                    self.publisher.send(plane, index=index, sizes=sizes, time=t * (interval or 0.0),
                                        pixel_size_um=self.info.get("pixel_size_um"),
                                        z_step_um=self.info.get("z_step_um"), interval_s=interval)
                if period:
                    delay = t0 + (t + 1) * period - time.monotonic()
                    if delay > 0:
                        self._stop.wait(delay)
            self.publisher.end()
        except Exception:
            log.exception("replay of %s failed", self.path)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        self.publisher.close()

    def stats(self) -> dict[str, Any]:
        return {"sent": self.publisher.sent, "dropped": self.publisher.dropped}


def make_source(cfg: DaemonConfig) -> Any | None:
    """The source object for ``cfg.source`` (None for ``zmq``: external publishers connect)."""
    src = cfg.source
    if src in ("sim", "mmcore"):
        return SimSource(cfg)
    if src.startswith("file:"):
        return FileSource(cfg, src[5:])
    if src == "zmq" or src.startswith("zmq:"):
        return None
    raise ValueError(f"unknown source {src!r}: use sim, file:PATH or zmq")
