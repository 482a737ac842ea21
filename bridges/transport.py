"""ZeroMQ sockets for frames: a lossless PUSH/PULL data path and a lossy PUB/SUB preview path.

Data frames travel PUSH -> PULL with a bounded high-water mark: when the daemon is slow the
sender sees it (a non-blocking send fails) and counts the frame it could not hand over. PUB/SUB
silently drops frames for slow subscribers, so it is used only for previews.

Every class takes ``curve=``: a :class:`~livescope.bridges.auth.CurveServer` for the sockets that
bind (the daemon's), a :class:`~livescope.bridges.auth.CurveClient` for those that connect. With
it, the socket speaks ZeroMQ CURVE (encrypted, and only allowed client keys get in).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from .protocol import Frame, ProtocolError, decode, encode, make_header

if TYPE_CHECKING:
    from .auth import CurveClient, CurveServer

__all__ = [
    "DEFAULT_CONTROL",
    "DEFAULT_INGEST",
    "DEFAULT_PUBLISH",
    "FramePublisher",
    "FrameReceiver",
    "PreviewPublisher",
    "PreviewSubscriber",
    "RestoreClient",
    "free_tcp_address",
    "ipc_available",
]

log = logging.getLogger(__name__)

DEFAULT_INGEST = "tcp://127.0.0.1:5570"
DEFAULT_PUBLISH = "tcp://127.0.0.1:5571"
DEFAULT_CONTROL = "tcp://127.0.0.1:5572"


def ipc_available() -> bool:
    """ipc:// exists on POSIX libzmq builds; Windows needs tcp (or a recent libzmq with AF_UNIX)."""
    return sys.platform != "win32" and zmq.has("ipc")


def _owner_only(address: str) -> None:
    """ipc sockets the daemon binds: only its user may connect (the socket file gets 0600)."""
    if address.startswith("ipc://"):
        from .auth import restrict_ipc

        restrict_ipc(address)


