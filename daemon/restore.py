"""Restore at capture time: a ROUTER socket for hooks that must hand the restored frame back to
the acquisition (Pycro-Manager's ``restore``). Each frame is saved as raw like any other, run
through the chain at once (never skipped), and the requested product (``want``, default the
chain's last image) is sent back; a frame that cannot be restored gets an error reply, counted,
and the server goes on with the next."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from ..bridges.protocol import Frame

__all__ = ["RestoreServer"]

log = logging.getLogger(__name__)


class RestoreServer:
    """``restore_one(frame)`` routes, saves and processes one frame and returns its images."""

    def __init__(
        self, address: str, restore_one: Callable[[Frame], dict[str, np.ndarray]], *, curve: Any, stop: threading.Event
    ) -> None:
        self.address = address
        self.restore_one = restore_one
        self.curve = curve
        self.stop = stop
        self.served = 0
        self.errors = 0

    def run(self) -> None:
        import zmq

        from ..bridges.protocol import MAX_FRAME_BYTES, ProtocolError, decode, encode

        curve = self.curve
        sock = (curve.acquire() if curve is not None else zmq.Context.instance()).socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # a message part larger than a frame can be (the protocol's limit) is dropped by libzmq, its
        # sender disconnected, before any memory is taken for it
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        if curve is not None:
            curve.secure(sock)
        try:
            sock.bind(self.address)
            from ..bridges.auth import restrict_ipc

            restrict_ipc(self.address)
        except zmq.ZMQError as exc:
            log.error("cannot bind the restore socket to %s: %s", self.address, exc)
            sock.close()
            if curve is not None:
                curve.release()
            return
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                if not poller.poll(50):
                    continue
                parts = sock.recv_multipart(copy=False)
                ident, body = parts[0], parts[2:] if len(parts) > 2 and len(parts[1].bytes) == 0 else parts[1:]
                envelope = [ident.bytes, b""]
                try:
                    frame = decode(body)
                    images = self.restore_one(frame)
                    want = frame.header.get("want")
                    if want is None and images:
                        want = list(images)[-1]
                    if want not in images:
                        raise KeyError(f"no product {want!r}; the chain made {sorted(images)}")
                    out = np.ascontiguousarray(images[want], dtype=np.float32)
                    header = {
                        "v": 1,
                        "stream": frame.stream,
                        "seq": frame.seq,
                        "kind": "frame",
                        "product": want,
                        "shape": list(out.shape),
                        "dtype": "float32",
                    }
                    sock.send_multipart(envelope + encode(header, out), copy=False)
                    self.served += 1
                except Exception as exc:  # answered, counted; the loop serves the next frame
                    self.errors += 1
                    if not isinstance(exc, (ProtocolError, ValueError, KeyError, RuntimeError)):
                        log.exception("restore failed on a frame")
                    err = {"v": 1, "stream": "error", "seq": 0, "kind": "end", "error": str(exc)[:1000]}
                    sock.send_multipart(envelope + encode(err, None))
        finally:
            sock.close(linger=0)
            if curve is not None:
                curve.release()
