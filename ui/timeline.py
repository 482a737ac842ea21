"""Time strips under the panels: the novelty score with the daemon's events marked (click one to
see its frame), and the mean intensity inside an ROI over time, raw against restored. Also the
bounded buffer of recent preview frames that makes the click possible."""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtWidgets

from .style import COLORS

__all__ = ["FrameBuffer", "NoveltyStrip", "RoiTrace", "event_stride", "event_rect", "event_point"]


def event_stride(event: dict[str, Any], header: dict[str, Any], preview_shape: tuple[int, ...]) -> tuple[int, str]:
    """The integer stride between a novelty event's full-frame pixels and a preview's pixels, and
    the rule that gave it. The daemon downsamples previews with ``arr[::step, ::step]``, ``step =
    ceil(max(frame shape) / preview_size)``, and scales the header's ``pixel_size_um`` by ``W / w``
    (full width over preview width), a ratio in (step - 1, step] for any frame wider than
    step * (step - 1) pixels, so its ceiling is the step:

    1. ``pixel size``: the event's full-frame ``pixel_size_um`` and the preview's: ceil(ratio);
    2. ``frame shape``: the event's ``frame_shape`` (or ``shape``), or the preview header's
       ``frame_shape``: ceil(longer full side / longer preview side);
    3. ``assumed``: neither known: the smallest stride that puts the box inside the preview
       (1 when it fits, which is exact for frames no larger than the preview size); approximate.
    """
    h, w = (int(n) for n in preview_shape[:2])
    full_px, prev_px = event.get("pixel_size_um"), header.get("pixel_size_um")
    if isinstance(full_px, (int, float)) and isinstance(prev_px, (int, float)) and full_px > 0 and prev_px > 0:
        return max(1, math.ceil(prev_px / full_px - 1e-6)), "pixel size"
    full = event.get("frame_shape") or event.get("shape") or header.get("frame_shape")
    if isinstance(full, (list, tuple)) and len(full) >= 2 and all(isinstance(n, int) and n > 0 for n in full[-2:]):
        return max(1, math.ceil(max(full[-2:]) / max(h, w) - 1e-9)), "frame shape"
    need = 1
    bbox = event.get("bbox")
    if isinstance(bbox, (list, tuple)) and len(bbox) == 4 and h > 0 and w > 0:
        need = max(1, math.ceil(float(bbox[2]) / h - 1e-9), math.ceil(float(bbox[3]) / w - 1e-9))
    return need, "assumed"


def event_rect(event: dict[str, Any], stride: int) -> tuple[float, float, float, float] | None:
    """The event's ``bbox`` [y0, x0, y1, x1] (full-frame pixels, end exclusive) as (x, y, width,
    height) in preview pixels: full pixel i lies in preview pixel i // stride."""
    bbox = event.get("bbox")
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4):
        return None
    y0, x0, y1, x1 = (float(v) / stride for v in bbox)
    if y1 <= y0 or x1 <= x0:
        return None
    return x0, y0, x1 - x0, y1 - y0


def event_point(event: dict[str, Any], stride: int) -> tuple[float, float] | None:
    """The event's ``centroid`` [y, x] (full-frame pixel indices) as (x, y) in preview pixels,
    at the pixel's centre."""
    c = event.get("centroid")
    if not (isinstance(c, (list, tuple)) and len(c) == 2):
        return None
    return (float(c[1]) + 0.5) / stride, (float(c[0]) + 0.5) / stride


