"""napari as the live display: redraws per second with six 512x512 layers updated in place, against
the livescope viewer's pyqtgraph panels measured the same way in the same run.

    python bench/bench_napari.py [--n 200]     # starts its own Xvfb when there is no DISPLAY

1. Redraws: six frames (raw uint16 + five float32 products, 512x512, bench_viewer's frame sets)
   replace six layers' data (``layer.data = frame``), or are copied into it (``np.copyto`` and
   ``layer.refresh(thumbnail=False, ...)``, the live widget's way before), or go through the live
   widget's own update (``LiveWidget.draw``: copied in, only the texture uploaded again), and
   the canvas is painted synchronously, N times; and the canvas painted with no new data (what
   drawing six layers costs, the floor). The live viewer's rows come from bench_viewer's
   ``bench_redraws`` (its six panels and six pg.ImageViews, the same frames, the same timing).
2. End to end: previews over ZeroMQ at 60 Hz (six products), the napari live widget on its 60 Hz
   timer: frame sets it draws per second, and the canvas paints per second; first with the
   widget's texture-only path turned off (napari's refresh for every frame: the dock before),
   then as it is, in the same run.
3. What a viewer costs the daemon: ``livescope daemon --source zmq`` fed by a camera process
   (the sim microscope's frames, rendered ahead, sent at 20 fps: the daemon's CPU is its own,
   not the sim's rendering), 512x512, a chain that keeps up, three ways in one run, in turns: no
   viewer, the pyqtgraph viewer (``livescope view``, its own process) attached, the napari live
   dock (in this process) attached. Over a window of W seconds after the viewer is up: the
   daemon's CPU seconds (psutil, the process and its children) per frame received, frames lost
   and skipped (its status over the control socket), and the viewer's own CPU.

Under Xvfb napari's OpenGL canvas is drawn by Mesa in software (llvmpipe) while pyqtgraph paints
with QPainter on the CPU either way: the napari numbers are a floor, a GPU draws faster.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from bench_viewer import PRODUCTS, _frames, _time, _xvfb, bench_redraws  # noqa: E402


def _canvas(viewer):
    return viewer.window._qt_viewer.canvas  # napari's VispyCanvas (no public handle on it)


def bench_napari(n: int) -> list[tuple[str, float, float]]:
    import napari
    from qtpy import QtWidgets

    from livescope.bridges.protocol import Frame
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
    viewer.reset_view()  # all six tiles in view (the grid alone keeps the one-image zoom: two tiles, cropped)
    app.processEvents()
    native = _canvas(viewer)._scene_canvas.native

    def draw_napari(i: int) -> None:
        for name, arr in sets[i % len(sets)].items():
            viewer.layers[name].data = arr
        native.repaint()

    rows.append(("napari, six layers (layer.data = frame), grid", *_time(draw_napari, n, app)))

    def draw_in_place(i: int) -> None:  # the live dock's way: no new dims, extent or thumbnail
        for name, arr in sets[i % len(sets)].items():
            layer = viewer.layers[name]
            np.copyto(layer.data, arr)
            layer.refresh(thumbnail=False, highlight=False, extent=False)
        native.repaint()

    for name, arr in sets[0].items():
        viewer.layers[name].data = arr.copy()  # the layers' own arrays, written in place
    label = "napari, six layers (copied in place, refresh, no thumbnail: the dock before), grid"
    rows.append((label, *_time(draw_in_place, n, app)))
    viewer.close()

    # the dock's own code (LiveWidget.draw) on the same frames, no socket: copied in, the texture
    # uploaded again from the view napari draws (levels, thumbnail and a napari refresh once a second)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    widget = LiveWidget(viewer, control="")
    viewer.window.add_dock_widget(widget, area="right")
    grid_of(viewer).enabled = True  # what connect_daemon does
    native = _canvas(viewer)._scene_canvas.native

    def draw_dock(i: int) -> None:  # what each tick of the dock's timer does with a frame set
        widget.draw(
            {
                ("b", name, 0, 0, 0): Frame({"v": 1, "stream": "b", "seq": i, "product": name, "index": {"t": i}}, arr)
                for name, arr in sets[i % len(sets)].items()
            }
        )
        native.repaint()

    rows.append(("napari live dock's update (LiveWidget.draw), six layers, grid", *_time(draw_dock, n, app)))
    assert len(viewer.layers) == len(PRODUCTS)
    fast_share = widget.texture_updates / max(widget.frames_drawn, 1)
    print(f"dock's update: {100 * fast_share:.0f} % of the layer updates took the texture-only path")
    size = native.size()
    print(f"napari canvas beside the dock: {size.width()}x{size.height()} pixels")

    def repaint(i: int) -> None:
        native.repaint()

    rows.append(("napari canvas repaint alone, the same six layers, no new data (the floor)", *_time(repaint, n, app)))
    viewer.close()

    # end to end: the live widget on previews published at 60 Hz; first with its texture-only
    # path turned off (every frame refreshed through napari, the dock before), then as it is
    for fast in (False, True):
        rows += _end_to_end(app, sets, fast=fast)
    return rows


def _end_to_end(app, sets, *, fast: bool) -> list[tuple[str, float, float]]:
    """The live widget on previews published at 60 Hz over ZeroMQ (in this process): frame sets
    it draws per second, and the canvas paints per second, over 5 s after 2 s of warm-up."""
    import napari

    from livescope.bridges.transport import PreviewPublisher, free_tcp_address
    from livescope.ui.napari import LiveWidget

    addr = free_tcp_address()
    pub = PreviewPublisher(addr)
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1600, 1000)
    widget = LiveWidget(viewer, preview=addr, control="", fps=60)
    if not fast:
        widget._texture_node = lambda layer: None  # napari's refresh, always
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
    fast_share = widget.texture_updates / max(widget.frames_drawn, 1)
    how = "texture-only path" if fast else "texture-only path off: napari refresh per frame (the dock before)"
    print(f"end to end, {how}: {100 * fast_share:.0f} % of the layer updates took the texture-only path")
    viewer.close()
    pub.close()
    what = "" if fast else ", texture-only path off (the dock before)"
    return [
        (f"napari live widget end to end{what}: 60 Hz previews, frame sets drawn", sets_rate, 1000 / sets_rate),
        (f"napari live widget end to end{what}: canvas paints", paint_rate, 1000 / paint_rate),
    ]


VIEWERS = ("no viewer", "pyqtgraph viewer", "napari dock")


def _cpu_s(proc) -> float:
    """CPU seconds (user + system) of a psutil process and its children."""
    import psutil

    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _pump(app, seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.002)


def daemon_cost(viewer: str, *, engines: str, size: int, fps: float, warmup_s: float, window_s: float, tmp: str):
    """One daemon run with ``viewer`` attached: its CPU per frame over the window, lost, skipped."""
    import psutil
    from qtpy import QtWidgets

    from livescope.bridges.transport import free_tcp_address
    from livescope.ui.napari._attach import ask

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    ingest, publish, control = free_tcp_address(), free_tcp_address(), free_tcp_address()
    cmd = [sys.executable, "-m", "livescope.daemon.cli", "daemon", "--source", "zmq", "--engines", engines]
    cmd += ["--complete", "off"]
    cmd += ["--out", tempfile.mkdtemp(dir=tmp) + "/run.zarr", "--ingest", ingest, "--publish", publish]
    cmd += ["--control", control, "-q"]
    daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dproc = psutil.Process(daemon.pid)
    view_proc = None
    napari_viewer = widget = None
    try:
        deadline = time.monotonic() + 60
        while ask(control, "status", timeout_s=0.5) is None:
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise RuntimeError(f"the daemon did not start: {' '.join(cmd)}")
        feeder = subprocess.Popen(
            [sys.executable, __file__, "--feed", ingest, "--size", str(size), "--fps", str(fps)],
            stdout=subprocess.DEVNULL,
        )
        if viewer == "pyqtgraph viewer":
            view_cmd = [sys.executable, "-m", "livescope.ui.viewer", "--connect", publish, "--control", control]
            view_cmd += ["--settings", os.path.join(tmp, "view.ini")]
            view_proc = subprocess.Popen(view_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif viewer == "napari dock":
            import napari

            from livescope.ui.napari import LiveWidget

            napari_viewer = napari.Viewer(show=True)
            napari_viewer.window._qt_window.resize(1600, 1000)
            widget = LiveWidget(napari_viewer, preview=publish, control=control)
            napari_viewer.window.add_dock_widget(widget, area="right")
            widget.connect_daemon()
        _pump(app, warmup_s)
        me = psutil.Process(view_proc.pid) if view_proc is not None else psutil.Process()
        s0, c0, v0, t0 = ask(control, "status"), _cpu_s(dproc), me.cpu_times(), time.perf_counter()
        _pump(app, window_s)
        s1, c1, v1, t1 = ask(control, "status"), _cpu_s(dproc), me.cpu_times(), time.perf_counter()
        assert s0 is not None and s1 is not None, "the daemon stopped answering"
        f0, f1 = s0["frames"], s1["frames"]
        received = f1["received"] - f0["received"]
        drawn = None if widget is None else widget.frames_drawn
        return {
            "viewer": viewer,
            "received": received,
            "fps": received / (t1 - t0),
            "lost": f1["lost"] - f0["lost"],
            "skipped": f1["skipped_frames"] - f0["skipped_frames"],
            "cpu_ms_per_frame": 1000 * (c1 - c0) / max(received, 1),
            "viewer_cpu_pct": (
                100 * (v1.user + v1.system - v0.user - v0.system) / (t1 - t0) if viewer != "no viewer" else 0.0
            ),
            "napari_frames_drawn": drawn,
        }
    finally:
        if "feeder" in locals():
            feeder.terminate()
            feeder.wait(10)
        if widget is not None:
            widget.disconnect_daemon()
        if napari_viewer is not None:
            napari_viewer.close()
        if view_proc is not None:
            view_proc.terminate()
            view_proc.wait(10)
        ask(control, "stop")
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()


def feed(address: str, size: int, fps: float) -> None:
    """A camera: the sim microscope's frames, rendered ahead, sent at ``fps`` until killed."""
    from livescope.bridges.sim import SimConfig, SimSample
    from livescope.bridges.transport import FramePublisher

    sample = SimSample(SimConfig(shape=(size, size)))
    frames = [sample.render(t, 0, 0, 0.0) for t in range(32)]
    pub = FramePublisher(address, stream="camera", pixel_size_um=sample.cfg.pixel_size_um, bits=sample.cfg.bits)
    t0 = time.perf_counter()
    t = 0
    while True:
        delay = t0 + t / fps - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.send(frames[t % len(frames)], index={"t": t})
        t += 1


