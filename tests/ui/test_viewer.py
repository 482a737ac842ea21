"""The live viewer, offscreen: panels, levels, readout, selectors, events, ROI, snapshot, layout,
and (with a real in-process daemon) every control and reconnecting after a restart."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pyqtgraph")
pytest.importorskip("pytestqt")

from livescope.bridges.transport import FramePublisher, PreviewPublisher  # noqa: E402
from livescope.ui.panels import apply_levels, percentile_levels  # noqa: E402
from livescope.ui.viewer import LiveViewer  # noqa: E402


@pytest.fixture
def viewer_factory(qtbot, tmp_path):
    made = []

    def make(connect, control=None, **kw):
        kw.setdefault("settings_path", tmp_path / "viewer.ini")
        kw.setdefault("snapshot_dir", tmp_path)
        v = LiveViewer(connect, control, **kw)
        qtbot.addWidget(v.win)
        v.win.show()
        made.append(v)
        return v

    yield make
    for v in made:
        v.close()


def _publisher(free_address):
    addr = free_address()
    return addr, PreviewPublisher(addr)


def _send(pub, product, arr, seq, *, p=0, c=0, z=0, **extra):
    header = {
        "v": 1,
        "stream": "s",
        "seq": seq,
        "product": product,
        "index": {"p": p, "c": c, "z": z, "t": seq},
        "shape": list(arr.shape),
        "dtype": arr.dtype.name,
        **extra,
    }
    pub.send(header, arr)


def _feed_until(qtbot, pub, frames_for_seq, done, timeout=20000, start=0):
    """Publish (PUB drops messages sent before the subscription lands, so keep sending) until ``done``."""
    state = {"seq": start}

    def check():
        for product, arr, extra in frames_for_seq(state["seq"]):
            _send(pub, product, arr, state["seq"], **extra)
        state["seq"] += 1
        return done()

    qtbot.waitUntil(check, timeout=timeout)
    return state["seq"]


def test_one_panel_per_product_with_the_newest_frame_and_a_composite(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    rng = np.random.default_rng(0)
    sent = {}
    try:

        def frames(seq):
            out = []
            for product in ("raw", "deconvolved", "background", "slow", "fast"):
                dtype = np.uint16 if product == "raw" else np.float32
                arr = (rng.random((32, 40)) * 1000 + seq).astype(dtype)
                sent[(product, seq)] = arr
                out.append((product, arr, {"bits": 12, "pixel_size_um": 0.5}))
            return out

        _feed_until(
            qtbot,
            pub,
            frames,
            lambda: (
                {"raw", "deconvolved", "slow", "composite"} <= set(v.panels)
                and all(p.array is not None for p in v.panels.values())
            ),
        )
        for name, panel in v.panels.items():
            if panel.composite:
                continue
            np.testing.assert_array_equal(panel.array, sent[(name, panel.seq)])  # the frame with its own seq
            assert panel.image.image is panel.array or np.array_equal(panel.image.image, panel.array)
            lo, hi = panel.levels  # from a frame of a second ago at most (levels are not per frame)
            assert 0 <= lo < hi <= 1000 + panel.seq
        v.auto_contrast()
        for panel in v.panels.values():
            if not panel.composite:
                assert panel.levels == pytest.approx(percentile_levels(panel.array))
        assert v.panels["raw"].image.image.dtype == np.uint16  # no conversion on the way to the screen
        rgb = v.panels["composite"].array
        assert rgb.shape == (32, 40, 3) and rgb.dtype == np.uint8
        # slow is green only, fast magenta (red + blue): green differs from red where slow is bright
        assert not np.array_equal(rgb[..., 0], rgb[..., 1])
        assert v.visible_panels()[:2] == ["raw", "deconvolved"]
    finally:
        pub.close()


def test_saturated_pixels_levels_histogram_and_readout(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    raw = np.full((20, 30), 500, np.uint16)
    raw[5, 7] = 4095  # saturated at 12 bits
    raw[10, 20] = 1234
    try:
        _feed_until(
            qtbot,
            pub,
            lambda s: [
                ("raw", raw, {"bits": 12, "pixel_size_um": 0.25}),
                ("denoised", raw.astype(np.float32) / 2, {"pixel_size_um": 0.25}),
            ],
            lambda: "denoised" in v.panels and v.panels["denoised"].array is not None,
        )
        panel = v.panels["raw"]
        assert panel.saturation.isVisible()
        mask = panel.saturation.image[..., 3] > 0
        assert mask.sum() == 1 and mask[5, 7]
        # the cursor over (x 20, y 10): every panel says its value, the status bar px and um
        v._readout(20.4, 10.6, raw.shape)
        assert panel.widget.value.text() == "1234"
        assert v.panels["denoised"].widget.value.text() == "617"
        assert "x 20  y 10 px" in v.cursor_label.text() and "5.12, 2.62 µm" in v.cursor_label.text()
        # dragging the histogram's levels fixes them: auto-levels no longer move them
        panel.hist.region.setRegion((400, 900))
        assert panel.levels == pytest.approx((400, 900)) and not panel.auto
        v._last_levels = 0
        v.update()
        assert panel.levels == pytest.approx((400, 900))
        v.auto_contrast()  # on demand: back to percentiles and auto
        assert panel.auto and panel.levels != pytest.approx((400, 900))
        assert v.panels["denoised"].levels[1] <= 617.0 + 1
    finally:
        pub.close()


def test_channel_selector_and_panel_visibility(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    a = np.full((16, 16), 100, np.uint16)
    b = np.full((16, 16), 900, np.uint16)
    try:
        _feed_until(
            qtbot,
            pub,
            lambda s: [
                ("raw", a, {"c": 0, "channel": "GFP"}),
                ("raw", b, {"c": 1, "channel": "mCherry"}),
                ("deconvolved", a.astype(np.float32), {"c": 0}),
            ],
            lambda: 1 in v.seen["c"] and "deconvolved" in v.panels and v.panels["raw"].array is not None,
        )
        assert v.panels["raw"].array[0, 0] == 100
        combo = v.selectors["c"]
        assert [combo.itemText(i) for i in range(combo.count())] == ["GFP", "mCherry"]
        v.select("c", 1)
        _feed_until(
            qtbot,
            pub,
            lambda s: [("raw", b, {"c": 1, "channel": "mCherry"})],
            lambda: v.panels["raw"].array is not None and v.panels["raw"].array[0, 0] == 900,
        )
        v.set_panel_visible("deconvolved", False)
        assert "deconvolved" not in v.visible_panels() and not v.panels["deconvolved"].widget.isVisible()
        v.toggle_panel_number(2)  # number keys follow the panel order: 2 = deconvolved
        assert "deconvolved" in v.visible_panels()
    finally:
        pub.close()


def test_event_click_shows_its_frame_from_the_buffer_and_roi_trace(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    frames = {}
    try:

        def make(seq):
            arr = np.full((24, 24), 100 + seq, np.uint16)
            frames[seq] = arr
            return [("raw", arr, {}), ("deconvolved", arr.astype(np.float32) * 2, {})]

        last = _feed_until(qtbot, pub, make, lambda: v.panels.get("raw") is not None and v.panels["raw"].seq >= 12)
        shown_seq = v.panels["raw"].seq
        target = min(s for s in v.buffer.seqs() if s < shown_seq)
        v.novelty.sigEventClicked.emit({"id": 3, "seq": target, "t": target, "score": 9.0})
        assert v.paused and v.panels["raw"].seq == target
        np.testing.assert_array_equal(v.panels["raw"].array, frames[target])
        assert "event 3" in v.banner.text()
        v.go_live()
        assert not v.paused
        _feed_until(qtbot, pub, make, lambda: v.panels["raw"].seq > shown_seq, start=last)
        # the ROI trace: the mean inside the rectangle of raw, and of the restored product
        raw_series = v.roi_trace.series["raw"]
        assert raw_series[1][-1] == pytest.approx(100 + raw_series[0][-1])
        ts, vs = v.roi_trace.series["deconvolved"]
        assert vs[-1] == pytest.approx(2 * (100 + ts[-1]))
        assert v.roi_trace.restored_name == "deconvolved"
    finally:
        pub.close()


def test_snapshot_shortcuts_and_layout_remembered(qtbot, viewer_factory, free_address, tmp_path):
    from pyqtgraph.Qt import QtCore

    addr, pub = _publisher(free_address)
    settings = tmp_path / "layout.ini"
    v = viewer_factory(addr, settings_path=settings)
    try:
        _feed_until(
            qtbot,
            pub,
            lambda s: [("raw", np.full((16, 16), s, np.uint16), {}), ("fast", np.ones((16, 16), np.float32), {})],
            lambda: "fast" in v.panels and v.panels["fast"].array is not None,
        )
        png = v.snapshot()
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        v.win.activateWindow()
        qtbot.waitUntil(lambda: v.win.isActiveWindow(), timeout=3000)
        qtbot.keyClick(v.win, QtCore.Qt.Key.Key_Space)
        assert v.paused
        qtbot.keyClick(v.win, QtCore.Qt.Key.Key_Escape)
        assert not v.paused
        qtbot.keyClick(v.win, QtCore.Qt.Key.Key_L)
        assert not v.auto_levels
        v.set_panel_visible("fast", False)
        v.panels["raw"].set_cmap("HiLo")
        v.dock_telemetry.setVisible(False)
        v.close()
        w = viewer_factory(addr, settings_path=settings)
        assert "fast" in w.hidden and not w.auto_levels and w.cmaps["raw"] == "HiLo"
        assert not w.dock_telemetry.isVisible()
    finally:
        pub.close()


# -- with a real daemon (in-process): controls and reconnecting ------------------------------------


def _daemon(free_address, addresses=None, engines=("register", "deconvolve", "denoise", "decompose")):
    from livescope.daemon.config import DaemonConfig
    from livescope.daemon.control import ControlServer
    from livescope.daemon.pipeline import Pipeline

    ingest, publish, control = addresses or (free_address(), free_address(), free_address())
    cfg = DaemonConfig(
        source="zmq",
        engines=list(engines),
        out=None,
        ingest=ingest,
        publish=publish,
        control=control,
        exit_on_end=False,
        preview_hz=50,
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(control, pipeline.handle)
    pipeline.start()
    server.start()
    return pipeline, server, (ingest, publish, control)


def _stop(pipeline, server):
    server.close()
    pipeline.close()


def test_each_control_changes_the_daemons_status(qtbot, viewer_factory, free_address):
    pipeline, server, (_, publish, control) = _daemon(free_address)
    v = viewer_factory(publish, control)
    try:
        qtbot.waitUntil(
            lambda: set(v.controls.boxes) == {"register", "deconvolve", "denoise", "decompose"}, timeout=10000
        )
        engines = lambda: pipeline.status()["engines"]  # noqa: E731
        box = v.controls.boxes["deconvolve"]
        assert box.enabled.isChecked()
        box.enabled.click()
        qtbot.waitUntil(lambda: not engines()["deconvolve"]["enabled"], timeout=5000)
        qtbot.waitUntil(lambda: "disabled by a control command" in box.state.text(), timeout=5000)
        box.enabled.click()
        qtbot.waitUntil(lambda: engines()["deconvolve"]["enabled"], timeout=5000)

        box.widgets["iterations"].setValue(7)
        qtbot.waitUntil(lambda: engines()["deconvolve"]["params"].get("iterations") == 7, timeout=5000)

        combo = v.controls.boxes["denoise"].widgets["backend"]
        i = combo.findText("torch")
        combo.setCurrentIndex(i)
        combo.activated.emit(i)  # what a user's pick emits
        qtbot.waitUntil(lambda: engines()["denoise"]["params"].get("backend") == "torch", timeout=5000)

        lags = v.controls.boxes["decompose"].widgets["lags"]
        lags.setText("1, 3, 9")
        lags.editingFinished.emit()
        qtbot.waitUntil(lambda: engines()["decompose"]["params"].get("lags") == [1, 3, 9], timeout=5000)
        lags.setText("0, x")  # refused here, never sent
        lags.editingFinished.emit()
        assert "positive" in lags.toolTip()

        v.controls.boxes["register"].enabled.click()
        qtbot.waitUntil(lambda: not engines()["register"]["enabled"], timeout=5000)
        # the status came back to the viewer too: telemetry and status bar show the daemon's numbers
        qtbot.waitUntil(lambda: "running" in v.status_label.text(), timeout=5000)
        assert v.telemetry.metrics["lost"].text() == "0"
    finally:
        _stop(pipeline, server)


def test_reconnects_by_itself_after_the_daemon_restarts(qtbot, viewer_factory, free_address):
    pipeline, server, addresses = _daemon(free_address, engines=())
    ingest, publish, control = addresses
    v = viewer_factory(publish, control)
    cam = FramePublisher(ingest, stream="cam")
    try:
        t = {"n": 0}

        def frames_arrive(value):
            cam.send(np.full((16, 16), value, np.uint16), index={"t": t["n"]})
            t["n"] += 1
            return (
                v.panels.get("raw") is not None
                and v.panels["raw"].array is not None
                and v.panels["raw"].array[0, 0] == value
            )

        qtbot.waitUntil(
            lambda: frames_arrive(11) and v.link.connected and v.status is not None and v.status["uptime_s"] > 1.0,
            timeout=15000,
        )
        _stop(pipeline, server)
        qtbot.waitUntil(lambda: "No livescope daemon answers" in v.banner.text(), timeout=10000)
        assert v.banner.isVisible()

        pipeline, server, _ = _daemon(free_address, addresses, engines=())
        t["n"] = 0
        qtbot.waitUntil(lambda: frames_arrive(22), timeout=20000)
        qtbot.waitUntil(lambda: v.link.connected and "restarted" in v.banner.text(), timeout=10000)
        assert "No livescope daemon" not in v.banner.text()
    finally:
        cam.close()
        _stop(pipeline, server)


def test_no_daemon_is_said_without_blocking(qtbot, viewer_factory, free_address):
    v = viewer_factory(free_address(), free_address())
    qtbot.waitUntil(lambda: "No livescope daemon answers" in v.banner.text(), timeout=8000)
    # the GUI thread stayed free: the draw timer kept running while the control thread waited
    import time

    t0 = time.perf_counter()
    v.update()
    assert time.perf_counter() - t0 < 0.1


def test_apply_levels_matches_what_pyqtgraph_draws(qtbot):
    """The screenshot test renders expected pixels with apply_levels: check it against ImageItem."""
    import pyqtgraph as pg

    from livescope.ui.style import lut

    arr = np.random.default_rng(1).integers(0, 4096, (32, 48), dtype=np.uint16)
    table = lut("Fire")
    item = pg.ImageItem(axisOrder="row-major")
    item.setImage(arr, autoLevels=False, levels=(500, 3000), lut=table)
    item.render()
    q = item.qimage.convertToFormat(item.qimage.Format.Format_RGB888)
    ptr = q.constBits()
    got = np.frombuffer(ptr, np.uint8, q.sizeInBytes()).reshape(q.height(), q.bytesPerLine())[:, : 48 * 3]
    got = got.reshape(32, 48, 3)
    want = apply_levels(arr, (500, 3000), table)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 8
    assert np.mean(np.all(got == want, axis=-1)) > 0.95


def test_fit_button_starts_live_fitting_in_the_daemon(qtbot, viewer_factory, free_address):
    pipeline, server, (_, publish, control) = _daemon(free_address, engines=("denoise",))
    v = viewer_factory(publish, control)
    try:
        qtbot.waitUntil(lambda: "denoise" in v.controls.boxes, timeout=10000)
        box = v.controls.boxes["denoise"]
        box.fit_frames.setValue(4)
        box.fit_steps.setValue(2)
        box.fit_button.click()
        # no frames arrive in this test: the daemon waits for them, and the viewer says so
        qtbot.waitUntil(lambda: (pipeline.status()["fit"] or {}).get("state") == "collecting", timeout=5000)
        assert pipeline.status()["fit"]["frames"] == 4 and pipeline.status()["fit"]["steps"] == 2
        qtbot.waitUntil(lambda: "collecting 0/4" in box.fit_state.text(), timeout=5000)
        assert not box.fit_button.isEnabled()
    finally:
        _stop(pipeline, server)


# -- channels overlaid in their colours; event boxes -------------------------------------------------


def _rendered(item):
    """What pyqtgraph draws for an ImageItem, as (h, w, 3) uint8."""
    item.render()
    q = item.qimage.convertToFormat(item.qimage.Format.Format_RGB888)
    h, w = q.height(), q.width()
    return (
        np.frombuffer(q.constBits(), np.uint8, q.sizeInBytes())
        .reshape(h, q.bytesPerLine())[:, : w * 3]
        .reshape(h, w, 3)
        .copy()
    )


def test_overlay_shows_each_channel_in_its_colour_and_toggles_back(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    gfp = np.full((16, 20), 100, np.uint16)
    gfp[:, :8] = 1000  # channel 0 bright on the left
    mch = np.full((16, 20), 50, np.uint16)
    mch[:, 12:] = 3000  # channel 1 bright on the right
    frames = lambda s: [("raw", gfp, {"c": 0, "channel": "GFP"}), ("raw", mch, {"c": 1, "channel": "mCherry"})]  # noqa: E731
    try:
        last = _feed_until(
            qtbot,
            pub,
            frames,
            lambda: 1 in v.seen["c"] and v.panels.get("raw") is not None and v.panels["raw"].array is not None,
        )
        panel = v.panels["raw"]
        assert panel.image.image.ndim == 2  # one channel through the colour map
        v.overlay_box.setChecked(True)  # what the toolbar checkbox (and O) does

        def coloured() -> bool:
            # per-channel levels come from the viewer's levels timer: wait for the first ones
            got = _rendered(panel.image)
            return got.shape == (16, 20, 3) and bool((got[:, :8, 1] >= 250).all() and (got[:, 12:, 0] >= 250).all())

        last = _feed_until(
            qtbot,
            pub,
            frames,
            lambda: panel.overlaid and set(panel.overlay_channels) == {0, 1} and coloured(),
            start=last,
        )
        got = _rendered(panel.image)
        assert got.shape == (16, 20, 3)
        left, middle, right = got[:, :8].reshape(-1, 3), got[:, 8:12].reshape(-1, 3), got[:, 12:].reshape(-1, 3)
        # channel 0 green (00FF00), channel 1 magenta (FF00FF), as the store's omero colours
        assert (left[:, 1] >= 250).all() and (left[:, 0] <= 5).all() and (left[:, 2] <= 5).all()
        assert (right[:, 0] >= 250).all() and (right[:, 2] >= 250).all() and (right[:, 1] <= 5).all()
        assert (middle <= 5).all()
        assert "mCherry" in panel.widget.info.text() and "GFP" in panel.widget.info.text()
        # the readout still gives the selected channel's value
        assert panel.value_at(2, 2, gfp.shape) == 1000
        v.select("c", 1)  # the selected channel changes which one the readout follows, not the overlay
        v.update()
        assert panel.overlaid and panel.value_at(15, 2, gfp.shape) == 3000
        v.select("c", 0)
        v.overlay_box.setChecked(False)
        _feed_until(
            qtbot,
            pub,
            frames,
            lambda: not panel.overlaid and panel.image.image is not None and panel.image.image.ndim == 2,
            start=last,
        )
        np.testing.assert_array_equal(panel.image.image, gfp)
        back = _rendered(panel.image)
        assert (back[..., 0] == back[..., 1]).all() and (back[..., 1] == back[..., 2]).all()  # grey again
    finally:
        pub.close()


def test_event_stride_rules_match_the_daemons_downsampling():
    import math

    from livescope.ui.timeline import event_point, event_rect, event_stride

    for height, width in ((700, 1000), (1030, 900), (512, 512), (2048, 2048), (601, 37)):
        step = max(1, math.ceil(max(height, width) / 512))  # the daemon's _downsample
        small = np.zeros((height, width), np.uint8)[::step, ::step].shape
        preview = {"pixel_size_um": 0.1 * width / small[1]}  # the daemon's header scaling
        assert event_stride({"pixel_size_um": 0.1}, preview, small) == (step, "pixel size")
        assert event_stride({"frame_shape": [height, width]}, {}, small) == (step, "frame shape")
        assert event_stride({}, {"frame_shape": [3, height, width]}, small) == (step, "frame shape")
    # neither: the smallest stride that keeps the box inside the preview, flagged as assumed
    assert event_stride({"bbox": [0, 0, 10, 10]}, {"pixel_size_um": 0.2}, (64, 64)) == (1, "assumed")
    assert event_stride({"bbox": [100, 30, 130, 60]}, {}, (64, 64)) == (3, "assumed")
    ev = {"bbox": [8, 12, 20, 28], "centroid": [13.5, 19.5]}
    assert event_rect(ev, 2) == (6.0, 4.0, 8.0, 6.0)
    assert event_point(ev, 2) == (10.0, 7.0)
    assert event_rect({"bbox": [5, 5, 5, 9]}, 1) is None and event_rect({}, 1) is None


def test_clicked_events_box_lands_scaled_on_the_panels(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    try:

        def make(seq):
            arr = np.full((30, 40), 100 + seq, np.uint16)  # a 60x80 frame, previewed with stride 2
            return [("raw", arr, {"pixel_size_um": 0.5}), ("denoised", arr.astype(np.float32), {"pixel_size_um": 0.5})]

        _feed_until(qtbot, pub, make, lambda: "denoised" in v.panels and v.panels["raw"].seq >= 5)
        seq = v.panels["raw"].seq
        event = {
            "id": 1,
            "seq": seq,
            "t": seq,
            "score": 4.0,
            "bbox": [8, 12, 20, 28],
            "centroid": [14.0, 20.0],
            "pixel_size_um": 0.25,
        }
        v.novelty.sigEventClicked.emit(event)
        for name in ("raw", "denoised"):
            box = v.panels[name].event_box
            assert box.isVisible()
            r = box.rect()
            assert (r.x(), r.y(), r.width(), r.height()) == (6.0, 4.0, 8.0, 6.0)
            # where it lands in the window: over preview pixels x 6..14, y 4..10 of the image
            scene = box.mapRectToScene(r)
            image = v.panels[name].image.mapRectFromScene(scene)
            assert (image.x(), image.y(), image.width(), image.height()) == pytest.approx((6, 4, 8, 6), abs=1e-6)
        assert "assumed" not in v.banner.text()
        v.go_live()
        assert not v.panels["raw"].event_box.isVisible()
        # the newest event's ring on the raw panel, for a few seconds
        v.mark_newest_event([{"id": 2, "p": 0, "z": 0, "centroid": [14.0, 20.0], "pixel_size_um": 0.25}])
        mark = v.panels["raw"].event_mark
        assert mark.isVisible()
        pts = mark.data
        assert (pts["x"][0], pts["y"][0]) == (10.25, 7.25)
        v._event_mark_until = 1e-9  # its time is over
        v.poll_daemon()
        assert not mark.isVisible()
    finally:
        pub.close()


def test_trust_badge_follows_the_trust_engines_scores(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    try:
        arr = np.full((24, 24), 7.0, np.float32)
        raw = np.full((24, 24), 100, np.uint16)

        def frames(score, ok):
            return lambda seq: [
                ("raw", raw, {}),
                ("denoised", arr, {"scalars": {"trust_denoised_score": score, "trust_denoised_ok": ok}}),
            ]

        badge = lambda: v.panels["denoised"].widget.trust if "denoised" in v.panels else None  # noqa: E731
        start = _feed_until(
            qtbot,
            pub,
            frames(0.31, 0.0),
            lambda: badge() is not None and badge().isVisible() and "check 0.31" in badge().text(),
        )
        _feed_until(qtbot, pub, frames(0.82, 1.0), lambda: "trusted 0.82" in badge().text(), start=start)
        assert "raw" in v.panels and not v.panels["raw"].widget.trust.isVisible()  # no score, no badge
    finally:
        pub.close()


def test_consistency_badge_follows_the_restore_engines_score(qtbot, viewer_factory, free_address):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    try:
        arr = np.full((24, 24), 7.0, np.float32)

        def frames(score):
            return lambda seq: [("restored", arr, {"scalars": {"consistency": score, "consistency_threshold": 0.44}})]

        badge = lambda: v.panels["restored"].widget.trust if "restored" in v.panels else None  # noqa: E731
        start = _feed_until(
            qtbot,
            pub,
            frames(0.21),
            lambda: badge() is not None and badge().isVisible() and "consistent 0.21 / 0.44" in badge().text(),
        )
        _feed_until(qtbot, pub, frames(5.5), lambda: "inconsistent 5.50 / 0.44" in badge().text(), start=start)
    finally:
        pub.close()


def _grab_pixels(widget):
    q = widget.grab().toImage().convertToFormat(widget.grab().toImage().Format.Format_RGB888)
    h, w = q.height(), q.width()
    return (
        np.frombuffer(q.constBits(), np.uint8, q.sizeInBytes())
        .reshape(h, q.bytesPerLine())[:, : w * 3]
        .reshape(h, w, 3)
        .copy()
    )


def test_trust_map_tints_low_trust_regions_and_toggles(qtbot, viewer_factory, free_address, tmp_path):
    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    raw = np.full((24, 32), 100, np.uint16)
    den = np.tile(np.linspace(0, 1000, 32, dtype=np.float32), (24, 1))
    tmap = np.ones((12, 16), np.float32)  # the trust map at half the product's sampling
    tmap[:, :8] = 0.1  # the left half is not trusted
    tmap[:, 8:12] = 0.4  # a band half tinted
    frames = lambda s: [  # noqa: E731
        ("raw", raw, {}),
        (
            "denoised",
            den,
            {
                "scalars": {
                    "trust_denoised_score": 0.1,
                    "trust_denoised_ok": 0.0,
                }
            },
        ),
        ("trust_denoised", tmap, {}),
    ]
    try:
        last = _feed_until(
            qtbot,
            pub,
            frames,
            lambda: (
                ("s", "trust_denoised", 0, 0, 0) in v.latest
                and "denoised" in v.panels
                and v.panels["denoised"].array is not None
            ),
        )
        assert "trust_denoised" not in v.panels  # a map to tint with, not a panel of its own
        panel = v.panels["denoised"]
        assert not panel.trust_item.isVisible() and not v.trust_overlay  # off until asked for
        v.trust_box.setChecked(True)  # what the toolbar checkbox (and T) does
        last = _feed_until(qtbot, pub, frames, lambda: panel.trust_item.isVisible(), start=last)
        assert not v.panels["raw"].trust_item.isVisible()  # raw has no trust map: no tint
        rgba = panel.trust_item.image
        assert rgba.shape == (12, 16, 4)
        alpha = rgba[..., 3].astype(int)
        assert (alpha[:, :8] == round(255 * 0.6)).all() and (alpha[:, 12:] == 0).all()
        assert (np.abs(alpha[:, 8:12] - 255 * 0.6 * 0.5) <= 1).all()  # 0.4: half way through (0.2, 0.6)
        assert tuple(rgba[0, 0, :3]) == (255, 140, 20)
        # the tint covers exactly the image, though sampled at half its resolution
        tint_rect = panel.trust_item.mapRectToScene(panel.trust_item.boundingRect())
        image_rect = panel.image.mapRectToScene(panel.image.boundingRect())
        assert (tint_rect.x(), tint_rect.y(), tint_rect.width(), tint_rect.height()) == pytest.approx(
            (image_rect.x(), image_rect.y(), image_rect.width(), image_rect.height()), abs=1e-6
        )

        # the window's pixels: amber over the left half, the plain grey ramp on the right. The view
        # ranges itself on the event loop: wait until the image lies inside the window
        def laid_out():
            x0, y0, x1, y1 = v.dump(tmp_path / "dump")["panels"]["denoised"]["image_rect"]
            return 0 <= x0 < x1 <= v.win.width() and 0 <= y0 < y1 <= v.win.height()

        qtbot.waitUntil(laid_out, timeout=5000)
        state = v.dump(tmp_path / "dump")
        assert state["panels"]["denoised"]["trust_overlay"]
        x0, y0, x1, y1 = state["panels"]["denoised"]["image_rect"]
        win = _grab_pixels(v.win)
        want = panel.shown_rgb_with_trust()
        for iy, ix in ((6, 3), (18, 5), (6, 20), (18, 28), (12, 29)):
            wy = int(y0 + (iy + 0.5) * (y1 - y0) / 24)
            wx = int(x0 + (ix + 0.5) * (x1 - x0) / 32)
            np.testing.assert_allclose(win[wy, wx], want[iy, ix], atol=12)
        left = win[int(y0 + 0.5 * (y1 - y0)), int(x0 + 0.1 * (x1 - x0))].astype(int)
        assert left[0] > left[2] + 60  # amber: red well above blue
        # the cursor readout gives the trust under the pointer
        v._readout(2.0, 2.0, den.shape)
        assert "trust denoised 0.10" in v.cursor_label.text()
        v.trust_box.setChecked(False)
        assert not panel.trust_item.isVisible()
        back = _grab_pixels(v.win)[int(y0 + 0.5 * (y1 - y0)), int(x0 + 0.1 * (x1 - x0))].astype(int)
        assert abs(back[0] - back[2]) <= 2  # grey again
    finally:
        pub.close()


# -- several streams in one daemon: the stream selector, following live mode, preview latency -----


def _raw_is(v, value, shape):
    raw = v.panels.get("raw")
    return raw is not None and raw.array is not None and raw.array.shape == shape and raw.array[0, 0] == value


def _pick_stream(v, name):
    """What a user's pick in the Stream selector does."""
    i = v.stream_combo.findData(name)
    assert i >= 0, [v.stream_combo.itemData(k) for k in range(v.stream_combo.count())]
    v.stream_combo.setCurrentIndex(i)
    v.stream_combo.activated.emit(i)


