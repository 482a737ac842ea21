"""A summary picture of a livescope store: the last saved frame of every product, side by side.

    python -m livescope.ui.snapshot OUT.zarr OUT.png

Runs without a display (Qt's offscreen platform is chosen when no display exists).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from ..bridges.store import STATUS, read_records

__all__ = ["last_frames", "render_montage", "main"]

ORDER = ["raw", "registered", "denoised", "deconvolved", "background", "slow", "fast"]
SKIP = {"residual"}  # the decomposition's remainder: in the store, not worth a tile


def last_frames(store: str | Path) -> list[tuple[str, np.ndarray, int]]:
    """(name, plane, t) of the last saved frame of each image, channel 0, middle z plane."""
    import zarr

    store = Path(store)
    meta = json.loads((store / "zarr.json").read_text())
    images = meta["attributes"]["livescope"]["images"]
    out = []
    for entry in images:
        path = store / entry["path"]
        rec = read_records(path)
        status = rec["status"]
        flat = status.reshape(status.shape[0], -1)
        saved_t = np.nonzero((flat == STATUS["saved"]).any(axis=1))[0]
        if not saved_t.size:
            continue
        t = int(saved_t[-1])
        arr = zarr.open_array(str(path / "0"), mode="r")
        sel: list = [t]
        lead_rest = arr.ndim - 3
        axes = list(getattr(arr.metadata, "dimension_names", None) or [])[1:-2]  # v2: none
        for a, n in zip(axes, arr.shape[1 : 1 + lead_rest], strict=False):
            sel.append(n // 2 if a == "z" else 0)
        out.append((entry["path"], np.asarray(arr[tuple(sel)]), t))
    out = [o for o in out if o[0].split("_")[0] not in SKIP]
    out.sort(key=lambda x: (ORDER.index(x[0].split("_")[0]) if x[0].split("_")[0] in ORDER else 99, x[0]))
    return out


def _to_rgb(plane: np.ndarray, lut: np.ndarray) -> np.ndarray:
    p = plane.astype(np.float32)
    finite = np.isfinite(p)
    if not finite.any():
        return np.zeros(p.shape + (3,), np.uint8)
    lo, hi = np.percentile(p[finite], [0.5, 99.8])
    if hi <= lo:
        hi = lo + 1
    idx = np.clip((np.nan_to_num(p, nan=lo) - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    return lut[idx]


def render_montage(frames: list[tuple[str, np.ndarray, int]], path: str | Path, tile: int = 320) -> Path:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtCore, QtGui

    app = QtGui.QGuiApplication.instance() or QtGui.QGuiApplication([])  # noqa: F841 - fonts need it
    n = max(1, len(frames))
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    title_h, pad = 28, 8
    W, H = cols * (tile + pad) + pad, rows * (tile + title_h + pad) + pad + 30
    img = QtGui.QImage(W, H, QtGui.QImage.Format.Format_RGB888)
    img.fill(QtGui.QColor(24, 24, 28))
    painter = QtGui.QPainter(img)
    font = painter.font()
    font.setPointSize(12)
    painter.setFont(font)
    grey = pg.colormap.get("CET-L1").getLookupTable(nPts=256, alpha=False)
    hot = pg.colormap.get("CET-L3").getLookupTable(nPts=256, alpha=False)
    for i, (name, plane, t) in enumerate(frames):
        r, c = divmod(i, cols)
        x0, y0 = pad + c * (tile + pad), pad + r * (tile + title_h + pad)
        lut = hot if name.split("_")[0] in ("background", "slow", "fast") else grey
        rgb = np.ascontiguousarray(_to_rgb(plane, lut))
        qimg = QtGui.QImage(rgb.data, rgb.shape[1], rgb.shape[0], rgb.strides[0], QtGui.QImage.Format.Format_RGB888)
        scaled = qimg.scaled(
            tile, tile, QtCore.Qt.AspectRatioMode.KeepAspectRatio, QtCore.Qt.TransformationMode.FastTransformation
        )
        painter.setPen(QtGui.QColor(230, 230, 230))
        painter.drawText(x0, y0 + 20, f"{name}   (t = {t})")
        painter.drawImage(x0, y0 + title_h, scaled)
    painter.setPen(QtGui.QColor(150, 150, 160))
    painter.drawText(pad, H - 12, "livescope: last saved frame of each product (percentile levels 0.5-99.8%)")
    painter.end()
    path = Path(path)
    if not img.save(str(path)):
        raise OSError(f"could not write {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m livescope.ui.snapshot STORE.zarr OUT.png", file=sys.stderr)
        return 2
    frames = last_frames(argv[0])
    if not frames:
        print(f"{argv[0]} has no saved frame", file=sys.stderr)
        return 1
    render_montage(frames, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
