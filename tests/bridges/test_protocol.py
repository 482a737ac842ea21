from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from livescope.bridges.protocol import DTYPES, ProtocolError, decode, encode, make_header
from livescope.bridges.transport import FramePublisher, FrameReceiver
from tests.conftest import wait_for

dtypes = st.sampled_from(["uint8", "uint16", "uint32", "int16", "float32", "float64"])


@settings(max_examples=60, deadline=None)
@given(
    dtype=dtypes,
    shape=st.lists(st.integers(1, 17), min_size=2, max_size=3),
    seq=st.integers(0, 2**40),
    index=st.fixed_dictionaries({}, optional={k: st.integers(0, 255) for k in "pczt"}),
    data=st.data(),
)
def test_round_trip_is_exact(dtype, shape, seq, index, data):
    arr = data.draw(
        st.builds(lambda s: np.random.default_rng(s).integers(0, 200, shape).astype(dtype), st.integers(0, 1000))
    )
    header = make_header(arr, stream="cam", seq=seq, index=index, pixel_size_um=0.1, meta={"x": [1, 2]})
    parts = [bytes(p) for p in encode(header, arr)]
    frame = decode(parts)
    assert frame.seq == seq and frame.stream == "cam"
    assert frame.array.dtype == np.dtype(dtype) and frame.array.shape == tuple(shape)
    np.testing.assert_array_equal(frame.array, arr)
    assert frame.index == index
    assert frame.header["meta"] == {"x": [1, 2]}


def _parts(header: dict, payload: bytes) -> list[bytes]:
    return [json.dumps(header).encode(), payload]


GOOD = {"v": 1, "stream": "s", "seq": 0, "shape": [4, 4], "dtype": "uint16"}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"v": 2}, "bad_version"),
        ({"dtype": "complex128"}, "bad_dtype"),
        ({"dtype": "object"}, "bad_dtype"),
        ({"shape": [4, 5]}, "size_mismatch"),
        ({"shape": [0, 4]}, "bad_shape"),
        ({"shape": [4]}, "bad_shape"),
        ({"shape": [100000, 100000, 1000]}, "too_large"),
        ({"seq": -1}, "bad_field"),
        ({"seq": "1"}, "bad_field"),
        ({"bits": 17}, "bad_field"),
        ({"index": {"q": 1}}, "bad_index"),
        ({"index": {"t": -1}}, "bad_index"),
        ({"time": float("nan")}, ("bad_field", "bad_json")),  # NaN is not JSON: orjson refuses it earlier
        ({"meta": [1]}, "bad_field"),
    ],
)
def test_malformed_headers_are_rejected_with_a_reason(change, reason):
    header = {**GOOD, **change}
    with pytest.raises(ProtocolError) as err:
        decode(_parts(header, b"\0" * 32))
    assert err.value.reason in ((reason,) if isinstance(reason, str) else reason)


@pytest.mark.parametrize("missing", ["v", "stream", "seq", "shape", "dtype"])
def test_missing_fields_are_rejected(missing):
    header = {k: v for k, v in GOOD.items() if k != missing}
    with pytest.raises(ProtocolError) as err:
        decode(_parts(header, b"\0" * 32))
    assert err.value.reason == "missing_field"


def test_not_json_and_wrong_part_count():
    with pytest.raises(ProtocolError, match="bad_json"):
        decode([b"\xff\xfe{", b""])
    with pytest.raises(ProtocolError, match="bad_header"):
        decode([b"[1, 2]", b""])
    with pytest.raises(ProtocolError, match="bad_parts"):
        decode([json.dumps(GOOD).encode()])
    with pytest.raises(ProtocolError, match="empty_message"):
        decode([])


@settings(max_examples=200, deadline=None)
@given(head=st.binary(max_size=200), body=st.binary(max_size=64))
def test_fuzzed_bytes_never_crash_the_decoder(head, body):
    try:
        frame = decode([head, body])
    except ProtocolError:
        return
    # whatever decodes must be self-consistent
    assert frame.array.nbytes == len(body)


@settings(max_examples=200, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["v", "stream", "seq", "shape", "dtype", "bits", "index", "kind"]),
        st.one_of(
            st.integers(-5, 5),
            st.text(max_size=5),
            st.lists(st.integers(-1, 8), max_size=4),
            st.none(),
            st.booleans(),
            st.sampled_from(list(DTYPES)),
        ),
    )
)
def test_fuzzed_headers_never_crash_the_decoder(header):
    try:
        decode(_parts(header, b"\0" * 16))
    except ProtocolError:
        pass


def test_receiver_counts_rejects_and_lost_frames_and_keeps_running(free_address):
    addr = free_address()
    rx = FrameReceiver(addr)
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.PUSH)
    raw.connect(addr)
    pub = FramePublisher(addr, stream="cam", block=True)
    try:
        frame0 = np.arange(64, dtype=np.uint16).reshape(8, 8)
        assert pub.send(frame0)
        raw.send_multipart([b"not json", b"x"])
        raw.send_multipart(_parts({**GOOD, "shape": [9, 9]}, b"\0" * 32))
        pub.seq = 5  # frames 1-4 never sent: a gap of 4
        assert pub.send(frame0 + 1)
        got = []

        def drained():
            f = rx.recv(50)
            if f is not None:
                got.append(f)
            # PULL fair-queues between the two connections: wait for both to be drained
            return len(got) >= 2 and rx.stats()["rejected"] >= 2

        wait_for(drained, message="2 frames and 2 rejects")
        np.testing.assert_array_equal(got[0].array, frame0)
        np.testing.assert_array_equal(got[1].array, frame0 + 1)
        stats = rx.stats()
        assert stats["received"] == 2
        assert stats["rejected"] == 2 and stats["rejected_by_reason"] == {"bad_json": 1, "size_mismatch": 1}
        assert stats["lost"] == 4
    finally:
        raw.close(0)
        pub.close(0)
        rx.close()


def test_publisher_never_blocks_and_counts_what_it_cannot_hand_over(free_address):
    addr = free_address()  # nobody listens: the high-water mark fills
    pub = FramePublisher(addr, stream="cam", hwm=2)
    try:
        frame = np.zeros((64, 64), np.uint16)
        results = [pub.send(frame) for _ in range(50)]
        assert not all(results)
        assert pub.dropped == results.count(False) > 0
        assert pub.seq == 50
    finally:
        pub.close(0)


def test_deeply_nested_header_is_rejected_not_fatal():
    with pytest.raises(ProtocolError, match="bad_json"):
        decode([b"[" * 100000 + b"]" * 100000, b""])