def test_two_cameras_each_in_the_stream_selector_neither_overwrites_the_other(qtbot, viewer_factory, free_address):
    import re

    pipeline, server, (ingest, publish, control) = _daemon(free_address, engines=("passthrough",))
    v = viewer_factory(publish, control)
    cam_a, cam_b = FramePublisher(ingest, stream="camA"), FramePublisher(ingest, stream="camB")
    a0, a1 = np.full((24, 32), 111, np.uint16), np.full((24, 32), 155, np.uint16)  # camA: two channels
    b = np.full((40, 20), 222, np.uint16)  # camB: another shape, one channel
    t = {"a": 0, "b": 0}

    def send(a=True, b_too=False):
        if a:
            cam_a.send(a0, index={"t": t["a"], "c": 0})
            cam_a.send(a1, index={"t": t["a"], "c": 1})
            t["a"] += 1
        if b_too:
            cam_b.send(b, index={"t": t["b"]})
            t["b"] += 1
        return True

    try:
        # one stream: no stream selector
        qtbot.waitUntil(lambda: send() and _raw_is(v, 111, (24, 32)), timeout=15000)
        assert v.streams.names() == ["camA"] and not v.stream_combo.isVisible() and not v.follow_box.isVisible()
        v.select("c", 1)  # camA's channel 1
        qtbot.waitUntil(lambda: send() and _raw_is(v, 155, (24, 32)), timeout=5000)
        # a second camera: the selector appears, listing both; camA stays shown
        qtbot.waitUntil(lambda: send(b_too=True) and v.stream_combo.isVisible(), timeout=10000)
        combo = v.stream_combo
        assert [combo.itemText(i) for i in range(combo.count())] == ["camA", "camB"]
        assert combo.currentText() == "camA" and v.follow_box.isVisible()
        qtbot.waitUntil(lambda: send(b_too=True) and ("camB", "passthrough", 0, 0, 0) in v.latest, timeout=5000)
        assert _raw_is(v, 155, (24, 32)) and v.panels["passthrough"].array.shape == (24, 32)
        # pick camB: its own frames and shape, at its own channel (it has c 0 only)
        _pick_stream(v, "camB")
        assert not v.streams.follow and not v.follow_box.isChecked()  # a pick by hand sticks
        assert v.selection == {"p": 0, "c": 0, "z": 0}
        qtbot.waitUntil(
            lambda: (
                send(b_too=True)
                and _raw_is(v, 222, (40, 20))
                and v.panels["passthrough"].array is not None
                and v.panels["passthrough"].array.shape == (40, 20)
            ),
            timeout=5000,
        )
        assert "shape" not in v._messages  # another camera, not "the stream changed shape"
        # each panel says how late its preview is, from the daemon's header
        raw = v.panels["raw"]
        assert re.fullmatch(r"\d+(\.\d)? ms", raw.widget.latency.text()), raw.widget.latency.text()
        assert float(raw.widget.latency.text().split()[0]) == pytest.approx(raw.header["latency_ms"], abs=0.5)
        assert raw.header["stream"] == "camB"
        # back to camA: channel 1 as it was picked there, camA's frames untouched by camB's
        _pick_stream(v, "camA")
        assert v.selection["c"] == 1 and v.selectors["c"].currentText() == "1"
        qtbot.waitUntil(lambda: send(b_too=True) and _raw_is(v, 155, (24, 32)), timeout=5000)
        # the daemon's preview latency p50 / p99, from its status, in the telemetry and status bar
        qtbot.waitUntil(
            lambda: (
                re.fullmatch(r"\d+ / \d+ ms", v.telemetry.metrics["preview"].text()) is not None
                and "preview p50/p99" in v.status_label.text()
            ),
            timeout=5000,
        )
        st = pipeline.status()["latency"]["preview"]
        assert st["count"] > 0 and st["p99_ms"] >= st["p50_ms"] > 0
    finally:
        cam_a.close()
        cam_b.close()
        _stop(pipeline, server)


