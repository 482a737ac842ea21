"""Attach livescope to a pymmcore-plus core running in this napari: find the core, start a daemon
(or use the one already at the dock's addresses), stream the core's frames to it.

The core is napari-micromanager's (its *Main Window* holds a ``CMMCorePlus`` of its own), or the
process's ``CMMCorePlus.instance()`` when one was already made: never a new, empty core. The
daemon runs as a subprocess (``python -m livescope.daemon.cli daemon --source zmq ...``), so the
dock uses its sockets only, as every other client does; it is asked to stop (flushing its store)
when the user detaches or the dock, the window or the application closes.
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from ...bridges.auth import read_token

__all__ = ["DaemonProcess", "ask", "default_out", "find_core"]

log = logging.getLogger(__name__)


def find_core(viewer: Any) -> tuple[Any, str] | None:
    """(core, where it was found): napari-micromanager's window in ``viewer``, else an existing
    ``CMMCorePlus.instance()``; None when this napari runs no Micro-Manager core."""
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)  # napari.Viewer only
    if window is not None:
        from qtpy import QtWidgets

        for widget in window.findChildren(QtWidgets.QWidget):
            if type(widget).__module__.startswith("napari_micromanager"):
                core = getattr(widget, "core", None) or getattr(widget, "_mmc", None)
                if _is_core(core):
                    return core, f"napari-micromanager ({type(widget).__name__})"
    if "pymmcore_plus" not in sys.modules:  # nobody made a core: importing it makes none
        return None
    try:
        from pymmcore_plus.core import _mmcore_plus
    except ImportError:
        return None
    # CMMCorePlus.instance() would make a new, empty core when none exists: read its weak
    # reference to the first core made in this process instead
    ref = getattr(_mmcore_plus, "_instance", None)
    core = ref() if callable(ref) else None
    return (core, "CMMCorePlus.instance()") if _is_core(core) else None


def _is_core(obj: Any) -> bool:
    return obj is not None and hasattr(obj, "mda") and hasattr(obj, "getCameraDevice")


def core_name(core: Any) -> str:
    try:
        camera = core.getCameraDevice() or "no camera"
    except Exception:
        camera = "?"
    return f"{type(core).__name__} (camera {camera!r})"


def default_out(folder: Path | None = None) -> Path:
    """``~/livescope-YYYYmmdd-HHMMSS.zarr``, a new name each time."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = folder or Path.home()
    path = base / f"livescope-{stamp}.zarr"
    n = 1
    while path.exists():
        n += 1
        path = base / f"livescope-{stamp}-{n}.zarr"
    return path


def ask(control: str, cmd: str, timeout_s: float = 1.0, **kwargs: Any) -> dict[str, Any] | None:
    """One control command; None when no daemon answers in ``timeout_s``."""
    import zmq

    sock: Any = zmq.Context.instance().socket(zmq.REQ)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
        sock.connect(control)
        token = read_token(control)
        sock.send(json.dumps({"cmd": cmd, **kwargs, **({"token": token} if token else {})}).encode())
        answer: dict[str, Any] = json.loads(sock.recv())
        return answer
    except (zmq.ZMQError, ValueError):
        return None
    finally:
        sock.close(linger=0)


class DaemonProcess:
    """A livescope daemon this dock started: ``--source zmq`` on the dock's addresses."""

    def __init__(
        self,
        *,
        ingest: str,
        publish: str,
        control: str,
        out: Path | None,
        engines: str = "",
        extra: list[str] | None = None,
    ) -> None:
        self.ingest, self.publish, self.control, self.out = ingest, publish, control, out
        args = [sys.executable, "-m", "livescope.daemon.cli", "daemon", "--source", "zmq"]
        args += ["--ingest", ingest, "--publish", publish, "--control", control]
        if engines:
            args += ["--engines", engines]
        if out is not None:
            args += ["--out", str(out)]
        args += extra or []
        self.args = args
        # the daemon's own messages (its summary, a refusal) go to a file: a pipe nobody reads fills up
        self._log = tempfile.NamedTemporaryFile(prefix="livescope-daemon-", suffix=".log", delete=False)  # noqa: SIM115
        self.log_path = Path(self._log.name)
        self.proc = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid
        # the last chance to stop it: at interpreter exit (a weak reference: the dock may go first)
        ref = weakref.ref(self)
        self._at_exit = lambda: (lambda d: d.stop(timeout_s=10) if d is not None else None)(ref())
        atexit.register(self._at_exit)

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def request_stop(self) -> None:
        """Ask it to stop (it flushes and closes its store); returns at once."""
        if self.running and ask(self.control, "stop", timeout_s=1.0) is None and self.running:
            self.proc.terminate()  # SIGTERM: the daemon stops cleanly on it too

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """Stop it and wait: ``stop`` over the control socket, SIGTERM, then kill."""
        if self.running:
            self.request_stop()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the livescope daemon (pid %d) did not stop in %.0f s: terminating it", self.pid, timeout_s)
                self.proc.terminate()  # a second signal skips completing products
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(5)
        atexit.unregister(self._at_exit)
        self._log.close()
        return self.proc.returncode

    def wait_exit(self, timeout_s: float) -> int | None:
        deadline = time.monotonic() + timeout_s
        while self.running and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.returncode
