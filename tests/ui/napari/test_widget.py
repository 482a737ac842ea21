"""The live dock widget with a real daemon: one layer per product updated in place at screen rate
(never a layer per frame), the daemon's counts, its events, engines turned off and on."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari extra: pip install 'livescope[napari]'")
pytest.importorskip("pytestqt")

from livescope.daemon.cli import run_daemon  # noqa: E402
from livescope.daemon.config import DaemonConfig  # noqa: E402


@pytest.fixture
def daemon(free_address, tmp_path):
    """The sim microscope through a real daemon (previews and control sockets), in a thread."""
    cfg = DaemonConfig(
        source="sim",
        frames=100000,  # until stopped
        sim_shape=(64, 64),
        sim_interval_s=0.01,
        engines=["passthrough"],
        engine_params={"passthrough": {"delay_s": 0.02}},
        complete="off",
        out=tmp_path / "live.zarr",
        ingest=free_address(),
        publish=free_address(),
        control=free_address(),
        preview_hz=50,
    )
    started = threading.Event()
    box = {}

    def on_started(pipeline):
        box["pipeline"] = pipeline
        started.set()

    thread = threading.Thread(target=lambda: run_daemon(cfg, on_started=on_started), daemon=True)
    thread.start()
    assert started.wait(20)
    yield cfg, box["pipeline"]
    box["pipeline"].request_stop()
    thread.join(20)


def test_one_layer_per_product_updated_in_place(qtbot, daemon):
    from napari.components import ViewerModel

    from livescope.ui.napari import LiveWidget
    from livescope.ui.napari._widget import grid_of

    cfg, pipeline = daemon
    viewer = ViewerModel()
    widget = LiveWidget(viewer, preview=cfg.publish, control=cfg.control)
    qtbot.addWidget(widget)
    widget.connect_daemon()
    try:
        qtbot.waitUntil(
            lambda: min(widget.updates.get(n, 0) for n in ("live raw", "live passthrough")) >= 3, timeout=10000
        )
        assert sorted(layer.name for layer in viewer.layers) == ["live passthrough", "live raw"]
        raw = viewer.layers["live raw"]
        first_seq = raw.metadata["livescope"]["seq"]
        drawn = widget.frames_drawn
        qtbot.waitUntil(lambda: widget.frames_drawn >= drawn + 20, timeout=10000)
        # the same two layers, their data replaced by newer frames
        assert len(viewer.layers) == 2 and viewer.layers["live raw"] is raw
        assert raw.metadata["livescope"]["seq"] > first_seq
        assert raw.data.shape == (64, 64) and raw.data.dtype == np.uint16
        assert grid_of(viewer).enabled
        # the daemon's counts from its control socket
        # (the first status may predate the first frame: the link asks twice a second)
        qtbot.waitUntil(lambda: (widget.status.get("frames") or {}).get("received", 0) > 0, timeout=5000)
        assert "received" in widget.telemetry.text() and "skipped frames" in widget.telemetry.text()
        # events, as the daemon numbers them
        pipeline.add_event({"kind": "novelty", "t": 3, "score": 9.5, "bbox": [1, 2, 5, 6]})
        qtbot.waitUntil(lambda: widget.event_list.count() == 1, timeout=5000)
        assert "novelty" in widget.event_list.item(0).text() and "t=3" in widget.event_list.item(0).text()
        # an engine turned off from napari, and on again
        qtbot.waitUntil(lambda: "passthrough" in widget.engine_boxes, timeout=5000)
        widget.engine_boxes["passthrough"].setChecked(False)
        qtbot.waitUntil(lambda: not pipeline.status()["engines"]["passthrough"]["enabled"], timeout=5000)
        # the box follows the daemon's status (a reply sent before the command may come after it)
        qtbot.waitUntil(lambda: widget.status["engines"]["passthrough"]["enabled"] is False, timeout=5000)
        qtbot.waitUntil(lambda: not widget.engine_boxes["passthrough"].isChecked(), timeout=5000)
        widget.engine_boxes["passthrough"].setChecked(True)
        qtbot.waitUntil(lambda: pipeline.status()["engines"]["passthrough"]["enabled"], timeout=5000)
    finally:
        widget.disconnect_daemon()
    assert not widget.connected and len(viewer.layers) == 2  # the last frames stay


def test_levels_one_layer_a_tick_and_only_when_they_moved(qtbot, monkeypatch):
    """Six layers due for their once-a-second levels at once get them over six ticks, one a tick
    (napari's refresh and its controls' redraw are the slow part of a paint); levels that moved
    less than 5 % of the range are not set again."""
    from napari.components import ViewerModel

    from livescope.bridges.protocol import Frame
    from livescope.ui.napari import LiveWidget, _widget

    monkeypatch.setattr(_widget, "LEVELS_EVERY_S", 600.0)  # due only when the test says so
    viewer = ViewerModel()
    widget = LiveWidget(viewer, control="")
    qtbot.addWidget(widget)
    products = [f"product{i}" for i in range(6)]
    rng = np.random.default_rng(0)

    def tick(scale: float, t: int) -> None:  # one tick of the dock's timer, with a frame of each
        widget.draw(
            {
                ("s", p, 0, 0, 0): Frame(
                    {"seq": t, "product": p, "index": {"t": t}}, (rng.random((256, 256)) * scale).astype(np.float32)
                )
                for p in products
            }
        )

    tick(100.0, 0)  # the layers, made with their first frame's levels
    layers = [viewer.layers[f"live {p}"] for p in products]
    assert all(la.contrast_limits[1] < 101 for la in layers)
    changed: list[set[str]] = []
    for la in layers:
        la.events.contrast_limits.connect(lambda _e, name=la.name: changed[-1].add(name))
    widget._levels_at.clear()  # every layer due at once
    for t in range(1, 7):  # ten times brighter: every layer's levels have to follow
        changed.append(set())
        tick(1000.0, t)
    assert [len(c) for c in changed] == [1] * 6  # one layer a tick
    assert set().union(*changed) == {la.name for la in layers}  # and each layer in turn
    assert all(990 < la.contrast_limits[1] < 1001 for la in layers)
    for t in range(7, 19):  # the same brightness again: levels within 5 %, nothing set
        widget._levels_at.clear()
        changed.append(set())
        tick(1000.0, t)
    assert set().union(*changed[6:]) == set()
    assert all(np.asarray(la.data).max() > 900 for la in layers)  # the frames themselves still drawn


def test_contrast_limits_set_by_hand_stay_until_auto_levels_are_ticked_again(qtbot, monkeypatch):
    """A layer whose contrast limits the user set in napari keeps them while its frames get ten
    times brighter (auto levels leave it; the other layers follow); unticking auto levels freezes
    every layer; ticking it again has every layer follow its frames, the hand-set one included."""
    from napari.components import ViewerModel

    from livescope.bridges.protocol import Frame
    from livescope.ui.napari import LiveWidget, _widget

    monkeypatch.setattr(_widget, "LEVELS_EVERY_S", 0.0)  # due at every tick, one layer a tick
    viewer = ViewerModel()
    widget = LiveWidget(viewer, control="")
    qtbot.addWidget(widget)
    rng = np.random.default_rng(1)

    def ticks(scale: float, n: int = 4) -> None:  # n ticks, a frame of both products in each
        for t in range(n):
            widget.draw(
                {
                    ("s", p, 0, 0, 0): Frame({"seq": t, "product": p}, frame)
                    for p in ("raw", "denoised")
                    for frame in [(rng.random((64, 64)) * scale).astype(np.float32)]
                }
            )

    ticks(100.0, 1)
    raw, den = viewer.layers["live raw"], viewer.layers["live denoised"]
    raw.contrast_limits = (0.0, 50.0)  # the user, in napari's layer controls
    ticks(1000.0)
    assert raw.contrast_limits == [0.0, 50.0]
    assert den.contrast_limits[1] > 900  # the other layer follows
    widget.auto_levels_box.setChecked(False)
    ticks(10000.0)
    assert raw.contrast_limits == [0.0, 50.0] and den.contrast_limits[1] < 1001  # nothing follows
    widget.auto_levels_box.setChecked(True)
    ticks(10000.0)
    assert raw.contrast_limits[1] > 9000 and den.contrast_limits[1] > 9000  # every layer follows again
    assert np.asarray(raw.data).max() > 9000  # frames were drawn all along


def test_thumbnails_every_few_seconds_not_with_every_levels_check(qtbot, monkeypatch):
    """Levels are checked once a second; napari's refresh with the thumbnail (the layer list
    repaints for each) only every THUMBNAIL_EVERY_S, so six layers do not repaint it six times a second."""
    import itertools
    import types

    from napari.components import ViewerModel

    from livescope.bridges.protocol import Frame
    from livescope.ui.napari import LiveWidget, _widget

    clock = [0.0]
    monkeypatch.setattr(_widget, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    viewer = ViewerModel()
    widget = LiveWidget(viewer, control="")
    qtbot.addWidget(widget)
    frame = np.random.default_rng(2).random((32, 32)).astype(np.float32) * 100

    def tick(t: int) -> None:  # one tick at t/10 s: one frame of the one product
        clock[0] = t / 10
        widget.draw({("s", "raw", 0, 0, 0): Frame({"seq": t, "product": "raw"}, frame + t * 1e-3)})

    tick(0)
    layer = viewer.layers["live raw"]
    thumbnails: list[float] = []
    layer.events.thumbnail.connect(lambda _e: thumbnails.append(clock[0]))
    checked = []
    for t in range(1, 121):  # twelve seconds at ten ticks a second
        before = widget._levels_at["live raw"]
        tick(t)
        if widget._levels_at["live raw"] != before:
            checked.append(clock[0])
    assert len(checked) == 12  # levels: once a second
    assert thumbnails and all(b - a >= _widget.THUMBNAIL_EVERY_S - 1e-9 for a, b in itertools.pairwise(thumbnails))
    assert len(thumbnails) == 12 // int(_widget.THUMBNAIL_EVERY_S)  # 5 s and 10 s


def test_the_slow_update_goes_round_every_layer(qtbot, monkeypatch):
    """With more layers than ticks in a second, the one slow update a tick still reaches every
    layer in turn (the most overdue first), never the same first few again and again."""
    import types

    from napari.components import ViewerModel

    from livescope.bridges.protocol import Frame
    from livescope.ui.napari import LiveWidget, _widget

    clock = iter(range(1, 10**6))
    monkeypatch.setattr(_widget, "time", types.SimpleNamespace(monotonic=lambda: float(next(clock))))
    monkeypatch.setattr(_widget, "LEVELS_EVERY_S", 0.0)  # every layer due at every tick
    viewer = ViewerModel()
    widget = LiveWidget(viewer, control="")
    qtbot.addWidget(widget)
    products = [f"p{i:02d}" for i in range(9)]
    frame = np.zeros((16, 16), np.float32)

    def frames(t: int) -> dict:
        return {("s", p, 0, 0, 0): Frame({"seq": t, "product": p, "index": {"t": t}}, frame + t) for p in products}

    widget.draw(frames(0))
    assert [la.name for la in viewer.layers] == [f"live {p}" for p in products]  # tiles in key order
    served = []
    for t in range(1, 19):
        before = dict(widget._levels_at)
        widget.draw(frames(t))
        served.append([n for n, at in widget._levels_at.items() if at != before[n]])
    assert [len(s) for s in served] == [1] * 18  # one slow update a tick
    names = sorted(f"live {p}" for p in products)
    assert sorted(n for s in served[:9] for n in s) == names  # every layer once in nine ticks
    assert sorted(n for s in served[9:] for n in s) == names  # and again
    assert all(np.asarray(la.data).max() == 18 for la in viewer.layers)  # every frame drawn


def test_the_dock_says_how_fast_napari_draws_against_the_previews(qtbot, free_address):
    """Two products published at 40 Hz, the dock's timer at 20 Hz: it says it redraws about 20
    times a second while previews arrive at about 40 a second per layer."""
    import time

    from napari.components import ViewerModel

    from livescope.bridges.transport import PreviewPublisher
    from livescope.ui.napari import LiveWidget

    address = free_address()
    pub = PreviewPublisher(address)
    viewer = ViewerModel()
    widget = LiveWidget(viewer, preview=address, control="", fps=20)
    qtbot.addWidget(widget)
    widget.connect_daemon()
    stop = threading.Event()
    frame = np.zeros((32, 32), np.uint16)

    def publish() -> None:
        seq = 0
        while not stop.is_set():
            for product in ("raw", "denoised"):
                header = {"v": 1, "stream": "s", "seq": seq, "product": product, "index": {"t": seq}}
                pub.send({**header, "shape": [32, 32], "dtype": "uint16", "bits": 12}, frame + seq)
            seq += 1
            time.sleep(1 / 40)

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    try:
        qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=10000)
        assert widget.state_label.text() == f"receiving previews from {address}"
        widget._rate_at = (time.monotonic(), widget._ticks_drawn, widget.previews.received)  # both layers in
        qtbot.waitUntil(lambda: widget.arrival_rate > 0, timeout=5000)
        qtbot.wait(1200)  # one more window, all of it streaming
        assert 8 <= widget.draw_rate <= 21, widget.draw_rate  # the timer's 20 Hz at most
        assert 15 <= widget.arrival_rate <= 42, widget.arrival_rate  # 40 Hz at most, per layer
        text = widget.rate_label.text()
        assert f"redraws {widget.draw_rate:.1f}/s" in text and f"{widget.arrival_rate:.1f}/s per layer" in text
    finally:
        stop.set()
        thread.join()
        widget.disconnect_daemon()
        pub.close()
    assert widget.rate_label.text() == ""


def test_the_widget_is_contributed_to_napari():
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()
    manifest = pm.get_manifest("livescope")
    assert [w.display_name for w in manifest.contributions.widgets] == ["livescope live"]
    assert manifest.contributions.readers[0].accepts_directories


def test_napari_is_imported_by_the_plugin_only():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import livescope.daemon.cli, livescope.daemon.pipeline, livescope.bridges.store, livescope.ui.viewer\n"
        "import livescope.ui.napari\n"  # the plugin package itself loads napari only on use
        "assert 'napari' not in sys.modules, sorted(m for m in sys.modules if m.startswith('napari'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
