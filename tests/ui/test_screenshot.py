"""Under Xvfb: a daemon on the sim source, the viewer in its own process; the window's pixels in
each panel must be the frame the daemon published with that seq, at the panel's levels and colour
map (and must not match another published frame): not just any image."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyqtgraph")

from livescope.bridges.transport import PreviewSubscriber  # noqa: E402
from livescope.ui.panels import apply_levels  # noqa: E402
from tests.conftest import xvfb_display  # noqa: E402


@pytest.fixture
def xvfb():
    yield from xvfb_display(140, "1600x1000x24")


def _window_pixels(png: Path) -> np.ndarray:
    from pyqtgraph.Qt import QtGui

    img = QtGui.QImage(str(png)).convertToFormat(QtGui.QImage.Format.Format_RGB888)
    buf = np.frombuffer(img.constBits(), np.uint8, img.sizeInBytes()).reshape(img.height(), img.bytesPerLine())
    return buf[:, : img.width() * 3].reshape(img.height(), img.width(), 3).copy()


def _sample(window: np.ndarray, rect: list[float], shape: tuple[int, int], step: int = 3):
    """Window pixels at the centres of image pixels in the middle 60% of the image (away from the
    scale bar and the edges), with the image pixels they show."""
    x0, y0, x1, y1 = rect
    h, w = shape
    ys, xs = np.mgrid[int(h * 0.2) : int(h * 0.8) : step, int(w * 0.2) : int(w * 0.8) : step]
    wx = np.floor(x0 + (xs + 0.5) * (x1 - x0) / w).astype(int)
    wy = np.floor(y0 + (ys + 0.5) * (y1 - y0) / h).astype(int)
    ok = (wx >= 0) & (wy >= 0) & (wx < window.shape[1]) & (wy < window.shape[0])
    return window[wy[ok], wx[ok]].astype(int), ys[ok], xs[ok]


def test_each_panel_shows_the_frame_the_daemon_published(xvfb, tmp_path, free_address):
    ingest, publish, control = free_address(), free_address(), free_address()
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livescope",
            "daemon",
            "--source",
            "sim",
            "--frames",
            "2000",
            "--sim-size",
            "128",
            "--engines",
            "register,deconvolve,decompose",
            "--ingest",
            ingest,
            "--publish",
            publish,
            "--control",
            control,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sub = PreviewSubscriber(publish)
    published: dict[tuple[str, int], np.ndarray] = {}
    try:
        viewer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "livescope.ui.viewer",
                "--connect",
                publish,
                "--control",
                control,
                "--seconds",
                "7",
                "--dump",
                str(tmp_path / "dump"),
                "--settings",
                str(tmp_path / "v.ini"),
            ],
            env={**env, "DISPLAY": xvfb},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # record every preview the daemon publishes while the viewer runs
        while viewer.poll() is None:
            for (_stream, product, p, c, z), frame in sub.latest().items():  # the sim source: one stream
                if frame.array is not None and (p, c, z) == (0, 0, 0):
                    published[(product, frame.seq)] = np.array(frame.array)
            time.sleep(0.005)
        out = viewer.stdout.read().decode(errors="replace")
        assert viewer.returncode == 0, out
    finally:
        sub.close()
        daemon.terminate()
        daemon.wait(20)
    state = json.loads((tmp_path / "dump" / "state.json").read_text())
    window = _window_pixels(tmp_path / "dump" / "window.png")
    panels = state["panels"]
    assert {"raw", "registered", "deconvolved", "background", "slow", "fast", "composite"} <= set(panels)
    for name, info in panels.items():
        shown = np.load(tmp_path / "dump" / f"{name}.npy")
        if info["composite"]:
            expected = shown  # RGB already: its parts are checked as panels of their own
        else:
            assert (name, info["seq"]) in published, f"{name}: seq {info['seq']} was never published"
            frame = published[(name, info["seq"])]
            np.testing.assert_array_equal(shown, frame)
            table = np.load(tmp_path / "dump" / f"{name}-lut.npy")
            expected = apply_levels(frame, tuple(info["levels"]), table)
        got, ys, xs = _sample(window, info["image_rect"], expected.shape[:2])
        want = expected[ys, xs].astype(int)
        close = np.all(np.abs(got - want) <= 6, axis=-1)
        # a few pixels may lie under the ROI outline or the saturation overlay
        assert close.mean() > 0.93, f"{name}: only {close.mean():.0%} of the panel's pixels match its frame"
        if not info["composite"]:
            # and another published frame of the same product does not match as well
            others = [s for (p, s) in published if p == name and abs(s - info["seq"]) >= 15]
            if others:
                other = published[(name, others[0])]
                alt = apply_levels(other, tuple(info["levels"]), table)[ys, xs].astype(int)
                alt_close = np.all(np.abs(got - alt) <= 6, axis=-1).mean()
                assert alt_close < close.mean() - 0.1, f"{name}: the panel matches seq {others[0]} as well"
