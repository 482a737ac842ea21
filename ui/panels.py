"""Image panels: one product in a ViewBox with its own levels, colour map and histogram.

Drawing stays on pyqtgraph's fast path: a bare ImageItem, ``setImage`` with fixed levels and a
256-entry uint8 look-up table; levels (percentiles of a subsample) and the histogram are
recomputed now and then by the viewer, never per frame. Sensor-saturated pixels of raw frames
are painted in a warning colour by an overlay that only exists while there are some; regions a
``trust`` engine does not vouch for can be tinted by another (``trust_tint``).
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from pyqtgraph.Qt import QtCore, QtGui, QtWidgets

from ..bridges.store import COLORS as STORE_CHANNEL_COLORS
from .state import PanelLevels
from .style import COLORMAPS, COLORS, DEFAULT_CMAP, lut

__all__ = [
    "ImagePanel",
    "CompositePanel",
    "ScaleBar",
    "percentile_levels",
    "apply_levels",
    "channel_color",
    "overlay_rgb",
    "trust_tint",
    "show_latency",
    "TRUST_TINT_RANGE",
]

PERCENTILES = (0.5, 99.8)
LATENCY_WARN_MS = 250.0  # a preview this late (frame received -> preview sent) is written in amber
# trust map values tinted: none at or above the upper value, full tint at or below the lower.
# The engines' frame thresholds lie near 0.5-0.6 (docs/trust.md), and good frames' maps sit at
# 0.65-1 away from their edges, so a tint starts where a region is less trusted than those.
TRUST_TINT_RANGE = (0.2, 0.6)
TRUST_TINT_ALPHA = 0.6


def percentile_levels(
    arr: np.ndarray, percentiles: tuple[float, float] = PERCENTILES, samples: int = 40_000
) -> tuple[float, float] | None:
    """Display levels from a strided subsample: cheap enough to run on a timer, robust to hot pixels."""
    flat = np.asarray(arr).reshape(-1)
    flat = flat[:: max(1, flat.size // samples)]
    if flat.dtype.kind == "f":
        flat = flat[np.isfinite(flat)]
    if not flat.size:
        return None
    lo, hi = np.percentile(flat, percentiles)
    lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + (1.0 if flat.dtype.kind in "ui" else max(abs(lo) * 1e-3, 1e-6))
    return lo, hi


def apply_levels(arr: np.ndarray, levels: tuple[float, float], table: np.ndarray) -> np.ndarray:
    """What a panel shows for ``arr``: levels to 0..len(table)-1, then the look-up table (RGB).
    Used by the snapshot test and by the composite panel; matches pyqtgraph's ImageItem."""
    lo, hi = levels
    n = len(table)
    scaled = (np.asarray(arr, np.float64) - lo) * (n / (hi - lo))
    idx = np.clip(np.nan_to_num(scaled, nan=0.0), 0, n - 1).astype(np.intp)
    return table[idx]


def channel_color(c: int) -> tuple[int, int, int]:
    """Channel ``c``'s display colour: the one the store writes in the OME-Zarr omero metadata
    (0 green, 1 magenta, 2 cyan, 3 yellow, ...), so the viewer and napari/Fiji agree."""
    hexa = STORE_CHANNEL_COLORS[int(c) % len(STORE_CHANNEL_COLORS)]
    return int(hexa[0:2], 16), int(hexa[2:4], 16), int(hexa[4:6], 16)


def overlay_rgb(channels: list[tuple[np.ndarray, tuple[float, float], tuple[int, int, int]]]) -> np.ndarray:
    """Additive colour overlay: each (frame, levels, colour) scaled to 0..1 at its own levels,
    times its colour, summed and clipped; uint8 RGB of the frames' shape."""
    shape = channels[0][0].shape[:2]
    rgb = np.zeros(shape + (3,), np.float32)
    for arr, (lo, hi), colour in channels:
        norm = np.clip((np.asarray(arr, np.float32) - np.float32(lo)) / np.float32(hi - lo), 0, 1)
        for ch in range(3):
            if colour[ch]:
                rgb[..., ch] += norm * np.float32(colour[ch] / 255.0)
    return (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8)


