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
    header = {"v": 1, "stream": "s", "seq": seq, "product": product, "index": {"p": p, "c": c, "z": z, "t": seq},
              "shape": list(arr.shape), "dtype": arr.dtype.name, **extra}
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

        _feed_until(qtbot, pub, frames, lambda: {"raw", "deconvolved", "slow", "composite"} <= set(v.panels)
                    and all(p.array is not None for p in v.panels.values()))
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
        _feed_until(qtbot, pub, lambda s: [("raw", raw, {"bits": 12, "pixel_size_um": 0.25}),
                                           ("denoised", raw.astype(np.float32) / 2, {"pixel_size_um": 0.25})],
                    lambda: "denoised" in v.panels and v.panels["denoised"].array is not None)
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
        _feed_until(qtbot, pub, lambda s: [("raw", a, {"c": 0, "channel": "GFP"}), ("raw", b, {"c": 1, "channel": "mCherry"}),
                                           ("deconvolved", a.astype(np.float32), {"c": 0})],
                    lambda: 1 in v.seen["c"] and "deconvolved" in v.panels and v.panels["raw"].array is not None)
        assert v.panels["raw"].array[0, 0] == 100
        combo = v.selectors["c"]
        assert [combo.itemText(i) for i in range(combo.count())] == ["GFP", "mCherry"]
        v.select("c", 1)
        _feed_until(qtbot, pub, lambda s: [("raw", b, {"c": 1, "channel": "mCherry"})],
                    lambda: v.panels["raw"].array is not None and v.panels["raw"].array[0, 0] == 900)
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
        _feed_until(qtbot, pub, lambda s: [("raw", np.full((16, 16), s, np.uint16), {}),
                                           ("fast", np.ones((16, 16), np.float32), {})],
                    lambda: "fast" in v.panels and v.panels["fast"].array is not None)
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
    cfg = DaemonConfig(source="zmq", engines=list(engines), out=None, ingest=ingest, publish=publish,
                       control=control, exit_on_end=False, preview_hz=50)
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
        qtbot.waitUntil(lambda: set(v.controls.boxes) == {"register", "deconvolve", "denoise", "decompose"},
                        timeout=10000)
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
            return v.panels.get("raw") is not None and v.panels["raw"].array is not None \
                and v.panels["raw"].array[0, 0] == value

        qtbot.waitUntil(lambda: frames_arrive(11) and v.link.connected and v.status is not None
                        and v.status["uptime_s"] > 1.0, timeout=15000)
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
