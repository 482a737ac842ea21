"""Coverage-guided fuzzing of the wire decoder with atheris (libFuzzer). Not part of the test
suite (hypothesis fuzzes there); a tool to run by hand for a while:

    pip install atheris            # a wheel for CPython <= 3.11 on x86_64 Linux; not a dependency
    python tests/bridges/atheris_wire.py -max_total_time=120 -rss_limit_mb=2048 [CORPUS_DIR]

Input layout: byte 0 picks the number of message parts (0-3), the next 2 bytes the header's
length; the header then the buffer follow. The seeds are valid frames and end markers, so the
fuzzer starts from messages the decoder accepts and mutates them. Anything other than a
``ProtocolError`` (or a frame whose array disagrees with its header) is a crash, and atheris saves
the input that caused it.
"""

from __future__ import annotations

import os
import sys
import tempfile

import atheris
import numpy as np

with atheris.instrument_imports(include=["livescope"]):  # the decoder, not numpy
    from livescope.bridges.protocol import ProtocolError, decode, encode, make_header


def _split(data: bytes) -> list[bytes]:
    if len(data) < 3:
        return [data] if data else []
    n_parts = data[0] % 4
    head_len = int.from_bytes(data[1:3], "little")
    head, body = data[3 : 3 + head_len], data[3 + head_len :]
    return [head, body, body[:1]][:n_parts]


def _join(parts: list[bytes]) -> bytes:
    head = parts[0]
    body = parts[1] if len(parts) > 1 else b""
    return bytes([len(parts)]) + len(head).to_bytes(2, "little") + head + body


def test_one_input(data: bytes) -> None:
    parts = _split(data)
    try:
        frame = decode(parts)
    except ProtocolError:
        return
    if frame.array is not None:
        assert list(frame.array.shape) == list(frame.header["shape"]), frame.header
        assert frame.array.dtype == np.dtype(frame.header["dtype"]), frame.header


def _seeds(folder: str) -> None:
    arrays = [np.arange(12, dtype=np.uint16).reshape(3, 4), np.zeros((2, 2, 2), np.float32), np.ones((1, 5), np.uint8)]
    for i, a in enumerate(arrays):
        head, body = encode(make_header(a, stream="cam", seq=i, index={"t": i, "c": 0}, pixel_size_um=0.1), a)
        with open(os.path.join(folder, f"seed{i}"), "wb") as f:
            f.write(_join([bytes(head), bytes(memoryview(body).cast("B"))]))
    head = encode(make_header(None, stream="cam", seq=9, kind="end"), None)[0]
    with open(os.path.join(folder, "seed_end"), "wb") as f:
        f.write(_join([bytes(head)]))


def main() -> None:
    args = sys.argv[1:]
    corpus = [a for a in args if not a.startswith("-")]
    if not corpus:
        folder = tempfile.mkdtemp(prefix="livescope-atheris-")
        _seeds(folder)
        args.append(folder)
    else:
        _seeds(corpus[0])
    atheris.Setup([sys.argv[0], *args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
