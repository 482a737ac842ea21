"""Saved means saved under every input: odd, inconsistent and hostile senders on loopback.

Each test sends what a careless or hostile local process would, over a real ZeroMQ socket into a
real daemon writing a real store, and checks that ingest stays alive, that every frame reported
saved is on disk bit-exact and distinct, and that every other frame is counted with a reason.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import zarr

from livescope.bridges.store import STATUS, read_records
from livescope.bridges.transport import FramePublisher
from livescope.daemon.cli import run_daemon
from livescope.daemon.config import DaemonConfig
from tests.clients.bare import BareClient


def _cfg(tmp_path, free_address, **kw):
    base = dict(
        out=tmp_path / "out.zarr", ingest=free_address(), publish=None, control=None, source="zmq", exit_on_end=True
    )
    base.update(kw)
    return DaemonConfig(**base)


def _run(cfg, publish):
    return run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())


def _wait_received(pipeline, n, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while pipeline.received < n and time.monotonic() < deadline:
        time.sleep(0.005)
    assert pipeline.received >= n


def _raw(cfg, name="raw"):
    return zarr.open_array(str(cfg.out / name / "0"), mode="r")


@pytest.mark.parametrize(
    "odd",
    [
        {"binning": "2x2"},
        {"sizes": {"c": "two"}},
        {"sizes": {"q": 3}},
        {"camera": {"offset": "100"}},
        {"pixel_size_affine": [1, 0, 0]},
        {"channel": ["GFP"]},
        {"index": {"c": 3_000_000}},
        {"sizes": {"c": 256, "z": 10_000}},
        {"acquisition": "first"},
    ],
)
def test_one_odd_header_opening_a_segment_is_refused_and_ingest_goes_on(tmp_path, free_address, odd):
    cfg = _cfg(tmp_path, free_address)
    frames = np.random.default_rng(1).integers(0, 60000, (6, 16, 16), dtype=np.uint16)

    def publish(_):
        cam = BareClient(cfg.ingest)
        for t in range(3):
            cam.send(frames[t], index={"t": t})
        # a new shape would open a new segment: the odd field reaches the segment code first
        cam.send(np.zeros((8, 8), np.uint16), **{"index": {"t": 3}, **odd})
        for t in range(3, 6):
            cam.send(frames[t], index={"t": t})
        cam.end()
        cam.close()

    summary = _run(cfg, publish)
    f = summary["frames"]
    assert f["received"] == 6 and f["saved"] == 6 and f["lost"] == 0
    assert f["rejected"] == 1 and sum(f["rejected_by_reason"].values()) == 1
    np.testing.assert_array_equal(_raw(cfg)[...], frames)
    assert not (cfg.out / "raw_seg1").exists()


@pytest.mark.parametrize("odd", [{"meta": {"channels": 2}}, {"index": {"t": 10**8}}])
def test_odd_but_valid_headers_opening_a_segment_are_saved_in_their_own_image(tmp_path, free_address, odd):
    # meta is the acquisition's own (passed on untouched); a new ROI may start at any time point
    cfg = _cfg(tmp_path, free_address)

    def publish(_):
        cam = BareClient(cfg.ingest)
        cam.send(np.ones((16, 16), np.uint16), index={"t": 0})
        cam.send(np.full((8, 8), 7, np.uint16), **{"index": {"t": 3}, **odd})
        cam.send(np.ones((16, 16), np.uint16), index={"t": 1})
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 3 and f["rejected"] == 0 and f["lost"] == 0
    assert int(_raw(cfg, "raw_seg1")[0, 0, 0]) == 7 and _raw(cfg, "raw").shape == (2, 16, 16)


def test_an_index_outside_the_sent_sizes_is_refused_never_written_over_another(tmp_path, free_address):
    # sizes says t only, the frames say c in {0, 1}: channel 1 would overwrite channel 0
    cfg = _cfg(tmp_path, free_address)
    frames = np.random.default_rng(2).integers(0, 4000, (8, 2, 12, 12), dtype=np.uint16)

    def publish(_):
        cam = BareClient(cfg.ingest)
        for t in range(8):
            for c in range(2):
                cam.send(frames[t, c], index={"t": t, "c": c}, sizes={"t": 8})
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 8 and f["rejected_by_reason"] == {"index_outside_sizes": 8}
    raw = _raw(cfg)[...]
    assert raw.shape == (8, 12, 12)
    np.testing.assert_array_equal(raw, frames[:, 0])
    assert (read_records(cfg.out / "raw")["status"] == STATUS["saved"]).sum() == 8


def test_a_channel_index_the_first_frame_did_not_have_is_refused(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)

    def publish(_):
        cam = BareClient(cfg.ingest)
        cam.send(np.full((8, 8), 1, np.uint16), index={"t": 0})
        cam.send(np.full((8, 8), 2, np.uint16), index={"t": 0, "c": 1})
        cam.send(np.full((8, 8), 3, np.uint16), index={"t": 1})
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 2 and f["rejected_by_reason"] == {"index_outside_layout": 1}
    np.testing.assert_array_equal(_raw(cfg)[:, 0, 0], [1, 3])


def test_a_second_frame_for_the_same_index_is_refused_and_the_first_kept(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)

    def publish(_):
        cam = BareClient(cfg.ingest)
        for t, value in [(0, 1), (1, 2), (1, 99), (2, 3)]:
            cam.send(np.full((8, 8), value, np.uint16), index={"t": t})
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 3 and f["rejected_by_reason"] == {"duplicate_index": 1}
    np.testing.assert_array_equal(_raw(cfg)[:, 0, 0], [1, 2, 3])


def _rss_mb() -> float:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024
    except OSError:  # not Linux: the counting part of the test still runs
        return 0.0


def test_huge_indices_on_tiny_frames_allocate_nothing(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)
    before = _rss_mb()

    def publish(_):
        cam = BareClient(cfg.ingest)
        cam.send(np.ones((1, 1), np.uint16), index={"t": 0})
        for idx in ({"t": 10**8}, {"t": 2**31 - 1}, {"t": 1, "z": 9_999}, {"t": 5_000_000}):
            cam.send(np.ones((1, 1), np.uint16), index=idx)
        cam.send(np.ones((1, 1), np.uint16), index={"t": 1})
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 2
    assert f["rejected_by_reason"] == {"index_out_of_range": 3, "index_outside_layout": 1}
    assert _rss_mb() - before < 200  # was 2 GB for one index.t = 1e8


def test_metadata_counts_against_the_memory_budget(tmp_path, free_address):
    # 1x1 frames carrying 0.7 MB of metadata each, a 0.5 MB budget: the pixels alone would fit
    cfg = _cfg(tmp_path, free_address, memory_budget_mb=0.5)
    meta = {"blob": "x" * 700_000}

    def publish(_):
        cam = BareClient(cfg.ingest)
        for t in range(5):
            cam.send(np.ones((1, 1), np.uint16), index={"t": t}, meta=meta)
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["dropped_over_budget"] == 5 and f["lost"] == 5 and f["saved"] == 0


def test_two_cameras_on_two_streams_get_their_own_images(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, exit_on_end=False, frames=20)
    rng = np.random.default_rng(3)
    a = rng.integers(0, 4000, (10, 16, 20), dtype=np.uint16)
    b = rng.integers(0, 4000, (10, 24, 12), dtype=np.uint16)

    def publish(pipeline):
        cam_a = FramePublisher(cfg.ingest, stream="camA", block=True)
        cam_b = FramePublisher(cfg.ingest, stream="camB", block=True)
        for t in range(10):
            cam_a.send(a[t], index={"t": t}, channel="GFP")
            if t == 0:  # the stream the daemon sees first keeps the plain names (documented rule)
                _wait_received(pipeline, 1)
            cam_b.send(b[t], index={"t": t}, channel="mCherry")
        cam_a.close()
        cam_b.close()

    summary = _run(cfg, publish)
    assert summary["frames"]["saved"] == 20 and summary["frames"]["rejected"] == 0
    np.testing.assert_array_equal(_raw(cfg, "raw")[...], a)
    np.testing.assert_array_equal(_raw(cfg, "raw_camB")[...], b)
    assert sorted(summary["store"]["images"]) == ["raw", "raw_camB"]
    assert summary["streams"]["camB"]["images"] == "camB"


def test_two_acquisitions_in_a_row_through_one_publisher_are_two_images(tmp_path, free_address):
    # an MDA bridge attached once: seq keeps counting, t restarts, an end marker between the runs
    cfg = _cfg(tmp_path, free_address, exit_on_end=False, frames=40)
    frames = np.random.default_rng(4).integers(0, 4000, (40, 8, 8), dtype=np.uint16)

    def publish(_):
        pub = FramePublisher(cfg.ingest, stream="mmcore", block=True)
        for run in range(2):
            for t in range(20):
                pub.send(frames[run * 20 + t], index={"t": t})
            pub.end()
        pub.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 40 and f["lost"] == 0 and f["rejected"] == 0
    np.testing.assert_array_equal(_raw(cfg, "raw")[...], frames[:20])
    np.testing.assert_array_equal(_raw(cfg, "raw_seg1")[...], frames[20:])


def test_an_acquisition_counter_starts_a_new_image_without_an_end_marker(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address, exit_on_end=False, frames=6)

    def publish(_):
        cam = BareClient(cfg.ingest)
        for run in range(2):
            for t in range(3):
                cam.send(np.full((4, 4), run * 10 + t, np.uint16), index={"t": t}, acquisition=run)
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["saved"] == 6 and f["rejected"] == 0
    np.testing.assert_array_equal(_raw(cfg, "raw_seg1")[:, 0, 0], [10, 11, 12])


def test_a_bare_client_names_each_channel(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)

    def publish(_):
        cam = BareClient(cfg.ingest)
        for t in range(2):
            for c, name in enumerate(["GFP", "mCherry"]):
                cam.send(np.full((8, 8), c, np.uint16), index={"t": t, "c": c}, sizes={"t": 2, "c": 2}, channel=name)
        cam.end()
        cam.close()

    _run(cfg, publish)
    ome = json.loads((cfg.out / "raw" / "zarr.json").read_text())["attributes"]["ome"]
    assert [ch["label"] for ch in ome["omero"]["channels"]] == ["GFP", "mCherry"]


def test_alternating_shapes_go_back_to_their_images_and_endless_new_shapes_are_capped(tmp_path, free_address):
    from livescope.daemon.pipeline import MAX_SEGMENTS

    cfg = _cfg(tmp_path, free_address)

    def publish(_):
        cam = BareClient(cfg.ingest)
        for t in range(10):  # two ROIs taking turns: two images, not ten
            shape = (8, 8) if t % 2 == 0 else (6, 10)
            cam.send(np.full(shape, t, np.uint16), index={"t": t // 2})
        for n in range(MAX_SEGMENTS + 5):  # a new shape every frame
            cam.send(np.full((2, 3 + n), n, np.uint8))
        cam.end()
        cam.close()

    f = _run(cfg, publish)["frames"]
    assert f["rejected_by_reason"] == {"too_many_segments": 7}
    assert f["saved"] == 10 + MAX_SEGMENTS - 2
    np.testing.assert_array_equal(_raw(cfg, "raw")[:, 0, 0], [0, 2, 4, 6, 8])
    np.testing.assert_array_equal(_raw(cfg, "raw_seg1")[:, 0, 0], [1, 3, 5, 7, 9])


def test_sender_counts_reach_the_status(tmp_path, free_address):
    cfg = _cfg(tmp_path, free_address)

    def publish(_):
        cam = BareClient(cfg.ingest, stream="scope")
        cam.send(np.ones((4, 4), np.uint16), sender={"dropped": 3, "meta_dropped": 1})
        cam.end()
        cam.close()

    summary = _run(cfg, publish)
    assert summary["streams"]["scope"]["sender"] == {"dropped": 3, "meta_dropped": 1}


@pytest.mark.parametrize("save_live", [False, True])
def test_live_mode_frames_are_previewed_not_saved_unless_asked(tmp_path, free_address, save_live):
    from livescope.bridges.transport import PreviewSubscriber
    from tests.conftest import wait_for

    cfg = _cfg(
        tmp_path, free_address, publish=free_address(), save_live=save_live, engines=["passthrough"], preview_hz=50.0
    )
    seen: dict = {}

    def publish(_):
        sub = PreviewSubscriber(cfg.publish)
        live = BareClient(cfg.ingest, stream="mmcore-live")
        mda = BareClient(cfg.ingest, stream="mmcore")
        mda.send(np.full((8, 8), 1, np.uint16), index={"t": 0})

        def previews():
            for key, frame in sub.latest().items():
                seen[key] = frame.header
            return any(h.get("live") and h.get("product") == "passthrough" for h in seen.values())

        for t in range(200):  # until a restored live preview came back (bounded)
            live.send(np.full((8, 8), 10 + t % 50, np.uint16), live=True, index={"t": t})
            try:
                wait_for(previews, timeout=0.05)
                break
            except AssertionError:
                continue
        live.end()
        mda.end()
        for c in (live, mda):
            c.close()
        sub.close()

    summary = _run(cfg, publish)
    f = summary["frames"]
    live_frames = f["received"] - 1
    assert any(h.get("live") and h.get("product") == "passthrough" for h in seen.values()), seen
    preview = next(h for h in seen.values() if h.get("live") and h.get("product") == "passthrough")
    assert preview["latency_ms"] > 0 and summary["latency"]["preview"]["count"] > 0
    if save_live:
        assert f["saved"] == f["received"] and f["live_not_saved"] == 0
        assert "raw_mmcore-live" in summary["store"]["images"]
    else:
        assert f["saved"] == 1 and f["live_not_saved"] == live_frames
        assert "raw" in summary["store"]["images"]
        assert not any("live" in name for name in summary["store"]["images"])


def test_stop_keeps_what_was_handed_over(tmp_path, free_address):
    # frames send() reported handed over, still queued in the socket when stop comes: received
    # and saved (or counted), never dropped uncounted
    from livescope.daemon.pipeline import Pipeline

    cfg = _cfg(tmp_path, free_address, exit_on_end=False)
    pipeline = Pipeline(cfg)
    pipeline.start()
    frames = np.random.default_rng(9).integers(0, 4000, (300, 32, 32), dtype=np.uint16)
    pub = FramePublisher(cfg.ingest, stream="cam", block=True, hwm=1000)
    sent = sum(bool(pub.send(f, index={"t": t})) for t, f in enumerate(frames))
    pipeline.request_stop()  # at once: most frames are still on their way
    summary = pipeline.close()
    pub.close()
    f = summary["frames"]
    assert sent == 300
    assert f["saved"] + f["dropped_at_close"] + f["lost"] == 300, f
    assert f["saved"] == 300, f
    np.testing.assert_array_equal(_raw(cfg)[...], frames)


def test_a_viewer_that_joins_after_the_frames_still_gets_the_newest_of_each(tmp_path, free_address):
    """PUB/SUB drops what was sent before a subscriber joined: the daemon sends the newest preview
    of each plane again when nothing new comes; a subscriber that already has it drops the repeat."""
    from livescope.bridges.transport import PreviewSubscriber
    from tests.conftest import wait_for

    cfg = _cfg(tmp_path, free_address, publish=free_address(), engines=["passthrough"], preview_hz=50.0)
    early_got: list = []
    late_got: dict = {}
    counts: dict = {}

    def publish(pipeline):
        subs = [PreviewSubscriber(cfg.publish)]
        cam = BareClient(cfg.ingest, stream="scope")
        try:
            _previews(pipeline, cam, subs)
        finally:  # the daemon ends with the stream, also when a wait below failed
            cam.end()
            cam.close()
            for s in subs:
                s.close()

    def _previews(pipeline, cam, subs):
        early = subs[0]
        for t in range(3):
            cam.send(np.full((8, 8), 100 + t, np.uint16), index={"t": t})
        _wait_received(pipeline, 3)

        def early_has_last():
            for key, frame in early.latest().items():
                early_got.append((key[1], frame.header["seq"], int(np.asarray(frame.array)[0, 0])))
            return {(p, v) for p, _, v in early_got} >= {("raw", 102), ("passthrough", 102)}

        wait_for(early_has_last, timeout=10, message="the early subscriber's previews of the last frame")
        late = PreviewSubscriber(cfg.publish)  # joins after every frame was previewed once
        subs.append(late)

        def late_has_last():
            for key, frame in late.latest().items():
                late_got[key[1]] = (frame.header, int(np.asarray(frame.array)[0, 0]))
            return {p for p, (_, v) in late_got.items() if v == 102} >= {"raw", "passthrough"}

        wait_for(late_has_last, timeout=10, message="the late subscriber's previews of the last frame")
        wait_for(lambda: early_has_last() and early.repeats >= 2, timeout=10, message="repeats at the early one")
        counts.update(early_received=early.received, early_repeats=early.repeats)

    _run(cfg, publish)
    assert {p for p, (_, v) in late_got.items() if v == 102} >= {"raw", "passthrough"}, late_got
    assert all(h.get("repeat") and "latency_ms" not in h for h, _ in late_got.values())
    # the early subscriber saw each (product, frame) once: the repeats never came out of latest()
    seen = [(p, seq) for p, seq, _ in early_got]
    assert len(seen) == len(set(seen)), early_got
    assert counts["early_repeats"] >= 2