def test_follows_live_mode_once_the_shown_stream_is_quiet_and_a_pick_sticks(qtbot, viewer_factory, free_address):
    import time

    addr, pub = _publisher(free_address)
    v = viewer_factory(addr)
    v.streams.quiet_s = 0.3  # 2 s in use: shorter here to keep the test fast
    mda, live = np.full((16, 16), 100, np.uint16), np.full((16, 16), 700, np.uint16)
    both = lambda s: [("raw", mda, {"stream": "mmcore"}), ("raw", live, {"stream": "mmcore-live", "live": True})]  # noqa: E731
    live_only = lambda s: [("raw", live, {"stream": "mmcore-live", "live": True, "latency_ms": 12.4})]  # noqa: E731
    try:
        last = _feed_until(qtbot, pub, both, lambda: len(v.streams.names()) == 2 and _raw_is(v, 100, (16, 16)))
        combo = v.stream_combo
        assert [combo.itemText(i) for i in range(combo.count())] == ["mmcore", "mmcore-live (live)"]
        # both send for longer than quiet_s: the first stream stays shown
        t_end = time.monotonic() + 0.6
        last = _feed_until(qtbot, pub, both, lambda: time.monotonic() > t_end, start=last)
        assert v.streams.selected == "mmcore"
        # the acquisition stops, live mode goes on: after quiet_s, live is shown, and the banner says why
        mda_stopped = time.monotonic()
        last = _feed_until(qtbot, pub, live_only, lambda: v.streams.selected == "mmcore-live", start=last)
        assert time.monotonic() - mda_stopped >= 0.3
        assert combo.currentText() == "mmcore-live (live)"
        assert "Now showing mmcore-live (live): mmcore sent nothing" in v.banner.text()
        last = _feed_until(qtbot, pub, live_only, lambda: _raw_is(v, 700, (16, 16)), start=last)
        assert v.panels["raw"].widget.latency.text() == "12 ms"
        # the user picks the acquisition: it stays, though it is quiet and live mode sends
        _pick_stream(v, "mmcore")
        t_end = time.monotonic() + 0.6
        last = _feed_until(qtbot, pub, live_only, lambda: time.monotonic() > t_end, start=last)
        assert v.streams.selected == "mmcore" and _raw_is(v, 100, (16, 16)) and not v.follow_box.isChecked()
        assert "mmcore sent nothing for" in v.banner.text() and "pick one in Stream" in v.banner.text()
        # following on again: live is shown, and no longer said to be quiet
        v.follow_box.setChecked(True)
        _feed_until(qtbot, pub, live_only, lambda: _raw_is(v, 700, (16, 16)), start=last)
        assert "quiet" not in v._messages
    finally:
        pub.close()