def trust_tint(
    tmap: np.ndarray,
    colour: tuple[int, int, int],
    tint_range: tuple[float, float] = TRUST_TINT_RANGE,
    alpha: float = TRUST_TINT_ALPHA,
) -> np.ndarray:
    """RGBA (uint8) tint over the regions of a trust map in [0, 1] below ``tint_range[1]``: its
    opacity grows linearly to ``alpha`` at ``tint_range[0]`` and below; NaN (no check) untinted."""
    lo, hi = tint_range
    t = np.nan_to_num(np.asarray(tmap, np.float32), nan=1.0)
    weight = np.clip((np.float32(hi) - t) / np.float32(hi - lo), 0.0, 1.0)
    rgba = np.empty(t.shape + (4,), np.uint8)
    rgba[..., :3] = colour
    rgba[..., 3] = np.rint(weight * (255 * alpha)).astype(np.uint8)
    return rgba


def nice_length(target: float) -> float:
    """The 1-2-5 number nearest below ``target`` (scale bar lengths)."""
    if target <= 0:
        return 0.0
    exp = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10**exp <= target:
            return m * 10**exp
    return 10**exp


class ScaleBar(pg.GraphicsObject):
    """A bar of a round length in micrometres, kept at the bottom right of its view."""

    def __init__(self, view: pg.ViewBox) -> None:
        super().__init__()
        self.view = view
        self.pixel_size_um: float | None = None
        self.setFlag(self.GraphicsItemFlag.ItemIgnoresTransformations)
        self.setZValue(50)
        self._text = ""
        self._w = 0.0
        view.sigRangeChanged.connect(self.update_bar)
        view.sigResized.connect(self.update_bar)
        view.addItem(self, ignoreBounds=True)
        self.setVisible(False)

    def set_pixel_size(self, pixel_size_um: float | None) -> None:
        if pixel_size_um != self.pixel_size_um:
            self.pixel_size_um = pixel_size_um
            self.update_bar()

    def update_bar(self, *_: Any) -> None:
        if not self.pixel_size_um:
            self.setVisible(False)
            return
        (x0, x1), (y0, y1) = self.view.viewRange()
        width_px = self.view.width()
        if width_px <= 0 or x1 <= x0:
            return
        um_per_screen_px = (x1 - x0) * self.pixel_size_um / width_px
        length_um = nice_length(0.18 * width_px * um_per_screen_px)
        if length_um <= 0:
            return
        self.prepareGeometryChange()
        self._w = length_um / um_per_screen_px
        self._text = f"{length_um:g} µm"
        # bottom right of the visible area, in view coordinates (y down: invertY)
        self.setPos(x1 - (x1 - x0) * 0.04, y1 - (y1 - y0) * 0.05)
        self.setVisible(True)
        self.update()

    def boundingRect(self) -> QtCore.QRectF:
        return QtCore.QRectF(-self._w - 4, -22, self._w + 8, 30)

    def paint(self, p: QtGui.QPainter, *_: Any) -> None:
        p.setPen(QtCore.Qt.PenStyle.NoPen)
        p.setBrush(QtGui.QColor(235, 235, 235, 230))
        p.drawRect(QtCore.QRectF(-self._w, 0, self._w, 4))
        p.setPen(QtGui.QColor(235, 235, 235))
        font = p.font()
        font.setPointSizeF(8.5)
        p.setFont(font)
        p.drawText(QtCore.QRectF(-self._w - 40, -18, self._w + 80, 16), QtCore.Qt.AlignmentFlag.AlignCenter, self._text)


