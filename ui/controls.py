"""Engine controls: enable/disable each engine and change its main parameters over the control
socket. Widgets show what the daemon's ``status`` says; a change is sent as a command and the
widget follows the next status (so it never shows a value the daemon did not take)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyqtgraph.Qt import QtCore, QtWidgets

from .style import COLORS

__all__ = ["EngineControls", "MAIN_PARAMS"]

# engine -> (param, kind, choices/range, default shown when the daemon has no value yet)
MAIN_PARAMS: dict[str, list[tuple[str, str, Any, Any]]] = {
    "deconvolve": [("iterations", "int", (1, 200), 2)],
    "denoise": [("backend", "choice", ("auto", "onnxruntime", "torch", "tensorrt"), "auto")],
    "decompose": [("lags", "lags", None, [1, 2, 4, 8])],
    "register": [("reference", "choice", ("first", "rolling"), "first")],
}


def _lags_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(int(v)) for v in value)
    return str(value)


def parse_lags(text: str) -> list[int]:
    try:
        lags = [int(v) for v in text.replace("(", "").replace(")", "").replace(" ", "").split(",") if v]
    except ValueError:
        lags = []
    if not lags or min(lags) < 1:
        raise ValueError("lags are positive frame counts, e.g. 1, 2, 4, 8")
    return lags


class _EngineBox(QtWidgets.QGroupBox):
    def __init__(self, name: str, send: Callable[..., None]) -> None:
        super().__init__(name)
        self.name = name
        self.send = send
        form = QtWidgets.QFormLayout(self)
        form.setContentsMargins(8, 4, 8, 6)
        form.setHorizontalSpacing(10)
        form.setVerticalSpacing(4)
        self.enabled = QtWidgets.QCheckBox("enabled")
        self.enabled.setFocusPolicy(QtCore.Qt.FocusPolicy.NoFocus)
        self.enabled.clicked.connect(self._toggle)
        self.state = QtWidgets.QLabel("")
        self.state.setStyleSheet(f"color:{COLORS['dim']}; font-size:8pt;")
        self.state.setWordWrap(True)
        form.addRow(self.enabled, self.state)
        self.widgets: dict[str, QtWidgets.QWidget] = {}
        for param, kind, choices, default in MAIN_PARAMS.get(name, []):
            if kind == "int":
                w = QtWidgets.QSpinBox()
                w.setRange(*choices)
                w.setValue(default)
                w.setKeyboardTracking(False)  # send on Enter / arrows, not on every digit typed
                w.valueChanged.connect(lambda v, p=param: self.send("set", engine=name, param=p, value=int(v)))
            elif kind == "choice":
                w = QtWidgets.QComboBox()
                w.addItems(choices)
                w.setCurrentText(default)
                w.activated.connect(
                    lambda i, p=param, ww=w: self.send("set", engine=name, param=p, value=ww.itemText(i))
                )
            else:  # lags
                w = QtWidgets.QLineEdit(_lags_text(default))
                w.setPlaceholderText("1, 2, 4, 8")
                w.editingFinished.connect(lambda p=param, ww=w: self._send_lags(p, ww))
            w.setObjectName(f"{name}.{param}")
            form.addRow(param, w)
            self.widgets[param] = w
        self.fit_button: QtWidgets.QPushButton | None = None
        if name == "denoise":
            self._add_fit_row(form)

    def _add_fit_row(self, form: QtWidgets.QFormLayout) -> None:
        """Fit the denoiser on the live stream (self-supervised) and hot-swap it: the daemon's
        ``fit`` command; progress and the loss curve follow ``status.fit``."""
        import pyqtgraph as pg

        row = QtWidgets.QHBoxLayout()
        self.fit_frames = QtWidgets.QSpinBox()
        self.fit_frames.setRange(2, 1000)
        self.fit_frames.setValue(32)
        self.fit_frames.setSuffix(" frames")
        self.fit_steps = QtWidgets.QSpinBox()
        self.fit_steps.setRange(1, 100000)
        self.fit_steps.setValue(300)
        self.fit_steps.setSuffix(" steps")
        self.fit_button = QtWidgets.QPushButton("Fit on stream")
        self.fit_button.setObjectName("denoise.fit")
        self.fit_button.setToolTip(
            "Fit the denoiser on the next frames of this stream (no clean images needed), "
            "then swap it in without stopping"
        )
        self.fit_button.clicked.connect(
            lambda: self.send(
                "fit", engine=self.name, frames=self.fit_frames.value(), steps=self.fit_steps.value(), seconds=600
            )
        )
        for w in (self.fit_frames, self.fit_steps, self.fit_button):
            row.addWidget(w)
        form.addRow("fit", row)
        self.fit_state = QtWidgets.QLabel("")
        self.fit_state.setStyleSheet(f"color:{COLORS['dim']}; font-size:8pt;")
        self.fit_plot = pg.PlotWidget()
        self.fit_plot.setFixedHeight(60)
        self.fit_plot.setBackground(None)
        self.fit_plot.hideAxis("bottom")
        self.fit_plot.getAxis("left").setWidth(34)
        self.fit_plot.setMouseEnabled(False, False)
        self.fit_curve = self.fit_plot.plot(pen=pg.mkPen(COLORS.get("accent", "#5fa8ff"), width=1.5))
        self.fit_plot.setVisible(False)
        form.addRow(self.fit_state)
        form.addRow(self.fit_plot)

    def follow_fit(self, fit: dict[str, Any] | None) -> None:
        if self.fit_button is None or not fit:
            return
        state = fit.get("state", "")
        running = state in ("collecting", "fitting", "swapping")
        self.fit_button.setEnabled(not running)
        if state == "collecting":
            text = f"collecting {fit.get('collected', 0)}/{fit.get('frames', 0)} frames"
        elif state == "fitting":
            text = f"fitting: step {fit.get('step', 0)}/{fit.get('steps', 0)}"
        elif state == "done":
            text = f"done: running {str(fit.get('model', '')).rsplit('/', 1)[-1]}"
        else:
            text = f"{state}: {fit.get('error', '')}"
        self.fit_state.setText(text)
        losses = fit.get("loss_curve") or []
        if losses:
            self.fit_plot.setVisible(True)
            self.fit_curve.setData(losses)

    def _toggle(self, checked: bool) -> None:
        self.send("enable" if checked else "disable", engine=self.name)

    def _send_lags(self, param: str, w: QtWidgets.QLineEdit) -> None:
        try:
            lags = parse_lags(w.text())
        except ValueError as exc:
            w.setToolTip(str(exc))
            w.setStyleSheet(f"border-color:{COLORS['bad']};")
            return
        w.setStyleSheet("")
        self.send("set", engine=self.name, param=param, value=lags)

    def follow(self, engine: dict[str, Any]) -> None:
        """Show the daemon's state; a widget the user is editing is left alone."""
        enabled = bool(engine.get("enabled"))
        if self.enabled.isChecked() != enabled:
            self.enabled.setChecked(enabled)
        reason = engine.get("reason") or ""
        processed = engine.get("processed", 0)
        self.state.setText(reason if reason else f"processed {processed}")
        params = engine.get("params") or {}
        for param, w in self.widgets.items():
            if param not in params or w.hasFocus():
                continue
            value = params[param]
            blocker = QtCore.QSignalBlocker(w)
            if isinstance(w, QtWidgets.QSpinBox) and value is not None:
                w.setValue(int(value))
            elif isinstance(w, QtWidgets.QComboBox):
                if w.findText(str(value)) < 0:
                    w.addItem(str(value))
                w.setCurrentText(str(value))
            elif isinstance(w, QtWidgets.QLineEdit):
                w.setText(_lags_text(value))
            del blocker


