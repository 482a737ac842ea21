"""One click from napari-micromanager: the dock finds the pymmcore-plus core running in napari,
starts a daemon (or uses the running one), streams a real MDA to it and shows its products."""

from __future__ import annotations

import threading
import weakref

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari extra: pip install 'livescope[napari]'")
pytest.importorskip("pytestqt")
useq = pytest.importorskip("useq")
pytest.importorskip("pymmcore_plus")

from livescope.bridges.sim import SimConfig, SimMicroscope  # noqa: E402


@pytest.fixture
def scope():
    scope = SimMicroscope(SimConfig(shape=(64, 64)))
    yield scope
    scope.close()


def _mda() -> object:
    return useq.MDASequence(time_plan={"interval": 0, "loops": 5})  # a client's defaults: no axis_order


def test_attach_starts_a_daemon_streams_the_mda_and_detaches(qtbot, scope, free_address, tmp_path, monkeypatch):
    from napari.components import ViewerModel
    from pymmcore_plus.core import _mmcore_plus

    from livescope.ui.napari import LiveWidget, read_store

    # the sim's core is the one running in this process: CMMCorePlus.instance() returns it
    monkeypatch.setattr(_mmcore_plus, "_instance", weakref.ref(scope.core))
    core = scope.core
    viewer = ViewerModel()
    out = tmp_path / "mm.zarr"
    widget = LiveWidget(
        viewer,
        preview=free_address(),
        control=free_address(),
        ingest=free_address(),
        engines="passthrough",
        out=str(out),
        daemon_args=["--complete", "off"],
    )
    qtbot.addWidget(widget)
    acquired: list[tuple[dict, np.ndarray]] = []
    core.mda.events.frameReady.connect(lambda img, ev, *_: acquired.append((dict(ev.index), img.copy())))
    slots_before = len(core.mda.events.frameReady)
    try:
        widget.attach_button.click()
        qtbot.waitUntil(lambda: widget.attached, timeout=30000)  # no daemon answered: the dock started one
        assert widget.core is core and widget.daemon is not None and widget.daemon.running
        assert len(core.mda.events.frameReady) == slots_before + 1

        core.mda.run(_mda())
        assert len(acquired) == 5
        qtbot.waitUntil(lambda: (widget.status.get("frames") or {}).get("saved") == 5, timeout=15000)
        frames = widget.status["frames"]
        assert frames["received"] == 5 and frames["lost"] == 0 and frames["rejected"] == 0
        assert "mmcore" in widget.status["streams"]
        assert "5 frames sent, 0 dropped" in widget.attach_label.text()
        # the daemon's products, live in napari: its last frame as the MDA acquired it
        qtbot.waitUntil(
            lambda: (
                "live passthrough" in viewer.layers
                and "live raw" in viewer.layers
                and viewer.layers["live raw"].metadata["livescope"]["t"] == 4
            ),
            timeout=10000,
        )
        np.testing.assert_array_equal(viewer.layers["live raw"].data, acquired[-1][1])

        # detach: the bridge leaves the core; the daemon the dock started saves and stops
        widget.attach_button.click()
        assert not widget.attached and len(core.mda.events.frameReady) == slots_before
        qtbot.waitUntil(lambda: widget.daemon is None, timeout=30000)
        assert "exit 0" in widget.attach_label.text() and str(out) in widget.attach_label.text()
        assert not widget.connected
        core.mda.run(_mda())  # detached: nothing of it goes anywhere
    finally:
        widget.shutdown()
    assert widget.daemon is None
    raw = next(data for data, meta, _kind in read_store(str(out)) if meta["name"] == "raw")
    assert raw.shape == (5, 64, 64)  # the first acquisition only, every frame, bit for bit
    np.testing.assert_array_equal(np.asarray(raw), np.stack([img for _, img in acquired[:5]]))


def test_attach_from_napari_micromanager_to_a_running_daemon(qtbot, scope, free_address, tmp_path, monkeypatch):
    """napari-micromanager's window holds its own core (not CMMCorePlus.instance()); a daemon is
    already running at the dock's addresses: the dock uses it and starts none. (The MDA itself is
    not run here: napari-micromanager draws each frame into a layer, which needs OpenGL, absent
    under Qt offscreen; the test above streams one.)"""
    pytest.importorskip("napari_micromanager")
    import napari
    from napari_micromanager.main_window import MainWindow
    from pymmcore_plus.core import _mmcore_plus

    from livescope.daemon.cli import run_daemon
    from livescope.daemon.config import DaemonConfig
    from livescope.ui.napari import LiveWidget

    monkeypatch.setattr(_mmcore_plus, "_instance", None)  # found through napari-micromanager only
    cfg = DaemonConfig(
        source="zmq",
        frames=100000,  # until stopped
        engines=["passthrough"],
        complete="off",
        out=tmp_path / "running.zarr",
        ingest=free_address(),
        publish=free_address(),
        control=free_address(),
    )
    started, box = threading.Event(), {}

    def on_started(pipeline):
        box["pipeline"] = pipeline
        started.set()

    thread = threading.Thread(target=lambda: run_daemon(cfg, on_started=on_started), daemon=True)
    thread.start()
    assert started.wait(20)
    viewer = napari.Viewer(show=False)
    frame_ready = scope.core.mda.events.frameReady
    try:
        mm = MainWindow(viewer, mmcore=scope.core)  # napari-micromanager, on the sim's core
        viewer.window.add_dock_widget(mm, name="Micro-Manager")
        widget = LiveWidget(viewer, preview=cfg.publish, control=cfg.control, ingest=cfg.ingest)
        viewer.window.add_dock_widget(widget, name="livescope live")
        slots = len(frame_ready)
        widget.attach_button.click()
        qtbot.waitUntil(lambda: widget.attached, timeout=15000)
        assert widget.core is scope.core and widget.daemon is None  # the running daemon, not a new one
        assert widget.bridge.address == cfg.ingest and len(frame_ready) == slots + 1
        qtbot.waitUntil(lambda: "received" in widget.telemetry.text(), timeout=5000)
        widget.detach_core()
        assert not widget.attached and len(frame_ready) == slots
        assert widget.connected and box["pipeline"].state == "running"  # a daemon it did not start runs on
        widget.shutdown()
    finally:
        viewer.close()
        box["pipeline"].request_stop()
        thread.join(20)


def test_no_core_no_attach(qtbot, monkeypatch):
    from napari.components import ViewerModel
    from pymmcore_plus.core import _mmcore_plus

    from livescope.ui.napari import LiveWidget

    monkeypatch.setattr(_mmcore_plus, "_instance", None)
    widget = LiveWidget(ViewerModel(), control="")
    qtbot.addWidget(widget)
    widget.attach_button.click()
    assert not widget.attached and not widget.connected and widget.daemon is None
    assert "no Micro-Manager core" in widget.attach_label.text()
