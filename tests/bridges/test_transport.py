"""The ZeroMQ data path (bridges/transport.py) with real sockets on 127.0.0.1: what a publisher
reports sent is what the daemon gets, bit-exact, and every frame that does not arrive is counted."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from livescope.bridges.protocol import MAX_FRAME_BYTES, encode, make_header
from livescope.bridges.transport import MAX_SEQ_GAP, FramePublisher, FrameReceiver
from tests.conftest import wait_for


@pytest.fixture
def receiver(free_address):
    made = []

    def make(**kw):
        rx = FrameReceiver(free_address(), **kw)
        made.append(rx)
        return rx

    yield make
    for rx in made:
        rx.close()


def _recv_all(rx: FrameReceiver, n: int, timeout_s: float = 10.0) -> list:
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        frame = rx.recv(timeout_ms=100)
        if frame is not None:
            got.append(frame)
    assert len(got) == n, f"{len(got)} of {n} frames within {timeout_s} s"
    return got


def test_camera_loop_reusing_one_buffer_delivers_every_frame_bit_exact(receiver):
    """A camera fills the same buffer for every frame; the daemon reads only after the burst (the
    slowest receiver). ZeroMQ sends from its own thread long after ``send`` returned: without
    the copy, most frames arrive holding the pixels of later ones."""
    rx = receiver(hwm=64)
    pub = FramePublisher(rx.address, stream="cam", hwm=64)  # the defaults, as camera code uses them
    buffer = np.empty((1024, 1024), np.uint16)  # 2 MB: more than the kernel takes in one go
    n = 24
    try:
        for i in range(n):
            buffer[...] = i
            buffer[i, :] = 4000 + i  # a per-frame pattern, not just a level
            assert pub.send(buffer, index={"t": i})
        got = _recv_all(rx, n)
    finally:
        pub.close(linger_s=0)
    for i, frame in enumerate(got):
        expected = np.full_like(buffer, i)
        expected[i, :] = 4000 + i
        assert frame.index == {"t": i}
        np.testing.assert_array_equal(frame.array, expected, err_msg=f"frame {i} holds other pixels")
    assert rx.stats()["lost"] == 0


def test_send_with_nobody_listening_is_counted_not_reported_sent(free_address):
    pub = FramePublisher(free_address(), stream="cam", connect_timeout_ms=100)
    frame = np.ones((16, 16), np.uint16)
    try:
        t0 = time.monotonic()
        assert not pub.send(frame)  # waits at most connect_timeout_ms for a daemon, then gives up
        assert time.monotonic() - t0 < 2.0
        assert [pub.send(frame) for _ in range(5)] == [False] * 5  # later sends never wait
        assert (pub.sent, pub.dropped, pub.seq) == (0, 6, 6)
        assert not pub.end(timeout_s=0.05)  # no daemon: the end marker is not handed over either
    finally:
        pub.close(linger_s=0)


def test_first_send_right_after_connect_reaches_a_listening_daemon(receiver):
    rx = receiver()
    pub = FramePublisher(rx.address, stream="cam")
    try:
        assert pub.send(np.full((8, 8), 7, np.uint16))  # the connection comes up within the first send
        assert int(_recv_all(rx, 1)[0].array[0, 0]) == 7
    finally:
        pub.close(linger_s=0)


def test_blocking_send_waits_for_a_daemon_that_binds_late(free_address):
    address = free_address()
    pub = FramePublisher(address, stream="late", block=True, send_timeout_ms=5000)
    started: list[FrameReceiver] = []
    binder = threading.Timer(0.3, lambda: started.append(FrameReceiver(address)))
    binder.start()
    try:
        t0 = time.monotonic()
        assert pub.send(np.full((8, 8), 3, np.uint16))
        assert time.monotonic() - t0 >= 0.2  # it waited for the bind, it did not queue blindly
        binder.join()
        frame = _recv_all(started[0], 1)[0]
        assert int(frame.array[0, 0]) == 3 and pub.dropped == 0
    finally:
        binder.cancel()
        pub.close(linger_s=0)
        for rx in started:
            rx.close()


def test_two_publishers_with_one_stream_name_lose_nothing(receiver):
    rx = receiver(hwm=256)
    pubs = [FramePublisher(rx.address, hwm=256) for _ in range(3)]  # default stream name for all
    try:
        assert len({p.source for p in pubs}) == 3 and all(len(p.source) == 8 for p in pubs)
        for i in range(40):
            for p in pubs:
                assert p.send(np.full((4, 4), i, np.uint16))
        for p in pubs:
            assert p.end()
        got = _recv_all(rx, 3 * 40 + 3)
    finally:
        for p in pubs:
            p.close(linger_s=0)
    assert {f.header["source"] for f in got} == {p.source for p in pubs}
    stats = rx.stats()
    assert stats["received"] == 120 and stats["lost"] == 0 and stats["restarts"] == 0


def test_seq_gaps_are_lost_frames_but_absurd_jumps_are_restarts(receiver):
    rx = receiver()
    pub = FramePublisher(rx.address, stream="cam", block=True, send_timeout_ms=2000)
    frame = np.zeros((4, 4), np.uint8)
    try:
        for seq in (0, 1, 4):  # 2 and 3 never sent: 2 lost
            assert pub.send(frame, seq=seq)
        # next expected is 5: a jump of MAX_SEQ_GAP + 1, then the absurd counts of issue #22, then back
        for seq in (5 + MAX_SEQ_GAP + 1, 5 + MAX_SEQ_GAP + 2, 2**63 - 1, 2**64 - 1, 5):
            pub.send(frame, seq=seq)  # the protocol may refuse the largest (counted as rejected)

        def all_in():
            rx.recv(timeout_ms=50)
            return rx.stats()["received"] + rx.stats()["rejected"] == 8

        wait_for(all_in, 5, message="all 8 messages")
    finally:
        pub.close(linger_s=0)
    stats = rx.stats()
    assert stats["lost"] == 2, stats  # never 9.2e18
    # a restart at the first jump, at each absurd seq the protocol let through, and at the step back
    huge_accepted = stats["received"] - 6
    assert stats["restarts"] == 2 + huge_accepted, stats


def test_oversize_message_is_dropped_before_allocation_and_ingest_goes_on(receiver):
    rx = receiver(max_message_bytes=64 * 1024)
    assert receiver().max_message_bytes >= MAX_FRAME_BYTES  # the default admits every legal frame
    pub = FramePublisher(rx.address, stream="cam", block=True, send_timeout_ms=2000)
    try:
        assert pub.send(np.zeros((256, 256), np.uint16))  # 128 KB: libzmq drops the connection
        small = np.full((8, 8), 5, np.uint16)
        # the publisher reconnects (ZeroMQ retries every 100 ms) and the next frames get in
        frame = wait_for(lambda: pub.send(small) and rx.recv(timeout_ms=100), 10, message="a frame after the drop")
    finally:
        pub.close(linger_s=0)
    assert frame.array.shape == (8, 8) and int(frame.array[0, 0]) == 5
    assert rx.stats()["rejected"] == 0


def test_drain_takes_the_queued_frames_and_close_counts_the_rest(receiver):
    rx = receiver(hwm=256)
    pub = FramePublisher(rx.address, stream="cam", hwm=256)
    try:
        for i in range(30):
            assert pub.send(np.full((8, 8), i, np.uint16))
        t0 = time.monotonic()
        drained = [int(f.array[0, 0]) for f in rx.drain(timeout_s=5.0, idle_s=0.2)]
        assert time.monotonic() - t0 < 2.0  # it stops once the queue is empty
        assert drained == list(range(30))
        for i in range(20):  # arrive after the drain: the daemon stops without taking them
            assert pub.send(np.full((8, 8), i, np.uint16))
        assert rx.recv(timeout_ms=2000) is not None
    finally:
        pub.close(linger_s=1)
    rx.close()
    stats = rx.stats()
    assert stats["received"] == 31 and stats["dropped_at_close"] == 19 and stats["lost"] == 0


def test_drain_does_not_wait_for_a_publisher_that_keeps_sending(receiver):
    rx = receiver(hwm=256)
    pub = FramePublisher(rx.address, stream="cam", hwm=256)
    stop = threading.Event()

    def camera():
        while not stop.is_set():
            pub.send(np.zeros((8, 8), np.uint16))
            time.sleep(0.005)

    sender = threading.Thread(target=camera)
    sender.start()
    try:
        assert rx.recv(timeout_ms=2000) is not None
        t0 = time.monotonic()
        n = sum(1 for _ in rx.drain(timeout_s=0.3, idle_s=0.1))
        assert n > 0 and time.monotonic() - t0 < 1.0
    finally:
        stop.set()
        sender.join()
        pub.close(linger_s=0)


def test_publisher_without_source_is_tracked_per_stream(receiver):
    """Other-language publishers that send no ``source`` keep the per-stream count."""
    rx = receiver()
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUSH)
    raw.connect(rx.address)
    frame = np.zeros((4, 4), np.uint8)
    try:
        for seq in (0, 1, 3):
            raw.send_multipart(encode(make_header(frame, stream="other", seq=seq), frame))
        _recv_all(rx, 3)
    finally:
        raw.close(0)
    assert rx.stats()["lost"] == 1
