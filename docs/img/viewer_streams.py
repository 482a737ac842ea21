"""Make docs/img/viewer_streams.png: one daemon, two cameras and Micro-Manager live mode.

    Xvfb :99 -screen 0 1600x1000x24 & DISPLAY=:99 python docs/img/viewer_streams.py; kill %1

A real daemon (``livescope daemon --source zmq --engines deconvolve``) ingests three streams
from FramePublishers: ``camA`` (256x256, the sim sample) for 6 s, ``camB`` (160x256, another
sample) all along, and from 6 s ``mmcore-live`` (camA's sample going through focus, headers
``live: true``). The viewer follows camA, the first stream; 2 s after camA stopped it shows the
live stream and says why. The window is grabbed 4 s after live mode started.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().with_suffix(".png")
LIVE_AT = 6.0  # s: camA stops, live mode starts


def cameras(ingest: str, stop: threading.Event) -> None:
    from livescope.bridges.sim import SimConfig, SimSample
    from livescope.bridges.transport import FramePublisher

    a_scene = SimSample(SimConfig(shape=(256, 256), seed=0))
    b_scene = SimSample(SimConfig(shape=(160, 256), seed=5, photons=80))
    cam_a, cam_b, live = (
        FramePublisher(ingest, stream=s, pixel_size_um=0.1, bits=12) for s in ("camA", "camB", "mmcore-live")
    )
    t0, t = time.monotonic(), 0
    while not stop.is_set():
        now = time.monotonic() - t0
        if now < LIVE_AT:
            cam_a.send(a_scene.render(t), index={"t": t})
        else:  # the microscopist focuses in live mode
            live.send(a_scene.render(t, z_um=1.2 * math.cos((now - LIVE_AT) * 0.7)), index={"t": t}, live=True)
        if now > 0.5:
            cam_b.send(b_scene.render(t), index={"t": t})
        t += 1
        time.sleep(0.1)
    for pub in (cam_a, cam_b, live):
        pub.close(linger_s=0)


def main() -> int:
    from pyqtgraph.Qt import QtCore, QtWidgets

    from livescope.bridges.transport import free_tcp_address
    from livescope.ui.viewer import LiveViewer

    ingest, publish, control = free_tcp_address(), free_tcp_address(), free_tcp_address()
    env = {k: v for k, v in os.environ.items() if k != "QT_QPA_PLATFORM"}
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livescope",
            "daemon",
            "--source",
            "zmq",
            "--engines",
            "deconvolve",
            "--ingest",
            ingest,
            "--publish",
            publish,
            "--control",
            control,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    stop = threading.Event()
    app = QtWidgets.QApplication(sys.argv[:1])
    viewer = LiveViewer(publish, control, settings_path=OUT.with_suffix(".ini"))
    viewer.win.resize(1600, 1000)
    viewer.win.show()
    threading.Thread(target=cameras, args=(ingest, stop), daemon=True).start()

    def shoot() -> None:
        viewer.update()
        viewer.win.grab().save(str(OUT))
        print(f"{OUT}: showing {viewer.streams.selected} of {viewer.streams.names()}")
        app.quit()

    QtCore.QTimer.singleShot(int((LIVE_AT + 4.0) * 1000), shoot)
    try:
        app.exec()
    finally:
        stop.set()
        viewer.close()
        daemon.terminate()
        daemon.wait(20)
        OUT.with_suffix(".ini").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
