"""pymmcore-plus bridge: stream every frame of an MDA into livescope without slowing it down.

    handle = attach(core, "tcp://127.0.0.1:5570")
    core.mda.run(sequence)
    handle.close()

The MDA thread only puts (image, event, metadata) into a bounded queue; a sender thread builds
the header and sends. A frame that finds the queue full is counted in ``dropped`` and its ``seq``
is skipped, so the daemon counts it as lost: nothing is lost silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any

import numpy as np

from ._sender import QueuedSender
from .transport import FramePublisher

__all__ = ["MMCoreBridge", "attach", "psygnal_signals"]

log = logging.getLogger(__name__)

@contextlib.contextmanager
def psygnal_signals() -> Any:
    """Make a pymmcore-plus core created inside use psygnal signals, even in a process where a
    Qt application exists: livescope runs MDAs on plain threads with no Qt event loop to deliver
    queued Qt signals (and Qt signals would need qtpy)."""
    old = os.environ.get("PYMM_SIGNALS_BACKEND")
    os.environ["PYMM_SIGNALS_BACKEND"] = "psygnal"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYMM_SIGNALS_BACKEND", None)
        else:
            os.environ["PYMM_SIGNALS_BACKEND"] = old


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


class MMCoreBridge(QueuedSender):
    def __init__(
        self,
        core: Any,
        address: str,
        *,
        stream: str = "mmcore",
        buffer_frames: int = 256,
        camera: dict[str, Any] | None = None,
        bits: int | None = None,
        send_end: bool = True,
        shm: bool | None = False,
        curve: Any = None,
    ) -> None:
        self.core = core
        self.stream = stream
        self.camera = camera
        self.bits = bits
        self.send_end = send_end
        if curve is not None and shm:
            raise ValueError("shm=True and curve: shared memory is same-host only; use one or the other")
        if shm is False or curve is not None:  # curve: a livescope.bridges.auth.CurveClient
            publisher = FramePublisher(address, stream=stream, block=True, send_timeout_ms=2000, hwm=16,
                                       curve=curve)
        else:  # same-host shared memory (None: when the address is on this machine); bridges/shm.py
            from .shm import make_publisher

            publisher = make_publisher(address, stream, shm=shm, block=True, send_timeout_ms=2000, hwm=16)
        self._sizes: dict[str, Any] = {}
        self._seq_info: dict[str, Any] = {}
        # the end marker goes out when each MDA sequence finishes, not on close
        super().__init__(publisher, buffer_frames=buffer_frames, end_on_close=False,
                         name="livescope-mmcore-sender")
        ev = core.mda.events
        ev.frameReady.connect(self._on_frame)
        ev.sequenceStarted.connect(self._on_sequence)
        ev.sequenceFinished.connect(self._on_finished)

    # -- MDA thread: no allocation beyond the queue entry, never blocks ------------------------
    def _on_frame(self, image: np.ndarray, event: Any, meta: Any) -> None:
        self.enqueue(image, event, meta)

    def _on_sequence(self, sequence: Any, *_: Any) -> None:
        if type(sequence).__name__ == "GeneratorMDASequence":  # events from an iterable: sizes unknown
            self._sizes, self._seq_info = {}, self._camera_geometry()
            return
        sizes = dict(sequence.sizes)
        self._sizes = {k: int(v) for k, v in sizes.items() if k in ("p", "c", "z", "t") and v}
        info: dict[str, Any] = {}
        if sequence.time_plan is not None and getattr(sequence.time_plan, "interval", None) is not None:
            interval = sequence.time_plan.interval
            info["interval_s"] = float(getattr(interval, "total_seconds", lambda: interval)())
        if sequence.z_plan is not None and getattr(sequence.z_plan, "step", None):
            info["z_step_um"] = float(sequence.z_plan.step)
        self._seq_info = info
        self._seq_info.update(self._camera_geometry())

    def _camera_geometry(self) -> dict[str, Any]:
        """Pixel-size affine (camera pixels -> stage um) and binning, read once per sequence."""
        out: dict[str, Any] = {}
        try:
            out["pixel_size_affine"] = [float(v) for v in self.core.getPixelSizeAffine()]
        except Exception:
            pass
        try:
            out["binning"] = int(self.core.getProperty(self.core.getCameraDevice(), "Binning"))
        except Exception:
            pass
        return out

    def _on_finished(self, sequence: Any, *_: Any) -> None:
        if self.send_end:
            self.end()

    # -- sender thread ---------------------------------------------------------------------
    def _frame(self, image: np.ndarray, event: Any, meta: Any) -> tuple[np.ndarray, dict[str, Any]]:
        return image, self._header(event, meta)

    def _header(self, event: Any, meta: Any) -> dict[str, Any]:
        index = {str(k): int(v) for k, v in dict(event.index).items() if str(k) in ("p", "c", "z", "t")}
        meta = dict(meta or {})
        header: dict[str, Any] = {
            "index": index,
            "sizes": self._sizes,
            **self._seq_info,
        }
        if event.channel is not None:
            header["channel"] = event.channel.config
        px = meta.get("pixel_size_um")
        if px:
            header["pixel_size_um"] = float(px)
        if "runner_time_ms" in meta:
            header["time"] = float(meta["runner_time_ms"]) / 1000.0
        if self.camera:
            header["camera"] = self.camera
        if self.bits:
            header["bits"] = self.bits
        meta.pop("mda_event", None)
        header["meta"] = _jsonable({"frame": meta, "event": event.model_dump(mode="json", exclude_unset=True)})
        return header

    def close(self, timeout: float = 10.0) -> None:
        """Detach from the core, send what is queued, close the socket."""
        if self._closed:
            return
        ev = self.core.mda.events
        for signal, slot in ((ev.frameReady, self._on_frame), (ev.sequenceStarted, self._on_sequence),
                             (ev.sequenceFinished, self._on_finished)):
            try:
                signal.disconnect(slot)
            except Exception:
                pass
        super().close(timeout)


def attach(core: Any, address: str, **kwargs: Any) -> MMCoreBridge:
    """Stream every ``frameReady`` frame of ``core`` (CMMCorePlus or UniMMCore) to ``address``."""
    return MMCoreBridge(core, address, **kwargs)
