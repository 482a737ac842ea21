"""Same-host fast path: frames through a shared-memory ring, headers over ZeroMQ (bridges/shm.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from livescope.bridges import shm_ring as shm_mod
from livescope.bridges.protocol import encode, make_header
from livescope.bridges.shm import ShmFramePublisher, ShmReader, cleanup_stale, make_publisher, same_host
from livescope.bridges.transport import FramePublisher, FrameReceiver, free_tcp_address
from tests.conftest import wait_for

REPO_PARENT = Path(__file__).resolve().parents[2].parent  # where `import livescope` resolves from
LINUX = sys.platform.startswith("linux")


def _segment_exists(name: str) -> bool:
    """Attach without the resource tracker (as the reader does) to see whether a segment is there."""
    try:
        seg = shm_mod._Attached(name)
    except FileNotFoundError:
        return False
    seg.close()
    return True


def _recv(rx: FrameReceiver, timeout_s: float = 10.0):
    frame = rx.recv(timeout_ms=int(timeout_s * 1000))
    assert frame is not None, "no frame within the timeout"
    return frame


@pytest.fixture
def link():
    """A bound receiver and a same-host publisher on a fresh port; both closed afterwards."""
    made = []

    def make(**kw):
        address = free_tcp_address()
        rx = FrameReceiver(address)
        pub = ShmFramePublisher(address, stream="cam", **kw)
        made.append((pub, rx))
        return pub, rx

    yield make
    for pub, rx in made:
        pub.close(linger_s=0)
        rx.close()


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((512, 512), "uint16"),
        ((1, 1), "uint16"),
        ((3, 7, 5), "uint16"),
        ((511, 257), "float32"),
        ((17, 33), "uint8"),
        ((9, 13), "int32"),
    ],
)
def test_round_trip_is_bit_exact_through_frame_receiver(link, shape, dtype):
    pub, rx = link(slots=4)
    assert pub.mode == "shm"
    rng = np.random.default_rng(1)
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    frames = [
        (rng.integers(info.min, info.max, size=shape, endpoint=True) if info else rng.standard_normal(shape)).astype(
            dtype
        )
        for _ in range(6)  # more frames than slots: slots are reused after the reader released them
    ]
    for i, f in enumerate(frames):
        assert pub.send(f, index={"t": i}, channel="GFP")
        got = _recv(rx)
        assert "shm" in got.header, "pixels should have come through shared memory"
        assert got.seq == i and got.index == {"t": i} and got.header["channel"] == "GFP"
        assert got.array.dtype == np.dtype(dtype) and got.array.shape == shape
        np.testing.assert_array_equal(got.array, f)
    # the receiver holds a private copy: refilling the slot must not change it
    pub.send(np.zeros(shape, dtype))
    _recv(rx)
    np.testing.assert_array_equal(got.array, frames[-1])
    assert rx.stats()["rejected"] == 0 and rx.stats()["lost"] == 0


def test_non_contiguous_frame_arrives_exact(link):
    pub, rx = link(slots=2)
    base = np.arange(64 * 80, dtype=np.uint16).reshape(64, 80)
    view = base[::2, 3:71]  # a strided crop, as an ROI of a camera buffer
    assert pub.send(view)
    np.testing.assert_array_equal(_recv(rx).array, view)


def test_big_endian_frame_arrives_with_its_values(link):
    pub, rx = link(slots=2)
    values = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 300
    assert pub.send(values.astype(">u2"))
    got = _recv(rx)
    assert got.array.dtype == np.dtype("uint16")
    np.testing.assert_array_equal(got.array, values)


def test_slots_are_reused_only_after_the_reader_released_them(link):
    pub, rx = link(slots=4)
    frames = [np.full((32, 48), i, np.uint16) for i in range(8)]
    for f in frames[:4]:
        assert pub.send(f)
    # the reader has not read anything: every slot is still full, the next frame is dropped
    assert not pub.send(frames[4])
    assert pub.dropped == 1 and pub.sent == 4 and pub.seq == 5
    for i in range(4):
        got = _recv(rx)
        assert got.seq == i
        np.testing.assert_array_equal(got.array, frames[i])  # not overwritten by the dropped frame
    for f in frames[5:8]:
        assert pub.send(f)
    seqs = [_recv(rx).seq for _ in range(3)]
    assert seqs == [5, 6, 7]
    st = rx.stats()
    assert st["lost"] == 1 and st["received"] == 7 and st["rejected"] == 0


def test_blocking_send_waits_for_the_reader(link):
    pub, rx = link(slots=2, block=True, send_timeout_ms=100, reclaim_s=None)
    f = np.ones((16, 16), np.uint16)
    assert pub.send(f) and pub.send(f)
    t0 = time.monotonic()
    assert not pub.send(f), "no reader: a blocking send gives up after send_timeout_ms"
    assert time.monotonic() - t0 >= 0.09 and pub.dropped == 1
    pub.send_timeout_ms = 10_000
    got = []
    reader = threading.Thread(target=lambda: got.append(_recv(rx)))
    reader.start()
    assert pub.send(f * 3), "the reader released a slot: the blocked send goes through"
    reader.join(10)
    assert [g.seq for g in got] == [0]
    assert [_recv(rx).seq for _ in range(2)] == [1, 3]


def test_header_for_a_vanished_segment_is_rejected_and_counted(link):
    pub, rx = link(slots=2)
    f = np.arange(100, dtype=np.uint16).reshape(10, 10)
    assert pub.send(f)
    good = _recv(rx)
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(rx.address)
    try:

        def forged(seq, **shm):
            ref = {**good.header["shm"], **shm}
            header = make_header(f, stream="forged", seq=seq, shm=ref)
            raw.send(encode(header, None)[0])

        forged(0, name=f"livescope_{os.getpid()}_deadbeef")  # no such segment (publisher gone)
        forged(1)  # the slot was already read: a replayed header
        forged(2, slot=99)  # not a slot of this ring
        forged(3, nbytes=7)  # does not match shape x dtype
        # the receiver rejects all four (recv returns None: no valid frame) and keeps going
        wait_for(lambda: rx.recv(timeout_ms=20) is None and rx.stats()["rejected"] == 4, 10, message="four rejects")
        assert pub.send(f + 1), "the publisher goes on"
        got = _recv(rx)
        np.testing.assert_array_equal(got.array, f + 1)
        st = rx.stats()["rejected_by_reason"]
        assert st == {"shm_missing": 1, "shm_stale": 1, "shm_bad": 2}, st
    finally:
        raw.close()


def test_reader_rejects_bad_shm_objects_without_attaching():
    reader = ShmReader()
    base = make_header(np.zeros((2, 2), np.uint16), stream="s", seq=0)
    for shm, reason in [
        ({"name": "x/y", "slot": 0, "nbytes": 8, "gen": 1}, "shm_bad"),
        ({"name": "a", "slot": -1, "nbytes": 8, "gen": 1}, "shm_bad"),
        ({"name": "a", "slot": 0, "nbytes": True, "gen": 1}, "shm_bad"),
        ({"name": "livescope_1_nothere", "slot": 0, "nbytes": 8, "gen": 1}, "shm_missing"),
    ]:
        with pytest.raises(shm_mod.ProtocolError) as exc:
            reader.read({**base, "shm": shm})
        assert exc.value.reason == reason
    assert reader.attached == []
    reader.close()


def test_larger_frame_mid_stream_gets_a_new_ring(link):
    pub, rx = link(slots=3)
    small = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    big = np.arange(300 * 200, dtype=np.uint16).reshape(300, 200)
    assert pub.send(small) and pub.send(small + 1)
    first = pub.segment_names[-1]
    assert pub.send(big)  # headers of the two small frames are still in flight
    second = pub.segment_names[-1]
    assert second != first
    assert _segment_exists(first), "the old ring must outlive the frames still in it"
    for expect in (small, small + 1, big):
        np.testing.assert_array_equal(_recv(rx).array, expect)
    assert pub.send(small + 2)  # smaller again: fits the big ring
    np.testing.assert_array_equal(_recv(rx).array, small + 2)
    assert pub.segment_names == [second], "the drained old ring is unlinked"
    assert not _segment_exists(first)
    assert rx.stats()["rejected"] == 0
    pub.close()
    assert not _segment_exists(second), "close unlinks the publisher's segments"


def test_lost_header_slot_is_reclaimed_and_its_late_header_rejected(link):
    pub, rx = link(slots=2, reclaim_s=0.2)
    f = np.ones((8, 8), np.uint16)
    assert pub.send(f)
    _recv(rx)  # the reader has released a slot: it can see the ring
    assert pub.send(f * 1) and pub.send(f * 2)  # both slots full, reader not reading
    deadline = time.monotonic() + 10
    while not pub.send(f * 3):  # dropped until the oldest slot is reclaim_s old
        assert time.monotonic() < deadline, "slot never reclaimed"
        time.sleep(0.01)
    assert pub.reclaimed == 1 and pub.mode == "shm"
    got = [_recv(rx) for _ in range(2)]
    assert [g.array[0, 0] for g in got] == [2, 3]
    assert rx.stats()["rejected_by_reason"] == {"shm_stale": 1}  # frame 1's slot was taken back
    # the gaps: every dropped frame; the frame whose late header was rejected is counted once,
    # as rejected, not again as lost
    assert rx.stats()["lost"] == pub.dropped


def test_falls_back_to_inline_when_the_receiver_never_releases(link):
    pub, rx = link(slots=2, reclaim_s=0.1)
    frames = [np.full((8, 8), i, np.uint16) for i in range(3)]
    assert pub.send(frames[0]) and pub.send(frames[1])
    deadline = time.monotonic() + 10
    while not pub.send(frames[2]):  # nobody reads: the receiver may not see our shared memory
        assert time.monotonic() < deadline, "publisher never gave up on shared memory"
        time.sleep(0.01)
    assert pub.mode == "zmq"
    got = [_recv(rx) for _ in range(3)]
    assert ["shm" in g.header for g in got] == [True, True, False]
    for g, f in zip(got, frames, strict=True):
        np.testing.assert_array_equal(g.array, f)


def test_receiver_not_up_yet_counts_frames_as_dropped_and_keeps_the_ring():
    """A daemon still starting: nothing can be handed over, so every frame is dropped and counted
    (never reported sent and then lost), no slot is held or reclaimed, shared memory is kept; once
    the daemon binds and the connection is up (ZeroMQ retries every 100 ms), frames arrive intact."""
    address = free_tcp_address()
    pub = ShmFramePublisher(address, stream="early", slots=2, reclaim_s=0.05, connect_timeout_ms=0)
    try:
        frames = [np.full((8, 8), i, np.uint16) for i in range(3)]
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:  # six times reclaim_s with nobody connected
            assert not pub.send(frames[0])
            time.sleep(0.01)
        assert pub.sent == 0 and pub.dropped == pub.seq > 0
        assert pub.mode == "shm" and pub.reclaimed == 0 and pub._ring.busy() == 0
        rx = FrameReceiver(address)
        try:
            wait_for(lambda: pub.send(frames[1]), 10, message="a send once the receiver is connected")
            assert pub.send(frames[2])
            got = [_recv(rx) for _ in range(2)]
            for g, f in zip(got, frames[1:], strict=True):
                assert "shm" in g.header
                np.testing.assert_array_equal(g.array, f)
            assert rx.stats()["rejected"] == 0 and rx.stats()["lost"] == 0
        finally:
            rx.close()
    finally:
        pub.close(linger_s=0)


def test_same_host_and_factory():
    assert same_host("ipc:///tmp/x.sock") and same_host("inproc://x")
    assert same_host("tcp://127.0.0.1:5570") and same_host("tcp://localhost:5570")
    assert same_host("tcp://[::1]:5570")
    assert not same_host("tcp://192.0.2.7:5570")  # TEST-NET-1: never this machine
    assert not same_host("udp://127.0.0.1:5570")
    remote = make_publisher("tcp://192.0.2.7:5570", slots=4, hwm=8)
    local = make_publisher(free_tcp_address(), slots=4)
    try:
        assert type(remote) is FramePublisher
        assert isinstance(local, ShmFramePublisher) and local.mode == "shm"
    finally:
        remote.close(linger_s=0)
        local.close(linger_s=0)


def test_forced_inline_mode_round_trips(link):
    pub, rx = link(shm=False)
    f = np.arange(30, dtype=np.uint16).reshape(5, 6)
    assert pub.mode == "zmq" and pub.send(f)
    got = _recv(rx)
    assert "shm" not in got.header
    np.testing.assert_array_equal(got.array, f)
    assert pub.segment_names == []


def _python(code: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_PARENT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        text=True,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        **kw,
    )


def test_reader_process_exit_does_not_unlink_the_publishers_segment():
    """Before Python 3.13 an attached SharedMemory is unlinked by the reader's resource tracker
    when the reader's process exits: the publisher would then send into a segment nobody can find."""
    address = free_tcp_address()
    f = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    # blocking: the reader binds while the publisher waits to reconnect (ZeroMQ retries every 100 ms)
    pub = ShmFramePublisher(address, stream="cam", slots=4, block=True, send_timeout_ms=10_000)
    try:
        reader = _python(
            f"""
            import numpy as np
            from livescope.bridges.transport import FrameReceiver
            rx = FrameReceiver({address!r})
            print("ready", flush=True)
            for _ in range(3):
                fr = rx.recv(timeout_ms=10000)
                assert fr is not None and "shm" in fr.header
                print(int(fr.array.sum()), flush=True)
            rx.close()
        """,
            stderr=subprocess.PIPE,
        )
        assert reader.stdout.readline().strip() == "ready"
        for i in range(3):
            assert pub.send(f + i)
        out, err = reader.communicate(timeout=30)
        assert reader.returncode == 0, err
        assert [int(x) for x in out.split()] == [int((f + i).sum()) for i in range(3)]
        assert "leaked shared_memory" not in err, err
        name = pub.segment_names[-1]
        assert _segment_exists(name), "the reader's exit unlinked the publisher's segment"
        # a new reader attaches to the same segment and the publisher keeps sending into it
        rx = FrameReceiver(address)
        try:
            assert pub.send(f * 2)
            np.testing.assert_array_equal(_recv(rx).array, f * 2)
            assert pub.segment_names[-1] == name and rx.stats()["rejected"] == 0
        finally:
            rx.close()
    finally:
        pub.close(linger_s=0)


