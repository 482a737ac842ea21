from __future__ import annotations

import json
import time

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


def _break(path):
    """A real fault that root (these tests run as root) cannot write through, unlike chmod: a
    file where tensorstore expects a folder (or a folder where it expects a file)."""
    away = path.with_name(path.name + ".away")
    path.rename(away)
    if away.is_dir():
        path.write_text("not a folder")
    else:
        (path / "blocked").mkdir(parents=True)
    return away


def _heal(path, away):
    if path.is_dir():
        (path / "blocked").rmdir()
        path.rmdir()
    else:
        path.unlink()
    away.rename(path)


def _status_on_disk(image):
    return read_records(image)["status"]


def test_failed_record_writes_are_retried_and_lost_frames_are_recorded_lost(tmp_path):
    store = OmeZarrStore(tmp_path / "out")
    w = store.image("raw", 0, 0, _layout())
    w.retry_after_s = 0.05
    image = tmp_path / "out" / "raw"

    def write(ts):
        for t in ts:
            w.write(t, 0, 0, np.full((32, 48), t + 1, np.uint16), seq=t, time_s=t)
        w.flush_due(now=float("inf"))
        w._drain(wait=True)

    write(range(5))
    assert w.saved == 5
    records = _break(image / "livescope" / "status")  # records cannot be written; pixels can
    write(range(5, 10))
    assert w.saved == 5 and w.unrecorded == 5  # pixels on disk, not counted saved without a record
    pixels = _break(image / "0" / "c")  # now the pixels cannot be written either: frames lost
    write(range(10, 15))
    assert w.lost == 5
    _heal(image / "0" / "c", pixels)
    _heal(image / "livescope" / "status", records)
    assert (_status_on_disk(image)[5:15] == STATUS["missing"]).all()  # nothing retried yet
    deadline = time.monotonic() + 5
    while w.unrecorded and time.monotonic() < deadline:  # later polls retry
        w.poll()
        time.sleep(0.02)
    assert w.unrecorded == 0 and w.saved == 10
    status = _status_on_disk(image)
    assert (status[:10] == STATUS["saved"]).all() and (status[10:15] == STATUS["lost"]).all()
    write(range(15, 20))
    store.close()
    status = _status_on_disk(image)
    assert list(status) == [STATUS["lost"] if 10 <= t < 15 else STATUS["saved"] for t in range(20)]
    arr = zarr.open_array(str(image / "0"), mode="r")[...]
    # saved frames intact, lost ones absent (each plane of a partial shard is waited for and
    # recorded on its own: none left in flight to land later under a "lost" record)
    assert [int(a[0, 0]) for a in arr] == [0 if 10 <= t < 15 else t + 1 for t in range(20)]


def test_frames_the_store_refuses_are_recorded_lost_once_it_can(tmp_path):
    store = OmeZarrStore(tmp_path / "out")
    w = store.image("raw", 0, 0, _layout())
    image = tmp_path / "out" / "raw"
    for t in range(w.capacity_t):
        w.write(t, 0, 0, np.full((32, 48), 7, np.uint16), seq=t, time_s=t)
    meta = _break(image / "0" / "zarr.json")  # the array cannot grow for the next frame
    with pytest.raises(ValueError, match="zarr.json"):  # tensorstore's error, naming the file it could not write
        w.write(w.capacity_t, 0, 0, np.full((32, 48), 7, np.uint16), seq=64, time_s=64.0)
    assert w.refused == 1  # the caller counts it lost (the pipeline's store_lost)
    _heal(image / "0" / "zarr.json", meta)
    assert store.flush() == 0  # flush retries at once
    rec = read_records(image)
    assert rec["status"][64] == STATUS["lost"] and rec["seq"][64] == 64
    assert (rec["status"][:64] == STATUS["saved"]).all()
    store.close()


def test_flush_puts_every_frame_record_and_window_on_disk_before_close(tmp_path):
    store = OmeZarrStore(tmp_path / "out")
    raw = store.image("raw", 0, 0, _layout())
    den = store.image("denoised", 0, 0, _layout(dtype="float32"))
    for t in range(40):  # partial shards still buffered: a summary now would say 0 saved
        raw.write(t, 0, 0, np.full((32, 48), 100 + t, np.uint16), seq=t, time_s=t)
        den.write(t, 0, 0, np.full((32, 48), 150.5 + t, np.float32), seq=t, time_s=t)
    assert raw.saved == 0
    assert store.flush() == 0
    assert raw.saved == den.saved == 40  # final counts before close: the summary can follow
    assert (read_records(tmp_path / "out" / "raw")["status"][:40] == STATUS["saved"]).all()
    ome = json.loads((tmp_path / "out" / "denoised" / "zarr.json").read_text())["attributes"]["ome"]
    assert ome["omero"]["channels"][0]["window"] == {"start": 150.5, "end": 189.5, "min": 150.5, "max": 189.5}
    xml = (tmp_path / "out" / "OME" / "METADATA.ome.xml").read_text()
    assert xml.count('SizeT="40"') == 2
    store.close()


class _WatchedStatus(np.ndarray):
    """A status array that notes the writer's ``pending`` each time a frame's status is set."""

    def __setitem__(self, key, value):
        if int(value) != STATUS["missing"]:
            self.seen.append((int(value), self.writer.pending))
        super().__setitem__(key, value)


@pytest.mark.parametrize("frames", [3, 20])  # a partial shard (timer flush) and full ones
def test_pending_stays_up_until_each_status_is_final(tmp_path, frames):
    """Another thread (the completer) reads ``pending`` == 0 and then the status: a frame must never
    show 0 pending while its status is still missing, or it is taken for a frame the store never got
    (this gap once dropped 17 completed products of a live run)."""
    store = OmeZarrStore(tmp_path / "out")
    w = store.image("raw", 0, 0, _layout())
    w.write(0, 0, 0, np.zeros((32, 48), np.uint16), seq=0, time_s=0.0)  # grows the records first
    watched = w._rec["status"].view(_WatchedStatus)
    watched.seen, watched.writer = [], w
    w._rec["status"] = watched
    for t in range(1, frames):
        w.write(t, 0, 0, np.full((32, 48), t, np.uint16), seq=t, time_s=t)
        assert w.pending == t + 1 and w.status_at(t, 0, 0) == "missing"
    w.flush_due(now=float("inf"))
    assert w.pending == frames  # submitted, not yet settled
    w._drain(wait=True)
    saved = [p for s, p in watched.seen if s == STATUS["saved"]]
    assert len(saved) == frames and min(saved) > 0  # still pending when its status became saved
    assert w.pending == 0 and all(w.status_at(t, 0, 0) == "saved" for t in range(frames))
    store.close()