class _PanelFrame(QtWidgets.QFrame):
    """Title bar (name, value under the cursor, colour map) above a graphics view."""

    def __init__(self, title: str, with_cmap: bool, cmap: str) -> None:
        super().__init__()
        self.setObjectName("panel")
        outer = QtWidgets.QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.setSpacing(0)
        bar = QtWidgets.QFrame()
        bar.setObjectName("panelBar")
        row = QtWidgets.QHBoxLayout(bar)
        row.setContentsMargins(8, 2, 4, 2)
        row.setSpacing(8)
        self.title = QtWidgets.QLabel(title)
        self.title.setObjectName("panelTitle")
        self.info = QtWidgets.QLabel("")
        self.info.setObjectName("panelInfo")
        self.value = QtWidgets.QLabel("")
        self.value.setObjectName("panelInfo")
        self.value.setAlignment(QtCore.Qt.AlignmentFlag.AlignRight | QtCore.Qt.AlignmentFlag.AlignVCenter)
        # the grid decides the panels' width: labels shrink (and clip) rather than widen the window
        self.info.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Preferred)
        # trust of this product's newest frame, when a `trust` engine scores it (docs/trust.md)
        self.trust = QtWidgets.QLabel("")
        self.trust.setObjectName("panelInfo")
        self.trust.setVisible(False)
        # how late this preview is: the daemon's latency_ms, frame received -> this preview sent
        self.latency = QtWidgets.QLabel("")
        self.latency.setObjectName("panelInfo")
        self.latency.setToolTip(
            "preview latency: from the daemon receiving the frame to sending this "
            "product's preview (its status gives p50/p99 in the telemetry dock)"
        )
        row.addWidget(self.title)
        row.addWidget(self.trust)
        row.addWidget(self.info, 1)
        row.addWidget(self.latency)
        row.addWidget(self.value)
        self.cmap = None
        if with_cmap:
            self.cmap = QtWidgets.QComboBox()
            self.cmap.addItems(COLORMAPS)
            self.cmap.setCurrentText(cmap)
            self.cmap.setToolTip("colour map")
            self.cmap.setFixedWidth(80)
            self.cmap.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
            row.addWidget(self.cmap)
        outer.addWidget(bar)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.ci.setContentsMargins(0, 0, 0, 0)
        self.graphics.ci.setSpacing(0)
        self.graphics.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        outer.addWidget(self.graphics, 1)


def show_trust(
    frame_widget: Any, score: float | None, ok: float | None, sampled: dict[str, float] | None = None
) -> None:
    """The trust badge in a panel's title bar: green when the frame passed its trust checks, red
    when one fell below its threshold (an event went to the feedback channel too). ``score`` is
    the residual (or re-blur) score of every frame; ``sampled`` the newest scores of the checks
    run on a sample of frames (``tta``, ``features``), shown beside it so a failing one shows."""
    label = frame_widget.trust
    if score is None:
        label.setVisible(False)
        return
    good = ok is None or ok >= 0.5
    extra = "".join(f" · {name} {value:.2f}" for name, value in (sampled or {}).items())
    label.setText(("trusted " if good else "check ") + f"{score:.2f}" + extra)
    label.setStyleSheet(f"color:{COLORS['ok'] if good else COLORS['bad']}; font-weight:bold;")
    label.setToolTip(
        "trust scores of this frame (docs/trust.md): residual or re-blur check"
        + (", and the newest of the sampled checks (" + ", ".join(sampled) + ")" if sampled else "")
        + "; "
        + ("all above" if good else "one below")
        + " its threshold"
    )
    label.setVisible(True)


def show_latency(frame_widget: Any, header: dict[str, Any]) -> float | None:
    """The preview's latency in the panel's title bar ("12 ms"; amber from LATENCY_WARN_MS);
    empty when the header has none (an older daemon). Returns the value shown."""
    label = frame_widget.latency
    ms = header.get("latency_ms")
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or not math.isfinite(ms):
        label.setText("")
        return None
    label.setText(f"{ms:.0f} ms" if ms >= 1 else f"{ms:.1f} ms")
    label.setStyleSheet(f"color:{COLORS['warn']};" if ms >= LATENCY_WARN_MS else "")
    return float(ms)