def test_publisher_exiting_without_close_unlinks_its_segment():
    child = _python(
        f"""
        import numpy as np
        from livescope.bridges.shm import ShmFramePublisher
        pub = ShmFramePublisher({free_tcp_address()!r}, slots=2)
        pub.send(np.ones((64, 64), np.uint16))
        print(pub.segment_names[-1], flush=True)
        # no close(): the interpreter exits with the publisher alive
    """,
        stderr=subprocess.PIPE,
    )
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert not _segment_exists(out.strip())
    # our finalizer unlinked it, not the resource tracker's last-resort cleanup (which warns)
    assert "leaked shared_memory" not in err, err


@pytest.mark.skipif(
    not LINUX, reason="segments are files in /dev/shm only on Linux; elsewhere cleanup_stale is a no-op"
)
def test_sigkilled_publisher_leaves_a_segment_that_cleanup_stale_removes():
    child = _python(
        f"""
        import sys
        import numpy as np
        from livescope.bridges.shm import ShmFramePublisher
        pub = ShmFramePublisher({free_tcp_address()!r}, slots=2)
        pub.send(np.ones((64, 64), np.uint16))
        print(pub.segment_names[-1], flush=True)
        sys.stdin.read()  # until killed
    """,
        start_new_session=True,
    )
    try:
        name = child.stdout.readline().strip()
        assert name.startswith(f"livescope_{child.pid}_")
        # kill its whole session: the publisher and its resource tracker, which would otherwise
        # unlink the segment (a crash that takes both, e.g. the kill of a process group)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(10)
        wait_for(lambda: not _pid_is_running(child.pid), 10, message="publisher gone")
        assert (Path("/dev/shm") / name).exists(), "SIGKILL should leave the segment behind"
        ours = ShmFramePublisher(free_tcp_address(), slots=2)
        try:
            ours.send(np.zeros((4, 4), np.uint16))
            removed = cleanup_stale()
            assert name in removed
            assert not (Path("/dev/shm") / name).exists()
            assert _segment_exists(ours.segment_names[-1]), "a live publisher's segment is kept"
            assert ours.segment_names[-1] not in removed
        finally:
            ours.close(linger_s=0)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(10)
        for stream in (child.stdin, child.stdout):
            stream.close()


