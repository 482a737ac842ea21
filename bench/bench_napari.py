"""napari as the live display: redraws per second with six 512x512 layers updated in place, against
the livescope viewer's pyqtgraph panels measured the same way in the same run.

    python bench/bench_napari.py [--n 200]     # starts its own Xvfb when there is no DISPLAY

1. Redraws: six frames (raw uint16 + five float32 products, 512x512, bench_viewer's frame sets)
   replace six layers' data (``layer.data = frame``, the live widget's way) and the canvas is
   painted synchronously, N times; the live viewer's rows come from bench_viewer's
   ``bench_redraws`` (its six panels and six pg.ImageViews, the same frames, the same timing).
2. End to end: previews over ZeroMQ at 60 Hz (six products), the napari live widget on its 60 Hz
   timer: frame sets it draws per second, and the canvas paints per second.

Under Xvfb napari's OpenGL canvas is drawn by Mesa in software (llvmpipe) while pyqtgraph paints
with QPainter on the CPU either way: the napari numbers are a floor, a GPU draws faster.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_viewer import PRODUCTS, _frames, _time, _xvfb, bench_redraws  # noqa: E402


def _canvas(viewer):
    return viewer.window._qt_viewer.canvas  # napari's VispyCanvas (no public handle on it)


def bench_napari(n: int) -> list[tuple[str, float, float]]:
    import napari
    from qtpy import QtWidgets

    from livescope.bridges.transport import PreviewPublisher, free_tcp_address
    from livescope.ui.napari import LiveWidget
    from livescope.ui.napari._widget import grid_of

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    sets = _frames()
    rows = []

    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    for name, arr in sets[0].items():
        viewer.add_image(arr, name=name, contrast_limits=(0.0, 4095.0))
    grid_of(viewer).enabled = True  # one tile per product, as the live viewer's panels
    app.processEvents()
    native = _canvas(viewer)._scene_canvas.native

    def draw_napari(i: int) -> None:
        for name, arr in sets[i % len(sets)].items():
            viewer.layers[name].data = arr
        native.repaint()

    rows.append(("napari, six layers (layer.data = frame), grid", *_time(draw_napari, n, app)))
    viewer.close()

    # end to end: the live widget on previews published at 60 Hz
    addr = free_tcp_address()
    pub = PreviewPublisher(addr)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    widget = LiveWidget(viewer, preview=addr, control="", fps=60)
    viewer.window.add_dock_widget(widget, area="right")
    paints = [0]
    _canvas(viewer)._scene_canvas.events.draw.connect(lambda _e: paints.__setitem__(0, paints[0] + 1))
    widget.connect_daemon()
    stop = threading.Event()

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            for name, arr in sets[seq % len(sets)].items():
                header = {"v": 1, "stream": "b", "seq": seq, "product": name, "index": {"t": seq}}
                pub.send({**header, "shape": list(arr.shape), "dtype": arr.dtype.name, "bits": 12}, arr)
            seq += 1
            time.sleep(1 / 60)

    th = threading.Thread(target=publish, daemon=True)
    th.start()
    t_end = time.perf_counter() + 2
    while time.perf_counter() < t_end:
        app.processEvents()
    d0, p0, t0 = widget.frames_drawn, paints[0], time.perf_counter()
    while time.perf_counter() - t0 < 5:
        app.processEvents()
        time.sleep(0.001)
    dt = time.perf_counter() - t0
    sets_rate = (widget.frames_drawn - d0) / len(PRODUCTS) / dt
    paint_rate = (paints[0] - p0) / dt
    stop.set()
    th.join()
    widget.disconnect_daemon()
    assert len(viewer.layers) == len(PRODUCTS), [la.name for la in viewer.layers]  # in place, never a layer per frame
    rows.append(("napari live widget end to end: 60 Hz previews, frame sets drawn", sets_rate, 1000 / sets_rate))
    rows.append(("napari live widget end to end: canvas paints", paint_rate, 1000 / paint_rate))
    viewer.close()
    pub.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="redraws timed per display")
    args = ap.parse_args()
    xvfb = _xvfb()
    try:
        rows = bench_redraws(args.n) + bench_napari(args.n)  # the live viewer's rows, then napari's
    finally:
        if xvfb is not None:
            xvfb.terminate()
    print(f"{'display':<70} {'redraws/s':>10} {'median ms':>10}")
    for name, rate, ms in rows:
        print(f"{name:<70} {rate:>10.1f} {ms:>10.1f}")


if __name__ == "__main__":
    main()