# -- the table of actions: keys and toolbar widgets drive ViewerState (ui/actions.py, ui/state.py) ---


def test_each_key_and_toolbar_toggle_of_the_actions_table_drives_the_state(qtbot, viewer_factory, free_address):
    from pyqtgraph.Qt import QtCore, QtGui, QtWidgets

    from livescope.ui.actions import ACTIONS

    v = viewer_factory(free_address())
    assert {sc.key().toString() for sc in v.shortcuts} == {
        QtGui.QKeySequence(a.shortcut).toString() for a in ACTIONS if a.shortcut
    }
    buttons = [a.text() for a in v.win.findChild(QtWidgets.QToolBar).actions() if a.text()]
    assert buttons == ["Auto levels", "Auto-contrast", "Fit", "ROI", "Pause", "Snapshot"]
    v.win.activateWindow()
    qtbot.waitUntil(lambda: v.win.isActiveWindow(), timeout=3000)
    st = v.state
    for key, attr, widget in (
        (QtCore.Qt.Key.Key_R, "roi_visible", v.act_roi),
        (QtCore.Qt.Key.Key_O, "overlay", v.overlay_box),
        (QtCore.Qt.Key.Key_T, "trust_overlay", v.trust_box),
        (QtCore.Qt.Key.Key_L, "auto_levels", v.act_auto),
        (QtCore.Qt.Key.Key_Space, "paused", v.act_pause),
    ):
        before = getattr(st, attr)
        qtbot.keyClick(v.win, key)
        assert getattr(st, attr) is (not before) and widget.isChecked() is (not before), attr
        qtbot.keyClick(v.win, key)
        assert getattr(st, attr) is before and widget.isChecked() is before, attr
    # the widgets forward the user's ticks, and a change made in code ticks them
    v.act_pause.trigger()
    assert st.paused and "Paused" in v.banner.text()
    v.go_live()
    assert not st.paused and not v.act_pause.isChecked()
    v.set_overlay(True)
    assert v.overlay_box.isChecked()
    v.set_follow(False)
    assert not v.follow_box.isChecked() and not st.follow
    qtbot.keyClick(v.win, QtCore.Qt.Key.Key_F1)
    assert "this list" in v.banner.text() and "<b>PgUp  PgDn</b>" in v.banner.text()
    telemetry = v.dock_telemetry.isVisible()
    qtbot.keyClick(v.win, QtCore.Qt.Key.Key_T, QtCore.Qt.KeyboardModifier.ControlModifier)
    assert v.dock_telemetry.isVisible() is (not telemetry)