def _pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cleanup_stale_ignores_other_names(tmp_path):
    (tmp_path / "livescope_notapid_x").write_bytes(b"")
    (tmp_path / "psm_1234").write_bytes(b"")
    (tmp_path / "livescope_999999999_ab").write_bytes(b"")  # beyond pid_max: surely dead
    removed = cleanup_stale(shm_dir=tmp_path)
    assert removed == (["livescope_999999999_ab"] if LINUX else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["livescope_notapid_x", "psm_1234"] if LINUX else ["livescope_999999999_ab", "livescope_notapid_x", "psm_1234"]
    )


def test_end_of_stream_and_context_manager(link):
    address = free_tcp_address()
    rx = FrameReceiver(address)
    try:
        with ShmFramePublisher(address, stream="ctx", slots=2) as pub:
            pub.send(np.ones((4, 4), np.uint16))
            names = pub.segment_names
            got = [_recv(rx)]  # read before close: close waits for the ring to drain
        got.append(_recv(rx))
        assert not got[0].is_end and got[1].is_end
        assert not _segment_exists(names[0])
        with pytest.raises(RuntimeError, match="closed"):
            pub.send(np.ones((4, 4), np.uint16))
    finally:
        rx.close()


def test_close_waits_for_the_reader_to_take_the_last_frames():
    address = free_tcp_address()
    rx = FrameReceiver(address)
    pub = ShmFramePublisher(address, stream="late", slots=4)
    frames = [np.full((16, 16), i, np.uint16) for i in range(3)]
    for f in frames:
        assert pub.send(f)
    got = []
    reader = threading.Thread(target=lambda: got.extend(_recv(rx) for _ in range(3)))
    reader.start()
    try:
        pub.close(linger_s=10)  # returns once the reader took all three, then unlinks
        reader.join(10)
        assert [int(g.array[0, 0]) for g in got] == [0, 1, 2]
        assert rx.stats()["rejected"] == 0
    finally:
        rx.close()
    assert json.loads(json.dumps(pub.segment_names)) == []


