"""What napari and ome-zarr-py users get from a store written the way the daemon writes it: they
open it the way their own docs say, from the root and per image, and find the pixels, axes,
units, scale and a display window that fits the values."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from livescope.bridges.store import ImageLayout, OmeZarrStore

CHANNELS = ["GFP", "mCherry"]
T, C, Z, Y, X, P = 4, 2, 3, 16, 20, 2
SAMPLING = {"pixel_size_um": 0.2, "z_step_um": 0.5, "interval_s": 0.5}


def _write_store(path, sampling=SAMPLING):
    """Raw (uint16, 12 bits) and a float product (values ~100-300, as a restoration gives) for 2
    positions x 2 channels x 3 planes, written as the daemon writes them: frame by frame in
    acquisition order (t, position, channel, z), polling as it goes, then flush and close.
    Returns the planes written, per image."""
    rng = np.random.default_rng(7)
    layout = dict(
        plane_shape=(Y, X),
        dtype="uint16",
        bits=12,
        has_c=True,
        n_c=C,
        has_z=True,
        n_z=Z,
        channel_names=CHANNELS,
        **sampling,
    )
    store = OmeZarrStore(path, provenance={"source": "test"})
    expect: dict[str, np.ndarray] = {}
    seq = 0
    for t in range(T):
        for p in range(P):
            raw = store.image("raw", p, 0, ImageLayout(**layout))
            product = store.image("denoised", p, 0, ImageLayout(**{**layout, "dtype": "float32"}))
            for c in range(C):
                for z in range(Z):
                    plane = rng.integers(200 + 300 * c, 3000 + 1000 * c, (Y, X), dtype=np.uint16)
                    restored = (plane / 20 + 100).astype(np.float32)
                    raw.write(t, c, z, plane, seq=seq, time_s=t * 0.5)
                    product.write(t, c, z, restored, seq=seq, time_s=t * 0.5)
                    expect.setdefault(raw.name, np.zeros((T, C, Z, Y, X), np.uint16))[t, c, z] = plane
                    expect.setdefault(product.name, np.zeros((T, C, Z, Y, X), np.float32))[t, c, z] = restored
                    seq += 1
            for w in store.images.values():
                w.poll()
    assert store.flush() == 0
    store.close()
    return expect


def _windows(data):
    """What a viewer's contrast limits should be: each channel's range of values."""
    return [[float(data[:, c].min()), float(data[:, c].max())] for c in range(data.shape[1])]


def _read(path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    return list(Reader(parse_url(str(path)))())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "run.zarr"
    return path, _write_store(path)


def _series(path):
    return json.loads((path / "OME" / "zarr.json").read_text())["attributes"]["ome"]["series"]


def test_ome_zarr_py_opens_raw_from_the_root(store):
    path, expect = store
    nodes = _read(path)
    assert len(nodes) == 1
    node = nodes[0]
    np.testing.assert_array_equal(np.asarray(node.data[0]), expect["raw"])
    axes = node.metadata["axes"]
    assert [(a["name"], a["type"], a.get("unit")) for a in axes] == [
        ("t", "time", "second"),
        ("c", "channel", None),
        ("z", "space", "micrometer"),
        ("y", "space", "micrometer"),
        ("x", "space", "micrometer"),
    ]
    assert node.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 1.0, 0.5, 0.2, 0.2]
    assert node.metadata["channel_names"] == CHANNELS
    assert node.metadata["contrast_limits"] == _windows(expect["raw"])


def test_ome_zarr_py_opens_every_image_by_its_path(store):
    path, expect = store
    assert sorted(_series(path)) == sorted(expect) == sorted(["raw", "raw_p1", "denoised", "denoised_p1"])
    for name in _series(path):
        (node,) = _read(path / name)
        np.testing.assert_array_equal(np.asarray(node.data[0]), expect[name])
        assert node.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 1.0, 0.5, 0.2, 0.2]
        # the float product's window is its values' range (~100-300), not [0, 1]
        assert node.metadata["contrast_limits"] == _windows(expect[name])
        assert node.metadata["contrast_limits"][0][0] > 100


def test_an_unknown_sampling_gets_no_unit(tmp_path):
    path = tmp_path / "run.zarr"
    _write_store(path, {"pixel_size_um": None, "z_step_um": None, "interval_s": None})
    for name in ["raw", "denoised_p1"]:
        (node,) = _read(path / name)
        assert [a.get("unit") for a in node.metadata["axes"]] == [None] * 5
        assert node.metadata["coordinateTransformations"][0][0]["scale"] == [1.0] * 5  # NGFF needs one
    (node,) = _read(path)
    assert [a.get("unit") for a in node.metadata["axes"]] == [None] * 5
    pixels = (
        ET.parse(path / "OME" / "METADATA.ome.xml")
        .getroot()
        .iter("{http://www.openmicroscopy.org/Schemas/OME/2016-06}Pixels")
    )
    for px in pixels:
        assert not {"PhysicalSizeX", "PhysicalSizeZ", "TimeIncrement"} & set(px.attrib)


def test_the_root_is_a_valid_collection_of_every_image(store):
    yaozarrs = pytest.importorskip("yaozarrs", reason="yaozarrs (an NGFF 0.5 validator) is not installed")
    path, expect = store
    attrs = json.loads((path / "zarr.json").read_text())["attributes"]["ome"]
    yaozarrs.v05.Bf2Raw.model_validate(attrs)
    yaozarrs.v05.Series.model_validate(json.loads((path / "OME" / "zarr.json").read_text())["attributes"]["ome"])
    yaozarrs.validate_zarr_store(str(path))  # the root as the raw image it also is
    for name in _series(path):
        yaozarrs.validate_zarr_store(str(path / name))
    ome = ET.parse(path / "OME" / "METADATA.ome.xml").getroot()
    images = [el for el in ome if el.tag.endswith("Image")]
    assert [el.get("ID") for el in images] == [f"Image:{name}" for name in _series(path)]  # series order
    px = images[0][0]
    sizes = (px.get("SizeT"), px.get("SizeC"), px.get("SizeZ"), px.get("PhysicalSizeX"))
    assert sizes == (str(T), str(C), str(Z), "0.2")
    ome_types = pytest.importorskip("ome_types", reason="ome-types (an OME-XML schema reader) is not installed")
    assert len(ome_types.from_xml((path / "OME" / "METADATA.ome.xml").read_text()).images) == len(expect)


def test_napari_opens_every_image_from_the_root(store):
    pytest.importorskip("napari", reason="napari is not installed (pip install napari napari-ome-zarr)")
    pytest.importorskip("napari_ome_zarr", reason="napari-ome-zarr is not installed")
    import npe2
    from napari.components import ViewerModel

    npe2.PluginManager.instance().discover()  # what napari.Viewer() does at start; ViewerModel needs no GUI
    path, expect = store
    viewer = ViewerModel()
    viewer.open(str(path), plugin="napari-ome-zarr")
    names = [layer.name for layer in viewer.layers]
    assert names == [f"{image}: {ch}" for image in _series(path) for ch in CHANNELS]  # split by channel
    for layer in viewer.layers:
        image, ch = layer.name.split(": ")
        c = CHANNELS.index(ch)
        data = layer.data[0] if layer.multiscale else layer.data
        np.testing.assert_array_equal(np.asarray(data), expect[image][:, c])
        assert list(layer.contrast_limits) == _windows(expect[image])[c]
        assert list(layer.scale) == [0.5, 0.5, 0.2, 0.2]
        assert [str(u) for u in layer.units] == ["second", "micrometer", "micrometer", "micrometer"]
        assert tuple(layer.axis_labels) == ("t", "z", "y", "x")


def test_a_two_camera_multi_position_daemon_store_validates_and_opens(tmp_path, free_address):
    """A store the daemon itself wrote (two cameras, two positions, a product) passes the
    ome-zarr-models validator at the root (bioformats2raw layout) and at every image, and napari
    opens every image from the root."""
    import threading

    import zarr
    from ome_zarr_models import open_ome_zarr

    from livescope.bridges.transport import FramePublisher
    from livescope.daemon.cli import run_daemon
    from livescope.daemon.config import DaemonConfig

    cfg = DaemonConfig(
        source="zmq",
        out=tmp_path / "two.zarr",
        ingest=free_address(),
        publish=None,
        control=None,
        exit_on_end=False,
        frames=12,
        engines=["passthrough"],
        pixel_size_um=0.1,
    )
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4000, (3, 2, 16, 20), dtype=np.uint16)  # t, p
    b = rng.integers(0, 4000, (3, 2, 12, 24), dtype=np.uint16)

    def publish(pipeline):
        cams = {
            "camA": FramePublisher(cfg.ingest, stream="camA", block=True),
            "camB": FramePublisher(cfg.ingest, stream="camB", block=True),
        }
        for t in range(3):
            for p in range(2):
                cams["camA"].send(a[t, p], index={"t": t, "p": p}, sizes={"p": 2}, interval_s=1.0)
                while t == p == 0 and pipeline.received < 1:  # the first stream seen keeps the plain names
                    time.sleep(0.005)
                cams["camB"].send(b[t, p], index={"t": t, "p": p}, sizes={"p": 2}, interval_s=1.0)
        for pub in cams.values():
            pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert summary["frames"]["saved"] == 12
    images = summary["store"]["images"]
    assert {"raw", "raw_p1", "raw_camB", "raw_camB_p1"} <= set(images)
    root = zarr.open_group(str(cfg.out), mode="r")
    from ome_zarr_models.v05 import BioFormats2Raw, Image

    # the root is both: the raw image (for readers that follow no collection) and the collection
    Image.from_zarr(root)  # each from_zarr raises on anything the NGFF models refuse
    collection = BioFormats2Raw.from_zarr(root)
    assert collection.ome_attributes.bioformats2raw_layout == 3
    for name in images:
        assert isinstance(open_ome_zarr(zarr.open_group(str(cfg.out / name), mode="r")), Image), name
    np.testing.assert_array_equal(zarr.open_array(str(cfg.out / "raw_camB_p1" / "0"), mode="r")[...], b[:, 1])

    napari = pytest.importorskip("napari", reason="napari is in the test extra; install livescope[test]")
    import npe2

    npe2.PluginManager.instance().discover()
    viewer = napari.components.ViewerModel()
    layers = viewer.open(str(cfg.out), plugin="napari-ome-zarr")
    shapes = sorted(
        tuple(layer.data[0].shape if isinstance(layer.data, list) else layer.data.shape) for layer in layers
    )
    assert len(layers) == len(images)
    assert (3, 12, 24) in shapes and (3, 16, 20) in shapes
