"""The viewer's look: a dark, calm palette (in the spirit of napari and Fiji's dark theme) and the
colour maps microscopists use. Nothing here touches a socket or a frame."""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np

__all__ = ["COLORS", "COLORMAPS", "DEFAULT_CMAP", "STYLESHEET", "apply_dark_theme", "lut"]

COLORS: dict[str, Any] = {  # "#rrggbb" text, or (r, g, b) where an image is tinted
    "window": "#17181c",
    "panel": "#0d0e10",
    "bar": "#202228",
    "border": "#2c2f36",
    "text": "#d8dadf",
    "dim": "#8b8f99",
    "accent": "#5fa8e8",
    "ok": "#6cc070",
    "warn": "#e8a23c",
    "bad": "#ff5a52",
    "saturated": (255, 40, 40),
    "low_trust": (255, 140, 20),  # amber tint over regions a trust engine does not vouch for
    "raw": "#9aa3b5",
    "restored": "#5fa8e8",
    "novelty": "#e8a23c",
    "event": "#ff5a52",
}

# the colour map each product starts with (the user can change it per panel)
DEFAULT_CMAP = {
    "raw": "Grays",
    "registered": "Grays",
    "denoised": "Grays",
    "deconvolved": "Grays",
    "background": "Fire",
    "slow": "Green",
    "fast": "Magenta",
    "residual": "Grays",
}

COLORMAPS = ("Grays", "Fire", "HiLo", "Green", "Magenta", "Cyan", "Red", "Yellow", "Inferno", "Viridis")


@cache
def lut(name: str, n: int = 256) -> np.ndarray:
    """An (n, 3) uint8 look-up table for a colour map by its Fiji/napari name."""
    ramp = np.linspace(0.0, 1.0, n)
    single = {
        "Grays": (1, 1, 1),
        "Green": (0, 1, 0),
        "Magenta": (1, 0, 1),
        "Cyan": (0, 1, 1),
        "Red": (1, 0, 0),
        "Yellow": (1, 1, 0),
    }
    if name in single or name == "HiLo":
        rgb = np.outer(ramp, single.get(name, (1, 1, 1)))
        out = np.rint(rgb * 255).astype(np.uint8)
        if name == "HiLo":  # Fiji's HiLo: the darkest level blue, the brightest red
            out[0] = (0, 0, 255)
            out[-1] = (255, 0, 0)
        return out
    import pyqtgraph as pg

    source = {"Fire": "CET-L3", "Inferno": "inferno", "Viridis": "viridis"}.get(name)
    if source is None:
        raise KeyError(f"unknown colour map {name!r}; choose one of {', '.join(COLORMAPS)}")
    table = pg.colormap.get(source).getLookupTable(0.0, 1.0, n, alpha=False)
    return np.ascontiguousarray(table[:, :3], dtype=np.uint8)


STYLESHEET = f"""
QMainWindow, QWidget {{ background: {COLORS["window"]}; color: {COLORS["text"]}; font-size: 10pt; }}
QToolBar {{ background: {COLORS["bar"]}; border: none; border-bottom: 1px solid {COLORS["border"]};
           spacing: 6px; padding: 3px 6px; }}
QToolBar QLabel {{ color: {COLORS["dim"]}; padding-left: 6px; }}
QToolButton {{ color: {COLORS["text"]}; background: transparent; border: 1px solid transparent;
              border-radius: 3px; padding: 3px 8px; }}
QToolButton:hover {{ background: #2a2d35; border-color: {COLORS["border"]}; }}
QToolButton:checked {{ background: #27364a; border-color: #3b5878; }}
QToolButton::menu-indicator {{ image: none; }}
QComboBox, QSpinBox, QLineEdit {{ background: #111216; color: {COLORS["text"]};
    border: 1px solid {COLORS["border"]}; border-radius: 3px; padding: 2px 6px; min-height: 18px; }}
QComboBox:hover, QSpinBox:hover, QLineEdit:hover {{ border-color: #444955; }}
QComboBox QAbstractItemView {{ background: #1b1c21; selection-background-color: #2d4a6b; }}
QCheckBox {{ spacing: 6px; }}
QPushButton {{ background: #262930; border: 1px solid {COLORS["border"]}; border-radius: 3px;
              padding: 3px 10px; }}
QPushButton:hover {{ background: #2f333c; }}
QDockWidget {{ color: {COLORS["dim"]}; font-size: 9pt; }}
QDockWidget::title {{ background: {COLORS["bar"]}; padding: 4px 8px; border-bottom: 1px solid {COLORS["border"]}; }}
QGroupBox {{ border: 1px solid {COLORS["border"]}; border-radius: 4px; margin-top: 14px; padding: 6px 4px 4px 4px; }}
QGroupBox::title {{ subcontrol-origin: margin; left: 8px; padding: 0 4px; color: {COLORS["text"]}; }}
QStatusBar {{ background: {COLORS["bar"]}; border-top: 1px solid {COLORS["border"]}; }}
QStatusBar QLabel {{ font-family: "DejaVu Sans Mono", monospace; font-size: 9pt; padding: 0 6px; }}
QMenu {{ background: #1d1f24; border: 1px solid {COLORS["border"]}; }}
QMenu::item:selected {{ background: #2d4a6b; }}
QLabel#panelTitle {{ color: {COLORS["text"]}; font-weight: 600; }}
QLabel#panelInfo {{ color: {COLORS["dim"]}; font-family: "DejaVu Sans Mono", monospace; font-size: 9pt; }}
QLabel#banner {{ padding: 6px 12px; border-radius: 0px; font-size: 10pt; }}
QLabel#metric {{ font-family: "DejaVu Sans Mono", monospace; font-size: 9pt; }}
QFrame#panelBar {{ background: {COLORS["bar"]}; border-bottom: 1px solid {COLORS["border"]}; }}
QFrame#panel {{ border: 1px solid {COLORS["border"]}; background: {COLORS["panel"]}; }}
QScrollArea {{ border: none; }}
"""


def apply_dark_theme(app) -> None:
    """Fusion style with a dark palette, so native widgets (menus, scroll bars) match."""
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtGui

    app.setStyle("Fusion")
    pal = QtGui.QPalette()
    role = QtGui.QPalette.ColorRole
    for r, c in (
        (role.Window, COLORS["window"]),
        (role.WindowText, COLORS["text"]),
        (role.Base, "#111216"),
        (role.AlternateBase, "#1b1c21"),
        (role.Text, COLORS["text"]),
        (role.Button, "#262930"),
        (role.ButtonText, COLORS["text"]),
        (role.Highlight, "#2d4a6b"),
        (role.HighlightedText, "#ffffff"),
        (role.ToolTipBase, "#202228"),
        (role.ToolTipText, COLORS["text"]),
    ):
        pal.setColor(r, QtGui.QColor(c))
    app.setPalette(pal)
    app.setStyleSheet(STYLESHEET)
    pg.setConfigOptions(
        imageAxisOrder="row-major", antialias=False, background=COLORS["panel"], foreground=COLORS["dim"]
    )