def test_mmcore_bridge_over_shared_memory_into_a_daemon(tmp_path, free_address):
    import zarr as _zarr

    from livescope.bridges.mmcore import attach
    from livescope.bridges.sim import SimConfig, SimMicroscope, SimSample
    from livescope.daemon.config import DaemonConfig
    from livescope.daemon.pipeline import Pipeline

    cfg = DaemonConfig(
        source="zmq", out=tmp_path / "shm.zarr", ingest=free_address(), publish=None, control=None, exit_on_end=True
    )
    pipeline = Pipeline(cfg)
    pipeline.start()
    scope = SimMicroscope(SimConfig(shape=(48, 64), seed=6))
    bridge = attach(scope.core, cfg.ingest, shm=True)
    try:
        scope.core.mda.run(scope.sequence(frames=5, interval_s=0))
        assert pipeline.wait(timeout=30)
    finally:
        bridge.close()
        summary = pipeline.close()
        scope.close()
    assert bridge.publisher.mode == "shm"  # the pixels went through shared memory, not ZeroMQ
    assert summary["frames"]["saved"] == 5 and summary["frames"]["rejected"] == 0
    raw = _zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")[...]
    sample = SimSample(SimConfig(shape=(48, 64), seed=6))
    np.testing.assert_array_equal(raw, np.stack([sample.render(t) for t in range(5)]))
