"""The live viewer: one pyqtgraph panel per product, fed from the daemon's preview socket.

It runs in its own process and never slows the daemon: previews arrive on a PUB/SUB socket with
a high-water mark of a few frames; a QTimer at screen rate drains the socket and draws only the
newest frame of each product. Levels are recomputed about once a second, not per frame.

    livescope view --connect tcp://127.0.0.1:5571 --control tcp://127.0.0.1:5572
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

import numpy as np

from ..bridges.transport import DEFAULT_CONTROL, DEFAULT_PUBLISH, PreviewSubscriber

__all__ = ["LiveViewer", "run_viewer", "main"]

log = logging.getLogger(__name__)

ORDER = ["raw", "registered", "denoised", "deconvolved", "background", "slow", "fast"]
CMAPS = {"background": "CET-L3", "slow": "CET-L3", "fast": "CET-L3"}


def _qt():
    try:
        import pyqtgraph as pg
        from pyqtgraph.Qt import QtCore, QtWidgets
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the viewer needs pyqtgraph and Qt: pip install 'livescope[ui]'") from exc
    return pg, QtCore, QtWidgets


class _StatusPoller:
    """Asks the daemon for its status once a second on a thread (a REQ can block for seconds)."""

    def __init__(self, address: str | None) -> None:
        self.address = address
        self.latest: dict[str, Any] | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livescope-view-status", daemon=True)
        if address:
            self._thread.start()

    def _run(self) -> None:
        import json

        import zmq

        ctx = zmq.Context.instance()
        sock = None
        while not self._stop.is_set():
            if sock is None:
                sock = ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, 1500)
                sock.connect(self.address)
            try:
                from ..bridges.auth import read_token

                sock.send(json.dumps({"cmd": "status", "token": read_token(self.address)}).encode())
                self.latest = json.loads(sock.recv())
                self.error = None
            except zmq.Again:
                sock.close(linger=0)
                sock = None  # a REQ socket is unusable after a timeout: make a new one
                self.error = "daemon not answering"
            self._stop.wait(1.0)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()


class LiveViewer:
    def __init__(self, connect: str = DEFAULT_PUBLISH, control: str | None = DEFAULT_CONTROL) -> None:
        pg, QtCore, QtWidgets = _qt()
        self.pg = pg
        pg.setConfigOptions(imageAxisOrder="row-major", antialias=False)
        self.sub = PreviewSubscriber(connect)
        self.status = _StatusPoller(control)
        self.win = QtWidgets.QMainWindow()
        self.win.setWindowTitle(f"livescope — {connect}")
        self.win.resize(1200, 700)
        self.layout = pg.GraphicsLayoutWidget()
        self.layout.setBackground((20, 20, 24))
        self.win.setCentralWidget(self.layout)
        self.status_label = QtWidgets.QLabel("waiting for frames…")
        self.status_label.setStyleSheet("color: #ddd; padding: 2px 6px; font-family: monospace;")
        self.win.statusBar().addWidget(self.status_label, 1)
        self.win.statusBar().setStyleSheet("background: #1b1b20;")
        self.panels: dict[str, dict[str, Any]] = {}
        self.frames_drawn = 0
        self._last_levels = 0.0
        self._display_times: list[float] = []
        self.timer = QtCore.QTimer()
        self.timer.timeout.connect(self.update)
        self.timer.start(33)
        self.status_timer = QtCore.QTimer()
        self.status_timer.timeout.connect(self.update_status)
        self.status_timer.start(500)

    def _panel(self, product: str) -> dict[str, Any]:
        panel = self.panels.get(product)
        if panel is not None:
            return panel
        pg = self.pg
        names = sorted([*self.panels, product], key=lambda n: (ORDER.index(n) if n in ORDER else 99, n))
        # re-lay out the grid: up to 4 columns
        self.layout.clear()
        first_view = None
        new_panels = {}
        for i, name in enumerate(names):
            old = self.panels.get(name)
            row, col = divmod(i, 4)
            label = pg.LabelItem(name, color="#e6e6e6", size="11pt")
            self.layout.addItem(label, row=2 * row, col=col)
            view = old["view"] if old else pg.ViewBox(lockAspect=True, invertY=True)
            view.setBackgroundColor((10, 10, 12))
            self.layout.addItem(view, row=2 * row + 1, col=col)
            if old:
                img = old["image"]
            else:
                img = pg.ImageItem(axisOrder="row-major")
                img.setColorMap(pg.colormap.get(CMAPS.get(name, "CET-L1")))
                view.addItem(img)
            if first_view is None:
                first_view = view
            else:
                view.setXLink(first_view)
                view.setYLink(first_view)
            new_panels[name] = {"view": view, "image": img, "label": label,
                                "levels": old["levels"] if old else None, "seq": old["seq"] if old else -1,
                                "shape": old["shape"] if old else None}
        self.panels = new_panels
        return self.panels[product]

    def update(self) -> None:
        latest = self.sub.latest()
        if not latest:
            return
        now = time.monotonic()
        relevel = now - self._last_levels > 1.0
        for (product, p, c, z), frame in sorted(latest.items()):
            if p != 0 or c != 0:
                continue  # the first viewer shows position 0, channel 0 (selectors: issue 7)
            arr = frame.array
            if arr is None:
                continue
            panel = self._panel(product)
            if panel["levels"] is None or relevel:
                finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
                if finite.size:
                    lo, hi = np.percentile(finite[:: max(1, finite.size // 20000)], [0.5, 99.8])
                    panel["levels"] = (float(lo), float(max(hi, lo + 1e-6)))
            first = panel["shape"] != arr.shape
            # the preview buffer belongs to this message: nothing else reuses it
            panel["image"].setImage(arr, autoLevels=False, levels=panel["levels"])
            if first:
                panel["shape"] = arr.shape
                panel["view"].autoRange(padding=0)
            panel["seq"] = frame.seq
            t = (frame.header.get("index") or {}).get("t", "?")
            panel["label"].setText(f"{product}  ·  t={t}  seq={frame.seq}")
            self.frames_drawn += 1
        if relevel:
            self._last_levels = now
        self._display_times.append(now)
        self._display_times = [t for t in self._display_times if now - t < 2.0]

    def update_status(self) -> None:
        st = self.status.latest
        disp = len(self._display_times) / 2.0
        if st is None:
            text = self.status.error or "connecting to the daemon…"
            self.status_label.setText(f"{text}   display {disp:.0f} fps")
            return
        f = st.get("frames", {})
        fps = st.get("fps", {})
        lost = f.get("lost", 0)
        eng = "  ".join(f"{n} {e['latency'].get('p50_ms', 0):.0f}/{e['latency'].get('p99_ms', 0):.0f} ms"
                        + ("" if e["enabled"] else " (off)") for n, e in st.get("engines", {}).items())
        lost_html = f"<span style='color:#ff5555'>lost {lost}</span>" if lost else "lost 0"
        skipped = sum((f.get("skipped") or {}).values())
        store = st.get("store") or {}
        self.status_label.setText(
            f"in {fps.get('in', 0):.1f} fps · saved {f.get('saved', 0)} ({fps.get('saved', 0):.1f} fps) · "
            f"{lost_html} · skipped {skipped} · rejected {f.get('rejected', 0)} · display {disp:.0f} fps · "
            f"{eng} · store {store.get('bytes_written', 0) / 2**20:.0f} MB, {store.get('free_gb', 0):.0f} GB free"
        )

    def close(self) -> None:
        self.timer.stop()
        self.status_timer.stop()
        self.status.close()
        self.sub.close()


def run_viewer(connect: str = DEFAULT_PUBLISH, control: str | None = DEFAULT_CONTROL, *,
               screenshot: str | None = None, seconds: float | None = None) -> int:
    pg, QtCore, QtWidgets = _qt()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    viewer = LiveViewer(connect, control)
    viewer.win.show()
    if seconds is not None:
        def _finish() -> None:
            if screenshot:
                viewer.win.grab().save(screenshot)
            app.quit()

        QtCore.QTimer.singleShot(int(seconds * 1000), _finish)
    rc = app.exec()
    viewer.close()
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="livescope view")
    p.add_argument("--connect", default=DEFAULT_PUBLISH)
    p.add_argument("--control", default=DEFAULT_CONTROL)
    p.add_argument("--screenshot")
    p.add_argument("--seconds", type=float)
    a = p.parse_args(argv)
    return run_viewer(a.connect, a.control, screenshot=a.screenshot, seconds=a.seconds)


if __name__ == "__main__":
    sys.exit(main())
