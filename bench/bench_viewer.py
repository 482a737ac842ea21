"""The live viewer's cost: redraws per second with six 512x512 panels, and what a viewer attached to
the daemon costs the daemon (CPU time per frame, lost frames).

    python bench/bench_viewer.py            # starts its own Xvfb when there is no DISPLAY

1. Redraws: six panels (raw uint16 + five float32 products, 512x512) get a new frame each and the
   panels are painted synchronously, N times; against the peer, six default ``pg.ImageView``s
   (``setImage`` with auto-levels and a histogram on every frame, the way most live viewers start).
   Also the end-to-end rate: frames published over ZeroMQ at 60 Hz, the viewer on its 30 Hz timer.
2. Daemon: ``livescope daemon --source sim`` (512x512 at 20 fps, register) with and without a
   viewer process attached; CPU time of the daemon process (os.wait4) per frame received.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PRODUCTS = ["raw", "registered", "denoised", "deconvolved", "background", "fast"]


def _xvfb() -> subprocess.Popen | None:
    if os.environ.get("DISPLAY"):
        return None
    if shutil.which("Xvfb") is None:
        sys.exit("no DISPLAY and no Xvfb: apt-get install xvfb")
    n = next(n for n in range(120, 200) if not Path(f"/tmp/.X11-unix/X{n}").exists())
    proc = subprocess.Popen(
        ["Xvfb", f":{n}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{n}").exists():
            break
        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{n}"
    os.environ.pop("QT_QPA_PLATFORM", None)
    return proc


def _frames(n_sets: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(n_sets):
        base = rng.gamma(2.0, 300.0, (512, 512))
        d = {"raw": np.clip(base + 100, 0, 4095).astype(np.uint16)}
        for p in PRODUCTS[1:]:
            d[p] = (base * rng.uniform(0.5, 1.5)).astype(np.float32)
        sets.append(d)
    return sets


def bench_redraws(n: int) -> list[tuple[str, float, float]]:
    import pyqtgraph as pg
    from pyqtgraph.Qt import QtWidgets

    from livescope.bridges.transport import PreviewPublisher, free_tcp_address
    from livescope.ui.viewer import LiveViewer

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    sets = _frames()
    rows = []

    # livescope: the panels, fed directly (the socket is measured end to end below)
    tmp = tempfile.mkdtemp()
    viewer = LiveViewer(free_tcp_address(), None, settings_path=os.path.join(tmp, "v.ini"))
    viewer.timer.stop()
    viewer.win.resize(1600, 1000)
    viewer.win.show()
    for name in PRODUCTS:
        viewer._panel(name)
    app.processEvents()

    def draw_livescope(i: int) -> None:
        for name, arr in sets[i % len(sets)].items():
            viewer.panels[name].show_frame(arr, {"seq": i, "index": {"t": i}, "bits": 12, "pixel_size_um": 0.2})
        if i % 30 == 0:  # levels now and then, as the viewer does once a second
            for p in viewer.panels.values():
                p.auto_levels()
                p.update_histogram()
        for p in viewer.panels.values():  # what a new frame repaints (docks repaint once a second)
            p.widget.graphics.viewport().repaint()

    rows.append(("livescope panels (fixed levels, uint8 LUT)", *_time(draw_livescope, n, app)))
    viewer.close()
    viewer.win.close()

    # peer: six default ImageViews
    win = QtWidgets.QWidget()
    grid = QtWidgets.QGridLayout(win)
    views = []
    for i, _ in enumerate(PRODUCTS):
        iv = pg.ImageView()
        grid.addWidget(iv, i // 3, i % 3)
        views.append(iv)
    win.resize(1600, 1000)
    win.show()
    app.processEvents()

    def draw_imageview(i: int) -> None:
        for iv, arr in zip(views, sets[i % len(sets)].values(), strict=True):
            iv.setImage(arr, autoRange=False)  # autoLevels and the histogram on every frame
        for iv in views:
            iv.ui.graphicsView.viewport().repaint()
            iv.ui.histogram.viewport().repaint()

    rows.append(("pg.ImageView x6, defaults (auto-levels + histogram per frame)", *_time(draw_imageview, n, app)))
    win.close()

    # end to end: previews over ZeroMQ at 60 Hz, the viewer's own 30 Hz timer
    addr = free_tcp_address()
    pub = PreviewPublisher(addr)
    viewer = LiveViewer(addr, None, settings_path=os.path.join(tmp, "v2.ini"))
    viewer.win.resize(1600, 1000)
    viewer.win.show()
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            for name, arr in sets[seq % len(sets)].items():
                pub.send(
                    {
                        "v": 1,
                        "stream": "b",
                        "seq": seq,
                        "product": name,
                        "index": {"t": seq},
                        "shape": list(arr.shape),
                        "dtype": arr.dtype.name,
                        "bits": 12,
                    },
                    arr,
                )
            seq += 1
            time.sleep(1 / 60)

    th = threading.Thread(target=publish, daemon=True)
    th.start()
    t_end = time.perf_counter() + 2
    while time.perf_counter() < t_end:
        app.processEvents()
    r0, t0 = viewer.redraws, time.perf_counter()
    while time.perf_counter() - t0 < 5:
        app.processEvents()
        time.sleep(0.001)
    rate = (viewer.redraws - r0) / (time.perf_counter() - t0)
    stop.set()
    th.join()
    rows.append(
        (
            "livescope end to end: 60 Hz previews over ZeroMQ, frame sets drawn by the 30 Hz timer",
            rate,
            1000 / rate if rate else float("nan"),
        )
    )
    viewer.close()
    pub.close()
    return rows


def _time(fn, n: int, app) -> tuple[float, float]:
    for i in range(5):
        fn(i)
    app.processEvents()
    times = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        fn(i)
        app.processEvents()
        times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    return n / total, 1000 * float(np.median(times))


def _run_daemon(frames: int, with_viewer: bool, tmp: str) -> dict[str, float]:
    from livescope.bridges.transport import free_tcp_address

    ingest, publish, control = free_tcp_address(), free_tcp_address(), free_tcp_address()
    cmd = [
        sys.executable,
        "-m",
        "livescope",
        "daemon",
        "--source",
        "sim",
        "--frames",
        str(frames),
        "--sim-size",
        "512",
        "--sim-interval",
        "0.05",
        "--engines",
        "register",
        "--ingest",
        ingest,
        "--publish",
        publish,
        "--control",
        control,
    ]
    daemon = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    viewer = None
    if with_viewer:
        viewer = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "livescope.ui.viewer",
                "--connect",
                publish,
                "--control",
                control,
                "--settings",
                os.path.join(tmp, "d.ini"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    _, status, usage = os.wait4(daemon.pid, 0)
    out = daemon.stdout.read()
    daemon.returncode = os.waitstatus_to_exitcode(status)
    if viewer is not None:
        viewer.terminate()
        viewer.wait(10)
    m = re.search(r"frames: received (\d+), saved (\d+), lost (\d+)", out)
    received, lost = (int(m.group(1)), int(m.group(3))) if m else (0, -1)
    cpu = usage.ru_utime + usage.ru_stime
    return {"received": received, "lost": lost, "cpu_ms_per_frame": 1000 * cpu / max(received, 1)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--redraws", type=int, default=150)
    p.add_argument("--frames", type=int, default=400, help="time points per daemon run (20 fps)")
    a = p.parse_args()
    xvfb = _xvfb()
    try:
        rows = bench_redraws(a.redraws)
        print("\n| six 512x512 panels | redraws/s | median ms per redraw |\n|---|---|---|")
        for name, rate, ms in rows:
            print(f"| {name} | {rate:.1f} | {ms:.1f} |")
        with tempfile.TemporaryDirectory() as tmp:
            print(
                "\n| daemon: sim 512x512 at 20 fps, register | frames received | lost | daemon CPU ms/frame |"
                "\n|---|---|---|---|"
            )
            for with_viewer in (False, True, False, True):
                r = _run_daemon(a.frames, with_viewer, tmp)
                label = "with a viewer attached" if with_viewer else "no viewer"
                print(f"| {label} | {r['received']} | {r['lost']} | {r['cpu_ms_per_frame']:.2f} |")
    finally:
        if xvfb is not None:
            xvfb.terminate()


if __name__ == "__main__":
    main()
