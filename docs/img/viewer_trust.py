"""Make docs/img/viewer_trust.png: the viewer with the trust map on, over a real trust engine run.

    Xvfb :99 -screen 0 1600x1000x24 & DISPLAY=:99 python docs/img/viewer_trust.py; kill %1

The frame: a W2S field (the shipped denoiser's kind of data, rendered with fresh camera noise as
in bench/bench_trust.py) whose lower right quarter is replaced by filaments, which the model
never saw. The trust engine (restore=denoise, every check on) runs on it for real; raw, denoised
and the trust map are published to the viewer as the daemon would, and the window is grabbed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))


def main() -> int:
    import bench_trust as B
    from pyqtgraph.Qt import QtWidgets

    from livescope.bridges.transport import PreviewPublisher, free_tcp_address
    from livescope.engines import FrameInfo, StreamSpec, create_engine
    from livescope.ui.viewer import LiveViewer

    rng = np.random.default_rng(2)
    w2s = B.W2S()
    scene = w2s.scenes[1][128:384, 96:352].astype(np.float32)  # 256x256 of W2S 085_1, photons
    B.SHAPE = (128, 128)
    scene[128:, 128:] = B.filaments(rng, peak=float(np.percentile(scene, 99)))  # the model never saw these
    raw = B.camera(scene, rng)
    eng = create_engine(
        "trust",
        restore="denoise",
        backend="onnxruntime",
        tile=0,
        tta_every=1,
        feature_every=1,
        gain=B.GAIN,
        offset=B.OFFSET,
        read_noise=B.READ_E * B.GAIN,
    )
    eng.setup(StreamSpec(shape=raw.shape))
    out = eng.process(raw, FrameInfo(seq=0))
    scalars = {k: float(out[k]) for k in eng.scalar_outputs if k in out}
    print(scalars, [(e["check"], round(e["score"], 2)) for e in out.get("events", [])])

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    addr = free_tcp_address()
    pub = PreviewPublisher(addr)
    viewer = LiveViewer(addr, None, settings_path=str(Path("/tmp") / "viewer_trust.ini"), fps=30)
    for dock in (viewer.dock_controls, viewer.dock_telemetry, viewer.dock_time):
        dock.setVisible(False)
    viewer.act_roi.setChecked(False)
    viewer.win.resize(1280, 700)
    viewer.win.show()
    header = {"v": 1, "stream": "doc", "index": {"p": 0, "c": 0, "z": 0, "t": 0}, "pixel_size_um": 0.1}
    deadline = time.monotonic() + 20
    seq = 0
    while time.monotonic() < deadline:
        for product, arr, extra in (
            ("raw", raw, {"bits": 16}),
            ("denoised", out["denoised"], {"scalars": scalars}),
            ("trust_denoised", out["trust_denoised"], {}),
        ):
            pub.send(
                {**header, "seq": seq, "product": product, "shape": list(arr.shape), "dtype": arr.dtype.name, **extra},
                np.ascontiguousarray(arr),
            )
        seq += 1
        app.processEvents()
        time.sleep(0.05)
        panel = viewer.panels.get("denoised")
        if panel is not None and panel.array is not None and viewer.panels["raw"].array is not None:
            if not viewer.trust_overlay:
                viewer.trust_box.setChecked(True)
            elif panel.trust_item.isVisible() and panel.widget.trust.isVisible():
                break
    viewer.unsay("control")
    viewer.auto_contrast()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    # the cursor over the filaments: the status bar gives the trust there
    viewer._readout(200.0, 200.0, raw.shape)
    app.processEvents()
    target = REPO / "docs" / "img" / "viewer_trust.png"
    ok = viewer.win.grab().save(str(target))
    print("saved" if ok else "FAILED", target)
    viewer.close()
    pub.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
