"""The live viewer: a grid of linked panels (raw and each product), fed by the daemon's previews.

It runs in its own process and never slows the daemon: previews arrive on a PUB/SUB socket with
a small high-water mark; a QTimer at screen rate drains the socket and draws only the newest
frame of each product; levels and histograms are recomputed about once a second. The control
socket is served by a thread (:mod:`.link`), so a daemon that is away never freezes the window.

One daemon previews every stream it ingests (cameras, Micro-Manager's live mode and snaps); the
viewer shows one stream at a time, picked in the *Stream* selector or followed by itself
(:mod:`.streams`: the first stream, and a live-mode stream once the shown one has gone quiet).

    livescope view --connect tcp://127.0.0.1:5571 --control tcp://127.0.0.1:5572

Shortcuts are listed in ``SHORTCUTS`` (F1 in the window).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bridges.transport import DEFAULT_CONTROL, DEFAULT_PUBLISH, PreviewSubscriber
from .streams import StreamChooser

__all__ = ["LiveViewer", "run_viewer", "main", "SHORTCUTS"]

log = logging.getLogger(__name__)

ORDER = ["raw", "registered", "denoised", "deconvolved", "background", "slow", "fast", "composite", "residual"]
DECOMPOSITION = ("background", "slow", "fast")
RESTORED = ("deconvolved", "denoised", "registered")  # the ROI trace compares raw with the first present
HIDDEN_BY_DEFAULT = {"residual"}
TRUST_PREFIX = "trust_"  # trust_<product>: a trust engine's map of <product>, drawn as its tint, not a panel
LEVELS_EVERY_S = 1.0
IDLE_AFTER_S = 3.0
EVENT_MARK_S = 4.0  # how long the newest event's ring stays on the raw panel

SHORTCUTS = [
    ("Space", "pause / resume the live display"),
    ("Esc", "back to live (after viewing an event)"),
    ("A", "auto-contrast every panel now"),
    ("L", "continuous auto-levels on/off"),
    ("F", "fit the image to the panels"),
    ("R", "show / hide the ROI"),
    ("1 … 9", "show / hide panel 1 … 9"),
    ("[  ]", "previous / next channel"),
    ("O", "overlay all channels in their colours on/off"),
    ("T", "trust map on/off: tint regions the trust engine does not vouch for"),
    ("PgUp  PgDn", "previous / next z plane"),
    ("Ctrl+S", "snapshot of the window to PNG"),
    ("Ctrl+T", "telemetry panel"),
    ("Ctrl+E", "engine controls"),
    ("Ctrl+B", "time strips (novelty, ROI)"),
    ("F1", "this list"),
    ("Ctrl+Q", "quit"),
]


def _qt():
    try:
        import pyqtgraph as pg
        from pyqtgraph.Qt import QtCore, QtGui, QtWidgets
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the viewer needs pyqtgraph and Qt: pip install 'livescope[ui]'") from exc
    return pg, QtCore, QtGui, QtWidgets


def _order(name: str) -> tuple[int, str]:
    return (ORDER.index(name) if name in ORDER else len(ORDER), name)


class LiveViewer:
    """The main window. ``update()`` (a timer) draws the newest previews; ``poll_daemon()``
    (another timer) handles what the control thread brought back."""

    def __init__(self, connect: str = DEFAULT_PUBLISH, control: str | None = DEFAULT_CONTROL, *,
                 settings_path: str | os.PathLike | None = None, snapshot_dir: str | os.PathLike | None = None,
                 fps: float = 30.0, curve: Any = None) -> None:
        pg, QtCore, QtGui, QtWidgets = _qt()
        from . import style
        from .controls import EngineControls
        from .link import DaemonLink
        from .settings import open_settings, read_json
        from .telemetry import TelemetryPanel
        from .timeline import FrameBuffer, NoveltyStrip, RoiTrace, strip_container

        self.pg, self.QtCore, self.QtGui, self.QtWidgets = pg, QtCore, QtGui, QtWidgets
        app = QtWidgets.QApplication.instance()
        if app is not None:
            style.apply_dark_theme(app)
        self.connect_address = connect
        self.control_address = control
        self.sub = PreviewSubscriber(connect, curve=curve)  # curve: client keys, or None
        self.link = DaemonLink(control, curve=curve)
        self.settings = open_settings(settings_path)
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir else Path.cwd()

        self.win = QtWidgets.QMainWindow()
        self.win.setObjectName("livescopeViewer")
        self.win.setWindowTitle(f"livescope — {connect}")
        self.win.resize(1600, 1000)
        self.win.setDockOptions(QtWidgets.QMainWindow.DockOption.AnimatedDocks
                                | QtWidgets.QMainWindow.DockOption.AllowTabbedDocks)

        # state
        self.latest: dict[tuple, Any] = {}  # (stream, product, p, c, z) -> newest Frame
        # which stream is shown, each stream's own p/c/z, following live mode (ui/streams.py)
        self.streams = StreamChooser()
        self._products: set[str] = set()  # the products the shown stream has previewed
        self._stream_labels: list[tuple[str, str]] = []  # what the stream selector lists
        self._relayout_after_draw = False
        self.panels: dict[str, Any] = {}
        self.hidden: set[str] = set(read_json(self.settings, "panels/hidden", sorted(HIDDEN_BY_DEFAULT)))
        self.cmaps: dict[str, str] = read_json(self.settings, "panels/cmaps", {})
        self.auto_levels = bool(read_json(self.settings, "levels/continuous", True))
        self.overlay = bool(read_json(self.settings, "view/overlay", False))
        self.trust_overlay = bool(read_json(self.settings, "view/trust", False))
        self._trust_sampled: dict[str, dict[str, float]] = {}  # product -> newest sampled trust scores
        self._event_mark_until = 0.0
        self._shown_event: dict[str, Any] | None = None
        # the shown stream's selection and values seen (the same dicts as its StreamInfo's)
        self.selection = {"p": 0, "c": 0, "z": 0}
        self.seen: dict[str, dict[int, str]] = {"p": {}, "c": {}, "z": {}}
        self.paused = False
        self.frames_drawn = 0
        self.redraws = 0
        self.status: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []
        self.buffer = FrameBuffer()
        self._display_times: list[float] = []
        self._last_levels = 0.0
        self._last_frame_at: float | None = None
        self._started = time.monotonic()
        self._messages: dict[str, tuple[str, str, float | None]] = {}
        self._last_seq: dict[str, int] = {}
        self._grid_order: list[str] = []
        self._cursor: tuple[float, float] | None = None
        self._linking = False

        # central: banner above the panel grid
        central = QtWidgets.QWidget()
        vbox = QtWidgets.QVBoxLayout(central)
        vbox.setContentsMargins(0, 0, 0, 0)
        vbox.setSpacing(0)
        self.banner = QtWidgets.QLabel("")
        self.banner.setObjectName("banner")
        self.banner.setWordWrap(True)
        self.banner.setVisible(False)
        vbox.addWidget(self.banner)
        self.grid_host = QtWidgets.QWidget()
        self.grid = QtWidgets.QGridLayout(self.grid_host)
        self.grid.setContentsMargins(6, 6, 6, 6)
        self.grid.setSpacing(6)
        self.placeholder = QtWidgets.QLabel(f"waiting for previews from {connect} …")
        self.placeholder.setAlignment(QtCore.Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setStyleSheet(f"color:{style.COLORS['dim']}; font-size:13pt;")
        self.grid.addWidget(self.placeholder, 0, 0)
        vbox.addWidget(self.grid_host, 1)
        viewer = self

        class _Relayout(QtCore.QObject):
            """The best column count depends on the grid's size: lay out again on resize."""

            def eventFilter(self, obj: Any, event: Any) -> bool:
                if event.type() == QtCore.QEvent.Type.Resize:
                    viewer._grid_order = []
                    viewer.relayout()
                return False

        self._relayout_filter = _Relayout()
        self.grid_host.installEventFilter(self._relayout_filter)
        self.win.setCentralWidget(central)

        # docks: engine controls and telemetry on the right, time strips below
        self.controls = EngineControls(self.send)
        self.telemetry = TelemetryPanel()
        self.novelty = NoveltyStrip()
        self.novelty.sigEventClicked.connect(self.show_event)
        self.roi_trace = RoiTrace()
        right = QtCore.Qt.DockWidgetArea.RightDockWidgetArea
        self.dock_controls = self._dock("Engines", "engines", self.controls, right)
        self.dock_telemetry = self._dock("Telemetry", "telemetry", self.telemetry,
                                         QtCore.Qt.DockWidgetArea.RightDockWidgetArea)
        self.dock_time = self._dock("Time", "time", strip_container(self.novelty.widget, self.roi_trace.widget),
                                    QtCore.Qt.DockWidgetArea.BottomDockWidgetArea)
        self.win.resizeDocks([self.dock_controls, self.dock_telemetry], [300, 560], QtCore.Qt.Orientation.Vertical)
        self.win.resizeDocks([self.dock_controls], [380], QtCore.Qt.Orientation.Horizontal)
        self.win.resizeDocks([self.dock_time], [170], QtCore.Qt.Orientation.Vertical)

        self._build_toolbar()
        # status bar: daemon state on the left, the pixel under the cursor on the right
        self.status_label = QtWidgets.QLabel("connecting to the daemon…")
        self.status_label.setTextFormat(QtCore.Qt.TextFormat.RichText)
        self.cursor_label = QtWidgets.QLabel("")
        self.win.statusBar().addWidget(self.status_label, 1)
        self.win.statusBar().addPermanentWidget(self.cursor_label)
        self.win.statusBar().setSizeGripEnabled(False)
        self._build_shortcuts()
        self._restore_layout()
        if not control:
            self.say("control", "No control socket given: engine controls and telemetry are off.", "info")

        self.timer = QtCore.QTimer()
        self.timer.setTimerType(QtCore.Qt.TimerType.PreciseTimer)
        self.timer.timeout.connect(self.update)
        self.timer.start(max(1, int(1000 / fps)))
        self.daemon_timer = QtCore.QTimer()
        self.daemon_timer.timeout.connect(self.poll_daemon)
        self.daemon_timer.start(200)

    # -- building --------------------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: Any, area: Any) -> Any:
        QtWidgets = self.QtWidgets
        dock = QtWidgets.QDockWidget(title, self.win)
        dock.setObjectName(f"dock-{name}")
        dock.setWidget(widget)
        dock.setFeatures(QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetMovable
                         | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetClosable
                         | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetFloatable)
        self.win.addDockWidget(area, dock)
        return dock

    def _build_toolbar(self) -> None:
        QtWidgets, QtCore = self.QtWidgets, self.QtCore
        tb = QtWidgets.QToolBar("view")
        tb.setObjectName("toolbar")
        tb.setMovable(False)
        self.win.addToolBar(tb)
        self.panels_menu = QtWidgets.QMenu(self.win)
        self.panels_button = QtWidgets.QToolButton()
        self.panels_button.setText("Panels ▾")
        self.panels_button.setToolTip("which panels show (1 … 9)")
        self.panels_button.setMenu(self.panels_menu)
        self.panels_button.setPopupMode(QtWidgets.QToolButton.ToolButtonPopupMode.InstantPopup)
        tb.addWidget(self.panels_button)
        tb.addSeparator()
        # the stream: shown only once a second stream was seen
        self.stream_combo = QtWidgets.QComboBox()
        self.stream_combo.setMinimumWidth(150)
        self.stream_combo.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.stream_combo.setToolTip("the stream shown: each camera, live mode, snaps (picking one stops "
                                     "following live mode)")
        self.stream_combo.activated.connect(lambda i: self.choose_stream(self.stream_combo.itemData(i)))
        self.follow_box = QtWidgets.QCheckBox("Follow live")
        self.follow_box.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.follow_box.setToolTip(f"show a live-mode stream when it sends and the shown stream has been quiet "
                                   f"for {self.streams.quiet_s:g} s, and the acquisition again when live mode "
                                   "stops; off once you pick a stream")
        self.follow_box.setChecked(self.streams.follow)
        self.follow_box.toggled.connect(self.set_follow)
        self._stream_actions = [tb.addWidget(QtWidgets.QLabel("Stream")), tb.addWidget(self.stream_combo),
                                tb.addWidget(self.follow_box), tb.addSeparator()]
        for act in self._stream_actions:
            act.setVisible(False)
        self.selectors: dict[str, Any] = {}
        for axis, label in (("p", "Position"), ("c", "Channel"), ("z", "Z")):
            tb.addWidget(QtWidgets.QLabel(label))
            combo = QtWidgets.QComboBox()
            combo.setMinimumWidth(90)
            combo.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
            combo.addItem("0", 0)
            combo.activated.connect(lambda i, a=axis, cb=combo: self.select(a, cb.itemData(i)))
            tb.addWidget(combo)
            self.selectors[axis] = combo
        self.overlay_box = QtWidgets.QCheckBox("Overlay channels")
        self.overlay_box.setToolTip("every channel of this position and z in its colour, each at its own levels (O)")
        self.overlay_box.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.overlay_box.setChecked(self.overlay)
        self.overlay_box.toggled.connect(self.set_overlay)
        tb.addWidget(self.overlay_box)
        self.trust_box = QtWidgets.QCheckBox("Trust map")
        self.trust_box.setToolTip("tint in amber the regions a trust engine does not vouch for: the stronger, the "
                                  "lower their trust (T; docs/trust.md)")
        self.trust_box.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.trust_box.setChecked(self.trust_overlay)
        self.trust_box.toggled.connect(self.set_trust_overlay)
        tb.addWidget(self.trust_box)
        tb.addSeparator()
        self.act_auto = self._action(tb, "Auto levels", "continuous percentile auto-levels (L)", checkable=True,
                                     checked=self.auto_levels, slot=self.set_auto_levels)
        self._action(tb, "Auto-contrast", "set every panel's levels from its current frame (A)",
                     slot=self.auto_contrast)
        self._action(tb, "Fit", "fit the image to the panels (F)", slot=self.fit)
        tb.addSeparator()
        self.act_roi = self._action(tb, "ROI", "mean intensity in a rectangle over time (R)", checkable=True,
                                    checked=bool(read_json_default(self.settings, "roi/visible", True)),
                                    slot=self.set_roi_visible)
        self.act_pause = self._action(tb, "Pause", "pause / resume the live display (Space)", checkable=True,
                                      slot=self.set_paused)
        self._action(tb, "Snapshot", "save the window as PNG (Ctrl+S)", slot=lambda: self.snapshot())
        spacer = QtWidgets.QWidget()
        spacer.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Preferred)
        tb.addWidget(spacer)
        self.source_label = QtWidgets.QLabel(self.connect_address)
        tb.addWidget(self.source_label)

    def _action(self, tb: Any, text: str, tip: str, *, checkable: bool = False, checked: bool = False,
                slot: Any = None) -> Any:
        act = self.QtGui.QAction(text, self.win)
        act.setToolTip(tip)
        act.setCheckable(checkable)
        if checkable:
            act.setChecked(checked)
            act.toggled.connect(slot)
        else:
            act.triggered.connect(lambda *_: slot())
        tb.addAction(act)
        return act

    def _build_shortcuts(self) -> None:
        QtGui, QtCore = self.QtGui, self.QtCore
        keys = {
            "Space": lambda: self.act_pause.toggle(),
            "Esc": self.go_live,
            "A": self.auto_contrast,
            "L": lambda: self.act_auto.toggle(),
            "F": self.fit,
            "R": lambda: self.act_roi.toggle(),
            "[": lambda: self.step("c", -1),
            "]": lambda: self.step("c", +1),
            "O": lambda: self.overlay_box.toggle(),
            "T": lambda: self.trust_box.toggle(),
            "PgUp": lambda: self.step("z", -1),
            "PgDown": lambda: self.step("z", +1),
            "Ctrl+S": lambda: self.snapshot(),
            "Ctrl+T": lambda: self._toggle_dock(self.dock_telemetry),
            "Ctrl+E": lambda: self._toggle_dock(self.dock_controls),
            "Ctrl+B": lambda: self._toggle_dock(self.dock_time),
            "F1": self.show_help,
            "Ctrl+Q": self.win.close,
        }
        for i in range(1, 10):
            keys[str(i)] = lambda i=i: self.toggle_panel_number(i)
        self.shortcuts = []
        for key, fn in keys.items():
            sc = QtGui.QShortcut(QtGui.QKeySequence(key), self.win)
            sc.setContext(QtCore.Qt.ShortcutContext.WindowShortcut)
            sc.activated.connect(fn)
            self.shortcuts.append(sc)

    def _toggle_dock(self, dock: Any) -> None:
        dock.setVisible(not dock.isVisible())

    # -- panels ----------------------------------------------------------------------------------
    def _panel(self, product: str) -> Any:
        panel = self.panels.get(product)
        if panel is not None:
            return panel
        from .panels import CompositePanel, ImagePanel

        panel = CompositePanel() if product == "composite" else ImagePanel(product)
        if product in self.cmaps and not panel.composite:
            panel.set_cmap(self.cmaps[product])
        if panel.widget.cmap is not None:
            panel.widget.cmap.currentTextChanged.connect(lambda name, p=product: self.cmaps.__setitem__(p, name))
        # pan and zoom together: by centre and scale, not by range (panels differ in size, and
        # linked ranges under locked aspect ratios grow each other until the image is a dot)
        panel.view.sigRangeChangedManually.connect(lambda *_, p=panel: self._link_from(p))
        scene = panel.widget.graphics.scene()
        scene.sigMouseMoved.connect(lambda pos, p=panel: self._mouse_moved(p, pos))
        self.panels[product] = panel
        if product == "raw":
            self.roi_trace_attach(panel)
        self._rebuild_panels_menu()
        self.relayout()
        return panel

    def _link_from(self, source: Any) -> None:
        if self._linking:
            return
        (x0, x1), (y0, y1) = source.view.viewRange()
        w = source.view.width()
        if w <= 0 or x1 <= x0:
            return
        scale, cx, cy = (x1 - x0) / w, (x0 + x1) / 2, (y0 + y1) / 2
        self._linking = True
        try:
            for panel in self.panels.values():
                if panel is source or panel.shape is None:
                    continue
                f = panel.shape[1] / source.shape[1] if source.shape else 1.0  # another sampling
                pw, ph = panel.view.width(), panel.view.height()
                panel.view.setRange(xRange=(f * cx - f * scale * pw / 2, f * cx + f * scale * pw / 2),
                                    yRange=(f * cy - f * scale * ph / 2, f * cy + f * scale * ph / 2), padding=0)
        finally:
            self._linking = False

    def _rebuild_panels_menu(self) -> None:
        self.panels_menu.clear()
        for i, name in enumerate(sorted(self.panels, key=_order)):
            act = self.panels_menu.addAction(f"{i + 1}  {name}" if i < 9 else name)
            act.setCheckable(True)
            act.setChecked(name not in self.hidden)
            act.toggled.connect(lambda on, n=name: self.set_panel_visible(n, on))

    def set_panel_visible(self, name: str, visible: bool) -> None:
        (self.hidden.discard if visible else self.hidden.add)(name)
        for act in self.panels_menu.actions():
            if act.text().split()[-1] == name and act.isChecked() != visible:
                act.setChecked(visible)
        self.relayout()

    def toggle_panel_number(self, number: int) -> None:
        names = sorted(self.panels, key=_order)
        if 1 <= number <= len(names):
            name = names[number - 1]
            self.set_panel_visible(name, name in self.hidden)

    def visible_panels(self) -> list[str]:
        """The panels shown: not hidden, and of a product the shown stream has (another
        stream's products keep their panels, out of sight, until it is shown again)."""
        return [n for n in sorted(self.panels, key=_order) if n not in self.hidden and self._has_product(n)]

    def _has_product(self, name: str) -> bool:
        if name == "composite":
            return any(d in self._products for d in DECOMPOSITION)
        return name in self._products

    def relayout(self) -> None:
        """Place the visible panels in the grid whose cells are largest for the frames' aspect."""
        names = self.visible_panels()
        if names == self._grid_order and all(self.panels[n].widget.isVisible() for n in names):
            return
        for i in reversed(range(self.grid.count())):
            self.grid.takeAt(i)
        for name, panel in self.panels.items():
            panel.widget.setVisible(name in names)
        self.placeholder.setVisible(not names)
        if not names:
            self.grid.addWidget(self.placeholder, 0, 0)
            self._grid_order = names
            return
        n = len(names)
        w, h = max(self.grid_host.width(), 400), max(self.grid_host.height(), 300)
        aspect = 1.0
        shape = next((self.panels[k].shape for k in names if self.panels[k].shape), None)
        if shape:
            aspect = shape[1] / shape[0]
        best_cols, best = 1, -1.0
        for cols in range(1, n + 1):
            rows = math.ceil(n / cols)
            cw, ch = w / cols - 50, h / rows - 28  # histogram and title bar
            size = min(cw, ch * aspect)
            if size > best + 1:
                best_cols, best = cols, size
        for r in range(self.grid.rowCount()):
            self.grid.setRowStretch(r, 0)
        for c in range(self.grid.columnCount()):
            self.grid.setColumnStretch(c, 0)
        for i, name in enumerate(names):
            r, c = divmod(i, best_cols)
            self.grid.addWidget(self.panels[name].widget, r, c)
            self.grid.setRowStretch(r, 1)
            self.grid.setColumnStretch(c, 1)
        self._grid_order = names

    def roi_trace_attach(self, raw_panel: Any) -> None:
        self._roi_panel = raw_panel
        self._roi_pending = True

    def set_roi_visible(self, on: bool) -> None:
        if self.roi_trace.roi is not None:
            self.roi_trace.roi.setVisible(on)

    # -- frames ----------------------------------------------------------------------------------
    def update(self) -> int:
        """Draw the newest preview of each product of the shown stream at the selected position,
        channel and z. Returns the number of panels drawn."""
        now = time.monotonic()
        new = self.sub.latest()
        if new:
            self._last_frame_at = now
            self.latest.update(new)
            self._note_streams(new, now)
        if not self.paused:  # a frozen display keeps its stream
            self._follow_streams(now)
        if new:
            self._note_frames(new)
        self._check_idle(now)
        if self.paused:
            return 0
        stream = self.streams.selected
        sel = (self.selection["p"], self.selection["c"], self.selection["z"])
        drawn = 0
        decomposition_changed = False
        # the newest frame of each channel of the selected position and z, per product
        channels: dict[str, dict[int, Any]] = {}
        if self.overlay:
            for (s, product, p, c, z), frame in self.latest.items():
                if s == stream and (p, z) == (sel[0], sel[2]) and frame.array is not None:
                    channels.setdefault(product, {})[c] = frame
        for (s, product, p, c, z), frame in sorted(self.latest.items(), key=lambda kv: _order(kv[0][1])):
            if s != stream or (p, c, z) != sel or frame.array is None or product.startswith(TRUST_PREFIX):
                continue
            panel = self._panel(product)
            group = channels.get(product, {})
            if len(group) > 1 and product not in self.hidden:
                # overlaid: redraw when any channel has a new frame
                key = (*sel, *sorted((k, f.seq, id(f.header)) for k, f in group.items()))
                if panel.overlaid and panel.overlay_key == key:
                    continue
                if panel.show_overlay({k: (f.array, f.header) for k, f in group.items()}, sel[1], self.seen["c"]):
                    self._shape_changed(product, frame.array.shape)
                panel.overlay_key = key
                drawn += 1
            elif panel.seq == frame.seq and panel.header is frame.header and not panel.overlaid:
                continue
            elif product in self.hidden:
                panel.array, panel.header, panel.seq = frame.array, frame.header, frame.seq  # readout and ROI
            else:
                if panel.show_frame(frame.array, frame.header):
                    self._shape_changed(product, frame.array.shape)
                drawn += 1
            if product in DECOMPOSITION:
                decomposition_changed = True
            self._sample_roi(product, frame)
        if self._relayout_after_draw and drawn:  # another stream shown: its frames' aspect decides the grid
            self._relayout_after_draw = False
            self._grid_order = []
            self.relayout()
        self._draw_trust(sel)
        if decomposition_changed and any(k in self.panels for k in DECOMPOSITION):
            composite = self._panel("composite")
            if "composite" not in self.hidden:
                composite.show_composite(self.panels)
                drawn += 1
        if now - self._last_levels > LEVELS_EVERY_S:
            self._last_levels = now
            for name in self.visible_panels():
                panel = self.panels[name]
                if self.auto_levels and panel.auto:
                    panel.auto_levels()
                if self.auto_levels and panel.overlaid:
                    panel.overlay_auto_levels()
                    panel.overlay_key = None  # draw again at the new levels
                panel.update_histogram()
            self.novelty.redraw()
            self.roi_trace.redraw()
        if drawn:
            self.frames_drawn += drawn
            self.redraws += 1
            self._display_times.append(now)
            if self._cursor is not None:
                self._readout(*self._cursor)
        return drawn

    def _draw_trust(self, sel: tuple[int, int, int]) -> None:
        """Each panel's trust tint from the newest ``trust_<product>`` map (when the overlay is on)."""
        for name, panel in self.panels.items():
            if panel.composite:
                continue
            key = (self.streams.selected, TRUST_PREFIX + name, *sel)
            frame = self.latest.get(key) if self.trust_overlay else None
            if frame is None or frame.array is None or panel.array is None or np.ndim(frame.array) != 2:
                if panel.trust_item.isVisible():
                    panel.show_trust_map(None)
                continue
            panel.show_trust_map(frame.array, key=(frame.seq, id(frame.header), id(panel.array)))

    def _note_streams(self, new: dict[tuple, Any], now: float) -> None:
        """Streams (when each sent, which are live mode) and the values each has on each axis."""
        shown = self.streams.selected
        # streams first seen in the same drain are listed by name: the order a viewer started
        # beside running cameras shows them in does not depend on which message came first
        for (stream, product, p, c, z), frame in sorted(new.items(), key=lambda kv: kv[0][0]):
            info = self.streams.note(stream, now, live=frame.header.get("live") is True)
            for axis, value in (("p", p), ("c", c), ("z", z)):
                if value not in info.seen[axis]:
                    info.seen[axis][value] = str(frame.header.get("channel") or value) if axis == "c" else str(value)
                    if stream == shown:
                        self._refresh_selector(axis)
            if stream == shown:
                self._products.add(product)
        labels = [(name, self.streams.label(name)) for name in self.streams.names()]
        if labels != self._stream_labels:
            self._stream_labels = labels
            self._refresh_stream_selector()

    def _note_frames(self, new: dict[tuple, Any]) -> None:
        """The shown stream's frames: the recent-frame buffer, the novelty strip, restarts."""
        stream = self.streams.selected
        sel = (self.selection["p"], self.selection["c"], self.selection["z"])
        for (s, product, p, c, z), frame in new.items():
            if s != stream or (p, c, z) != sel or frame.array is None:
                continue
            last = self._last_seq.get(product)
            if last is not None and frame.seq < last - 1:
                self.say("stream", f"The stream restarted (seq {last} → {frame.seq}); history cleared.", "info", 6)
                self.novelty.clear()
                self.roi_trace.reset()
                self.buffer.clear()
            self._last_seq[product] = frame.seq
            self.buffer.add(product, frame.seq, frame.array, frame.header)
            scalars = frame.header.get("scalars") or {}
            score = scalars.get(f"trust_{product}_score")
            panel = self.panels.get(product)
            if score is not None and panel is not None:
                from .panels import show_trust

                sampled = self._trust_sampled.setdefault(product, {})
                for check in ("tta", "features"):  # run on some frames only: keep the newest
                    if scalars.get(f"trust_{product}_{check}") is not None:
                        sampled[check] = float(scalars[f"trust_{product}_{check}"])
                show_trust(panel.widget, float(score), scalars.get(f"trust_{product}_ok"), sampled)
            elif product == "restored" and panel is not None and scalars.get("consistency") is not None:
                from .panels import show_consistency

                thr = scalars.get("consistency_threshold")
                show_consistency(panel.widget, float(scalars["consistency"]), None if thr is None else float(thr))
            # one product's frames only: the products' previews leave at slightly different times
            novelty_from = next((d for d in DECOMPOSITION if d in self._products), None)
            if "novelty" in scalars and product == novelty_from:
                t = (frame.header.get("index") or {}).get("t", frame.seq)
                self.novelty.add(float(t), float(scalars["novelty"]))

    def _shape_changed(self, product: str, shape: tuple[int, ...]) -> None:
        self.say("shape", f"The stream changed shape: {product} is now {' × '.join(map(str, shape))}; "
                 "views and levels were reset.", "info", 8)
        self._grid_order = []
        self.relayout()
        if self.roi_trace.roi is not None and product == "raw":
            self.roi_trace.reset()

    def _sample_roi(self, product: str, frame: Any) -> None:
        if getattr(self, "_roi_pending", False) and self._roi_panel.array is not None:
            self._roi_pending = False
            roi = self.roi_trace.attach(self._roi_panel.view, self._roi_panel.array.shape)
            roi.setVisible(self.act_roi.isChecked())
            geo = read_json_default(self.settings, "roi/rect", None)
            if geo:
                roi.setPos(geo[:2])
                roi.setSize(geo[2:])
        if self.roi_trace.roi is None:
            return
        restored = next((r for r in RESTORED if r in self.panels), None)
        self.roi_trace.restored_name = restored
        if product in ("raw", restored):
            t = (frame.header.get("index") or {}).get("t", frame.seq)
            self.roi_trace.sample(product, frame.seq, float(t), frame.array)

    def _check_idle(self, now: float) -> None:
        if self._last_frame_at is None:
            if now - self._started > IDLE_AFTER_S and self.link.connected:
                self.say("idle", "The daemon is running but sends no frames yet: is the acquisition started?", "info")
            return
        idle = now - self._last_frame_at
        if idle > IDLE_AFTER_S and "idle" not in self._messages and not self.paused:
            self.say("idle", f"No new frames for {idle:.0f} s: the acquisition is paused or has ended.", "info")
        elif idle <= IDLE_AFTER_S and "idle" in self._messages:
            self.unsay("idle")
        self._check_quiet_stream(now, idle)

    def _check_quiet_stream(self, now: float, idle: float) -> None:
        """The shown stream is quiet while another sends (Follow live off, or two ordinary
        streams): say so, so a still image is not taken for a live one."""
        info = self.streams.info()
        quiet_for = now - info.last_seen if info is not None else 0.0
        if idle <= IDLE_AFTER_S and quiet_for > self.streams.quiet_s and not self.paused:
            if "quiet" not in self._messages:
                self.say("quiet", f"{self.streams.label(info.name)} sent nothing for {quiet_for:.0f} s while other "
                         "streams send: pick one in Stream to see it.", "info")
        elif "quiet" in self._messages:
            self.unsay("quiet")

    # -- selectors -------------------------------------------------------------------------------
    def _refresh_selector(self, axis: str) -> None:
        combo = self.selectors[axis]
        blocker = self.QtCore.QSignalBlocker(combo)
        combo.clear()
        for value in sorted(self.seen[axis]):
            combo.addItem(self.seen[axis][value] if axis == "c" else str(value), value)
        combo.setCurrentIndex(max(0, combo.findData(self.selection[axis])))
        del blocker

    def select(self, axis: str, value: int) -> None:
        if value is None or value == self.selection[axis]:
            return
        self.selection[axis] = int(value)
        combo = self.selectors[axis]
        combo.setCurrentIndex(max(0, combo.findData(value)))
        for panel in self.panels.values():
            panel.seq = -1  # redraw from what the new selection holds
            panel.overlay_key = None  # an overlay too: its readout follows the selected channel
        self.novelty.clear()
        self.roi_trace.reset()
        self.buffer.clear()
        self._last_seq.clear()

    def step(self, axis: str, delta: int) -> None:
        values = sorted(self.seen[axis])
        if values:
            i = values.index(self.selection[axis]) if self.selection[axis] in values else 0
            self.select(axis, values[max(0, min(len(values) - 1, i + delta))])

    # -- streams ---------------------------------------------------------------------------------
    def _refresh_stream_selector(self) -> None:
        """The streams in first-seen order, live mode marked; shown only with more than one."""
        combo = self.stream_combo
        blocker = self.QtCore.QSignalBlocker(combo)
        combo.clear()
        for name, label in self._stream_labels:
            combo.addItem(label, name)
        combo.setCurrentIndex(max(0, combo.findData(self.streams.selected)))
        del blocker
        for act in self._stream_actions:
            act.setVisible(self.streams.several)

    def choose_stream(self, name: str | None) -> None:
        """The user picked a stream: show it, and stop following live mode (sticky)."""
        if name is not None:
            self.set_stream(name, by_user=True)

    def set_follow(self, on: bool) -> None:
        """Follow live mode by itself (see ui/streams.py), or stay on the stream shown."""
        self.streams.follow = bool(on)
        if self.follow_box.isChecked() != self.streams.follow:
            self.follow_box.setChecked(self.streams.follow)
        if not on:
            self.unsay("follow")

    def _follow_streams(self, now: float) -> None:
        pick = self.streams.auto_pick(now)
        if pick is None:
            return
        before = self.streams.selected
        self.set_stream(pick)
        if before is not None:
            self.say("follow", f"Now showing {self.streams.label(pick)}: {self.streams.label(before)} sent nothing "
                     f"for {self.streams.quiet_s:g} s (Follow live). Pick a stream to stay on one.", "info", 8)

    def set_stream(self, name: str, *, by_user: bool = False) -> None:
        """Show ``stream``: its own position, channel and z (as last picked there), its products'
        panels; the history of the stream shown before (novelty, ROI trace, buffer) starts over."""
        before = self.streams.selected
        selection = self.streams.select(name, by_user=by_user)
        if by_user:
            self.set_follow(False)
            self.unsay("follow")
        if before is None:  # the first stream shown keeps the selection the viewer started with
            self.streams.adopt_selection(name, self.selection)
            selection = self.selection
        info = self.streams.info(name)
        assert info is not None
        self.selection, self.seen = selection, info.seen
        for axis in self.selectors:
            self._refresh_selector(axis)
        self.stream_combo.setCurrentIndex(max(0, self.stream_combo.findData(name)))
        if name == before:
            return
        self._products = {k[1] for k in self.latest if k[0] == name}
        for panel in self.panels.values():
            panel.seq = -1
            panel.overlay_key = None
            panel.shape = None  # another camera's frames: fit them, no "the stream changed shape"
            if panel.auto:
                panel.levels = None  # levels from the new stream's first frame
            panel.show_trust_map(None)
            panel.show_event_box(None)
            panel.show_event_mark(None)
            panel.widget.trust.setVisible(False)
            panel.widget.latency.setText("")
        self._trust_sampled.clear()
        self.novelty.clear()
        self.roi_trace.reset()
        self.buffer.clear()
        self._last_seq.clear()
        self._grid_order = []
        self._relayout_after_draw = True
        self.relayout()

    # -- levels, view, modes ---------------------------------------------------------------------
    def set_overlay(self, on: bool) -> None:
        """Overlay every channel of the selected position and z in its colour, or (off) show the
        channel picked in the selector through each panel's colour map."""
        self.overlay = bool(on)
        if self.overlay_box.isChecked() != self.overlay:
            self.overlay_box.setChecked(self.overlay)
        for panel in self.panels.values():
            panel.seq = -1
            panel.overlay_key = None
        if self.overlay and len(self.seen["c"]) < 2:
            self.say("overlay", "Overlay channels: the stream has one channel so far.", "info", 4)
        if not self.paused:
            self.update()

    def set_trust_overlay(self, on: bool) -> None:
        """Tint low-trust regions of every product a trust engine scores (T), or hide the tints."""
        self.trust_overlay = bool(on)
        if self.trust_box.isChecked() != self.trust_overlay:
            self.trust_box.setChecked(self.trust_overlay)
        has_maps = any(k[1].startswith(TRUST_PREFIX) for k in self.latest if k[0] == self.streams.selected)
        if self.trust_overlay and not has_maps:
            self.say("trust", "Trust map: no trust map received yet; run the daemon with --engines trust "
                     "(docs/trust.md).", "info", 6)
        elif not self.trust_overlay:
            self.unsay("trust")
        sel = (self.selection["p"], self.selection["c"], self.selection["z"])
        self._draw_trust(sel)

    def set_auto_levels(self, on: bool) -> None:
        self.auto_levels = bool(on)
        if on:
            for panel in self.panels.values():
                panel.auto = True
            self._last_levels = 0.0

    def auto_contrast(self) -> None:
        for panel in self.panels.values():
            panel.auto = True
            panel.auto_levels()
            panel.update_histogram()
        if "composite" in self.panels:
            self.panels["composite"].show_composite(self.panels)

    def fit(self) -> None:
        for panel in self.panels.values():
            if panel.shape is not None:
                panel.view.autoRange(padding=0)

    def set_paused(self, on: bool) -> None:
        self.paused = bool(on)
        if on:
            self.say("paused", "Paused: the display is frozen, the daemon goes on. Space resumes.", "info")
        else:
            self.unsay("paused")
            self.unsay("event")
            self._shown_event = None
            for panel in self.panels.values():
                panel.seq = -1
                panel.overlay_key = None
                panel.show_event_box(None)

    def go_live(self) -> None:
        if self.act_pause.isChecked():
            self.act_pause.setChecked(False)

    def show_event(self, event: dict[str, Any]) -> None:
        """Pause and show the buffered frames nearest an event's seq."""
        seq = event.get("seq")
        if seq is None:
            return
        shown = []
        if not self.act_pause.isChecked():
            self.act_pause.setChecked(True)
        for name, panel in self.panels.items():
            if panel.composite:
                continue
            found = self.buffer.nearest(name, int(seq))
            if found is not None:
                panel.show_frame(*found)
                shown.append(int(found[1].get("seq", -1)))
        if "composite" in self.panels and shown:
            self.panels["composite"].show_composite(self.panels)
        self._shown_event = event
        rule = self.draw_event_box(event)
        score = event.get("score")
        what = f"event {event.get('id', '?')} at t {event.get('t', '?')} (seq {seq}" + (
            f", score {score:.2f})" if isinstance(score, (int, float)) else ")")
        if shown:
            near = min(shown, key=lambda s: abs(s - int(seq)))
            box = (" Its box is drawn at an assumed scale: the event gives neither its frame's pixel size nor shape."
                   if rule == "assumed" else "")
            self.say("event", f"Showing {what} — nearest buffered frame seq {near}.{box} Esc or Space: back to live.",
                     "info")
        else:
            self.say("event", f"{what}: its frame is no longer in the recent-frame buffer "
                     f"({self.buffer.max_bytes >> 20} MB). Esc: back to live.", "warn")

    def draw_event_box(self, event: dict[str, Any]) -> str | None:
        """Draw the event's bounding box on every panel, scaled from full-frame pixels to that
        panel's preview (see ``timeline.event_stride``). Returns the scaling rule used (None: no box)."""
        from .timeline import event_rect, event_stride

        rule = None
        for panel in self.panels.values():
            if panel.array is None:
                panel.show_event_box(None)
                continue
            stride, rule = event_stride(event, panel.header, panel.array.shape[:2])
            panel.show_event_box(event_rect(event, stride))
            if event_rect(event, stride) is None:
                rule = None
        return rule

    def mark_newest_event(self, events: list[dict[str, Any]]) -> None:
        """A ring on the raw panel at the newest event's centroid, for EVENT_MARK_S seconds."""
        from .timeline import event_point, event_stride

        raw = self.panels.get("raw")
        newest = next((e for e in reversed(events) if e.get("centroid") is not None), None)
        if raw is None or raw.array is None or newest is None:
            return
        if newest.get("stream", self.streams.selected) != self.streams.selected:
            return
        if (newest.get("p", self.selection["p"]), newest.get("z", self.selection["z"])) != (
                self.selection["p"], self.selection["z"]):
            return
        stride, _ = event_stride(newest, raw.header, raw.array.shape[:2])
        point = event_point(newest, stride)
        if point is not None:
            raw.show_event_mark(point)
            self._event_mark_until = time.monotonic() + EVENT_MARK_S

    # -- cursor readout --------------------------------------------------------------------------
    def _mouse_moved(self, panel: Any, scene_pos: Any) -> None:
        if not panel.view.sceneBoundingRect().contains(scene_pos):
            return
        pt = panel.view.mapSceneToView(scene_pos)
        shape = panel.array.shape[:2] if panel.array is not None else None
        self._cursor = (pt.x(), pt.y(), shape)  # type: ignore[assignment]
        self._readout(pt.x(), pt.y(), shape)

    def _readout(self, x: float, y: float, shape: tuple[int, ...] | None = None) -> None:
        if shape is None:
            return
        inside = 0 <= x < shape[1] and 0 <= y < shape[0]
        for panel in self.panels.values():
            v = panel.value_at(x, y, shape) if inside else None
            if not panel.composite:
                panel.widget.value.setText("" if v is None else _fmt_value(v))
        if not inside:
            self.cursor_label.setText("")
            return
        px = f"x {int(x)}  y {int(y)} px"
        ref = next((self.panels[n] for n in self.visible_panels() if self.panels[n].header.get("pixel_size_um")),
                   None)  # a panel of the shown stream: another camera's pixels may be another size
        if ref is not None:
            size = float(ref.header["pixel_size_um"]) * (ref.array.shape[1] / shape[1] if ref.array is not None else 1)
            px += f"   ({(int(x) + 0.5) * size:.2f}, {(int(y) + 0.5) * size:.2f} µm)"
        raw = self.panels.get("raw")
        if raw is not None:
            v = raw.value_at(x, y, shape)
            if v is not None:
                px += f"   raw {_fmt_value(v)}"
        for name, panel in sorted(self.panels.items(), key=lambda kv: _order(kv[0])):
            t = panel.trust_at(x, y, shape) if not panel.composite else None
            if t is not None:
                px += f"   trust {name} {t:.2f}"
        self.cursor_label.setText(px)

    # -- the daemon ------------------------------------------------------------------------------
    def send(self, cmd: str, **kwargs: Any) -> None:
        if not self.control_address:
            self.say("control", "No control socket: start the viewer with --control ADDR.", "warn", 5)
            return
        self.link.request(cmd, **kwargs)

    def poll_daemon(self) -> None:
        for kind, payload in self.link.drain():
            if kind == "status":
                self.status = payload
                self.controls.follow(payload)
                self.telemetry.update_status(payload, self.display_fps())
            elif kind == "events":
                self.events.extend(payload)
                self.events = self.events[-1000:]
                self.novelty.add_events(payload)
                self.mark_newest_event(payload)
            elif kind == "reply":
                request, reply = payload
                self.controls.show_reply(request, reply)
                if not reply.get("ok"):
                    self.say("reply", f"The daemon refused {request.get('cmd')} {request.get('engine', '')}: "
                             f"{reply.get('error')}", "warn", 8)
            elif kind == "down":
                self.say("daemon", f"No livescope daemon answers at {payload}: is it running (`livescope daemon`)? "
                         "Reconnecting by itself…", "error")
                self.status_label.setText(f"<span style='color:#ff5a52'>●</span> no daemon at {payload}")
            elif kind == "refused":
                self.say("daemon", f"The daemon at {self.control_address} refuses this viewer: {payload}", "error")
            elif kind == "up":
                if "daemon" in self._messages:
                    self.say("daemon", "Connected to the daemon again.", "ok", 4)
            elif kind == "restarted":
                self.say("daemon", "The daemon restarted: counters, events and plots start over.", "info", 8)
                self.novelty.clear()
                self.roi_trace.reset()
                self.events.clear()
        if self._event_mark_until and time.monotonic() > self._event_mark_until:
            self._event_mark_until = 0.0
            raw = self.panels.get("raw")
            if raw is not None:
                raw.show_event_mark(None)
        if self.status is not None and self.link.connected:
            from .telemetry import status_line

            self.status_label.setText(status_line(self.status, self.display_fps()))
        elif not self.control_address:
            self.status_label.setText(f"previews from {self.connect_address} · display {self.display_fps():.0f} fps")
        self._show_messages()

    def display_fps(self) -> float:
        now = time.monotonic()
        self._display_times = [t for t in self._display_times if now - t < 2.0]
        return len(self._display_times) / 2.0

    # -- messages ---------------------------------------------------------------------------------
    def say(self, key: str, text: str, level: str = "info", seconds: float | None = None) -> None:
        """A message in the banner above the panels; never a dialog (nothing blocks the display)."""
        self._messages[key] = (text, level, None if seconds is None else time.monotonic() + seconds)
        self._show_messages()

    def unsay(self, key: str) -> None:
        if self._messages.pop(key, None) is not None:
            self._show_messages()

    def _show_messages(self) -> None:
        from .style import COLORS

        now = time.monotonic()
        for key in [k for k, (_, _, until) in self._messages.items() if until is not None and until < now]:
            del self._messages[key]
        if not self._messages:
            self.banner.setVisible(False)
            return
        rank = {"error": 0, "warn": 1, "info": 2, "ok": 3}
        items = sorted(self._messages.values(), key=lambda m: rank.get(m[1], 9))
        level = items[0][1]
        colours = {"error": ("#3a1d1f", COLORS["bad"]), "warn": ("#3a2f1a", COLORS["warn"]),
                   "info": ("#1c2736", "#9cc7f0"), "ok": ("#1c3322", COLORS["ok"])}
        bg, fg = colours.get(level, colours["info"])
        self.banner.setStyleSheet(f"background:{bg}; color:{fg}; border-bottom:1px solid {fg};")
        text = "   ·   ".join(m[0] for m in items)
        if self.banner.text() != text:
            self.banner.setText(text)
        self.banner.setVisible(True)

    def show_help(self) -> None:
        text = "   ".join(f"<b>{k}</b> {v}" for k, v in SHORTCUTS)
        self.say("help", text, "info", 12)

    # -- snapshot, settings, closing ---------------------------------------------------------------
    def snapshot(self, path: str | os.PathLike | None = None) -> Path:
        """Save what the window shows as PNG (default: livescope-YYYYmmdd-HHMMSS.png in snapshot_dir)."""
        if path is None:
            path = self.snapshot_dir / time.strftime("livescope-%Y%m%d-%H%M%S.png")
        path = Path(path)
        if not self.win.grab().save(str(path)):
            self.say("snapshot", f"Could not write {path}.", "warn", 6)
        else:
            self.say("snapshot", f"Snapshot saved: {path}", "ok", 5)
        return path

    def dump(self, folder: str | os.PathLike) -> dict[str, Any]:
        """The window as PNG plus, for each visible panel, the frame, levels, look-up table and
        where the image lies in the window: what a test needs to check the pixels shown."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.win.grab().save(str(folder / "window.png"))
        state: dict[str, Any] = {"panels": {}, "window": [self.win.width(), self.win.height()],
                                 "stream": self.streams.selected, "streams": self.streams.names()}
        for name in self.visible_panels():
            panel = self.panels[name]
            if panel.array is None:
                continue
            gv = panel.widget.graphics
            rect = panel.image.mapRectToScene(panel.image.boundingRect())
            tl = gv.mapTo(self.win, gv.mapFromScene(rect.topLeft()))
            br = gv.mapTo(self.win, gv.mapFromScene(rect.bottomRight()))
            view_rect = panel.view.sceneBoundingRect()
            vtl = gv.mapTo(self.win, gv.mapFromScene(view_rect.topLeft()))
            vbr = gv.mapTo(self.win, gv.mapFromScene(view_rect.bottomRight()))
            np.save(folder / f"{name}.npy", np.asarray(panel.array))
            if panel.lut is not None:
                np.save(folder / f"{name}-lut.npy", panel.lut)
            state["panels"][name] = {
                "seq": panel.seq, "levels": list(panel.levels) if panel.levels else None, "cmap": panel.cmap_name,
                "image_rect": [tl.x(), tl.y(), br.x(), br.y()], "view_rect": [vtl.x(), vtl.y(), vbr.x(), vbr.y()],
                "composite": panel.composite, "saturated_overlay": bool(panel.saturation.isVisible()),
                "trust_overlay": bool(panel.trust_item.isVisible()),
                "latency_ms": panel.header.get("latency_ms"), "stream": panel.header.get("stream"),
            }
        (folder / "state.json").write_text(json.dumps(state, indent=1))
        return state

    def _restore_layout(self) -> None:
        s = self.settings
        geo, state = s.value("window/geometry"), s.value("window/state")
        if geo is not None:
            self.win.restoreGeometry(geo)
        if state is not None:
            self.win.restoreState(state)

    def save_layout(self) -> None:
        from .settings import write_json

        s = self.settings
        s.setValue("window/geometry", self.win.saveGeometry())
        s.setValue("window/state", self.win.saveState())
        write_json(s, "panels/hidden", sorted(self.hidden))
        write_json(s, "panels/cmaps", {n: p.cmap_name for n, p in self.panels.items() if not p.composite}
                   | {k: v for k, v in self.cmaps.items() if k not in self.panels})
        write_json(s, "levels/continuous", self.auto_levels)
        write_json(s, "view/overlay", self.overlay)
        write_json(s, "view/trust", self.trust_overlay)
        write_json(s, "roi/visible", self.act_roi.isChecked())
        roi = self.roi_trace.roi
        if roi is not None:
            write_json(s, "roi/rect", [*map(float, roi.pos()), *map(float, roi.size())])
        s.sync()

    def close(self) -> None:
        self.timer.stop()
        self.daemon_timer.stop()
        try:
            self.save_layout()
        except Exception:  # a read-only settings file must not stop the viewer from closing
            log.exception("could not save the viewer layout")
        self.link.close()
        self.sub.close()


def read_json_default(settings: Any, key: str, default: Any) -> Any:
    from .settings import read_json

    return read_json(settings, key, default)


def _fmt_value(v: float) -> str:
    if v == int(v) and abs(v) < 1e7:
        return f"{int(v)}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3g}"


def run_viewer(connect: str = DEFAULT_PUBLISH, control: str | None = DEFAULT_CONTROL, *,
               screenshot: str | None = None, seconds: float | None = None,
               settings_path: str | None = None, dump: str | None = None, curve: Any = None) -> int:
    pg, QtCore, QtGui, QtWidgets = _qt()
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setApplicationName("livescope")
    viewer = LiveViewer(connect, control, settings_path=settings_path, curve=curve)
    viewer.win.show()
    if seconds is not None:
        def _finish(shown: LiveViewer = viewer) -> None:  # bound now: `viewer` is deleted below
            shown.update()
            if screenshot:
                shown.win.grab().save(screenshot)
            if dump:
                shown.dump(dump)
            app.quit()

        QtCore.QTimer.singleShot(int(seconds * 1000), _finish)
    rc = app.exec()
    viewer.close()
    # tear the window down while Qt still runs: left to the interpreter's exit, PySide6 and
    # pyqtgraph objects can be collected in an order that crashes
    viewer.win.deleteLater()
    app.processEvents()
    del viewer
    import gc

    gc.collect()
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="livescope view", description="the live viewer of a livescope daemon")
    p.add_argument("--connect", default=DEFAULT_PUBLISH, help="the daemon's preview socket")
    p.add_argument("--control", default=DEFAULT_CONTROL, help="the daemon's control socket ('' for none)")
    p.add_argument("--screenshot", help="save the window to this PNG after --seconds")
    p.add_argument("--seconds", type=float, help="quit after this many seconds")
    p.add_argument("--settings", help="settings file (default: the user's; env LIVESCOPE_VIEWER_SETTINGS)")
    p.add_argument("--dump", help="after --seconds, write the window and each panel's frame and levels here (tests)")
    a = p.parse_args(argv)
    return run_viewer(a.connect, a.control or None, screenshot=a.screenshot, seconds=a.seconds,
                      settings_path=a.settings, dump=a.dump)


if __name__ == "__main__":
    sys.exit(main())
