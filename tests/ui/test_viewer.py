from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyqtgraph")
pytest.importorskip("pytestqt")

from livescope.bridges.transport import PreviewPublisher  # noqa: E402
from livescope.ui.viewer import LiveViewer  # noqa: E402


def test_viewer_shows_one_panel_per_product_with_the_newest_frame(qtbot, free_address):
    addr = free_address()
    pub = PreviewPublisher(addr)
    viewer = LiveViewer(addr, control=None)
    qtbot.addWidget(viewer.win)
    viewer.win.show()
    try:
        def send(seq):
            for product, value in (("raw", 100), ("denoised", 50.5)):
                arr = np.full((32, 40), value + seq, np.float32 if product != "raw" else np.uint16)
                pub.send({"v": 1, "stream": "s", "seq": seq, "product": product, "index": {"t": seq},
                          "shape": [32, 40], "dtype": arr.dtype.name}, arr)

        def drawn():
            send(drawn.seq)
            drawn.seq += 1
            return set(viewer.panels) == {"raw", "denoised"} and all(
                p["image"].image is not None for p in viewer.panels.values())

        drawn.seq = 0
        qtbot.waitUntil(drawn, timeout=10000)
        img = viewer.panels["raw"]["image"].image
        assert img.shape == (32, 40) and img.dtype == np.uint16
        assert viewer.panels["raw"]["seq"] >= 0
        assert "raw" in viewer.panels["raw"]["label"].text
        viewer.update_status()
        assert "daemon" in viewer.status_label.text() or "connecting" in viewer.status_label.text()
    finally:
        viewer.close()
        pub.close()
