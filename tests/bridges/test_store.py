from __future__ import annotations

import json

import numpy as np
import pytest
import zarr

from livescope.bridges.store import STATUS, ImageLayout, OmeZarrStore, StoreError, read_records, recover


def _layout(**kw):
    base = dict(plane_shape=(32, 48), dtype="uint16", bits=12, pixel_size_um=0.2, interval_s=0.5)
    base.update(kw)
    return ImageLayout(**base)


def test_frames_round_trip_with_records_and_ngff_metadata(tmp_path):
    store = OmeZarrStore(tmp_path / "out", provenance={"source": "test"})
    w = store.image("raw", 0, 0, _layout(has_c=True, n_c=2, channel_names=["GFP", "mCherry"]))
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 4096, (70, 2, 32, 48), dtype=np.uint16)
    seq = 0
    for t in range(70):
        for c in range(2):
            w.write(t, c, 0, frames[t, c], seq=seq, time_s=t * 0.5, saturated=int((frames[t, c] == 4095).sum()))
            seq += 1
        w.poll()
    store.close()
    arr = zarr.open_array(str(tmp_path / "out" / "raw" / "0"), mode="r")
    assert arr.shape == (70, 2, 32, 48)  # trimmed from the grown capacity
    np.testing.assert_array_equal(arr[...], frames)
    rec = read_records(tmp_path / "out" / "raw")
    assert (rec["status"] == STATUS["saved"]).all()
    np.testing.assert_array_equal(rec["seq"], np.arange(140).reshape(70, 2))
    attrs = json.loads((tmp_path / "out" / "raw" / "zarr.json").read_text())["attributes"]
    ms = attrs["ome"]["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["t", "c", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [0.5, 1.0, 0.2, 0.2]
    assert [c["label"] for c in attrs["ome"]["omero"]["channels"]] == ["GFP", "mCherry"]
    assert attrs["ome"]["omero"]["channels"][0]["window"]["end"] == 4095
    root = json.loads((tmp_path / "out" / "zarr.json").read_text())["attributes"]["livescope"]
    assert root["images"][0]["path"] == "raw" and root["provenance"]["source"] == "test"


def test_ome_zarr_py_reads_the_image(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    store = OmeZarrStore(tmp_path / "out")
    w = store.image("raw", 0, 0, _layout(has_z=True, n_z=3, z_step_um=0.5))
    for t in range(4):
        for z in range(3):
            w.write(t, 0, z, np.full((32, 48), t * 10 + z, np.uint16), seq=t * 3 + z, time_s=t)
    store.close()
    nodes = list(Reader(parse_url(str(tmp_path / "out" / "raw")))())
    data = np.asarray(nodes[0].data[0])
    assert data.shape == (4, 3, 32, 48)
    assert data[2, 1, 0, 0] == 21
    assert [a["name"] for a in nodes[0].metadata["axes"]] == ["t", "z", "y", "x"]


def test_products_skip_frames_and_keep_raw_time_index(tmp_path):
    store = OmeZarrStore(tmp_path / "out")
    w = store.image("denoised", 0, 0, _layout(dtype="float32"))
    for t in range(10):
        if t % 3 == 0:
            w.mark(t, 0, 0, "skipped", seq=t, time_s=t)
        else:
            w.write(t, 0, 0, np.full((32, 48), t, np.float32), seq=t, time_s=t)
    store.close()
    arr = zarr.open_array(str(tmp_path / "out" / "denoised" / "0"), mode="r")[...]
    rec = read_records(tmp_path / "out" / "denoised")
    assert list(rec["status"]) == [2 if t % 3 == 0 else 1 for t in range(10)]
    assert np.isnan(arr[3]).all() and (arr[4] == 4).all()


def test_partial_shards_are_flushed_on_a_timer(tmp_path):
    store = OmeZarrStore(tmp_path / "out")
    w = store.image("raw", 0, 0, _layout())
    assert w.shard_t > 3
    for t in range(3):
        w.write(t, 0, 0, np.full((32, 48), t, np.uint16), seq=t, time_s=t)
    assert w.poll() == 0  # still buffered: not yet saved
    w.flush_due(now=float("inf"))
    w._drain(wait=True)
    assert w.saved == 3
    for t in range(3, 5):  # the rest of the same shard arrives later
        w.write(t, 0, 0, np.full((32, 48), t, np.uint16), seq=t, time_s=t)
    store.close()
    arr = zarr.open_array(str(tmp_path / "out" / "raw" / "0"), mode="r")[...]
    assert [int(a[0, 0]) for a in arr] == [0, 1, 2, 3, 4]


def test_compressed_raw_is_lossless(tmp_path):
    store = OmeZarrStore(tmp_path / "out", compress_raw=True)
    w = store.image("raw", 0, 0, _layout())
    frames = np.random.default_rng(0).poisson(50, (20, 32, 48)).astype(np.uint16)
    for t in range(20):
        w.write(t, 0, 0, frames[t], seq=t, time_s=t)
    store.close()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "out" / "raw" / "0"), mode="r")[...], frames)
    meta = json.loads((tmp_path / "out" / "raw" / "0" / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert any(c["name"] == "blosc" for c in inner)


def test_refuses_to_overwrite_without_permission(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("data")
    with pytest.raises(StoreError, match="--overwrite"):
        OmeZarrStore(tmp_path / "out")
    OmeZarrStore(tmp_path / "out", overwrite=True).close()


def test_recover_trims_to_saved_frames(tmp_path):
    store = OmeZarrStore(tmp_path / "out")
    w = store.image("raw", 0, 0, _layout())
    for t in range(5):
        w.write(t, 0, 0, np.full((32, 48), t, np.uint16), seq=t, time_s=t)
    w.flush_due(now=float("inf"))
    w._drain(wait=True)
    # no close(): as after a crash, the array still has its grown capacity
    assert zarr.open_array(str(tmp_path / "out" / "raw" / "0"), mode="r").shape[0] == w.capacity_t > 5
    assert recover(tmp_path / "out") == {"raw": 5}
    arr = zarr.open_array(str(tmp_path / "out" / "raw" / "0"), mode="r")
    assert arr.shape[0] == 5 and int(arr[4, 0, 0]) == 4