def show_consistency(frame_widget: Any, score: float | None, threshold: float | None) -> None:
    """The learned restoration's consistency badge (docs/learned_deconvolution.md): the output
    re-blurred with the PSF against the raw frame; green while the score stays under the
    model's threshold, red above it (an event was raised too). Shares the trust badge's place:
    a panel scored by a ``trust`` engine keeps that badge."""
    label = frame_widget.trust
    if score is None or not math.isfinite(score):
        return
    good = threshold is None or score <= threshold
    limit = "" if threshold is None else f" / {threshold:.2f}"
    label.setText(("consistent " if good else "inconsistent ") + f"{score:.2f}{limit}")
    label.setStyleSheet(f"color:{COLORS['ok'] if good else COLORS['bad']}; font-weight:bold;")
    label.setToolTip(
        "consistency of the network's output with this raw frame (re-blurred with the "
        "PSF, standardised residual; ~1 or below for frames like the training ones); "
        + ("below" if good else "above")
        + " the model's threshold"
    )
    label.setVisible(True)


class ImagePanel:
    """One product: newest frame, levels (auto or set by hand on the histogram), colour map.

    The levels live in a :class:`~.state.PanelLevels` (``level_state``), the viewer's
    ``ViewerState.levels[product]``: the panel draws them, and a drag on its histogram sets them."""

    composite = False

    def __init__(self, product: str, *, show_histogram: bool = True, levels: PanelLevels | None = None) -> None:
        self.product = product
        self.level_state = levels if levels is not None else PanelLevels()
        self.cmap_name = DEFAULT_CMAP.get(product, "Grays")
        self.widget = _PanelFrame(product, True, self.cmap_name)
        self.view = pg.ViewBox(lockAspect=True, invertY=True, enableMenu=False)
        self.view.setBackgroundColor(COLORS["panel"])
        self.widget.graphics.addItem(self.view, row=0, col=0)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.view.addItem(self.image)
        self.saturation = pg.ImageItem(axisOrder="row-major")
        self.saturation.setZValue(10)
        self.saturation.setVisible(False)
        self.view.addItem(self.saturation)
        # low-trust regions tinted over the image (the viewer's trust overlay, T)
        self.trust_item = pg.ImageItem(axisOrder="row-major")
        self.trust_item.setZValue(5)
        self.trust_item.setVisible(False)
        self.view.addItem(self.trust_item)
        self.trust_map: np.ndarray | None = None
        self.trust_key: tuple | None = None
        self.scale_bar = ScaleBar(self.view)
        self.hist: pg.HistogramLUTItem | None = None
        if show_histogram:
            # driven by hand: its automatic mode would compute a histogram on every setImage
            self.hist = pg.HistogramLUTItem(fillHistogram=True)
            self.hist.vb.setMinimumWidth(30)
            self.hist.vb.setMaximumWidth(30)
            # no axis: the levels are written in the title bar, and ticks on every panel are clutter
            self.hist.layout.removeItem(self.hist.axis)
            self.hist.axis.hide()
            self.hist.gradient.setVisible(False)  # the colour map is picked in the title bar
            self.hist.layout.removeItem(self.hist.gradient)
            self.hist.plot.setBrush(pg.mkBrush(120, 140, 170, 120))
            self.hist.plot.setPen(pg.mkPen(150, 170, 200, 170))
            self.hist.region.setBrush(pg.mkBrush(95, 168, 232, 35))
            for line in self.hist.region.lines:
                line.setPen(pg.mkPen(COLORS["accent"], width=1.5))
                line.setHoverPen(pg.mkPen("#ffffff", width=2))
            self.hist.sigLevelsChanged.connect(self._levels_dragged)
            self.widget.graphics.addItem(self.hist, row=0, col=1)
        self.array: np.ndarray | None = None
        self.header: dict[str, Any] = {}
        self.seq = -1
        self.shape: tuple[int, ...] | None = None
        self.bits: int | None = None
        self._setting_levels = False
        # channels overlaid in their colours: the frames drawn (c -> frame, header), the other
        # channels' own percentile levels, and what was drawn last (to skip unchanged redraws)
        self.overlaid = False
        self.overlay_key: tuple | None = None
        self.overlay_channels: dict[int, tuple[np.ndarray, dict[str, Any]]] = {}
        self.overlay_levels: dict[int, tuple[float, float]] = {}
        self.overlay: np.ndarray | None = None
        self._names: dict[int, str] = {}
        # a clicked event's bounding box, and a ring on the newest event (preview pixels)
        self.event_box = QtWidgets.QGraphicsRectItem()
        pen = QtGui.QPen(QtGui.QColor(COLORS["event"]))
        pen.setCosmetic(True)  # the same width at every zoom
        pen.setWidthF(1.6)
        self.event_box.setPen(pen)
        self.event_box.setZValue(30)
        self.event_box.setVisible(False)
        self.view.addItem(self.event_box, ignoreBounds=True)
        self.event_mark = pg.ScatterPlotItem(
            size=18, symbol="o", pen=pg.mkPen(COLORS["event"], width=2), brush=pg.mkBrush(0, 0, 0, 0), pxMode=True
        )
        self.event_mark.setZValue(31)
        self.event_mark.setVisible(False)
        self.view.addItem(self.event_mark, ignoreBounds=True)
        self.lut: np.ndarray | None = None  # the colour map's look-up table (None: an RGB image)
        self.set_cmap(self.cmap_name)
        if self.widget.cmap is not None:
            self.widget.cmap.currentTextChanged.connect(self.set_cmap)

    # -- appearance ------------------------------------------------------------------------------
    @property
    def levels(self) -> tuple[float, float] | None:
        """The display levels (low, high), None before a frame set them."""
        return self.level_state.values

    @levels.setter
    def levels(self, values: tuple[float, float] | None) -> None:
        self.level_state.values = None if values is None else (float(values[0]), float(values[1]))

    @property
    def auto(self) -> bool:
        """Follows the viewer's percentile auto-levels (until the user drags the levels)."""
        return self.level_state.auto

    @auto.setter
    def auto(self, on: bool) -> None:
        self.level_state.auto = bool(on)

    def set_cmap(self, name: str) -> None:
        self.cmap_name = name
        self.lut = lut(name)
        if not self.overlaid:  # an overlay is RGB: the map applies again when it ends
            self.image.setLookupTable(self.lut)
        if self.widget.cmap is not None and self.widget.cmap.currentText() != name:
            self.widget.cmap.setCurrentText(name)

    def set_levels(self, levels: tuple[float, float], *, by_user: bool = False) -> None:
        self.level_state.set(levels, fixed=by_user)
        values = (float(levels[0]), float(levels[1]))
        if self.array is not None:
            if self.overlaid:
                self.overlay_key = None  # an RGB overlay: the viewer composes it again at these levels
            else:
                self.image.setLevels(values)
        if self.hist is not None and not by_user:
            self._setting_levels = True
            try:
                self.hist.setLevels(*values)
            finally:
                self._setting_levels = False
        self._update_info()

    def _levels_dragged(self, *_: Any) -> None:
        if self._setting_levels or self.hist is None:
            return
        lo, hi = self.hist.getLevels()
        if hi > lo:
            self.set_levels((lo, hi), by_user=True)

    def auto_levels(self) -> None:
        if self.array is None:
            return
        levels = percentile_levels(self.array)
        if levels is not None:
            self.set_levels(levels)

    def update_histogram(self) -> None:
        if self.hist is None or self.array is None:
            return
        flat = np.asarray(self.array).reshape(-1)
        flat = flat[:: max(1, flat.size // 40_000)]
        if flat.dtype.kind == "f":
            flat = flat[np.isfinite(flat)]
        if not flat.size:
            return
        lo, hi = float(flat.min()), float(flat.max())
        if hi <= lo:
            hi = lo + 1
        counts, edges = np.histogram(flat, bins=96, range=(lo, hi))
        # log counts: a dim background dominates otherwise
        self.hist.plot.setData(edges[:-1], np.log1p(counts), stepMode=False)
        lvl = self.levels or (lo, hi)
        self.hist.setHistogramRange(min(lo, lvl[0]), max(hi, lvl[1]), padding=0.02)

    # -- frames ------------------------------------------------------------------------------
    def show_frame(self, arr: np.ndarray, header: dict[str, Any]) -> bool:
        """Draw a frame; returns True when the frame's shape differs from the previous one."""
        changed = self.shape is not None and self.shape != arr.shape
        first = self.shape is None
        self.array = arr
        self.header = header
        self.seq = int(header.get("seq", -1))
        if self.overlaid:  # back to one channel through the colour map
            self.overlaid = False
            self.overlay_key = None
            self.image.setLookupTable(self.lut)
        if self.levels is None or changed:
            levels = percentile_levels(arr)
            if levels is not None:
                self.set_levels(levels)
        self.image.setImage(arr, autoLevels=False, levels=self.levels)
        show_latency(self.widget, header)
        self._update_saturation(arr, header)
        self.scale_bar.set_pixel_size(header.get("pixel_size_um"))
        if first or changed:
            self.shape = arr.shape
            self.view.autoRange(padding=0)
            self.update_histogram()
        self._update_info()
        return changed

    def show_overlay(
        self, channels: dict[int, tuple[np.ndarray, dict[str, Any]]], selected: int, names: dict[int, str] | None = None
    ) -> bool:
        """Draw every channel of ``channels`` (c -> (frame, header)) additively in its colour.
        The selected channel keeps this panel's levels (auto or dragged on the histogram) and is
        what the readout, the ROI and the histogram use; every other channel has its own
        percentile levels. Channels of another shape than the selected one are left out.
        Returns True when the selected channel's shape changed."""
        primary_c = selected if selected in channels else min(channels)
        arr, header = channels[primary_c]
        changed = self.shape is not None and self.shape != arr.shape
        first = self.shape is None
        self.array, self.header, self.seq = arr, header, int(header.get("seq", -1))
        if self.levels is None or changed:
            levels = percentile_levels(arr)
            if levels is not None:
                self.set_levels(levels)
        parts, shown = [], {}
        for c in sorted(channels):
            frame, hdr = channels[c]
            if frame.shape[:2] != arr.shape[:2]:
                continue
            if c == primary_c:
                lv = self.levels
            else:
                lv = self.overlay_levels.get(c)
                old = self.overlay_channels.get(c)
                if lv is None or (old is not None and old[0].shape != frame.shape):
                    lv = percentile_levels(frame)
                    if lv is None:
                        continue
                    self.overlay_levels[c] = lv
            if lv is None:
                continue
            parts.append((frame, lv, channel_color(c)))
            shown[c] = (frame, hdr)
        if not parts:
            return changed
        self.overlay_channels = shown
        self.overlay = overlay_rgb(parts)
        if not self.overlaid:
            self.image.setLookupTable(None)
            self.overlaid = True
        self.image.setImage(self.overlay, autoLevels=False, levels=(0, 255))
        show_latency(self.widget, header)
        self._update_saturation(arr, header)
        self.scale_bar.set_pixel_size(header.get("pixel_size_um"))
        if first or changed:
            self.shape = arr.shape
            self.view.autoRange(padding=0)
            self.update_histogram()
        self._names = names or {}
        self._update_info()
        return changed

    def overlay_auto_levels(self) -> None:
        """Percentile levels of every overlaid channel but the selected one (that one follows the
        panel's levels): on the viewer's levels timer, not per frame."""
        for c, (frame, _) in self.overlay_channels.items():
            if frame is not self.array:
                lv = percentile_levels(frame)
                if lv is not None:
                    self.overlay_levels[c] = lv

    def show_trust_map(self, tmap: np.ndarray | None, key: tuple | None = None) -> None:
        """Tint the regions of this product that its trust map (same field of view, any sampling)
        does not vouch for; None hides the tint. ``key`` skips redrawing the same map."""
        if tmap is None or self.array is None:
            self.trust_item.setVisible(False)
            self.trust_map, self.trust_key = None, None
            return
        if key is not None and key == self.trust_key and self.trust_item.isVisible():
            return
        self.trust_map, self.trust_key = tmap, key
        self.trust_item.setImage(trust_tint(tmap, COLORS["low_trust"]), autoLevels=False, levels=(0, 255))
        h, w = self.array.shape[:2]
        self.trust_item.setRect(QtCore.QRectF(0, 0, w, h))  # over the image, whatever the map's sampling
        self.trust_item.setVisible(True)

    def trust_at(self, x: float, y: float, shape: tuple[int, ...] | None) -> float | None:
        """The trust map's value at view coordinates (x, y) of a frame of ``shape``."""
        tmap = self.trust_map
        if tmap is None or not self.trust_item.isVisible():
            return None
        h, w = shape[:2] if shape is not None else tmap.shape[:2]
        ix, iy = int(math.floor(x * tmap.shape[1] / w)), int(math.floor(y * tmap.shape[0] / h))
        if 0 <= iy < tmap.shape[0] and 0 <= ix < tmap.shape[1]:
            return float(tmap[iy, ix])
        return None

    def shown_rgb_with_trust(self) -> np.ndarray | None:
        """What the panel shows including the trust tint (alpha-blended as Qt does), same shape as
        ``shown_rgb``; the tint resampled by nearest neighbour when its sampling differs."""
        rgb = self.shown_rgb()
        if rgb is None or self.trust_map is None or not self.trust_item.isVisible():
            return rgb
        tint = trust_tint(self.trust_map, COLORS["low_trust"])
        h, w = rgb.shape[:2]
        iy = (np.arange(h) * tint.shape[0] // h)[:, None]
        ix = (np.arange(w) * tint.shape[1] // w)[None, :]
        tint = tint[iy, ix]
        a = tint[..., 3:4].astype(np.float32) / 255
        return np.rint(rgb * (1 - a) + tint[..., :3] * a).astype(np.uint8)

    def show_event_box(self, rect: tuple[float, float, float, float] | None) -> None:
        """A box (x, y, width, height) in this panel's pixels, or None to hide it."""
        if rect is None:
            self.event_box.setVisible(False)
            return
        self.event_box.setRect(QtCore.QRectF(*rect))
        self.event_box.setVisible(True)

    def show_event_mark(self, point: tuple[float, float] | None) -> None:
        """A ring at (x, y) in this panel's pixels, or None to hide it."""
        if point is None:
            self.event_mark.setVisible(False)
            return
        self.event_mark.setData([point[0]], [point[1]])
        self.event_mark.setVisible(True)

    def _update_saturation(self, arr: np.ndarray, header: dict[str, Any]) -> None:
        bits = header.get("bits")
        if self.product != "raw" or arr.dtype.kind not in "ui" or not bits:
            self.saturation.setVisible(False)
            return
        mask = arr >= (1 << int(bits)) - 1
        if not mask.any():
            self.saturation.setVisible(False)
            return
        rgba = np.zeros(arr.shape + (4,), np.uint8)
        rgba[mask] = (*COLORS["saturated"], 255)
        self.saturation.setImage(rgba, autoLevels=False, levels=(0, 255))
        self.saturation.setVisible(True)

    def _update_info(self) -> None:
        t = (self.header.get("index") or {}).get("t")
        lv = self.levels
        parts = []
        if t is not None:
            parts.append(f"t {t}")
        if lv is not None:
            parts.append(f"{_fmt(lv[0])}–{_fmt(lv[1])}" + ("" if self.auto else " (fixed)"))
        if self.overlaid and self.overlay_channels:
            names = self._names
            parts.append(
                " ".join(
                    _swatch(channel_color(c), html.escape(str(names.get(c, c)))) for c in sorted(self.overlay_channels)
                )
            )
            self.widget.info.setTextFormat(QtCore.Qt.TextFormat.RichText)
        else:
            self.widget.info.setTextFormat(QtCore.Qt.TextFormat.PlainText)
        self.widget.info.setText("  ".join(parts))
        self.widget.info.setToolTip(f"time point and display levels (min–max){'' if self.auto else ', set by hand'}")

    def value_at(self, x: float, y: float, shape: tuple[int, ...] | None) -> float | None:
        """The pixel value at view coordinates (x, y) given in a frame of ``shape``."""
        arr = self.array
        if arr is None:
            return None
        if shape is not None and shape[:2] != arr.shape[:2]:
            x = x * arr.shape[1] / shape[1]
            y = y * arr.shape[0] / shape[0]
        ix, iy = int(math.floor(x)), int(math.floor(y))
        if 0 <= iy < arr.shape[0] and 0 <= ix < arr.shape[1]:
            v = arr[iy, ix]
            return float(v) if np.ndim(v) == 0 else None
        return None

    def shown_rgb(self) -> np.ndarray | None:
        """The RGB image this panel displays (levels and look-up table applied)."""
        if self.overlaid and self.overlay is not None:
            return self.overlay
        if self.array is None or self.levels is None or self.lut is None:
            return None
        return apply_levels(self.array, self.levels, self.lut)


class CompositePanel(ImagePanel):
    """Slow (green) and fast (magenta) over the background (grey), each at its own panel's levels."""

    composite = True

    def __init__(self, levels: PanelLevels | None = None) -> None:
        super().__init__("composite", show_histogram=False, levels=levels)
        if self.widget.cmap is not None:
            self.widget.cmap.setVisible(False)
        legend = (
            "<span style='color:#bbbbbb'>background</span> · <span style='color:#5fe35f'>slow</span>"
            " · <span style='color:#ff5cff'>fast</span>"
        )
        self.widget.info.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.legend = legend
        self.widget.info.setText(legend)

    def compose(self, parts: dict[str, ImagePanel]) -> np.ndarray | None:
        bg, slow, fast = (parts.get(k) for k in ("background", "slow", "fast"))
        base = next((p.array for p in (bg, slow, fast) if p is not None and p.array is not None), None)
        if base is None:
            return None
        shape = base.shape
        rgb = np.zeros(shape + (3,), np.float32)
        for panel, colour, weight in ((bg, (1, 1, 1), 0.55), (slow, (0, 1, 0), 1.0), (fast, (1, 0, 1), 1.0)):
            if panel is None or panel.array is None or panel.array.shape != shape or panel.levels is None:
                continue
            lo, hi = panel.levels
            norm = np.clip((panel.array.astype(np.float32) - lo) / np.float32(hi - lo), 0, 1) * np.float32(weight)
            for ch in range(3):
                if colour[ch]:
                    rgb[..., ch] += norm
        return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)

    def show_composite(self, parts: dict[str, ImagePanel]) -> None:
        rgb = self.compose(parts)
        if rgb is None:
            return
        first = self.shape is None or self.shape != rgb.shape[:2]
        self.array = rgb
        base = next(p for p in (parts.get("background"), parts.get("slow"), parts.get("fast")) if p is not None)
        self.header = base.header
        self.seq = base.seq
        self.levels = (0.0, 255.0)
        self.image.setImage(rgb, autoLevels=False, levels=(0, 255), lut=None)
        self.scale_bar.set_pixel_size(self.header.get("pixel_size_um"))
        if first:
            self.shape = rgb.shape[:2]
            self.view.autoRange(padding=0)

    def set_cmap(self, name: str) -> None:  # an RGB image has no colour map
        self.cmap_name = name
        self.lut = None
        self.image.setLookupTable(None)

    def auto_levels(self) -> None:
        pass

    def _update_info(self) -> None:
        pass

    def value_at(self, x: float, y: float, shape: tuple[int, ...] | None) -> float | None:
        return None

    def shown_rgb(self) -> np.ndarray | None:
        return self.array


def _fmt(v: float) -> str:
    if abs(v) < 1e-4:
        return "0"
    if abs(v) >= 1000 or v == int(v):
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def _swatch(rgb: tuple[int, ...], text: str) -> str:
    r, g, b = rgb[:3]
    return f"<span style='color:#{r:02x}{g:02x}{b:02x}'>{text}</span>"
