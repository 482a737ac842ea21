"""ZeroMQ sockets for frames: a lossless PUSH/PULL data path and a lossy PUB/SUB preview path.

Data frames travel PUSH -> PULL with a bounded high-water mark: when the daemon is slow, or not
there at all, the sender sees it (a non-blocking send fails) and counts the frame it could not
hand over. PUB/SUB silently drops frames for slow subscribers, so it is used only for previews.

Every class takes ``curve=``: a :class:`~livescope.bridges.auth.CurveServer` for the sockets that
bind (the daemon's), a :class:`~livescope.bridges.auth.CurveClient` for those that connect. With
it, the socket speaks ZeroMQ CURVE (encrypted, and only allowed client keys get in).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import zmq

from .protocol import (
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    Frame,
    ProtocolError,
    decode,
    encode,
    make_header,
)
from .shm_ring import ShmReader

if TYPE_CHECKING:
    from .auth import CurveClient, CurveServer

__all__ = [
    "DEFAULT_CONTROL",
    "DEFAULT_INGEST",
    "DEFAULT_PUBLISH",
    "MAX_SEQ_GAP",
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

# a seq jump larger than this is a publisher that restarted with another count (or a corrupt
# header), not frames lost: about 70 min of a 250 fps camera
MAX_SEQ_GAP = 2**20
MAX_TRACKED_PUBLISHERS = 4096  # (stream, source) pairs followed at once; the least recent is forgotten
# libzmq's ZMQ_MAXMSGSIZE applies to each part of a message: the header, then the pixel buffer
MAX_MESSAGE_PART_BYTES = max(MAX_HEADER_BYTES, MAX_FRAME_BYTES)


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

    ``send`` never blocks by default: if no daemon is connected, or its queue and the high-water
    mark are full, it returns False and counts the frame in ``dropped``. Frames are queued only to
    a daemon whose connection is up (``ZMQ_IMMEDIATE``), so a frame sent while nobody listens (a
    daemon not started yet, a wrong port) is counted, never reported sent and then lost. Only in
    the first ``connect_timeout_ms`` after construction does a send wait for the connection to
    come up (a daemon that is there answers at once).

    ``send`` copies the frame, so a camera loop may refill its buffer as soon as ``send``
    returned: ZeroMQ transmits later, from its own thread. Pass ``copy=False`` (to ``send``, or
    here for every frame) only when you hand the array over for good, a fresh array per frame
    that you never write again. Measured (the copy, the connection): docs/protocol.md, section
    "Publishing from your code".

    Every header carries ``source``, 8 hex characters drawn per publisher, so that the daemon
    keeps one ``seq`` count per publisher even when several share a stream name.
    """

    def __init__(
        self,
        address: str,
        stream: str = "camera",
        *,
        hwm: int = 64,
        block: bool = False,
        send_timeout_ms: int = -1,
        connect_timeout_ms: int = 1000,
        copy: bool = True,
        context: zmq.Context | None = None,
        curve: CurveClient | None = None,
        **defaults: Any,
    ) -> None:
        self.stream = stream
        self.block = block
        self.copy = copy
        # this publisher's id in every header: the daemon counts seq per (stream, source)
        self.source = str(defaults.pop("source", None) or secrets.token_hex(4))
        self.defaults = {"source": self.source, **defaults}
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
        # queue only to completed connections: with no daemon a send fails (and is counted)
        # instead of waiting in a pipe for a peer that may never come
        self._sock.setsockopt(zmq.IMMEDIATE, 1)
        if curve is not None:
            curve.secure(self._sock)
        self._sock.connect(address)
        self._t0 = time.time()
        self._connect_deadline = time.monotonic() + connect_timeout_ms / 1000
        self._handed_over = False  # once one frame went through, sends never wait for a connection

    def send(self, array: np.ndarray, *, copy: bool | None = None, seq: int | None = None, **fields: Any) -> bool:
        """Send one frame; False if it could not be handed over (counted in ``dropped``).

        ``copy`` defaults to the publisher's (True): the caller may reuse ``array`` at once.
        ``seq`` defaults to the publisher's own counter; a caller that drops frames before
        ``send`` passes its own, so the gap reaches the receiver as lost frames.
        """
        if self._sock is None:
            raise RuntimeError("FramePublisher is closed; create a new one")
        merged = {**self.defaults, **fields}
        merged.setdefault("time", time.time() - self._t0)
        if seq is not None:
            self.seq = int(seq)
        header = make_header(array, stream=self.stream, seq=self.seq, **merged)
        self.seq += 1  # a frame we fail to send is a gap in seq: the receiver counts it as lost
        if self._hand_over(encode(header, array), copy=self.copy if copy is None else copy):
            self.sent += 1
            return True
        self.dropped += 1
        return False

    def _hand_over(self, parts: list[Any], *, copy: bool) -> bool:
        """Queue one message to the connected daemon; False if none is connected or it is full.

        ``copy=True`` copies the parts into ZeroMQ messages now; ``copy=False`` lends ZeroMQ the
        buffers until its I/O thread has written them.
        """
        assert self._sock is not None
        try:
            self._sock.send_multipart(parts, copy=copy, flags=0 if self.block else zmq.NOBLOCK)
        except zmq.Again:
            if self.block or self._handed_over or not self._wait_for_connection():
                return False
            try:
                self._sock.send_multipart(parts, copy=copy, flags=zmq.NOBLOCK)
            except zmq.Again:
                return False
        self._handed_over = True
        return True

    def _wait_for_connection(self) -> bool:
        """Right after construction the connection may still be coming up: wait for it, at most
        until ``connect_timeout_ms`` after construction (never later in the publisher's life)."""
        assert self._sock is not None
        left_ms = int((self._connect_deadline - time.monotonic()) * 1000)
        return left_ms > 0 and bool(self._sock.poll(left_ms, zmq.POLLOUT))

    def end(self, timeout_s: float = 5.0) -> bool:
        """Tell the receiver the stream ended (it flushes and, for `--frames`-less runs, stops).

        Waits at most ``timeout_s`` for room (or a daemon); False if the marker was not handed over.
        """
        if self._sock is None:
            return False
        header = make_header(None, stream=self.stream, seq=self.seq, kind="end", source=self.source)
        self.seq += 1  # frames sent after an end marker continue the count, not restart it
        try:
            if self._sock.poll(int(timeout_s * 1000), zmq.POLLOUT):
                self._sock.send_multipart(encode(header, None), flags=zmq.NOBLOCK)
                return True
        except zmq.Again:
            pass
        log.warning(
            "stream %r: the end marker could not be handed over within %.1f s (no daemon?)", self.stream, timeout_s
        )
        return False

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

    ``seq`` is followed per publisher: per (``stream``, ``source``) when the header names its
    ``source`` (every :class:`FramePublisher` does), per ``stream`` otherwise. A gap is counted in
    ``lost``; a ``seq`` that goes backwards, or jumps ahead by more than :data:`MAX_SEQ_GAP`
    frames, is a publisher that restarted (``restarts``), never billions of lost frames.

    ``max_message_bytes``: ZeroMQ drops (and disconnects) a peer whose message part is larger,
    before allocating it; the default is the largest part the protocol allows.

    On stop, :meth:`drain` takes the frames already queued; :meth:`close` counts what is left
    in ``dropped_at_close``.

    ``private`` (with ``bind``): an extra endpoint bound *before* CURVE is applied, for frame
    sources inside the daemon's own process; it must be an owner-only ipc address
    (:func:`~livescope.bridges.auth.private_ipc_address`), since it takes frames without keys.
    """

    def __init__(
        self,
        address: str,
        *,
        bind: bool = True,
        hwm: int = 64,
        context: zmq.Context | None = None,
        curve: CurveServer | CurveClient | None = None,
        private: str | None = None,
        max_message_bytes: int = MAX_MESSAGE_PART_BYTES,
    ):
        self.address = address
        self._private = private if bind else None
        # a socket that binds takes the server's keys (module doc); a connecting one only secures itself
        self._curve = cast("CurveServer | None", curve) if bind else None
        self._ctx = self._curve.acquire() if self._curve is not None else context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, hwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # libzmq checks every part against this as its size arrives: an absurd message costs a
        # disconnect (the publisher reconnects), not a multi-GB allocation
        self.max_message_bytes = int(max_message_bytes)
        self._sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
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
        self.received = 0
        self.rejected: Counter[str] = Counter()
        self.lost = 0
        self.restarts = 0
        self.dropped_at_close = 0
        # next expected seq per (stream, source), least recently seen first; bounded, since every
        # publisher restart brings a new source
        self._next_seq: OrderedDict[tuple[str, str | None], int] = OrderedDict()
        self._restarted: set[tuple[str, str | None]] = set()  # restarts seen on refused messages
        self._lock = threading.Lock()  # counters: read by stats() from other threads
        self._io_lock = threading.Lock()  # the socket: recv/drain in the ingest thread, close in another
        self._shm: Any = None

    def recv(self, timeout_ms: int = 100) -> Frame | None:
        """The next valid frame, or None on timeout. Malformed messages are counted and skipped."""
        with self._io_lock:
            return self._recv(timeout_ms)

    def _recv(self, timeout_ms: int) -> Frame | None:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:  # a queued message needs no poll: at high frame rates the queue is rarely empty
                parts = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                remaining = int((deadline - time.monotonic()) * 1000)
                if remaining <= 0 or not self._sock.poll(remaining, zmq.POLLIN):
                    return None
                continue
            frame = self._decode(parts)
            if frame is not None:
                return frame

    def _decode(self, parts: list[Any], leftover: bool = False) -> Frame | None:
        try:
            frame = decode(parts)
            if frame.array is None and "shm" in frame.header and not frame.is_end:
                frame = self._from_shm(frame)
        except ProtocolError as exc:
            with self._lock:
                self.rejected[exc.reason] += 1
            log.warning("rejected a message: %s", exc)
            self._track_rejected(parts)
            return None
        if self._track_seq(frame, leftover):
            frame = dataclasses.replace(frame, restarted=True)
        return frame

    def _track_rejected(self, parts: list[Any]) -> None:
        """A refused message whose header still names its stream and seq takes its place in the
        sequence: it is counted as rejected, not again as a lost frame when the next one comes."""
        try:
            head = parts[0].buffer if hasattr(parts[0], "buffer") else parts[0]
            header = json.loads(bytes(head)) if len(head) <= MAX_HEADER_BYTES else None
        except (ValueError, UnicodeDecodeError, RecursionError, IndexError, TypeError):
            return
        if not isinstance(header, dict):
            return
        stream, seq, source = header.get("stream"), header.get("seq"), header.get("source")
        if not isinstance(stream, str) or not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            return
        key = (stream, source if isinstance(source, str) else None)
        with self._lock:
            expected = self._next_seq.get(key)
            if expected is not None and expected < seq <= expected + MAX_SEQ_GAP:
                self.lost += seq - expected
            elif expected is not None and seq != expected:  # the publisher restarted: say so with its next frame
                self.restarts += 1
                self._restarted.add(key)
            self._next_seq[key] = seq + 1
            self._next_seq.move_to_end(key)
            if len(self._next_seq) > MAX_TRACKED_PUBLISHERS:
                self._next_seq.popitem(last=False)

    def drain(self, timeout_s: float = 2.0, idle_s: float = 0.05) -> Iterator[Frame]:
        """The frames already on their way, for a daemon that stops: yields until nothing arrived
        for ``idle_s``, or ``timeout_s`` passed (a publisher that keeps sending does not hold the
        stop up). Whatever is still queued then is counted by :meth:`close`."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            frame = self.recv(timeout_ms=max(1, int(1000 * min(idle_s, left))))
            if frame is None:
                return
            yield frame

    def _from_shm(self, frame: Frame) -> Frame:
        if self._shm is None:
            self._shm = ShmReader()
        array = self._shm.read(frame.header)  # a copy: the slot is released at once
        shape, dtype = frame.header["shape"], np.dtype(frame.header["dtype"])
        if array.dtype != dtype or list(array.shape) != list(shape):
            raise ProtocolError(
                "size_mismatch", f"shm slot holds {array.shape} {array.dtype}, header says {shape} {dtype}"
            )
        return dataclasses.replace(frame, array=array)  # keeps when it arrived and what its header cost

    def _track_seq(self, frame: Frame, leftover: bool = False) -> bool:
        """Count gaps and restarts of this frame's publisher; True when it restarted since the last
        frame delivered (seen on this frame, or on a refused message before it)."""
        source = frame.header.get("source")
        key = (frame.stream, source if isinstance(source, str) else None)
        seq = frame.seq
        with self._lock:
            expected = self._next_seq.pop(key, None)
            restarted = key in self._restarted
            self._restarted.discard(key)
            if expected is not None and expected < seq <= expected + MAX_SEQ_GAP:
                self.lost += seq - expected
                log.warning("stream %r: %d frame(s) lost before seq %d", frame.stream, seq - expected, seq)
            elif expected is not None and seq != expected:
                self.restarts += 1
                restarted = True
                log.warning("stream %r restarted (seq %d after %d)", frame.stream, seq, expected - 1)
            # an end marker carries the next seq (a gap before it was counted above) and ends the count
            if not frame.is_end:
                if leftover:
                    self.dropped_at_close += 1
                else:
                    self.received += 1
                self._next_seq[key] = seq + 1
                if len(self._next_seq) > MAX_TRACKED_PUBLISHERS:
                    self._next_seq.popitem(last=False)
        return restarted and not frame.is_end

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": self.received,
                "rejected": sum(self.rejected.values()),
                "rejected_by_reason": dict(self.rejected),
                "lost": self.lost,
                "restarts": self.restarts,
                "dropped_at_close": self.dropped_at_close,
            }

    def close(self, count_s: float = 0.5) -> None:
        """Close the socket. Frames still queued are taken (at most ``count_s`` seconds) only to be
        counted in ``dropped_at_close``: call :meth:`drain` first to keep them."""
        if self._sock.closed:
            return
        if self._io_lock.acquire(timeout=1.0):  # else a recv is stuck in another thread: just close
            try:
                self._count_leftovers(count_s)
            finally:
                self._io_lock.release()
        self._sock.close(linger=0)
        if self._private and self._private.startswith("ipc://"):
            try:  # libzmq leaves the socket file behind
                os.unlink(self._private[len("ipc://") :])
            except OSError:
                pass
        if self._shm is not None:
            self._shm.close()
        if self._curve is not None:
            self._curve.release()

    def _count_leftovers(self, count_s: float, idle_ms: int = 20) -> None:
        deadline = time.monotonic() + count_s
        before = self.dropped_at_close
        # what is queued, and what is still arriving (a frame the I/O thread is reading now)
        while time.monotonic() < deadline and self._sock.poll(idle_ms, zmq.POLLIN):
            parts = self._sock.recv_multipart(copy=False)
            self._decode(parts, leftover=True)  # validated, and an shm slot is released
        if self.dropped_at_close > before:
            log.warning(
                "%d frame(s) still queued at close were dropped (call drain() before close)",
                self.dropped_at_close - before,
            )


