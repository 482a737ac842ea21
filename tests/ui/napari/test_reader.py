"""The napari reader on stores the real daemon wrote: every image a layer with its physical scale,
frames not saved made visible with their reasons, events where they happened, per-frame scalars."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytest.importorskip("napari", reason="the napari extra: pip install 'livescope[napari]'")

from livescope.bridges.sim import SimConfig, SimSample  # noqa: E402
from livescope.bridges.store import STATUS  # noqa: E402
from livescope.bridges.transport import FramePublisher  # noqa: E402
from livescope.daemon.cli import run_daemon  # noqa: E402
from livescope.daemon.config import DaemonConfig  # noqa: E402
from tests.conftest import wait_for  # noqa: E402

N_T = 40
GAP = (10, 11)  # never sent: seq jumps, the daemon counts them lost in transport, never written
FLASH_T = 35  # a bright patch nothing before predicts: decompose raises a novelty event
FLASH = (slice(16, 32), slice(20, 36))
P1_T = 4  # a second position, a few time points
PIXEL_UM, INTERVAL_S = 0.2, 0.5


def _open(path):
    import npe2
    from napari.components import ViewerModel

    npe2.PluginManager.instance().discover()  # what napari.Viewer() does at start
    viewer = ViewerModel()
    viewer.open(str(path), plugin="livescope")
    return viewer


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A daemon run: a slow engine skips frames while they come fast (t < 20), then each frame is
    sent once the chain is idle, so the flash at FLASH_T is processed; a second position and a
    second segment (another frame shape)."""
    from livescope.bridges.transport import free_tcp_address

    out = tmp_path_factory.mktemp("napari") / "run.zarr"
    sent = N_T - len(GAP) + P1_T + 2
    cfg = DaemonConfig(
        source="zmq",
        frames=sent,
        engines=["passthrough", "decompose"],
        engine_params={
            "passthrough": {"delay_s": 0.05},
            "decompose": {"background_window": 8, "background_samples": 4},
        },
        complete="off",  # the live path's own record: skipped frames stay skipped
        out=out,
        ingest=free_tcp_address(),
        publish=None,
        control=None,
        exit_on_end=False,
    )
    sample = SimSample(SimConfig(shape=(64, 64), seed=3))

    def done(pipeline):
        st = pipeline.status()
        return st["engines"]["passthrough"]["processed"] + st["frames"]["skipped"].get("passthrough", 0)

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True, pixel_size_um=PIXEL_UM, interval_s=INTERVAL_S)
        n = 0
        for t in range(N_T):
            if t in GAP:
                pub.seq += 1
                continue
            frame = sample.render(t, 0, 0, 0.0)
            if t == FLASH_T:
                frame = frame.copy()
                frame[FLASH] += 1500
            if t >= 20:
                wait_for(lambda n=n: done(pipeline) >= n, timeout=20, message="the chain to be idle")
            pub.send(frame, index={"t": t}, bits=12, channel="GFP")
            n += 1
        for t in range(P1_T):
            pub.send(sample.render(t, 0, 0, 0.0), index={"t": t, "p": 1}, bits=12)
        for t in range(2):  # another frame shape: a new segment
            pub.send(np.full((32, 48), 300 + t, np.uint16), index={"t": t}, bits=12)
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == sent
    return out, summary


@pytest.fixture(scope="module")
def opened(store):
    """The store as napari opens it through the plugin (one viewer for the module's tests)."""
    return _open(store[0])


def test_every_image_is_a_layer_with_its_scale_and_records(store, opened):
    _, summary = store
    viewer = opened
    names = [layer.name for layer in viewer.layers]
    for name in ["raw", "passthrough", "background", "slow", "fast", "raw_p1", "passthrough_p1", "raw_seg1"]:
        assert name in names
    raw = viewer.layers["raw"]
    assert raw.data.shape == (N_T, 64, 64)
    np.testing.assert_allclose(raw.scale, [INTERVAL_S, PIXEL_UM, PIXEL_UM])
    assert [str(u) for u in raw.units] == ["second", "micrometer", "micrometer"]
    assert raw.axis_labels == ("t", "y", "x")
    np.testing.assert_array_equal(
        np.asarray(raw.data[0]), SimSample(SimConfig(shape=(64, 64), seed=3)).render(0, 0, 0, 0.0)
    )
    # only the first position and segment show; the others are there, hidden
    assert raw.visible and not viewer.layers["raw_p1"].visible and not viewer.layers["raw_seg1"].visible
    assert viewer.layers["raw_seg1"].data.shape[-2:] == (32, 48)
    # per-frame records and scalars in the layer's metadata, status by name
    frames = raw.metadata["livescope"]["frames"]
    assert list(frames["status"][list(GAP)]) == ["missing", "missing"]
    assert (frames["status"] == "saved").sum() == N_T - len(GAP)
    assert "novelty" in frames and frames["novelty"].shape == (N_T,)
    assert np.nanargmax(frames["novelty"]) == FLASH_T  # the flash is the most novel frame
    # every position and segment's skipped frames, as the daemon counted them
    counts = [la.metadata["livescope"]["status_counts"] for la in viewer.layers if la.name.startswith("passthrough")]
    assert sum(c["skipped"] for c in counts) == summary["frames"]["skipped"]["passthrough"]
    assert viewer.layers["passthrough"].metadata["livescope"]["status_counts"]["skipped"] > 5