def free_tcp_address(host: str = "127.0.0.1") -> str:
    """A tcp address on a port that is free right now (tests, ad-hoc daemons)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


class FramePublisher:
    """Stream frames into livescope from any camera code, in three lines::

        pub = FramePublisher("tcp://127.0.0.1:5570", stream="mycam")
        pub.send(frame, index={"t": t}, pixel_size_um=0.1)
        pub.close()

    ``send`` never blocks by default: if the daemon's queue and the high-water mark are full it
    returns False and counts the frame in ``dropped``. The array is sent without a copy: do not
    modify it until ``send`` returned (pass ``copy=True`` to send a private copy).
    """

    def __init__(
        self,
        address: str,
        stream: str = "camera",
        *,
        hwm: int = 64,
        block: bool = False,
        send_timeout_ms: int = -1,
        context: zmq.Context | None = None,
        curve: CurveClient | None = None,
        **defaults: Any,
    ) -> None:
        self.stream = stream
        self.block = block
        self.defaults = defaults
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        # an own context, terminated on close: close() then returns only when the queued frames
        # (and the end marker) were handed to the daemon or linger ran out; a process that exits
        # right after close() loses nothing
        self._own_ctx = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 5000)
        self._sock.setsockopt(zmq.SNDTIMEO, send_timeout_ms)  # with block=True: give up after this
        if curve is not None:
            curve.secure(self._sock)
        self._sock.connect(address)
        self._t0 = time.time()

    def send(self, array: np.ndarray, *, copy: bool = False, seq: int | None = None, **fields: Any) -> bool:
        """Send one frame; False if it could not be handed over (counted in ``dropped``).

        ``seq`` defaults to the publisher's own counter; a caller that drops frames before
        ``send`` passes its own, so the gap reaches the receiver as lost frames.
        """
        if self._sock is None:
            raise RuntimeError("FramePublisher is closed; create a new one")
        merged = {**self.defaults, **fields}
        merged.setdefault("time", time.time() - self._t0)
        if copy:
            array = np.array(array, copy=True)
        if seq is not None:
            self.seq = int(seq)
        header = make_header(array, stream=self.stream, seq=self.seq, **merged)
        self.seq += 1  # a frame we fail to send is a gap in seq: the receiver counts it as lost
        try:
            self._sock.send_multipart(encode(header, array), copy=False, flags=0 if self.block else zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
            return False
        self.sent += 1
        return True

    def end(self) -> None:
        """Tell the receiver the stream ended (it flushes and, for `--frames`-less runs, stops)."""
        if self._sock is not None:
            header = make_header(None, stream=self.stream, seq=self.seq, kind="end")
            self._sock.send_multipart(encode(header, None))

    def close(self, linger_s: float = 5.0) -> None:
        if self._sock is not None:
            self._sock.close(linger=int(linger_s * 1000))
            self._sock = None
            if self._own_ctx:
                self._ctx.term()

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()
        self.close()


class FrameReceiver:
    """PULL side of the data path: validates every message, counts rejects and lost frames.

    ``private`` (with ``bind``): an extra endpoint bound *before* CURVE is applied, for frame
    sources inside the daemon's own process; it must be an owner-only ipc address
    (:func:`~livescope.bridges.auth.private_ipc_address`), since it takes frames without keys.
    """

    def __init__(self, address: str, *, bind: bool = True, hwm: int = 64, context: zmq.Context | None = None,
                 curve: CurveServer | CurveClient | None = None, private: str | None = None):
        self.address = address
        self._private = private if bind else None
        self._curve = curve if bind else None
        self._ctx = self._curve.acquire() if self._curve is not None else context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            if bind and private:
                if not private.startswith("ipc://"):
                    raise ValueError(f"a private ingest endpoint must be ipc:// (owner-only), not {private}")
                self._sock.bind(private)  # CURVE options apply only to the binds that follow them
                _owner_only(private)
            if curve is not None:
                curve.secure(self._sock)
            if bind:
                self._sock.bind(address)
                _owner_only(address)
            else:
                self._sock.connect(address)
        except zmq.ZMQError as exc:
            self._sock.close()
            if self._curve is not None:
                self._curve.release()
            raise OSError(
                f"cannot bind the ingest socket to {address}: {exc}. Another livescope daemon may be "
                "running; stop it or pass another address with --ingest"
            ) from exc
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self.received = 0
        self.rejected: Counter[str] = Counter()
        self.lost = 0
        self.restarts = 0
        self._next_seq: dict[str, int] = {}
        self._lock = threading.Lock()
        self._shm: Any = None

    def recv(self, timeout_ms: int = 100) -> Frame | None:
        """The next valid frame, or None on timeout. Malformed messages are counted and skipped."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._poller.poll(remaining):
                return None
            parts = self._sock.recv_multipart(copy=False)
            try:
                frame = decode(parts)
                if frame.array is None and "shm" in frame.header and not frame.is_end:
                    frame = self._from_shm(frame)
            except ProtocolError as exc:
                with self._lock:
                    self.rejected[exc.reason] += 1
                log.warning("rejected a message: %s", exc)
                continue
            self._track_seq(frame)
            return frame

    def _from_shm(self, frame: Frame) -> Frame:
        if self._shm is None:
            from .shm import ShmReader

            self._shm = ShmReader()
        array = self._shm.read(frame.header)  # a copy: the slot is released at once
        shape, dtype = frame.header["shape"], np.dtype(frame.header["dtype"])
        if array.dtype != dtype or list(array.shape) != list(shape):
            raise ProtocolError("size_mismatch", f"shm slot holds {array.shape} {array.dtype}, header says {shape} {dtype}")
        return Frame(frame.header, array)

    def _track_seq(self, frame: Frame) -> None:
        stream, seq = frame.stream, frame.seq
        with self._lock:
            expected = self._next_seq.get(stream)
            if expected is not None and seq > expected:
                self.lost += seq - expected
                log.warning("stream %r: %d frame(s) lost before seq %d", stream, seq - expected, seq)
            elif expected is not None and seq < expected:
                self.restarts += 1
                log.warning("stream %r restarted (seq %d after %d)", stream, seq, expected - 1)
            self._next_seq[stream] = seq + 1
            if not frame.is_end:
                self.received += 1

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": self.received,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected),
                "lost": self.lost,
                "restarts": self.restarts,
            }

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(linger=0)
        if self._private and self._private.startswith("ipc://"):
            try:  # libzmq leaves the socket file behind
                os.unlink(self._private[len("ipc://"):])
            except OSError:
                pass
        if self._shm is not None:
            self._shm.close()
        if self._curve is not None:
            self._curve.release()


