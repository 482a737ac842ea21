"""Under Xvfb, on napari's real OpenGL canvas: the dock's fast path (a frame copied into the
layer's own array, only the texture uploaded again) draws every new frame, at the layer's
contrast limits, bit for bit what the frame holds, never the previous frame; no layer per frame.

napari's canvas needs OpenGL, which Qt's offscreen platform (the other tests') lacks: the
napari side runs in a child process on an Xvfb display and reports what it saw as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SIZE, BLOCK = 64, 16  # frames of 4x4 blocks of constant value: each block centre is unambiguous on screen
GAP = 32  # the second layer is translated beside the first, so each block has one screen position


def _frame(k: int, dtype: str) -> np.ndarray:
    """Frame ``k``: 16 distinct levels in the blocks, permuted differently for every k."""
    rng = np.random.default_rng(k)
    levels = rng.permutation(16).reshape(4, 4).astype(np.float64)
    values = 200.0 + levels * 250.0 + (7.0 if dtype == "uint16" else 0.5)  # 200..3950 (+ an offset)
    return np.kron(values, np.ones((BLOCK, BLOCK))).astype(dtype)


def _child(out: str) -> None:
    """In the child, on the Xvfb display: napari, the dock, frames through its ``_show``."""
    import napari
    from qtpy import QtWidgets

    from livescope.bridges.protocol import Frame
    from livescope.ui.napari import LiveWidget, _widget

    _widget.LEVELS_EVERY_S = 1e9  # the dock's own levels (and napari's refresh) never come in this run
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1200, 800)
    widget = LiveWidget(viewer, control="")  # not docked: the canvas keeps the window's width
    products = {"raw": "uint16", "denoised": "float32"}
    report: dict = {"frames": []}

    def feed(k: int) -> dict[str, np.ndarray]:
        frames = {p: _frame(k * 10 + i, dt) for i, (p, dt) in enumerate(products.items())}
        for p, arr in frames.items():
            header = {"v": 1, "stream": "s", "seq": k, "product": p, "index": {"t": k}, "dtype": arr.dtype.name}
            arr.flags.writeable = False  # as the socket gives it: a read-only view
            widget._show(("s", p, 0, 0, 0), Frame(header, arr))
        return frames

    feed(0)
    layers = {p: viewer.layers[f"live {p}"] for p in products}
    layers["denoised"].translate = (0.0, SIZE + GAP)  # beside raw, not over it (additive blending)
    viewer.reset_view()
    app.processEvents()
    canvas = viewer.window._qt_viewer.canvas
    report["ids"] = {p: id(layer) for p, layer in layers.items()}

    def shot(frames: dict[str, np.ndarray], k: int) -> None:
        img = np.asarray(viewer.screenshot(canvas_only=True, flash=False))[..., :3].astype(int)
        h, w = img.shape[:2]
        camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera  # napari 0.9 / before
        zoom, (cy, cx) = camera.zoom, camera.center[-2:]
        row: dict = {"k": k, "layers": len(viewer.layers), "texture_updates": widget.texture_updates}
        for p, arr in frames.items():
            layer = layers[p]
            lo, hi = layer.contrast_limits
            ty, tx = layer.translate
            node = canvas.layer_to_visual[layer].node
            centres = np.arange(BLOCK // 2, SIZE, BLOCK)
            shown, expected = [], []
            for y in centres:
                for x in centres:
                    sy = int(round((y + ty - cy) * zoom + h / 2))
                    sx = int(round((x + tx - cx) * zoom + w / 2))
                    shown.append(img[sy, sx].tolist())
                    expected.append(round(255 * float(np.clip((float(arr[y, x]) - lo) / (hi - lo), 0, 1))))
            row[p] = {
                "shown": shown,
                "expected": expected,
                "levels": [lo, hi],
                "texture_source_equal": bool(np.array_equal(node._data, arr)),
                "layer_data_equal": bool(np.array_equal(layer.data, arr)),
                "layer_is_same": viewer.layers[f"live {p}"] is layer,
            }
        report["frames"].append(row)

    for k in range(1, 6):
        frames = feed(k)
        shot(frames, k)
    # contrast limits set on the layer (as napari's layer controls do): the next frame is drawn at them
    for layer in layers.values():
        layer.contrast_limits = (1000.0, 3000.0)
    frames = feed(6)
    shot(frames, 6)
    report["levels_after"] = {p: list(layer.contrast_limits) for p, layer in layers.items()}
    Path(out).write_text(json.dumps(report))
    viewer.close()


@pytest.fixture
def xvfb():
    from tests.conftest import xvfb_display

    yield from xvfb_display(200, "1280x1024x24")


def test_the_fast_path_draws_each_new_frame_at_the_layers_levels(xvfb, tmp_path):
    pytest.importorskip("napari", reason="the napari extra: pip install 'livescope[napari]'")
    out = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    proc = subprocess.run(
        [sys.executable, __file__, str(out)],
        env={**env, "DISPLAY": xvfb},
        cwd=Path(__file__).resolve().parents[3],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["frames"]
    assert [r["k"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # no layer per frame: the same two layers all along
    assert all(r["layers"] == 2 for r in rows)
    # every frame after the first took the fast path: only the texture uploaded again
    assert [r["texture_updates"] for r in rows] == [2 * r["k"] for r in rows]
    previous: dict[str, list[int]] = {}
    for r in rows:
        for p in ("raw", "denoised"):
            info = r[p]
            assert info["layer_is_same"] and info["layer_data_equal"] and info["texture_source_equal"], (p, r["k"])
            shown = np.array(info["shown"])
            expected = np.array(info["expected"])
            # grey colormap: R = G = B, the frame's value through the layer's contrast limits
            assert (shown == shown[:, :1]).all(), (p, r["k"], info["shown"])
            err = np.abs(shown[:, 0] - expected)
            assert err.max() <= 2, (p, r["k"], list(zip(shown[:, 0].tolist(), expected.tolist(), strict=True)))
            # and not the previous frame: the blocks were permuted, so a stale texture would fail
            if p in previous:
                assert np.abs(np.array(previous[p]) - expected).max() > 20
            previous[p] = expected.tolist()
    assert rows[-1]["raw"]["levels"] == rows[-1]["denoised"]["levels"] == [1000.0, 3000.0]
    assert report["levels_after"] == {"raw": [1000.0, 3000.0], "denoised": [1000.0, 3000.0]}


if __name__ == "__main__":
    _child(sys.argv[1])