def test_frames_not_saved_are_visible_with_their_reason(opened):
    viewer = opened
    layer = viewer.layers["frames not saved"]
    feats = layer.features
    skipped_t = set(np.nonzero(viewer.layers["passthrough"].metadata["livescope"]["frames"]["status"] == "skipped")[0])
    assert skipped_t and skipped_t <= set(feats["t"])
    row = feats[feats["t"] == min(skipped_t)].iloc[0]
    assert row["status"] == "skipped" and row["passthrough"] == "skipped" and row["raw"] == "saved"
    assert "skipped: passthrough" in row["images"]
    gap = feats[feats["t"].isin(GAP)]
    assert len(gap) == 2 and set(gap["raw"]) == {"missing"}  # lost in transport: never written
    # a marker on each of those frames only (not on the others), coloured by the reason
    assert layer.data.shape == (len(feats), 3) and set(layer.data[:, 0]) == set(feats["t"])
    assert not layer.out_of_slice_display
    amber = layer.face_color[feats.index[feats["t"] == min(skipped_t)][0]]
    np.testing.assert_allclose(amber, [1.0, 0.72, 0.0, 1.0])
    # saved frames carry no marker
    assert FLASH_T not in set(feats["t"])
    assert STATUS["skipped"] == 2  # the store's code the reader names


def test_events_are_points_and_boxes_at_their_time_point(store, opened):
    out, _ = store
    events = json.loads((out / "zarr.json").read_text())["attributes"]["livescope"]["provenance"]["events"]
    flash = [e for e in events if e["t"] == FLASH_T]
    assert len(flash) == 1
    viewer = opened
    points, boxes = viewer.layers["events"], viewer.layers["event boxes"]
    assert len(points.data) == len(events)
    i = list(points.features["t"]).index(FLASH_T)
    t, cy, cx = points.data[i]
    assert t == FLASH_T and 16 <= cy < 32 and 20 <= cx < 36
    assert points.features["kind"][i] == "novelty" and points.features["score"][i] > 0
    np.testing.assert_allclose(points.scale, [INTERVAL_S, PIXEL_UM, PIXEL_UM])
    box = boxes.data[list(boxes.features["t"]).index(FLASH_T)]
    assert set(box[:, 0]) == {FLASH_T}
    y0, x0, y1, x1 = flash[0]["bbox"]
    np.testing.assert_allclose(
        [box[:, 1].min(), box[:, 2].min(), box[:, 1].max(), box[:, 2].max()], [y0 - 0.5, x0 - 0.5, y1 - 0.5, x1 - 0.5]
    )


def test_channels_get_their_names_and_colours(tmp_path, free_address):
    cfg = DaemonConfig(
        source="sim",
        frames=2,
        sim_shape=(32, 32),
        sim_channels=("GFP", "mCherry"),
        sim_interval_s=0.0,
        out=tmp_path / "c.zarr",
        ingest=free_address(),
        publish=None,
        control=None,
    )
    run_daemon(cfg)
    viewer = _open(cfg.out)
    gfp, mcherry = viewer.layers["raw GFP"], viewer.layers["raw mCherry"]
    assert gfp.data.shape == (2, 32, 32) and gfp.axis_labels == ("t", "y", "x")
    np.testing.assert_allclose(gfp.colormap.colors[-1], [0, 1, 0, 1])
    np.testing.assert_allclose(mcherry.colormap.colors[-1], [1, 0, 1, 1])
    assert gfp.metadata["livescope"]["frames"]["status"].shape == (2, 2)  # t, c


def test_only_livescope_stores_are_claimed(store, tmp_path):
    from livescope.ui.napari import napari_get_reader

    out, _ = store
    assert napari_get_reader(str(out)) is not None and napari_get_reader([str(out)]) is not None
    assert napari_get_reader(str(out / "raw")) is None  # one image: napari-ome-zarr's
    assert napari_get_reader(str(tmp_path)) is None
    (tmp_path / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"ome": {}}}))
    assert napari_get_reader(str(tmp_path)) is None
    assert napari_get_reader(str(out / "zarr.json")) is None