class FrameBuffer:
    """The last preview frames by seq, per product, within a memory budget (previews are already
    downsampled, so a few hundred MB hold minutes of a 20 Hz stream). Arrays are kept as received
    (read-only views on their messages): nothing is copied."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._frames: OrderedDict[tuple[int, str], tuple[np.ndarray, dict[str, Any]]] = OrderedDict()

    def add(self, product: str, seq: int, arr: np.ndarray, header: dict[str, Any]) -> None:
        key = (seq, product)
        if key in self._frames:
            return
        self._frames[key] = (arr, header)
        self.nbytes += arr.nbytes
        while self.nbytes > self.max_bytes and self._frames:
            _, (old, _) = self._frames.popitem(last=False)
            self.nbytes -= old.nbytes

    def nearest(self, product: str, seq: int, tolerance: int = 50) -> tuple[np.ndarray, dict[str, Any]] | None:
        """The buffered frame of ``product`` with the seq nearest ``seq`` (previews are sent at
        display rate, so not every seq is there); None if none lies within ``tolerance``."""
        best, best_d = None, tolerance + 1
        for (s, p), value in self._frames.items():
            if p == product and abs(s - seq) < best_d:
                best, best_d = value, abs(s - seq)
        return best

    def seqs(self) -> list[int]:
        return sorted({s for s, _ in self._frames})

    def clear(self) -> None:
        self._frames.clear()
        self.nbytes = 0


def _plot(title: str, left: str) -> pg.PlotWidget:
    w = pg.PlotWidget()
    w.setBackground(COLORS["window"])
    pi = w.getPlotItem()
    pi.setTitle(f"<span style='color:{COLORS['dim']};font-size:9pt'>{title}</span>")
    pi.setLabel("left", f"<span style='font-size:8pt'>{left}</span>")
    pi.showGrid(x=True, y=True, alpha=0.12)
    pi.setMenuEnabled(False)
    pi.hideButtons()
    for axis in ("left", "bottom"):
        pi.getAxis(axis).setTextPen(COLORS["dim"])
        pi.getAxis(axis).setPen(COLORS["border"])
    pi.getAxis("left").setWidth(46)
    w.setMinimumHeight(110)
    return w


class NoveltyStrip(QtCore.QObject):
    """Novelty over time (t of the frames) with events as red ticks; ``sigEventClicked(event)``."""

    sigEventClicked = QtCore.Signal(object)

    def __init__(self, history: int = 3000) -> None:
        super().__init__()
        self.widget = _plot("novelty  ·  events (click one to see its frame)", "novelty")
        self.curve = self.widget.plot(pen=pg.mkPen(COLORS["novelty"], width=1.4))
        self.marks = pg.ScatterPlotItem(
            size=11,
            symbol="t1",
            pen=pg.mkPen(COLORS["event"]),
            brush=pg.mkBrush(COLORS["event"]),
            hoverable=True,
            hoverBrush=pg.mkBrush("#ffffff"),
            tip=self._tip,
        )
        self.widget.addItem(self.marks)
        self.marks.sigClicked.connect(self._clicked)
        self.t: deque[float] = deque(maxlen=history)
        self.value: deque[float] = deque(maxlen=history)
        self.events: deque[dict[str, Any]] = deque(maxlen=500)
        self._last_t: float | None = None

    def add(self, t: float, novelty: float) -> None:
        if self._last_t is not None and t <= self._last_t:
            if t > self._last_t - 100:
                return  # the same or an older frame
            self.clear()  # far back: a new stream, start over
        self._last_t = t
        self.t.append(t)
        self.value.append(novelty)

    def add_events(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(e for e in events if "t" in e)

    def redraw(self) -> None:
        if self.t:
            self.curve.setData(np.fromiter(self.t, float), np.fromiter(self.value, float))
        spots = []
        t_min = self.t[0] if self.t else None
        for ev in self.events:
            if t_min is not None and float(ev["t"]) < t_min:
                continue  # before the strip's history: still listed by the daemon, not drawn
            value = ev.get("novelty", ev.get("score"))
            y = float(value) if isinstance(value, (int, float)) else (self.value[-1] if self.value else 0.0)
            spots.append({"pos": (float(ev["t"]), y), "data": ev})
        self.marks.setData(spots)

    def clear(self) -> None:
        self.t.clear()
        self.value.clear()
        self.events.clear()
        self._last_t = None

    @staticmethod
    def _tip(x: float, y: float, data: Any) -> str:
        ev = data or {}
        kind = ev.get("kind", ev.get("type", "novelty"))
        return f"event {ev.get('id', '?')} ({kind}): t {x:g}, score {y:.2f}, seq {ev.get('seq')}"

    def _clicked(self, _item: Any, points: Any, *_: Any) -> None:
        if len(points):
            self.sigEventClicked.emit(points[0].data())


class RoiTrace:
    """Mean intensity inside a rectangle of the raw panel, raw and restored, over time."""

    def __init__(self, history: int = 3000) -> None:
        self.widget = _plot("ROI mean intensity  ·  raw vs restored", "mean")
        self.widget.addLegend(offset=(-6, 4), labelTextColor=COLORS["dim"], brush=pg.mkBrush(23, 24, 28, 200))
        self.raw_curve = self.widget.plot(pen=pg.mkPen(COLORS["raw"], width=1.3), name="raw (left)")
        # restored products have other units (offset removed, deconvolved): their own axis, on the right
        pi = self.widget.getPlotItem()
        self.right = pg.ViewBox()
        pi.showAxis("right")
        pi.scene().addItem(self.right)
        pi.getAxis("right").linkToView(self.right)
        pi.getAxis("right").setTextPen(COLORS["restored"])
        pi.getAxis("right").setPen(COLORS["border"])
        pi.getAxis("right").setWidth(46)
        pi.getAxis("left").setTextPen(COLORS["raw"])
        self.right.setXLink(pi)
        pi.vb.sigResized.connect(lambda *_: self.right.setGeometry(pi.vb.sceneBoundingRect()))
        self.restored_curve = pg.PlotDataItem(pen=pg.mkPen(COLORS["restored"], width=1.3))
        self.right.addItem(self.restored_curve)
        self.widget.getPlotItem().legend.addItem(self.restored_curve, "restored (right)")
        self.history = history
        self.series: dict[str, tuple[deque[float], deque[float]]] = {}
        self.restored_name: str | None = None
        self.roi: pg.RectROI | None = None
        self._last: dict[str, int] = {}

    def attach(self, view: pg.ViewBox, shape: tuple[int, ...]) -> pg.RectROI:
        h, w = shape[:2]
        self.roi = pg.RectROI(
            (w * 0.4, h * 0.4),
            (w * 0.2, h * 0.2),
            pen=pg.mkPen(COLORS["accent"], width=1.5),
            hoverPen=pg.mkPen("#ffffff", width=1.5),
            handlePen=pg.mkPen(COLORS["accent"]),
        )
        self.roi.setZValue(20)
        view.addItem(self.roi)
        return self.roi

    def sample(self, product: str, seq: int, t: float, arr: np.ndarray) -> None:
        if self.roi is None or self._last.get(product) == seq:
            return
        self._last[product] = seq
        (x, y), (w, h) = self.roi.pos(), self.roi.size()
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(arr.shape[1], int(x + w)), min(arr.shape[0], int(y + h))
        if x1 <= x0 or y1 <= y0:
            return
        mean = float(np.mean(arr[y0:y1, x0:x1], dtype=np.float64))
        ts, vs = self.series.setdefault(product, (deque(maxlen=self.history), deque(maxlen=self.history)))
        if ts and t < ts[-1]:
            ts.clear()
            vs.clear()
        ts.append(t)
        vs.append(mean)

    def redraw(self) -> None:
        for curve, name in ((self.raw_curve, "raw"), (self.restored_curve, self.restored_name)):
            if name in self.series:
                ts, vs = self.series[name]
                curve.setData(np.fromiter(ts, float), np.fromiter(vs, float))
        if self.restored_name:
            legend = self.widget.getPlotItem().legend
            if legend is not None:
                for sample, label in legend.items:
                    if sample.item is self.restored_curve:
                        label.setText(f"{self.restored_name} (right)", color=COLORS["dim"])

    def reset(self) -> None:
        self.series.clear()
        self._last.clear()


def strip_container(*widgets: QtWidgets.QWidget) -> QtWidgets.QWidget:
    box = QtWidgets.QWidget()
    lay = QtWidgets.QHBoxLayout(box)
    lay.setContentsMargins(4, 2, 4, 2)
    lay.setSpacing(6)
    for w in widgets:
        lay.addWidget(w, 1)
    return box