class PreviewPublisher:
    """PUB side of previews. The high-water mark counts messages, one per (product, plane): it
    holds about two display ticks' worth (``hwm``, default 32 messages of at most
    ``preview_size``^2 pixels each), so a slow viewer costs at most a few tens of MB and never
    slows the daemon; a smaller mark would drop the later products of every burst."""

    def __init__(self, address: str, *, hwm: int = 32, context: zmq.Context | None = None,
                 curve: CurveServer | None = None) -> None:
        self._curve = curve
        self._ctx = curve.acquire() if curve is not None else context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.SNDHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            curve.secure(self._sock)
        try:
            self._sock.bind(address)
            _owner_only(address)
        except zmq.ZMQError as exc:
            self._sock.close()
            if curve is not None:
                curve.release()
            raise OSError(f"cannot bind the preview socket to {address}: {exc}; pass another --publish") from exc
        self.sent = 0

    def send(self, header: dict[str, Any], array: np.ndarray) -> None:
        try:
            self._sock.send_multipart(encode(header, array), copy=False, flags=zmq.NOBLOCK)
            self.sent += 1
        except zmq.Again:
            pass  # a preview nobody can take right now is simply not shown

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(linger=0)
        if self._curve is not None:
            self._curve.release()


class PreviewSubscriber:
    """SUB side for viewers: ``latest()`` drains the socket and keeps only the newest frame per
    (product, position, channel, z)."""

    def __init__(self, address: str, *, context: zmq.Context | None = None, curve: CurveClient | None = None) -> None:
        self.address = address
        self._curve = curve
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self.rejected = 0
        self.received = 0
        self._connect()

    def _connect(self) -> None:
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self._curve is not None:
            self._curve.secure(self._sock)
        self._sock.connect(self.address)

    def latest(self, max_messages: int = 256) -> dict[tuple, Frame]:
        out: dict[tuple, Frame] = {}
        assert self._sock is not None
        for _ in range(max_messages):
            try:
                parts = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                frame = decode(parts)
            except ProtocolError:
                self.rejected += 1
                continue
            self.received += 1
            h = frame.header
            idx = h.get("index") or {}
            key = (h.get("product", "raw"), idx.get("p", 0), idx.get("c", 0), idx.get("z", 0))
            out[key] = frame
        return out

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None


class RestoreClient:
    """Client of the daemon's synchronous restore socket (``livescope daemon --restore ADDR``).

    ``restore(frame)`` sends one frame and waits at most ``timeout_s`` for the restored product
    (float32). It returns ``(array, header)``, or ``(None, reason)`` on timeout or error: the
    caller (an acquisition hook) then goes on with the raw frame. A timed-out REQ socket is
    unusable, so it is recreated.
    """

    def __init__(self, address: str, stream: str = "restore", *, timeout_s: float = 1.0,
                 context: zmq.Context | None = None, curve: CurveClient | None = None, **defaults: Any) -> None:
        self.address = address
        self._curve = curve
        self.stream = stream
        self.timeout_s = timeout_s
        self.defaults = defaults
        self.seq = 0
        self.served = 0
        self.missed = 0
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._t0 = time.time()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            if self._curve is not None:
                self._curve.secure(self._sock)
            self._sock.connect(self.address)
        return self._sock

    def restore(self, array: np.ndarray, *, want: str | None = None, timeout_s: float | None = None,
                **fields: Any) -> tuple[np.ndarray | None, Any]:
        merged = {**self.defaults, **fields}
        merged.setdefault("time", time.time() - self._t0)
        if want:
            merged["want"] = want
        header = make_header(np.ascontiguousarray(array), stream=self.stream, seq=self.seq, **merged)
        self.seq += 1
        sock = self._socket()
        timeout_ms = int(1000 * (self.timeout_s if timeout_s is None else timeout_s))
        try:
            sock.send_multipart(encode(header, np.ascontiguousarray(array)), copy=False)
            if not sock.poll(timeout_ms):
                raise TimeoutError(f"no restored frame within {timeout_ms} ms")
            reply = decode(sock.recv_multipart(copy=False))
        except (TimeoutError, zmq.ZMQError, ProtocolError) as exc:
            self._drop_socket()
            self.missed += 1
            return None, str(exc)
        if reply.array is None:
            self.missed += 1
            return None, reply.header.get("error", "no image in the reply")
        self.served += 1
        return np.array(reply.array), reply.header

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def close(self) -> None:
        self._drop_socket()