class PreviewPublisher:
    """PUB side of previews. The high-water mark counts messages, one per (product, plane): it
    holds about two display ticks' worth (``hwm``, default 32 messages of at most
    ``preview_size``^2 pixels each), so a slow viewer costs at most a few tens of MB and never
    slows the daemon; a smaller mark would drop the later products of every burst."""

    def __init__(
        self, address: str, *, hwm: int = 32, context: zmq.Context | None = None, curve: CurveServer | None = None
    ) -> None:
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
        """Queue one preview, a copy (small: at most ``preview_size``^2 pixels), so the caller's
        array may change while the message waits for a slow viewer."""
        try:
            self._sock.send_multipart(encode(header, array), copy=True, flags=zmq.NOBLOCK)
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
    (stream, product, position, channel, z).

    The stream is part of the key: one daemon previews every stream it ingests (two cameras,
    a Multi Camera's ``mmcore/Camera-1``, Micro-Manager's ``mmcore-live``), and their planes
    share product names and indices."""

    def __init__(self, address: str, *, context: zmq.Context | None = None, curve: CurveClient | None = None) -> None:
        self.address = address
        self._curve = curve
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self.rejected = 0
        self.received = 0
        self.repeats = 0  # the daemon's re-sends of a frame this subscriber already has: dropped
        self._seen: dict[tuple[str, str, int, int, int], Any] = {}
        self._connect()

    def _connect(self) -> None:
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, 4)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self._curve is not None:
            self._curve.secure(self._sock)
        self._sock.connect(self.address)

    def latest(self, max_messages: int = 256) -> dict[tuple[str, str, int, int, int], Frame]:
        """The newest preview per (stream, product, p, c, z) among the messages waiting (at most
        ``max_messages``); empty when none came. Malformed messages are counted in ``rejected``."""
        out: dict[tuple[str, str, int, int, int], Frame] = {}
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
            key = (frame.stream, h.get("product", "raw"), idx.get("p", 0), idx.get("c", 0), idx.get("z", 0))
            if h.get("repeat") and self._seen.get(key) == h.get("seq"):
                self.repeats += 1  # sent again for late joiners; this one has it
                continue
            self._seen[key] = h.get("seq")
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

    def __init__(
        self,
        address: str,
        stream: str = "restore",
        *,
        timeout_s: float = 1.0,
        context: zmq.Context | None = None,
        curve: CurveClient | None = None,
        **defaults: Any,
    ) -> None:
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

    def restore(
        self, array: np.ndarray, *, want: str | None = None, timeout_s: float | None = None, **fields: Any
    ) -> tuple[np.ndarray | None, Any]:
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
