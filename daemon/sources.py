"""Frame sources the daemon can start itself: the ``sim`` microscope and ``file:PATH`` replay
(read by :mod:`livescope.bridges.movies`, the reader ``livescope process`` uses too).

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

from ..bridges.mmcore import attach, release_core
from ..bridges.movies import open_movie
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
        h, w = cfg.sim_shape
        dy, dx = cfg.sim_drift
        self.sim_config = SimConfig(
            shape=(int(h), int(w)), drift=(float(dy), float(dx)), seed=cfg.sim_seed, interval_s=cfg.sim_interval_s
        )
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
            self.sequence = self.scope.endless(
                channels=cfg.sim_channels, z_planes=cfg.sim_z, interval_s=cfg.sim_interval_s
            )
        else:
            from useq import MDASequence

            self.sequence = MDASequence(
                time_plan={
                    "interval": cfg.sim_interval_s,  # type: ignore[arg-type]
                    "loops": cfg.frames or 1_000_000,
                }
            )
        self.bridge = attach(self.core, cfg.ingest, stream="sim" if self.scope else "mmcore", camera=camera, bits=bits)
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
        else:  # the core this daemon made from --config: its devices released (again is harmless)
            release_core(self.core)

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
        release_core(core)
        raise RuntimeError(
            f"could not load {path}: {exc}. A real rig needs Micro-Manager's device adapters: install them "
            "with `mmcore install` (pymmcore-plus), or run without --config to use the built-in microscope"
        ) from exc
    return core


def read_movie(path: str | Path, axes: str | None = None) -> tuple[Any, list[str], dict[str, Any]]:
    """The first position of a saved movie (TIFF / OME-TIFF / ImageJ, OME-Zarr, NDTiff) as a lazily
    readable (t, [c,] [z,] y, x) array, those axes, and the sampling the file states. Read as its
    writer wrote it (:mod:`livescope.bridges.movies`); ``axes``: the file's axes where it does not
    say them."""
    movie = open_movie(path, axes)
    return movie.array(0), movie.array_axes, dict(movie.info)


# what the wire protocol carries (bridges.protocol.DTYPES): other integer and float types widened
_WIRE_DTYPE = {"int8": "int16", "int64": "int32", "uint64": "uint32", "bool": "uint8", "float64": "float32"}


class FileSource:
    """Replay a saved movie into the daemon at ``rate_fps`` time points per second (as fast as
    possible if None): every position, channel and plane, each sent with its index {p, c, z, t},
    the sizes, its channel's name and the file's sampling, as a live acquisition would."""

    def __init__(self, cfg: DaemonConfig, path: str | Path, axes: str | None = None) -> None:
        self.cfg = cfg
        self.path = Path(path)
        self.movie = open_movie(self.path, axes)
        m = self.movie
        log.info(
            "replaying %s: %s, %d time points x %d positions x %d channels x %d planes of %dx%d %s",
            self.path,
            m.file_axes,
            m.sizes["t"],
            m.sizes["p"],
            m.sizes["c"],
            m.sizes["z"],
            m.sizes["y"],
            m.sizes["x"],
            m.dtype,
        )
        self.publisher = FramePublisher(cfg.ingest, stream=f"file:{self.path.name}", block=True, hwm=16)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="livescope-file-replay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        movie = self.movie
        period = 1.0 / self.cfg.rate_fps if self.cfg.rate_fps else 0.0
        interval = movie.info.get("interval_s")
        step = interval or period  # the time stamps: the file's interval, else the replay's
        names = [n or f"channel {i}" for i, n in enumerate(movie.channels)]
        meta = {"channels": names} if any(movie.channels) else None
        t0 = time.monotonic()
        last_t = -1
        try:
            for frame in movie.frames(self.cfg.frames):
                if self._stop.is_set():
                    break
                t = frame.index["t"]
                if t != last_t and period and t > 0:  # pace whole time points
                    delay = t0 + t * period - time.monotonic()
                    if delay > 0 and self._stop.wait(delay):
                        break
                last_t = t
                plane = frame.plane
                wire = _WIRE_DTYPE.get(plane.dtype.name)
                if wire:
                    plane = plane.astype(wire)
                fields: dict[str, Any] = dict(frame.sampling)
                self.publisher.send(
                    np.ascontiguousarray(plane),
                    index=frame.index,
                    sizes=frame.sizes,
                    channel=names[frame.index["c"]] if meta else None,
                    time=t * step,
                    meta=meta,
                    **fields,
                )
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
        # --axes: the file's axes where it does not say them (DaemonConfig.axes where it has one)
        return FileSource(cfg, src[5:], getattr(cfg, "axes", None))
    if src == "zmq" or src.startswith("zmq:"):
        return None
    raise ValueError(f"unknown source {src!r}: use sim, file:PATH or zmq")