def bench_daemon_cost(rounds: int, **kw) -> list[dict]:
    import shutil

    tmp = tempfile.mkdtemp(prefix="bench-napari-")
    try:
        return [daemon_cost(v, tmp=tmp, **kw) for _ in range(rounds) for v in VIEWERS]  # in turns
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="redraws timed per display")
    ap.add_argument("--part", choices=("redraws", "daemon", "all"), default="all")
    ap.add_argument("--engines", default="register", help="the daemon's chain for the cost runs")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--fps", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=2, help="daemon runs per viewer, in turns")
    ap.add_argument("--window", type=float, default=15.0, help="seconds measured per daemon run")
    ap.add_argument("--feed", metavar="ADDR", help=argparse.SUPPRESS)  # the camera process of part 3
    args = ap.parse_args()
    if args.feed:
        return feed(args.feed, args.size, args.fps)
    xvfb = _xvfb()
    rows, costs = [], []
    try:
        if args.part in ("redraws", "all"):
            rows = bench_redraws(args.n) + bench_napari(args.n)  # the live viewer's rows, then napari's
        if args.part in ("daemon", "all"):
            costs = bench_daemon_cost(
                args.rounds, engines=args.engines, size=args.size, fps=args.fps, warmup_s=4.0, window_s=args.window
            )
    finally:
        if xvfb is not None:
            xvfb.terminate()
    if rows:
        print(f"{'display':<70} {'redraws/s':>10} {'median ms':>10}")
        for name, rate, ms in rows:
            print(f"{name:<70} {rate:>10.1f} {ms:>10.1f}")
    if costs:
        print(
            f"\ndaemon --source zmq: the sim's {args.size}x{args.size} frames at {args.fps:g} fps, "
            f"--engines {args.engines}, {args.window:g} s measured per run"
        )
        print("| viewer | frames received | fps in | lost | skipped | daemon CPU ms/frame | viewer CPU % |")
        print("|---|---|---|---|---|---|---|")
        for r in costs:
            print(
                f"| {r['viewer']} | {r['received']} | {r['fps']:.1f} | {r['lost']} | {r['skipped']} "
                f"| {r['cpu_ms_per_frame']:.2f} | {r['viewer_cpu_pct']:.0f} |"
            )
        base = np.median([r["cpu_ms_per_frame"] for r in costs if r["viewer"] == "no viewer"])
        for v in VIEWERS[1:]:
            m = np.median([r["cpu_ms_per_frame"] for r in costs if r["viewer"] == v])
            print(f"{v}: daemon CPU per frame {m:.2f} ms, {m / base:.2f}x no viewer's {base:.2f} ms (medians)")


if __name__ == "__main__":
    main()
