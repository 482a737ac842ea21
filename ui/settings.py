"""Where the viewer remembers its layout between runs (Qt's QSettings).

The default is the user's settings store (``~/.config/livescope/viewer.conf`` on Linux); tests and
side-by-side sessions pass a file with ``settings_path=`` or ``LIVESCOPE_VIEWER_SETTINGS``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pyqtgraph.Qt import QtCore

__all__ = ["open_settings", "read_json", "write_json"]

ENV = "LIVESCOPE_VIEWER_SETTINGS"


def open_settings(path: str | os.PathLike | None = None) -> QtCore.QSettings:
    path = path or os.environ.get(ENV)
    if path:
        return QtCore.QSettings(str(path), QtCore.QSettings.Format.IniFormat)
    return QtCore.QSettings(QtCore.QSettings.Format.IniFormat, QtCore.QSettings.Scope.UserScope, "livescope", "viewer")


def read_json(settings: QtCore.QSettings, key: str, default: Any) -> Any:
    """Plain values travel as JSON text: QSettings' own typing of lists differs by platform."""
    raw = settings.value(key)
    if raw in (None, ""):
        return default
    try:
        return json.loads(str(raw))
    except ValueError:
        return default


def write_json(settings: QtCore.QSettings, key: str, value: Any) -> None:
    settings.setValue(key, json.dumps(value))
