"""The live dock widget: a running daemon's previews as napari layers, updated in place.

A thread subscribes to the daemon's preview socket (``PreviewSubscriber``, PUB/SUB: the newest
frame of each product, already downsampled by the daemon) and keeps only the newest frame per
key; a timer on the GUI thread, at screen rate, copies each new frame into its layer's own array
(one layer per product, never a new layer per frame) and has napari's canvas upload that layer's
texture again, nothing more (the dock sets its levels once a second, and napari re-slices the
layer and redraws its thumbnail every five seconds). The control socket is the live viewer's
``DaemonLink`` (its own thread: a daemon that is away never freezes napari), asked for ``status``
twice a second and for new ``events`` once a second; the widget shows the counts, lists the events
and turns engines on and off.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from napari.components import ViewerModel
from qtpy import QtCore, QtWidgets
from vispy.visuals import ImageVisual

from ...bridges.protocol import Frame
from ...bridges.store import COLORS
from ...bridges.transport import DEFAULT_CONTROL, DEFAULT_INGEST, DEFAULT_PUBLISH, PreviewSubscriber
from ..link import DaemonLink
from ._attach import DaemonProcess, core_name, default_out, find_core

__all__ = ["LiveWidget", "PreviewThread", "grid_of", "layer_name", "telemetry_text"]

log = logging.getLogger(__name__)

Key = tuple[str, str, int, int, int]  # (stream, product, p, c, z), as PreviewSubscriber.latest() gives it
LEVELS_EVERY_S = 1.0  # display levels: percentiles now and then, never per frame (as the live viewer)
THUMBNAIL_EVERY_S = 5.0  # napari's refresh of a layer (its thumbnail: the layer list repaints) less often still
# levels are set again when they moved more than this share of their range: the percentiles of a
# noisy frame wander a few % from frame to frame, and each set has napari redraw the layer's
# thumbnail, list row and controls (measured: a 2 % margin set them nearly every second)
LEVELS_TOLERANCE = 0.05
EVENTS_SHOWN = 500


class PreviewThread:
    """Drains the preview socket on its own thread; :meth:`take` hands the GUI the newest frame
    per key that arrived since the last call."""

    def __init__(self, address: str, *, curve: Any = None, poll_s: float = 0.005) -> None:
        self.sub = PreviewSubscriber(address, curve=curve)
        self.poll_s = poll_s
        self._latest: dict[Key, Frame] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livescope-napari-previews", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                new = self.sub.latest()
                if new:
                    with self._lock:
                        self._latest.update(new)
                self._stop.wait(self.poll_s)
        finally:
            self.sub.close()  # a socket is closed by the thread that used it

    def take(self) -> dict[Key, Frame]:
        with self._lock:
            out, self._latest = self._latest, {}
        return out

    @property
    def received(self) -> int:
        return self.sub.received

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def layer_name(key: Key, first_stream: str | None, channel: str | None = None) -> str:
    """``live raw``, ``live denoised p1``, ``live raw camB c1`` (the first stream's name is left out)."""
    stream, product, p, c, _z = key
    parts = ["live", product]
    if stream and first_stream is not None and stream != first_stream:
        parts.append(stream)
    if p:
        parts.append(f"p{p}")
    if c:
        parts.append(channel or f"c{c}")
    return " ".join(parts)


def _display_levels(arr: np.ndarray) -> tuple[float, float]:
    sample = np.asarray(arr[::4, ::4], dtype=np.float32)
    finite = sample[np.isfinite(sample)]
    if not finite.size:
        return (0.0, 1.0)
    lo, hi = (float(v) for v in np.percentile(finite, (0.5, 99.8)))
    return (lo, hi if hi > lo else lo + 1.0)


def _moved(old: tuple[float, float], new: tuple[float, float], tolerance: float = LEVELS_TOLERANCE) -> bool:
    """Whether display levels moved by more than ``tolerance`` of the old range at either end."""
    span = max(abs(old[1] - old[0]), 1e-12)
    return abs(new[0] - old[0]) > tolerance * span or abs(new[1] - old[1]) > tolerance * span


def _colormap(c: int, n_channels_seen: int) -> Any:
    if n_channels_seen <= 1:
        return "gray"
    from napari.utils.colormaps import Colormap

    hexa = COLORS[c % len(COLORS)]
    rgb = [int(hexa[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    return Colormap([[0.0, 0.0, 0.0, 1.0], [*rgb, 1.0]], name=f"livescope #{hexa}")


class LiveWidget(QtWidgets.QWidget):
    """*Plugins > livescope live*: addresses, connect / disconnect, telemetry, events, engines."""

    def __init__(
        self,
        napari_viewer: ViewerModel,
        *,
        preview: str = DEFAULT_PUBLISH,
        control: str | None = DEFAULT_CONTROL,
        ingest: str = DEFAULT_INGEST,
        engines: str = "",
        out: str = "",
        daemon_args: list[str] | None = None,
        fps: float = 60.0,
    ) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.previews: PreviewThread | None = None
        self.link: DaemonLink | None = None
        self.layers: dict[str, Any] = {}  # layer name -> the layer this widget updates
        self.updates: dict[str, int] = {}  # layer name -> frames drawn (tests, the benchmark)
        self.frames_drawn = 0
        self.texture_updates = 0  # frames drawn by uploading the texture only (see _texture_node)
        self.status: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._first_stream: str | None = None
        self._channels: set[int] = set()
        self._levels_at: dict[str, float] = {}
        self._thumbnail_at: dict[str, float] = {}
        self._fixed: set[str] = set()  # layers whose contrast limits the user set: auto levels leave them
        self._setting_levels = False  # the dock itself is setting contrast limits (not the user)
        # layers whose levels (and, every few seconds, napari's refresh with the thumbnail) may run
        # in this tick: one, so six layers' slow updates are spread over six paints, never one slow one
        self._slow_left = 1
        self._names: dict[Key, str] = {}  # each key's layer name, as _show made it
        self.engine_boxes: dict[str, QtWidgets.QCheckBox] = {}
        # attached to a Micro-Manager core: the bridge, and the daemon this dock started
        self.core: Any = None
        self.bridge: Any = None
        self.daemon: DaemonProcess | None = None
        self.daemon_args = list(daemon_args or [])
        self._attach_pending = False

        self.preview_edit = QtWidgets.QLineEdit(preview)
        self.control_edit = QtWidgets.QLineEdit(control or "")
        self.curve_box = QtWidgets.QCheckBox("CURVE (the daemon runs --curve)")
        self.grid_box = QtWidgets.QCheckBox("grid: one tile per product")
        self.grid_box.setChecked(True)
        self.auto_levels_box = QtWidgets.QCheckBox("auto levels (percentiles, once a second)")
        self.auto_levels_box.setChecked(True)
        self.auto_levels_box.setToolTip(
            "the live layers' contrast limits follow their frames; a layer whose contrast limits you "
            "set in napari keeps them until this box is ticked again"
        )
        self.auto_levels_box.toggled.connect(self._auto_levels_toggled)
        self.connect_button = QtWidgets.QPushButton("Connect")
        self.connect_button.clicked.connect(self.toggle_connection)
        self.state_label = QtWidgets.QLabel("not connected")
        self.state_label.setWordWrap(True)
        self.telemetry = QtWidgets.QLabel("")
        self.telemetry.setWordWrap(True)
        self.telemetry.setTextInteractionFlags(QtCore.Qt.TextInteractionFlag.TextSelectableByMouse)
        # how fast napari draws against how fast previews come (once a second): napari drawing in
        # software OpenGL, or a busy machine, shows here as a rate below the previews'
        self.rate_label = QtWidgets.QLabel("")
        self.rate_label.setWordWrap(True)
        self.draw_rate = 0.0  # ticks a second that drew new frames (canvas updates)
        self.arrival_rate = 0.0  # previews a second per live layer
        self._rate_at = (time.monotonic(), 0, 0)  # when, ticks that drew, previews received
        self._ticks_drawn = 0
        self._receiving = False  # a frame came since connecting
        self.engines_box = QtWidgets.QGroupBox("Engines")
        self.engines_layout = QtWidgets.QVBoxLayout(self.engines_box)
        self.event_list = QtWidgets.QListWidget()
        self.event_list.itemActivated.connect(self._go_to_event)

        self.mm_box = QtWidgets.QGroupBox("Micro-Manager core")
        self.ingest_edit = QtWidgets.QLineEdit(ingest)
        self.chain_edit = QtWidgets.QLineEdit(engines)
        self.chain_edit.setPlaceholderText("the daemon's default chain")
        self.chain_edit.setToolTip("a daemon this dock starts runs these engines, e.g. register,denoise,deconvolve")
        self.out_edit = QtWidgets.QLineEdit(out)
        self.out_edit.setPlaceholderText("~/livescope-DATE-TIME.zarr")
        self.out_edit.setToolTip("where a daemon this dock starts saves raw and products (OME-Zarr)")
        self.attach_button = QtWidgets.QPushButton("Attach to the Micro-Manager core")
        self.attach_button.setToolTip(
            "stream every frame of the core's acquisitions (MDA, live, snaps) to the daemon at these "
            "addresses, starting one when none answers, and show its products here"
        )
        self.attach_button.clicked.connect(self.toggle_attach)
        self.attach_label = QtWidgets.QLabel("")
        self.attach_label.setWordWrap(True)
        mm_form = QtWidgets.QFormLayout(self.mm_box)
        mm_form.addRow("Ingest", self.ingest_edit)
        mm_form.addRow("Engines", self.chain_edit)
        mm_form.addRow("Save to", self.out_edit)
        mm_form.addRow(self.attach_button)
        mm_form.addRow(self.attach_label)

        form = QtWidgets.QFormLayout()
        form.addRow("Previews", self.preview_edit)
        form.addRow("Control", self.control_edit)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.curve_box)
        layout.addWidget(self.grid_box)
        layout.addWidget(self.auto_levels_box)
        layout.addWidget(self.connect_button)
        layout.addWidget(self.mm_box)
        layout.addWidget(self.state_label)
        layout.addWidget(self.telemetry)
        layout.addWidget(self.rate_label)
        layout.addWidget(self.engines_box)
        layout.addWidget(QtWidgets.QLabel("Events (double-click: go to its time point)"))
        layout.addWidget(self.event_list, 1)

        self.timer = QtCore.QTimer(self)
        self.timer.setInterval(max(1, int(1000 / fps)))
        self.timer.timeout.connect(self.tick)
        app = QtWidgets.QApplication.instance()
        if app is not None:  # quitting napari stops what this dock started
            app.aboutToQuit.connect(self.shutdown)

    # -- connection ------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.previews is not None

    def toggle_connection(self) -> None:
        if self.connected:
            self.disconnect_daemon()
        else:
            self.connect_daemon()

    def connect_daemon(self) -> None:
        """Subscribe to the previews and open the control link at the addresses in the fields."""
        if self.connected:
            return
        curve = None
        if self.curve_box.isChecked():
            from ...bridges.auth import CurveClient, CurveKeysMissing

            try:
                curve = CurveClient.from_dir()
            except (CurveKeysMissing, OSError) as exc:
                self.state_label.setText(f"CURVE keys: {exc}")
                return
        preview = self.preview_edit.text().strip()
        control = self.control_edit.text().strip() or None
        try:
            self.previews = PreviewThread(preview, curve=curve)
        except Exception as exc:  # a malformed address: said in the widget, napari goes on
            self.state_label.setText(f"cannot subscribe to {preview}: {exc}")
            return
        self.link = DaemonLink(control, curve=curve) if control else None
        if self.grid_box.isChecked():
            grid_of(self.viewer).enabled = True
        self.connect_button.setText("Disconnect")
        self.state_label.setText(f"subscribed to {preview}; waiting for frames")
        self._rate_at = (time.monotonic(), self._ticks_drawn, 0)  # a new subscription counts from 0
        self._receiving = False
        self.timer.start()

    def disconnect_daemon(self) -> None:
        self.timer.stop()
        if self.previews is not None:
            self.previews.close()
            self.previews = None
        if self.link is not None:
            self.link.close()
            self.link = None
        self.connect_button.setText("Connect")
        self.state_label.setText("not connected (the layers keep the last frames)")
        self.rate_label.setText("")

    def closeEvent(self, event: Any) -> None:  # noqa: N802 (Qt's name)
        self.shutdown()
        super().closeEvent(event)

    def shutdown(self) -> None:
        """Detach from the core, stop the daemon this dock started (it flushes its store), disconnect."""
        self.detach_core()
        if self.daemon is not None:
            self.daemon.stop()
        self.disconnect_daemon()

    # -- attached to a Micro-Manager core -----------------------------------------------------------
    @property
    def attached(self) -> bool:
        return self.bridge is not None

    def toggle_attach(self) -> None:
        if self.attached or self._attach_pending:
            self.detach_core()
        else:
            self.attach_core()

    def attach_core(self) -> None:
        """Find the core, then (on the link's first answer, in :meth:`_on_link`) attach the bridge
        to the daemon at the dock's addresses or start one."""
        if self.attached or self._attach_pending:
            return
        found = find_core(self.viewer)
        if found is None:
            self.attach_label.setText(
                "no Micro-Manager core in this napari: open napari-micromanager's window "
                "(Plugins > napari-micromanager), or make a pymmcore_plus.CMMCorePlus, first"
            )
            return
        self.core, where = found
        if not self.control_edit.text().strip():
            self.attach_label.setText("the Control address is needed: it says whether a daemon is running")
            return
        if self.daemon is not None and not self.daemon.running:
            self.daemon = None  # the one this dock started earlier has finished
        if self.connected and not (self.link is not None and self.link.connected):
            self.disconnect_daemon()  # a link that already said "down" says it once: start afresh
        if not self.connected:
            self.connect_daemon()
            if not self.connected:
                return
        self._attach_pending = True
        self.attach_button.setText("Detach")
        control = self.control_edit.text().strip()
        self.attach_label.setText(f"{core_name(self.core)} from {where}; asking the daemon at {control}")
        if self.link is not None and self.link.connected and self.status:  # already answering
            self._attach_to_daemon(self.status)

    def _start_daemon(self) -> None:
        out_text = self.out_edit.text().strip()
        out = Path(out_text).expanduser() if out_text else default_out()
        try:
            self.daemon = DaemonProcess(
                ingest=self.ingest_edit.text().strip(),
                publish=self.preview_edit.text().strip(),
                control=self.control_edit.text().strip(),
                out=out,
                engines=self.chain_edit.text().strip().replace(" ", ""),
                extra=self.daemon_args,
            )
        except OSError as exc:
            self._attach_failed(f"could not start a daemon: {exc}")
            return
        self.attach_label.setText(f"no daemon answered: started one (pid {self.daemon.pid}), saving to {out}")

    def _attach_to_daemon(self, status: Mapping[str, Any]) -> None:
        self._attach_pending = False
        source = str(status.get("source", ""))
        if not source.startswith("zmq"):
            self._attach_failed(
                f"the daemon at {self.control_edit.text()} reads from {source!r}, not from an ingest socket: "
                "stop it, or give the addresses of a daemon run with --source zmq"
            )
            return
        from ...bridges.mmcore import attach

        ingest = self.ingest_edit.text().strip()
        try:
            self.bridge = attach(self.core, ingest)
        except Exception as exc:  # a malformed address, a core that is not a pymmcore-plus core
            self._attach_failed(f"cannot attach to {ingest}: {exc}")
            return
        self.attach_button.setText("Detach")
        self._show_bridge()

    def _attach_failed(self, text: str) -> None:
        self._attach_pending = False
        self.attach_button.setText("Attach to the Micro-Manager core")
        self.attach_label.setText(text)

    def _show_bridge(self) -> None:
        b = self.bridge
        if b is None:
            return
        started = f"; daemon pid {self.daemon.pid} saving to {self.daemon.out}" if self.daemon is not None else ""
        self.attach_label.setText(
            f"attached to {core_name(self.core)} -> {b.address}: {b.sent} frames sent, {b.dropped} dropped, "
            f"{b.acquisitions} acquisitions{started}"
        )

    def detach_core(self) -> None:
        """Close the bridge (its queued frames are sent first); a daemon this dock started is asked
        to stop, and the dock disconnects when it has saved everything."""
        self._attach_pending = False
        text = ""
        if self.bridge is not None:
            b, self.bridge = self.bridge, None
            b.close()
            text = f"detached: {b.sent} frames sent, {b.dropped} dropped"
        self.attach_button.setText("Attach to the Micro-Manager core")
        if self.daemon is not None and self.daemon.running:
            self.daemon.request_stop()
            text += f"; the daemon is finishing {self.daemon.out}"
        if text:
            self.attach_label.setText(text.removeprefix("; "))

    def _watch_daemon(self) -> None:
        """The daemon this dock started: failed to start, or finished after a detach."""
        d = self.daemon
        if d is None or d.running:
            return
        self.daemon = None
        if self._attach_pending:
            self._attach_failed(f"the daemon did not start (exit {d.returncode}):\n{d.log_tail()}")
        elif self.bridge is not None:  # it went away under the bridge (killed, or stopped by `livescope stop`)
            self.detach_core()
            self.attach_label.setText(f"the daemon stopped (exit {d.returncode}); detached")
        else:
            self.attach_label.setText(
                f"the daemon stopped (exit {d.returncode}); its store: {d.out}"
                if d.returncode == 0
                else f"the daemon stopped (exit {d.returncode}):\n{d.log_tail()}"
            )
        d.stop()  # closes its log file
        self.disconnect_daemon()

    # -- each tick, on the GUI thread ------------------------------------------------------------
    def tick(self) -> None:
        if self.daemon is not None:
            self._watch_daemon()
        if self.previews is not None:
            frames = self.previews.take()
            if frames:
                if not self._receiving:
                    self._receiving = True
                    if self.link is None:  # with a link, its state line stays
                        self.state_label.setText(f"receiving previews from {self.preview_edit.text().strip()}")
                self.draw(frames)
                self._ticks_drawn += 1
            self._update_rates(self.previews.received)
        if self.link is not None:
            for kind, payload in self.link.drain():
                self._on_link(kind, payload)

    def _update_rates(self, received: int) -> None:
        now = time.monotonic()
        t0, drawn0, received0 = self._rate_at
        if now - t0 < 1.0:
            return
        dt = now - t0
        self.draw_rate = (self._ticks_drawn - drawn0) / dt
        self.arrival_rate = (received - received0) / dt / max(len(self.layers), 1)
        self._rate_at = (now, self._ticks_drawn, received)
        self.rate_label.setText(
            f"napari redraws {self.draw_rate:.1f}/s with new frames; previews arrive at "
            f"{self.arrival_rate:.1f}/s per layer (the newest is drawn, older ones skipped)"
        )

    def draw(self, frames: dict[Key, Frame]) -> None:
        """One tick's newest frames into their layers. One slow update a tick (levels, napari's
        refresh): the layer whose levels are the oldest goes first, so it goes round every layer
        however many there are; new products come first, in key order (their grid tiles)."""
        self._slow_left = 1
        n_layers = len(self.layers)
        order = sorted(frames)
        order.sort(key=lambda k: self._levels_at.get(self._names.get(k, ""), 0.0))  # stable
        for key in order:
            self._show(key, frames[key])
        if len(self.layers) > n_layers:  # a new product: every tile fits its view again
            self.viewer.reset_view()

    def _show(self, key: Key, frame: Frame) -> None:
        if frame.array is None:
            return
        if self._first_stream is None:
            self._first_stream = key[0]
        h = frame.header
        self._channels.add(key[3])
        name = layer_name(key, self._first_stream, h.get("channel") if key[3] else None)
        self._names[key] = name
        arr = np.asarray(frame.array)
        if arr.dtype == np.float16:  # vispy has no half-float textures
            arr = arr.astype(np.float32)
        px = h.get("pixel_size_um")
        scale = (float(px), float(px)) if px else (1.0, 1.0)
        layer = self.layers.get(name)
        if layer is None or layer not in self.viewer.layers:  # first frame, or the user deleted it
            layer = self.viewer.add_image(
                np.array(arr),  # the layer's own, writable copy: later frames are copied into it
                name=name,
                scale=scale,
                units=("micrometer", "micrometer") if px else ("pixel", "pixel"),
                colormap=_colormap(key[3], len(self._channels)),
                contrast_limits=_display_levels(arr),
                blending="additive",
                metadata={"livescope": {"live": True, "key": key}},
            )
            self.layers[name] = layer
            self._levels_at[name] = self._thumbnail_at[name] = time.monotonic()
            self._fixed.discard(name)
            layer.events.contrast_limits.connect(lambda _e, name=name: self._contrast_set(name))
        elif not layer.visible:
            return  # a hidden layer is not drawn: its data waits for the next frame after it is shown
        else:
            now = time.monotonic()
            levels = self._slow_left > 0 and now - self._levels_at.get(name, 0.0) >= LEVELS_EVERY_S
            if levels:
                self._slow_left -= 1
            thumbnail = levels and now - self._thumbnail_at.get(name, 0.0) >= THUMBNAIL_EVERY_S
            if thumbnail:
                self._thumbnail_at[name] = now
            data = layer.data
            if (
                isinstance(data, np.ndarray)
                and data.shape == arr.shape
                and data.dtype == arr.dtype
                and data.flags.writeable
            ):
                # the same layer, its new frame copied into its own array; then either only the
                # texture is uploaded again (the canvas draws from a view of that array), or, every
                # few seconds and wherever there is no such view, napari re-slices the layer (its
                # dims and extent kept) and redraws its thumbnail (and the layer list repaints:
                # once a second for each of six layers cost a tenth of the frame rate, measured)
                np.copyto(data, arr)
                node = None if thumbnail else self._texture_node(layer)
                if node is not None:
                    node.set_data(node._data)  # the same view, uploaded again when the canvas paints
                    self.texture_updates += 1
                else:
                    layer.refresh(thumbnail=thumbnail, highlight=False, extent=False)
            else:  # another shape or dtype (binning changed): the layer's data replaced
                with self._dock_sets_levels():  # napari may fit the contrast limits to the new data
                    layer.data = np.array(arr)
            if tuple(layer.scale) != scale:
                layer.scale = scale
            if levels:
                self._levels_at[name] = now
                if self.auto_levels_box.isChecked() and name not in self._fixed:
                    new = _display_levels(arr)
                    if _moved(tuple(layer.contrast_limits), new):  # napari redraws its controls for each set
                        with self._dock_sets_levels():
                            layer.contrast_limits = new
        layer.metadata["livescope"].update(
            seq=h.get("seq"), t=(h.get("index") or {}).get("t"), latency_ms=h.get("latency_ms"), z=key[4]
        )
        if h.get("scalars"):
            layer.metadata["livescope"]["scalars"] = dict(h["scalars"])
        self.updates[name] = self.updates.get(name, 0) + 1
        self.frames_drawn += 1

    # -- levels ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _dock_sets_levels(self) -> Iterator[None]:
        """Contrast-limit changes inside are the dock's, not the user's."""
        self._setting_levels = True
        try:
            yield
        finally:
            self._setting_levels = False

    def _contrast_set(self, name: str) -> None:
        """A layer's contrast limits changed: by the user (napari's slider, its auto-contrast
        button, code) unless the dock set them; the user's stay, auto levels leave that layer."""
        if not self._setting_levels:
            self._fixed.add(name)

    def _auto_levels_toggled(self, on: bool) -> None:
        """Ticked: every live layer follows its frames' percentiles again, from the next tick."""
        if on:
            self._fixed.clear()
            self._levels_at = dict.fromkeys(self._levels_at, 0.0)

    def _texture_node(self, layer: Any) -> Any:
        """The vispy node that draws ``layer`` on napari's canvas, when the data it uploads is a view
        of the layer's own array (no copy, no dtype conversion, a 2D image): a frame copied into
        the array is then in that view already, and uploading it again is all a redraw needs.
        None otherwise (no canvas, as with a ``ViewerModel``; a 3D view; data napari converted):
        the caller refreshes the layer through napari."""
        canvas = getattr(getattr(getattr(self.viewer, "window", None), "_qt_viewer", None), "canvas", None)
        visuals = getattr(canvas, "layer_to_visual", None)  # napari's VispyCanvas (>= 0.5), no public handle
        if visuals is None:
            return None
        node = getattr(visuals.get(layer), "node", None)
        source = getattr(node, "_data", None)
        if (
            not isinstance(node, ImageVisual)
            or not isinstance(source, np.ndarray)
            or source.ndim != 2
            or not np.may_share_memory(source, layer.data)
        ):
            return None
        return node

    # -- the control link ------------------------------------------------------------------------
    def _on_link(self, kind: str, payload: Any) -> None:
        if kind == "status":
            self.status = payload
            self.telemetry.setText(telemetry_text(payload))
            self._update_engines(payload.get("engines") or {})
            self._show_bridge()
        elif kind == "events":
            self._add_events(payload)
        elif kind == "down":
            self.state_label.setText(f"no daemon answers at {payload}: is it running? (reconnecting by itself)")
            if self._attach_pending and self.daemon is None:
                self._start_daemon()
        elif kind == "up":
            self.state_label.setText(f"connected to {self.control_edit.text().strip()}")
            if self._attach_pending:
                self._attach_to_daemon(payload)
        elif kind == "restarted":
            self.state_label.setText("the daemon restarted: counters and events start over")
            self.events.clear()
            self.event_list.clear()
        elif kind == "refused":
            self.state_label.setText(f"the daemon refused: {payload}")
        elif kind == "reply":
            request, answer = payload
            ok = answer.get("ok", False)
            self.state_label.setText(
                f"{request.get('cmd')} {request.get('engine', '')}: " + ("✓" if ok else answer.get("error", "refused"))
            )

    def _add_events(self, events: list[dict[str, Any]]) -> None:
        for ev in events:
            self.events.append(ev)
            score = ev.get("score")
            text = f"#{ev.get('id')}  t={ev.get('t')}  {ev.get('kind', 'event')}"
            if isinstance(score, int | float):
                text += f"  {score:.3g}"
            if ev.get("stream"):
                text += f"  [{ev['stream']}]"
            item = QtWidgets.QListWidgetItem(text)
            item.setData(QtCore.Qt.ItemDataRole.UserRole, ev)
            self.event_list.addItem(item)
        while self.event_list.count() > EVENTS_SHOWN:
            self.event_list.takeItem(0)
        del self.events[:-EVENTS_SHOWN]
        self.event_list.scrollToBottom()

    def _go_to_event(self, item: QtWidgets.QListWidgetItem) -> None:
        """Events name their time point; with a store layer open, step its t slider there."""
        ev = item.data(QtCore.Qt.ItemDataRole.UserRole) or {}
        labels = list(getattr(self.viewer.dims, "axis_labels", ()))
        if "t" in labels and ev.get("t") is not None:
            self.viewer.dims.set_current_step(labels.index("t"), int(ev["t"]))  # a step, whatever t's scale

    def _update_engines(self, engines: Mapping[str, Any]) -> None:
        for name, info in engines.items():
            box = self.engine_boxes.get(name)
            if box is None:
                box = QtWidgets.QCheckBox(name)
                box.toggled.connect(lambda on, engine=name: self._set_engine(engine, on))
                self.engines_layout.addWidget(box)
                self.engine_boxes[name] = box
            box.blockSignals(True)  # follow the daemon: never a command for what it already says
            box.setChecked(bool(info.get("enabled")))
            box.blockSignals(False)
            box.setToolTip(info.get("reason") or "")

    def _set_engine(self, engine: str, on: bool) -> None:
        if self.link is not None:
            self.link.request("enable" if on else "disable", engine=engine)


def grid_of(viewer: Any) -> Any:
    """The viewer's grid settings: ``viewer.canvas.grid`` from napari 0.9, ``viewer.grid`` before."""
    canvas = getattr(viewer, "canvas", None)
    return canvas.grid if canvas is not None and hasattr(canvas, "grid") else viewer.grid


def telemetry_text(status: Mapping[str, Any]) -> str:
    """The daemon's counts in a few lines: received, saved, lost, skipped, rejected, rates."""
    f = status.get("frames") or {}
    skipped = f.get("skipped") or {}
    fps = status.get("fps") or {}
    lines = [
        f"state {status.get('state', '?')}",
        f"received {f.get('received', 0)} · saved {f.get('saved', 0)} · lost {f.get('lost', 0)}"
        f" · rejected {f.get('rejected', 0)}",
        f"skipped frames {f.get('skipped_frames', 0)}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else ""),
        f"fps in {fps.get('in', 0):.1f} · processed {fps.get('processed', 0):.1f} · saved {fps.get('saved', 0):.1f}",
    ]
    return "\n".join(lines)