class EngineControls(QtWidgets.QWidget):
    def __init__(self, send: Callable[..., None]) -> None:
        super().__init__()
        self.send = send
        self.boxes: dict[str, _EngineBox] = {}
        self._layout = QtWidgets.QVBoxLayout(self)
        self._layout.setContentsMargins(6, 4, 6, 4)
        self._layout.setSpacing(4)
        self.placeholder = QtWidgets.QLabel("waiting for the daemon…")
        self.placeholder.setStyleSheet(f"color:{COLORS['dim']};")
        self._layout.addWidget(self.placeholder)
        self.message = QtWidgets.QLabel("")
        self.message.setWordWrap(True)
        self.message.setStyleSheet(f"color:{COLORS['dim']}; font-size:8pt;")
        self._layout.addStretch(1)
        self._layout.addWidget(self.message)

    def follow(self, status: dict[str, Any]) -> None:
        engines = status.get("engines") or {}
        if set(engines) != set(self.boxes):
            for box in self.boxes.values():
                box.setParent(None)
                box.deleteLater()
            self.boxes = {}
            for i, name in enumerate(engines):
                box = _EngineBox(name, self.send)
                self._layout.insertWidget(i, box)
                self.boxes[name] = box
            self.placeholder.setVisible(not engines)
            if not engines:
                self.placeholder.setText("the daemon runs no engine")
        for name, engine in engines.items():
            self.boxes[name].follow(engine)
        if "denoise" in self.boxes:
            self.boxes["denoise"].follow_fit(status.get("fit"))

    def show_reply(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        what = " ".join(str(request.get(k)) for k in ("cmd", "engine", "param", "value") if k in request)
        if reply.get("ok"):
            self.message.setText(f"✓ {what}")
            self.message.setStyleSheet(f"color:{COLORS['dim']}; font-size:8pt;")
        else:
            self.message.setText(f"✗ {what}: {reply.get('error')}")
            self.message.setStyleSheet(f"color:{COLORS['bad']}; font-size:8pt;")
