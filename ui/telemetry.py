"""The telemetry panel and the status line: what the daemon's ``status`` says, over time.

Rates (input, processed, saved, display) and per-stage latency p50/p99 are plotted over the last
few minutes; counters that mean data is missing (lost) are red when non-zero, skipped frames
(engines slower than the camera, by design) amber. The live preview latency (frame received ->
its preview sent, ``status()["latency"]["preview"]`` for restored products, ``preview_raw`` for
raw) is written as p50 / p99 in the panel and the status line.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

from .style import COLORS

__all__ = ["TelemetryPanel", "status_line", "preview_latency"]

LINE_COLORS = ["#5fa8e8", "#e8a23c", "#6cc070", "#c77dde", "#e8e05f", "#ff7b72", "#7fd6d6", "#b0b0b0"]


def _span(text: str, colour: str | None) -> str:
    return f"<span style='color:{colour}'>{text}</span>" if colour else text


def preview_latency(st: dict[str, Any], which: str = "preview") -> str | None:
    """ "p50 / p99 ms" of the daemon's preview latency (``which``: "preview" for restored
    products, "preview_raw" for raw), or None before the daemon measured any."""
    summary = (st.get("latency") or {}).get(which) or {}
    p50, p99 = summary.get("p50_ms"), summary.get("p99_ms")
    if not isinstance(p50, (int, float)) or not isinstance(p99, (int, float)):
        return None
    return f"{p50:.0f} / {p99:.0f} ms"


def completion_text(st: dict[str, Any]) -> tuple[str, str | None]:
    """The saved products' completion (daemon/completion.py): frames to go and the time left, or
    "complete"; with the colour to show it in."""
    comp = st.get("completion") or {}
    mode = comp.get("mode")
    if not mode or mode == "off":
        return ("off", None) if mode == "off" else ("–", None)
    to_go = int(comp.get("frames_to_go") or 0)
    done = int(comp.get("frames_completed") or 0)
    if not to_go:
        return (f"complete ({done} caught up)" if done else "complete"), COLORS["ok"]
    eta = comp.get("eta_s")
    left = f", ~{eta:.0f} s" if isinstance(eta, int | float) else ""
    waiting = " after the run" if mode == "after" and st.get("state") == "running" else ""
    return f"{to_go} to go{left}{waiting}", COLORS["warn"]


def resolution_points(st: dict[str, Any]) -> list[tuple[str, float]]:
    """(product, resolution) from a status's per-frame scalars ``resolution_<product>_nm`` (or
    ``_px`` where the stream gives no pixel size), raw first; NaN (nothing shared) left out."""
    out = []
    for key, value in (st.get("scalars") or {}).items():
        if key.startswith("resolution_") and isinstance(value, int | float) and value == value:
            name = key[len("resolution_") :].rsplit("_", 1)[0]
            out.append((name, float(value)))
    return sorted(out, key=lambda kv: (kv[0] != "raw", kv[0]))


def status_line(st: dict[str, Any], display_fps: float) -> str:
    """One line of rich text for the status bar."""
    f = st.get("frames", {})
    fps = st.get("fps", {})
    lost = int(f.get("lost", 0))
    skipped = f.get("skipped_frames", max((f.get("skipped") or {}).values(), default=0))
    rejected = int(f.get("rejected", 0))
    store = st.get("store") or {}
    parts = [
        _span("●", COLORS["ok"]) + f" {st.get('state', '?')}",
        f"in {fps.get('in', 0):.1f} fps",
        f"processed {fps.get('processed', 0):.1f}",
        f"saved {f.get('saved', 0)}",
        _span(f"lost {lost}", COLORS["bad"] if lost else None),
        _span(f"skipped {skipped}", COLORS["warn"] if skipped else None),
        _span(f"rejected {rejected}", COLORS["bad"] if rejected else None),
        f"display {display_fps:.0f} fps",
    ]
    preview = preview_latency(st) or preview_latency(st, "preview_raw")
    if preview:
        parts.append(f"preview p50/p99 {preview}")
    to_go = int((st.get("completion") or {}).get("frames_to_go") or 0)
    if to_go:
        text, colour = completion_text(st)
        parts.append(_span(f"products: {text}", colour))
    if store:
        free = float(store.get("free_gb", 0))
        parts.append(_span(f"{free:.0f} GB free", COLORS["bad"] if free < 5 else None))
    return "  ·  ".join(parts)


class _Series:
    def __init__(self, n: int) -> None:
        self.t: deque[float] = deque(maxlen=n)
        self.v: deque[float] = deque(maxlen=n)


class TelemetryPanel(QtWidgets.QWidget):
    def __init__(self, history: int = 600) -> None:
        super().__init__()
        self.history = history
        self.t0 = time.monotonic()
        lay = QtWidgets.QVBoxLayout(self)
        lay.setContentsMargins(6, 4, 6, 4)
        lay.setSpacing(6)
        grid = QtWidgets.QGridLayout()
        grid.setHorizontalSpacing(14)
        grid.setVerticalSpacing(2)
        self.metrics: dict[str, QtWidgets.QLabel] = {}
        names = [
            ("received", "received"),
            ("saved", "saved"),
            ("lost", "lost"),
            ("skipped", "skipped"),
            ("rejected", "rejected"),
            ("queue", "store queue"),
            ("slots", "engine slots"),
            ("store", "written"),
            ("free", "free disk"),
            ("preview", "preview p50 / p99"),
            ("preview_raw", "raw preview p50 / p99"),
            ("completion", "saved products"),
        ]
        for i, (key, label) in enumerate(names):
            name = QtWidgets.QLabel(label)
            name.setStyleSheet(f"color:{COLORS['dim']}; font-size:9pt;")
            value = QtWidgets.QLabel("–")
            value.setObjectName("metric")
            grid.addWidget(name, i // 3 * 2, i % 3)
            grid.addWidget(value, i // 3 * 2 + 1, i % 3)
            self.metrics[key] = value
        lay.addLayout(grid)
        self.path = QtWidgets.QLabel("store: –")
        self.path.setStyleSheet(f"color:{COLORS['dim']}; font-size:8pt;")
        self.path.setWordWrap(True)
        self.path.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.path)
        self.fps_plot = self._plot("frames per second", "fps")
        self.lat_plot = self._plot("latency p50 (solid) / p99 (dashed)", "ms")
        # the live resolution readout (daemon/tuning.py: FRC of two photon halves), raw and restored
        self.res_plot = self._plot("resolution (FRC): raw and restored", "nm")
        lay.addWidget(self.fps_plot, 1)
        lay.addWidget(self.lat_plot, 1)
        lay.addWidget(self.res_plot, 1)
        self.engines_label = QtWidgets.QLabel("")
        self.engines_label.setObjectName("metric")
        self.engines_label.setTextFormat(QtCore.Qt.TextFormat.RichText)
        lay.addWidget(self.engines_label)
        self.series: dict[str, _Series] = {}
        self.curves: dict[str, pg.PlotDataItem] = {}

    def _plot(self, title: str, unit: str) -> pg.PlotWidget:
        w = pg.PlotWidget()
        w.setBackground(COLORS["window"])
        pi = w.getPlotItem()
        pi.setTitle(f"<span style='color:{COLORS['dim']};font-size:9pt'>{title}</span>")
        pi.setLabel("left", f"<span style='font-size:8pt'>{unit}</span>")
        pi.setLabel("bottom", "<span style='font-size:8pt'>s</span>")
        pi.showGrid(x=True, y=True, alpha=0.12)
        pi.setMenuEnabled(False)
        pi.hideButtons()
        for axis in ("left", "bottom"):
            pi.getAxis(axis).setTextPen(COLORS["dim"])
            pi.getAxis(axis).setPen(COLORS["border"])
        pi.getAxis("left").setWidth(40)
        pi.addLegend(
            offset=(4, 2),
            labelTextColor=COLORS["dim"],
            labelTextSize="8pt",
            brush=pg.mkBrush(23, 24, 28, 190),
            colCount=2,
        )
        w.setMinimumHeight(140)
        return w

    def _add(
        self,
        plot: pg.PlotWidget,
        key: str,
        t: float,
        value: float | None,
        colour: str,
        dashed: bool = False,
        legend: bool = True,
    ) -> None:
        if value is None:
            return
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series(self.history)
            style = QtCore.Qt.PenStyle.DashLine if dashed else QtCore.Qt.PenStyle.SolidLine
            pen = pg.mkPen(colour, width=1.3, style=style)
            self.curves[key] = plot.plot(pen=pen, name=key.split(":", 1)[1] if legend else None)
        s.t.append(t)
        s.v.append(float(value))

    def update_status(self, st: dict[str, Any], display_fps: float) -> None:
        t = time.monotonic() - self.t0
        f = st.get("frames", {})
        fps = st.get("fps", {})
        for i, (name, value) in enumerate(
            (
                ("in", fps.get("in")),
                ("processed", fps.get("processed")),
                ("saved", fps.get("saved")),
                ("display", display_fps),
            )
        ):
            self._add(self.fps_plot, f"fps:{name}", t, value, LINE_COLORS[i])
        lat = dict(st.get("latency") or {})
        for name, e in (st.get("engines") or {}).items():
            lat[name] = e.get("latency") or {}
        for i, (name, summary) in enumerate(sorted(lat.items())):
            colour = LINE_COLORS[i % len(LINE_COLORS)]
            self._add(self.lat_plot, f"p50:{name}", t, summary.get("p50_ms"), colour)
            self._add(self.lat_plot, f"p99:{name}", t, summary.get("p99_ms"), colour, dashed=True, legend=False)
        for i, (name, value) in enumerate(resolution_points(st)):
            self._add(self.res_plot, f"res:{name}", t, value, LINE_COLORS[i % len(LINE_COLORS)])
        for key, s in self.series.items():
            self.curves[key].setData(np.fromiter(s.t, float), np.fromiter(s.v, float))
        lost = int(f.get("lost", 0))
        skipped = f.get("skipped_frames", max((f.get("skipped") or {}).values(), default=0))
        rejected = int(f.get("rejected", 0))
        q = st.get("queues") or {}
        store = st.get("store") or {}
        self._metric("received", f"{f.get('received', 0)}")
        self._metric("saved", f"{f.get('saved', 0)}")
        self._metric("lost", f"{lost}", COLORS["bad"] if lost else None)
        self._metric("skipped", f"{skipped}", COLORS["warn"] if skipped else None)
        self._metric("rejected", f"{rejected}", COLORS["bad"] if rejected else None)
        self._metric("queue", f"{q.get('store_items', 0)} · {q.get('store_mb', 0):.0f} MB")
        self._metric("slots", f"{q.get('engine_slots', 0)}")
        # frame received -> preview sent, restored products and raw apart (docs/viewer.md)
        self._metric("preview", preview_latency(st) or "–")
        self._metric("preview_raw", preview_latency(st, "preview_raw") or "–")
        self._metric("completion", *completion_text(st))
        if store:
            free = float(store.get("free_gb", 0))
            self._metric("store", f"{store.get('bytes_written', 0) / 2**20:,.0f} MB")
            self._metric("free", f"{free:,.1f} GB", COLORS["bad"] if free < 5 else None)
            self.path.setText(f"store: {store.get('path', '–')}")
        else:
            self._metric("store", "not saving")
            self._metric("free", "–")
            self.path.setText("store: none (the daemon runs without --out)")
        rows = []
        for name, e in (st.get("engines") or {}).items():
            state = _span("on", COLORS["ok"]) if e.get("enabled") else _span("off", COLORS["warn"])
            lat = e.get("latency") or {}
            rows.append(
                f"{name:<11} {state}  {lat.get('p50_ms', 0):6.1f} / {lat.get('p99_ms', 0):6.1f} ms"
                f"  processed {e.get('processed', 0)}"
            )
        self.engines_label.setText("<pre style='margin:0'>" + "\n".join(rows) + "</pre>")

    def _metric(self, key: str, text: str, colour: str | None = None) -> None:
        label = self.metrics[key]
        label.setText(text)
        label.setStyleSheet(f"color:{colour or COLORS['text']};")
