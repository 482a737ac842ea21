"""The live viewer: a grid of linked panels (raw and each product), fed by the daemon's previews.

It runs in its own process and never slows the daemon: previews arrive on a PUB/SUB socket with
a small high-water mark; a QTimer at screen rate drains the socket and draws only the newest
frame of each product; levels and histograms are recomputed about once a second. The control
socket is served by a thread (:mod:`.link`), so a daemon that is away never freezes the window.

One daemon previews every stream it ingests (cameras, Micro-Manager's live mode and snaps); the
viewer shows one stream at a time, picked in the *Stream* selector or followed by itself
(:mod:`.streams`: the first stream, and a live-mode stream once the shown one has gone quiet).

    livescope view --connect tcp://127.0.0.1:5571 --control tcp://127.0.0.1:5572

What the viewer shows and decides lives in :class:`.state.ViewerState` (plain Python, no Qt);
this module draws it and forwards what the user does. Every user action (toolbar entry, key,
what it calls) is a row of :data:`.actions.ACTIONS`; the keys are listed in ``SHORTCUTS`` (F1 in
the window).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..bridges.transport import DEFAULT_CONTROL, DEFAULT_PUBLISH, PreviewSubscriber
from .actions import ACTIONS, BY_ID, STREAM_ITEMS, TOOLBAR, Action, shortcut_list
from .state import DECOMPOSITION, SETTINGS_DEFAULTS, ViewerState, best_columns, panel_order
from .streams import AXES, StreamChooser

__all__ = ["LiveViewer", "run_viewer", "main", "SHORTCUTS"]

log = logging.getLogger(__name__)

SHORTCUTS = shortcut_list()  # (key, what it does), from ACTIONS


def _qt() -> tuple[Any, Any, Any, Any]:
    try:
        import pyqtgraph as pg
        from pyqtgraph.Qt import QtCore, QtGui, QtWidgets
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the viewer needs pyqtgraph and Qt: pip install 'livescope[ui]'") from exc
    return pg, QtCore, QtGui, QtWidgets


_order = panel_order


class LiveViewer:
    """The main window. ``update()`` (a timer) draws the newest previews; ``poll_daemon()``
    (another timer) handles what the control thread brought back."""

    def __init__(
        self,
        connect: str = DEFAULT_PUBLISH,
        control: str | None = DEFAULT_CONTROL,
        *,
        settings_path: str | os.PathLike | None = None,
        snapshot_dir: str | os.PathLike | None = None,
        fps: float = 30.0,
        curve: Any = None,
    ) -> None:
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
        self.win.setDockOptions(
            QtWidgets.QMainWindow.DockOption.AnimatedDocks | QtWidgets.QMainWindow.DockOption.AllowTabbedDocks
        )

        # what the viewer shows and decides (ui/state.py); the widgets below draw it
        self.state = ViewerState.from_settings(
            {key: read_json(self.settings, key, default) for key, default in SETTINGS_DEFAULTS.items()}, control=control
        )
        self.latest: dict[tuple, Any] = {}  # (stream, product, p, c, z) -> newest Frame
        self._relayout_after_draw = False
        self.panels: dict[str, Any] = {}
        self.buffer = FrameBuffer()
        self._grid_order: list[str] = []
        self._cursor: tuple[float, float, tuple[int, ...] | None] | None = None
        self._linking = False
        self._banner_version = -1

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

        qobject: Any = QtCore.QObject

        class _Relayout(qobject):
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
        self.dock_telemetry = self._dock(
            "Telemetry", "telemetry", self.telemetry, QtCore.Qt.DockWidgetArea.RightDockWidgetArea
        )
        self.dock_time = self._dock(
            "Time",
            "time",
            strip_container(self.novelty.widget, self.roi_trace.widget),
            QtCore.Qt.DockWidgetArea.BottomDockWidgetArea,
        )
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

    # -- the state, under the names the viewer had before ViewerState ----------------------------
    @property
    def streams(self) -> StreamChooser:
        return self.state.streams

    @property
    def selection(self) -> dict[str, int]:
        return self.state.selection

    @property
    def seen(self) -> dict[str, dict[int, str]]:
        return self.state.seen

    @property
    def hidden(self) -> set[str]:
        return self.state.hidden

    @property
    def cmaps(self) -> dict[str, str]:
        return self.state.cmaps

    @property
    def paused(self) -> bool:
        return self.state.paused

    @property
    def auto_levels(self) -> bool:
        return self.state.auto_levels

    @property
    def overlay(self) -> bool:
        return self.state.overlay

    @property
    def trust_overlay(self) -> bool:
        return self.state.trust_overlay

    @property
    def status(self) -> dict[str, Any] | None:
        return self.state.status

    @property
    def events(self) -> list[dict[str, Any]]:
        return self.state.events

    @property
    def frames_drawn(self) -> int:
        return self.state.frames_drawn

    @property
    def redraws(self) -> int:
        return self.state.redraws

    @property
    def _messages(self) -> dict[str, tuple[str, str, float | None]]:
        return self.state.messages

    @property
    def _event_mark_until(self) -> float:
        return self.state.event_mark_until

    @_event_mark_until.setter
    def _event_mark_until(self, value: float) -> None:
        self.state.event_mark_until = value

    @property
    def _last_levels(self) -> float:
        return self.state.last_levels

    @_last_levels.setter
    def _last_levels(self, value: float) -> None:
        self.state.last_levels = value

    # -- building --------------------------------------------------------------------------------
    def _dock(self, title: str, name: str, widget: Any, area: Any) -> Any:
        QtWidgets = self.QtWidgets
        dock = QtWidgets.QDockWidget(title, self.win)
        dock.setObjectName(f"dock-{name}")
        dock.setWidget(widget)
        dock.setFeatures(
            QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetClosable
            | QtWidgets.QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        self.win.addDockWidget(area, dock)
        return dock

    def _build_toolbar(self) -> None:
        """The toolbar, in the order of actions.TOOLBAR: the rows of ACTIONS with a widget, and the
        viewer's own widgets (Panels menu, stream and p / c / z selectors, the preview address)."""
        QtWidgets = self.QtWidgets
        tb = QtWidgets.QToolBar("view")
        tb.setObjectName("toolbar")
        tb.setMovable(False)
        self.win.addToolBar(tb)
        self.actions: dict[str, Any] = {}  # action id -> its QAction or QCheckBox
        self._stream_actions: list[Any] = []  # shown only once a second stream was seen
        self.selectors: dict[str, Any] = {}
        previous = ""
        for item in TOOLBAR:
            if item == "|":
                added = [tb.addSeparator()]
            elif item.startswith("@"):
                added = getattr(self, f"_toolbar_{item[1:]}")(tb)
            else:
                added = [self._toolbar_action(tb, BY_ID[item])]
            if item in STREAM_ITEMS or (item == "|" and previous in STREAM_ITEMS):
                self._stream_actions.extend(added)
            previous = item
        for act in self._stream_actions:
            act.setVisible(False)
        # the names the viewer's widgets had before the table (tests, docs/img scripts)
        self.act_auto, self.act_roi, self.act_pause = (self.actions[k] for k in ("auto_levels", "roi", "pause"))
        self.overlay_box, self.trust_box, self.follow_box = (
            self.actions[k] for k in ("overlay", "trust_map", "follow_live")
        )

    def _toolbar_panels(self, tb: Any) -> list[Any]:
        QtWidgets = self.QtWidgets
        self.panels_menu = QtWidgets.QMenu(self.win)
        self.panels_button = QtWidgets.QToolButton()
        self.panels_button.setText("Panels ▾")
        self.panels_button.setToolTip("which panels show (1 … 9)")
        self.panels_button.setMenu(self.panels_menu)
        self.panels_button.setPopupMode(QtWidgets.QToolButton.ToolButtonPopupMode.InstantPopup)
        return [tb.addWidget(self.panels_button)]

    def _toolbar_stream(self, tb: Any) -> list[Any]:
        """The stream selector: shown only once a second stream was seen."""
        QtWidgets, QtCore = self.QtWidgets, self.QtCore
        self.stream_combo = QtWidgets.QComboBox()
        self.stream_combo.setMinimumWidth(150)
        self.stream_combo.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.stream_combo.setToolTip(
            "the stream shown: each camera, live mode, snaps (picking one stops following live mode)"
        )
        self.stream_combo.activated.connect(lambda i: self.choose_stream(self.stream_combo.itemData(i)))
        return [tb.addWidget(QtWidgets.QLabel("Stream")), tb.addWidget(self.stream_combo)]

    def _toolbar_selectors(self, tb: Any) -> list[Any]:
        QtWidgets, QtCore = self.QtWidgets, self.QtCore
        added = []
        for axis, label in (("p", "Position"), ("c", "Channel"), ("z", "Z")):
            added.append(tb.addWidget(QtWidgets.QLabel(label)))
            combo = QtWidgets.QComboBox()
            combo.setMinimumWidth(90)
            combo.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
            combo.addItem("0", 0)
            combo.activated.connect(lambda i, a=axis, cb=combo: self.select(a, cb.itemData(i)))
            added.append(tb.addWidget(combo))
            self.selectors[axis] = combo
        return added

    def _toolbar_spacer(self, tb: Any) -> list[Any]:
        QtWidgets = self.QtWidgets
        spacer = QtWidgets.QWidget()
        spacer.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Preferred)
        return [tb.addWidget(spacer)]

    def _toolbar_source(self, tb: Any) -> list[Any]:
        self.source_label = self.QtWidgets.QLabel(self.connect_address)
        return [tb.addWidget(self.source_label)]

    def _toolbar_action(self, tb: Any, action: Action) -> Any:
        """A row of ACTIONS in the toolbar: a tool button (QAction) or a checkbox. A toggle shows its
        ViewerState attribute and forwards a change to its method; a button calls its method."""
        tip = action.tooltip.format(quiet_s=self.state.streams.quiet_s)
        if action.widget == "checkbox":
            box = self.QtWidgets.QCheckBox(action.label)
            box.setToolTip(tip)
            box.setFocusPolicy(self.QtCore.Qt.FocusPolicy.NoFocus)
            box.setChecked(bool(getattr(self.state, action.checked)))
            box.toggled.connect(lambda on, a=action: self._toggled(a, on))
            self.actions[action.id] = box
            return tb.addWidget(box)
        act = self.QtGui.QAction(action.label, self.win)
        act.setToolTip(tip)
        act.setCheckable(action.toggle)
        if action.toggle:
            act.setChecked(bool(getattr(self.state, action.checked)))
            act.toggled.connect(lambda on, a=action: self._toggled(a, on))
        else:
            act.triggered.connect(lambda *_, a=action: self.trigger(a.id))
        tb.addAction(act)
        self.actions[action.id] = act
        return act

    def _build_shortcuts(self) -> None:
        """A window-wide QShortcut for each row of ACTIONS with a key."""
        QtGui, QtCore = self.QtGui, self.QtCore
        self.shortcuts = []
        for action in ACTIONS:
            if not action.shortcut:
                continue
            sc = QtGui.QShortcut(QtGui.QKeySequence(action.shortcut), self.win)
            sc.setContext(QtCore.Qt.ShortcutContext.WindowShortcut)
            sc.activated.connect(lambda a=action: self.trigger(a.id))
            self.shortcuts.append(sc)

    def trigger(self, action_id: str) -> None:
        """Do the action ``action_id`` (a row of ACTIONS), as its key does: a toggle flips its state."""
        action = BY_ID[action_id]
        args: tuple[Any, ...] = action.args
        if action.toggle:
            args = (*args, not getattr(self.state, action.checked))
        getattr(self, action.method)(*args)

    def _toggled(self, action: Action, on: bool) -> None:
        """The user ticked or unticked a toggle's widget: forward it unless the state already says so
        (the widget was only brought in line with the state)."""
        if bool(getattr(self.state, action.checked)) != on:
            getattr(self, action.method)(*action.args, on)

    def _show_toggles(self) -> None:
        """Every toggle's widget ticked as its ViewerState attribute says."""
        for action_id, widget in self.actions.items():
            action = BY_ID[action_id]
            if action.toggle and widget.isChecked() != bool(getattr(self.state, action.checked)):
                widget.setChecked(bool(getattr(self.state, action.checked)))

    def toggle_dock(self, name: str) -> None:
        """Show or hide a dock: "engines", "telemetry" or "time"."""
        dock = {"engines": self.dock_controls, "telemetry": self.dock_telemetry, "time": self.dock_time}[name]
        dock.setVisible(not dock.isVisible())

    def quit(self) -> None:
        self.win.close()

    # -- panels ----------------------------------------------------------------------------------
    def _panel(self, product: str) -> Any:
        panel = self.panels.get(product)
        if panel is not None:
            return panel
        from .panels import CompositePanel, ImagePanel

        levels = self.state.panel_levels(product)  # the panel draws the state's levels
        panel = CompositePanel(levels) if product == "composite" else ImagePanel(product, levels=levels)
        if product in self.state.cmaps and not panel.composite:
            panel.set_cmap(self.state.cmaps[product])
        if panel.widget.cmap is not None:
            panel.widget.cmap.currentTextChanged.connect(lambda name, p=product: self.state.set_cmap(p, name))
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
                panel.view.setRange(
                    xRange=(f * cx - f * scale * pw / 2, f * cx + f * scale * pw / 2),
                    yRange=(f * cy - f * scale * ph / 2, f * cy + f * scale * ph / 2),
                    padding=0,
                )
        finally:
            self._linking = False

    def _rebuild_panels_menu(self) -> None:
        self.panels_menu.clear()
        for i, name in enumerate(sorted(self.panels, key=_order)):
            act = self.panels_menu.addAction(f"{i + 1}  {name}" if i < 9 else name)
            act.setCheckable(True)
            act.setChecked(name not in self.state.hidden)
            act.toggled.connect(lambda on, n=name: self.set_panel_visible(n, on))

    def set_panel_visible(self, name: str, visible: bool) -> None:
        self.state.set_panel_visible(name, visible)
        for act in self.panels_menu.actions():
            if act.text().split()[-1] == name and act.isChecked() != visible:
                act.setChecked(visible)
        self.relayout()

    def toggle_panel_number(self, number: int) -> None:
        toggled = self.state.toggle_panel_number(self.panels, number)
        if toggled is not None:
            self.set_panel_visible(*toggled)

    def visible_panels(self) -> list[str]:
        """The panels shown: not hidden, and of a product the shown stream has (another
        stream's products keep their panels, out of sight, until it is shown again)."""
        return self.state.visible_panels(self.panels)

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
        best_cols = best_columns(n, w, h, aspect)
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
        self.state.set_roi_visible(on)
        self._show_toggles()
        if self.roi_trace.roi is not None:
            self.roi_trace.roi.setVisible(self.state.roi_visible)

    # -- frames ----------------------------------------------------------------------------------
    def update(self) -> int:
        """Draw the newest preview of each product of the shown stream at the selected position,
        channel and z. Returns the number of panels drawn."""
        st = self.state
        now = time.monotonic()
        new = self.sub.latest()
        if new:
            self.latest.update(new)
            self._note_streams(new, now)
        self._follow_streams(now)  # never while paused: a frozen display keeps its stream
        if new:
            self._note_frames(new)
        st.check_idle(now, self.link.connected)
        self._show_messages_if_changed()
        if st.paused:
            return 0
        sel = st.sel
        drawn = 0
        decomposition_changed = False
        # the newest frame of each channel of the selected position and z, per product
        channels: dict[str, dict[int, Any]] = {}
        if st.overlay:
            for key, frame in self.latest.items():
                if st.in_overlay(key) and frame.array is not None:
                    channels.setdefault(key[1], {})[key[3]] = frame
        for key, frame in sorted(self.latest.items(), key=lambda kv: _order(kv[0][1])):
            if frame.array is None or not st.accept_frame(key):
                continue
            product = key[1]
            panel = self._panel(product)
            group = channels.get(product, {})
            if len(group) > 1 and product not in st.hidden:
                # overlaid: redraw when any channel has a new frame
                overlay_key = (*sel, *sorted((k, f.seq, id(f.header)) for k, f in group.items()))
                if panel.overlaid and panel.overlay_key == overlay_key:
                    continue
                if panel.show_overlay({k: (f.array, f.header) for k, f in group.items()}, sel[1], st.seen["c"]):
                    self._shape_changed(product, frame.array.shape)
                panel.overlay_key = overlay_key
                drawn += 1
            elif panel.seq == frame.seq and panel.header is frame.header and not panel.overlaid:
                continue
            elif product in st.hidden:
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
        self._draw_trust()
        if decomposition_changed and any(k in self.panels for k in DECOMPOSITION):
            composite = self._panel("composite")
            if "composite" not in st.hidden:
                composite.show_composite(self.panels)
                drawn += 1
        if st.levels_due(now):
            for name in self.visible_panels():
                panel = self.panels[name]
                if st.follows_auto_levels(name):
                    panel.auto_levels()
                if st.auto_levels and panel.overlaid:
                    panel.overlay_auto_levels()
                    panel.overlay_key = None  # draw again at the new levels
                panel.update_histogram()
            self.novelty.redraw()
            self.roi_trace.redraw()
        st.note_drawn(drawn, now)
        if drawn and self._cursor is not None:
            self._readout(*self._cursor)
        return drawn

    def _draw_trust(self) -> None:
        """Each panel's trust tint from the newest ``trust_<product>`` map (when the overlay is on)."""
        for name, panel in self.panels.items():
            if panel.composite:
                continue
            key = self.state.trust_map_key(name)
            frame = self.latest.get(key) if self.state.trust_overlay else None
            if frame is None or frame.array is None or panel.array is None or np.ndim(frame.array) != 2:
                if panel.trust_item.isVisible():
                    panel.show_trust_map(None)
                continue
            panel.show_trust_map(frame.array, key=(frame.seq, id(frame.header), id(panel.array)))

    def _note_streams(self, new: dict[tuple, Any], now: float) -> None:
        """Streams (when each sent, which are live mode) and the values each has on each axis."""
        noted = self.state.note_previews(((key, frame.header) for key, frame in new.items()), now)
        for axis in AXES:
            if axis in noted.axes:
                self._refresh_selector(axis)
        if noted.streams_changed:
            self._refresh_stream_selector()

    def _note_frames(self, new: dict[tuple, Any]) -> None:
        """The shown stream's frames: the recent-frame buffer, the novelty strip, restarts, badges."""
        from .panels import show_consistency, show_trust

        st = self.state
        for key, frame in new.items():
            if frame.array is None or not st.in_view(key):
                continue
            product = key[1]
            if st.note_seq(product, frame.seq):  # the stream restarted
                self._show_messages()
                self.novelty.clear()
                self.roi_trace.reset()
                self.buffer.clear()
            self.buffer.add(product, frame.seq, frame.array, frame.header)
            scalars = frame.header.get("scalars") or {}
            panel = self.panels.get(product)
            trust = st.note_trust(product, scalars) if panel is not None else None
            consistency = st.consistency(product, scalars)
            if trust is not None and panel is not None:
                show_trust(panel.widget, *trust)
            elif panel is not None and consistency is not None:
                show_consistency(panel.widget, *consistency)
            point = st.novelty_point(product, frame.header, frame.seq)
            if point is not None:
                self.novelty.add(*point)

    def _shape_changed(self, product: str, shape: tuple[int, ...]) -> None:
        self.say(
            "shape",
            f"The stream changed shape: {product} is now {' × '.join(map(str, shape))}; views and levels were reset.",
            "info",
            8,
        )
        self._grid_order = []
        self.relayout()
        if self.roi_trace.roi is not None and product == "raw":
            self.roi_trace.reset()

    def _sample_roi(self, product: str, frame: Any) -> None:
        if getattr(self, "_roi_pending", False) and self._roi_panel.array is not None:
            self._roi_pending = False
            roi = self.roi_trace.attach(self._roi_panel.view, self._roi_panel.array.shape)
            roi.setVisible(self.state.roi_visible)
            geo = self.state.roi_rect
            if geo:
                roi.setPos(geo[:2])
                roi.setSize(geo[2:])
        if self.roi_trace.roi is None:
            return
        restored = self.state.roi_product(self.panels)
        self.roi_trace.restored_name = restored
        if product in ("raw", restored):
            t = (frame.header.get("index") or {}).get("t", frame.seq)
            self.roi_trace.sample(product, frame.seq, float(t), frame.array)

    # -- selectors -------------------------------------------------------------------------------
    def _refresh_selector(self, axis: str) -> None:
        seen, selection = self.state.seen, self.state.selection
        combo = self.selectors[axis]
        blocker = self.QtCore.QSignalBlocker(combo)
        combo.clear()
        for value in sorted(seen[axis]):
            combo.addItem(seen[axis][value] if axis == "c" else str(value), value)
        combo.setCurrentIndex(max(0, combo.findData(selection[axis])))
        del blocker

    def select(self, axis: str, value: int | None) -> None:
        if not self.state.select(axis, value):
            return
        combo = self.selectors[axis]
        combo.setCurrentIndex(max(0, combo.findData(value)))
        for panel in self.panels.values():
            panel.seq = -1  # redraw from what the new selection holds
            panel.overlay_key = None  # an overlay too: its readout follows the selected channel
        self.novelty.clear()
        self.roi_trace.reset()
        self.buffer.clear()

    def step(self, axis: str, delta: int) -> None:
        value = self.state.step_target(axis, delta)
        if value is not None:
            self.select(axis, value)

    # -- streams ---------------------------------------------------------------------------------
    def _refresh_stream_selector(self) -> None:
        """The streams in first-seen order, live mode marked; shown only with more than one."""
        combo = self.stream_combo
        blocker = self.QtCore.QSignalBlocker(combo)
        combo.clear()
        for name, label in self.state.stream_labels:
            combo.addItem(label, name)
        combo.setCurrentIndex(max(0, combo.findData(self.state.streams.selected)))
        del blocker
        for act in self._stream_actions:
            act.setVisible(self.state.streams.several)

    def choose_stream(self, name: str | None) -> None:
        """The user picked a stream: show it, and stop following live mode (sticky)."""
        if name is not None:
            self.set_stream(name, by_user=True)

    def set_follow(self, on: bool) -> None:
        """Follow live mode by itself (see ui/streams.py), or stay on the stream shown."""
        self.state.set_follow(on)
        self._show_toggles()
        self._show_messages_if_changed()

    def _follow_streams(self, now: float) -> None:
        pick = self.state.follow_pick(now)
        if pick is None:
            return
        before = self.state.streams.selected
        self.set_stream(pick)
        self.state.say_followed(before, pick)
        self._show_messages_if_changed()

    def set_stream(self, name: str, *, by_user: bool = False) -> None:
        """Show ``stream``: its own position, channel and z (as last picked there), its products'
        panels; the history of the stream shown before (novelty, ROI trace, buffer) starts over."""
        changed = self.state.show_stream(name, by_user=by_user, keys=self.latest)
        self._show_toggles()  # a pick by hand unticks Follow live
        self._show_messages_if_changed()
        for axis in self.selectors:
            self._refresh_selector(axis)
        self.stream_combo.setCurrentIndex(max(0, self.stream_combo.findData(name)))
        if not changed:
            return
        for panel in self.panels.values():  # auto levels were forgotten: from the new stream's first frame
            panel.seq = -1
            panel.overlay_key = None
            panel.shape = None  # another camera's frames: fit them, no "the stream changed shape"
            panel.show_trust_map(None)
            panel.show_event_box(None)
            panel.show_event_mark(None)
            panel.widget.trust.setVisible(False)
            panel.widget.latency.setText("")
        self.novelty.clear()
        self.roi_trace.reset()
        self.buffer.clear()
        self._grid_order = []
        self._relayout_after_draw = True
        self.relayout()

    # -- levels, view, modes ---------------------------------------------------------------------
    def set_overlay(self, on: bool) -> None:
        """Overlay every channel of the selected position and z in its colour, or (off) show the
        channel picked in the selector through each panel's colour map."""
        self.state.set_overlay(on)
        self._show_toggles()
        for panel in self.panels.values():
            panel.seq = -1
            panel.overlay_key = None
        self._show_messages_if_changed()
        if not self.state.paused:
            self.update()

    def set_trust_overlay(self, on: bool) -> None:
        """Tint low-trust regions of every product a trust engine scores (T), or hide the tints."""
        self.state.set_trust_overlay(on, self.latest)
        self._show_toggles()
        self._show_messages_if_changed()
        self._draw_trust()

    def set_auto_levels(self, on: bool) -> None:
        self.state.set_auto_levels(on)
        self._show_toggles()

    def auto_contrast(self) -> None:
        self.state.auto_contrast()
        for panel in self.panels.values():
            panel.auto_levels()
            panel.update_histogram()
        if "composite" in self.panels:
            self.panels["composite"].show_composite(self.panels)

    def fit(self) -> None:
        for panel in self.panels.values():
            if panel.shape is not None:
                panel.view.autoRange(padding=0)

    def set_paused(self, on: bool) -> None:
        self.state.set_paused(on)
        self._show_toggles()
        if not on:
            self._resumed()
        self._show_messages_if_changed()

    def _resumed(self) -> None:
        """Back to live: every panel draws the newest frame again, without an event's box."""
        for panel in self.panels.values():
            panel.seq = -1
            panel.overlay_key = None
            panel.show_event_box(None)

    def go_live(self) -> None:
        if self.state.paused:
            self.set_paused(False)

    def show_event(self, event: dict[str, Any]) -> None:
        """Pause and show the buffered frames nearest an event's seq."""
        seq = self.state.focus_event(event)
        if seq is None:
            return
        self._show_toggles()  # paused
        shown = []
        for name, panel in self.panels.items():
            if panel.composite:
                continue
            found = self.buffer.nearest(name, seq)
            if found is not None:
                panel.show_frame(*found)
                shown.append(int(found[1].get("seq", -1)))
        if "composite" in self.panels and shown:
            self.panels["composite"].show_composite(self.panels)
        rule = self.draw_event_box(event)
        self.state.say_event(event, shown, rule, self.buffer.max_bytes >> 20)
        self._show_messages_if_changed()

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
        newest = self.state.event_to_mark(events)
        if raw is None or raw.array is None or newest is None:
            return
        stride, _ = event_stride(dict(newest), raw.header, raw.array.shape[:2])
        point = event_point(dict(newest), stride)
        if point is not None:
            raw.show_event_mark(point)
            self.state.mark_event(time.monotonic())

    # -- cursor readout --------------------------------------------------------------------------
    def _mouse_moved(self, panel: Any, scene_pos: Any) -> None:
        if not panel.view.sceneBoundingRect().contains(scene_pos):
            return
        pt = panel.view.mapSceneToView(scene_pos)
        shape = panel.array.shape[:2] if panel.array is not None else None
        self._cursor = (pt.x(), pt.y(), shape)
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
        ref = next(
            (self.panels[n] for n in self.visible_panels() if self.panels[n].header.get("pixel_size_um")), None
        )  # a panel of the shown stream: another camera's pixels may be another size
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
        st = self.state
        for kind, payload in self.link.drain():
            st.note_link(kind, payload)  # the status, events, and what the banner says of them
            if kind == "status":
                self.controls.follow(payload)
                self.telemetry.update_status(payload, self.display_fps())
            elif kind == "events":
                self.novelty.add_events(payload)
                self.mark_newest_event(payload)
            elif kind == "reply":
                self.controls.show_reply(*payload)
            elif kind == "down":
                self.status_label.setText(f"<span style='color:#ff5a52'>●</span> no daemon at {payload}")
            elif kind == "restarted":
                self.novelty.clear()
                self.roi_trace.reset()
        if st.event_mark_expired(time.monotonic()):
            raw = self.panels.get("raw")
            if raw is not None:
                raw.show_event_mark(None)
        if st.status is not None and self.link.connected:
            from .telemetry import status_line

            self.status_label.setText(status_line(st.status, self.display_fps()))
        elif not self.control_address:
            self.status_label.setText(f"previews from {self.connect_address} · display {self.display_fps():.0f} fps")
        self._show_messages()

    def display_fps(self) -> float:
        return self.state.display_fps()

    # -- messages ---------------------------------------------------------------------------------
    def say(self, key: str, text: str, level: str = "info", seconds: float | None = None) -> None:
        """A message in the banner above the panels; never a dialog (nothing blocks the display)."""
        self.state.say(key, text, level, seconds)
        self._show_messages()

    def unsay(self, key: str) -> None:
        if self.state.unsay(key):
            self._show_messages()

    def _show_messages_if_changed(self) -> None:
        if self.state.messages_version != self._banner_version:
            self._show_messages()

    def _show_messages(self) -> None:
        """The banner: what ViewerState.banner() says (expired messages dropped)."""
        from .style import COLORS

        shown = self.state.banner()
        self._banner_version = self.state.messages_version
        if shown is None:
            self.banner.setVisible(False)
            return
        level, text = shown
        colours = {
            "error": ("#3a1d1f", COLORS["bad"]),
            "warn": ("#3a2f1a", COLORS["warn"]),
            "info": ("#1c2736", "#9cc7f0"),
            "ok": ("#1c3322", COLORS["ok"]),
        }
        bg, fg = colours.get(level, colours["info"])
        self.banner.setStyleSheet(f"background:{bg}; color:{fg}; border-bottom:1px solid {fg};")
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
        state: dict[str, Any] = {
            "panels": {},
            "window": [self.win.width(), self.win.height()],
            "stream": self.state.streams.selected,
            "streams": self.state.streams.names(),
        }
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
                "seq": panel.seq,
                "levels": list(panel.levels) if panel.levels else None,
                "cmap": panel.cmap_name,
                "image_rect": [tl.x(), tl.y(), br.x(), br.y()],
                "view_rect": [vtl.x(), vtl.y(), vbr.x(), vbr.y()],
                "composite": panel.composite,
                "saturated_overlay": bool(panel.saturation.isVisible()),
                "trust_overlay": bool(panel.trust_item.isVisible()),
                "latency_ms": panel.header.get("latency_ms"),
                "stream": panel.header.get("stream"),
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
        for name, panel in self.panels.items():
            if not panel.composite:
                self.state.set_cmap(name, panel.cmap_name)
        roi = self.roi_trace.roi
        if roi is not None:
            self.state.roi_rect = [*map(float, roi.pos()), *map(float, roi.size())]
        for key, value in self.state.to_settings().items():
            write_json(s, key, value)
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


def _fmt_value(v: float) -> str:
    if v == int(v) and abs(v) < 1e7:
        return f"{int(v)}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3g}"


def run_viewer(
    connect: str = DEFAULT_PUBLISH,
    control: str | None = DEFAULT_CONTROL,
    *,
    screenshot: str | None = None,
    seconds: float | None = None,
    settings_path: str | None = None,
    dump: str | None = None,
    curve: Any = None,
) -> int:
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
    return run_viewer(
        a.connect, a.control or None, screenshot=a.screenshot, seconds=a.seconds, settings_path=a.settings, dump=a.dump
    )


if __name__ == "__main__":
    sys.exit(main())
