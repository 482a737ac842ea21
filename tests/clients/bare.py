"""A frame publisher written from docs/protocol.md alone (pyzmq and json, nothing of livescope):
how a user's own camera loop in Python, or any language with a ZeroMQ binding, talks to the daemon."""

from __future__ import annotations

import json

import numpy as np
import zmq


class BareClient:
    def __init__(self, address: str, stream: str = "cam") -> None:
        self.sock = zmq.Context.instance().socket(zmq.PUSH)
        self.sock.connect(address)
        self.stream = stream
        self.seq = 0

    def send(self, array: np.ndarray | None, **fields) -> None:
        header = {"v": 1, "stream": self.stream, "seq": self.seq, **fields}
        if array is not None:
            header.update(shape=list(array.shape), dtype=array.dtype.name)
        self.seq += 1
        parts = [json.dumps(header).encode()] + ([np.ascontiguousarray(array).tobytes()] if array is not None else [])
        self.sock.send_multipart(parts)

    def end(self) -> None:
        self.sock.send_multipart([json.dumps({"v": 1, "stream": self.stream, "seq": self.seq, "kind": "end"}).encode()])

    def close(self) -> None:
        self.sock.close(linger=5000)
