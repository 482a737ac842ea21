"""Same-host fast path: pixels through a shared-memory ring, only the JSON header over ZeroMQ.

When camera code and the daemon run on one machine, copying a frame into shared memory and
letting the daemon copy it out costs two memcpys, where a ZeroMQ socket also pushes every byte
through the kernel. :class:`ShmFramePublisher` keeps ``FramePublisher``'s API::

    pub = make_publisher("tcp://127.0.0.1:5570", stream="mycam")   # shm here, plain ZeroMQ across hosts
    pub.send(frame, index={"t": t})
    pub.close()

The receiver side needs nothing: ``FrameReceiver`` resolves a header with an ``shm`` field through
:class:`ShmReader`.

Ring layout (one ``multiprocessing.shared_memory`` segment per ring, created by the publisher):
a 64-byte block (magic, version, slot count, slot size, data offset, creator pid, retired flag),
then one 64-byte record per slot (state, generation, nbytes; a cache line each so that the two
processes do not fight over one line), then the page-aligned slots. A slot is FULL from the moment
the publisher filled it until the reader copied it out; only then does the publisher reuse it. The
generation, bumped on every fill, lets the reader reject a header whose slot has since been
reused (``shm_stale``) instead of returning someone else's pixels.

Every state word is an aligned 8-byte store, atomic on x86-64 and arm64. The publisher writes
pixels before it marks a slot FULL and sends the header (the socket send orders them); the reader
checks the generation before and after its copy, so a slot reclaimed under it is detected.

Segment names are ``livescope_<pid>_<token>`` so that :func:`cleanup_stale` can remove the
segments of a publisher killed with SIGKILL (POSIX keeps them in /dev/shm until unlinked).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import socket
import sys
import time
import weakref
from multiprocessing import shared_memory
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq

from .protocol import DTYPES, encode, make_header
from .shm_ring import (  # the ring's layout and its reader (the receiver's side) live below both
    CONTROL_BYTES,
    DATA_OFFSET,
    DEFAULT_PREFIX,
    FREE,
    FULL,
    GEN,
    LAYOUT_VERSION,
    MAGIC,
    MAX_PAUSE_S,
    MIN_SLOTS,
    NBYTES,
    NSLOTS,
    PID,
    RETIRED,
    SLOT_NBYTES,
    STATE,
    VERSION,
    ShmReader,
    cleanup_stale,
    ring_layout,
    ring_views,
)
from .transport import FramePublisher

__all__ = [
    "DEFAULT_PREFIX",
    "ShmFramePublisher",
    "ShmReader",
    "cleanup_stale",
    "make_publisher",
    "same_host",
]

log = logging.getLogger(__name__)


def _is_local_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    # an address this machine can bind to is one of its own interfaces
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def same_host(address: str) -> bool:
    """True when a ZeroMQ ``address`` reaches a process on this machine (ipc://, inproc://, tcp to
    a loopback address, ``localhost``, this host's name or one of its interface addresses).

    Only addresses that cannot be told apart without DNS are resolved; a name that does not
    resolve counts as remote (plain ZeroMQ is always correct, shared memory only faster).
    """
    scheme, _, rest = address.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp" or not rest:
        return False
    host = urlsplit(f"//{rest}").hostname or ""
    if ";" in rest:  # tcp://source;dest: the destination is what counts
        host = urlsplit("//" + rest.split(";", 1)[1]).hostname or ""
    if not host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return _is_local_ip(host)  # an address literal: no DNS needed
    if host.lower() in ("localhost", "localhost.localdomain", socket.gethostname().lower()):
        return True
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return any(_is_local_ip(str(info[4][0])) for info in infos)  # TCP: (host, port, ...) addresses


def make_publisher(address: str, stream: str = "camera", *, shm: bool | None = None, **kw: Any) -> FramePublisher:
    """A :class:`ShmFramePublisher` when ``address`` is on this host (or ``shm=True``), else a plain
    ``FramePublisher``; ``shm=False`` forces plain ZeroMQ (e.g. a daemon in a container that does
    not share /dev/shm). Shared-memory options (``slots``, ``reclaim_s``) are ignored across hosts."""
    if shm is None:
        shm = same_host(address)
    if shm:
        return ShmFramePublisher(address, stream, **kw)
    for key in ("slots", "reclaim_s", "prefix"):
        kw.pop(key, None)
    return FramePublisher(address, stream, **kw)


# -- publisher side ---------------------------------------------------------------------------------


def _shm_free_bytes() -> int | None:
    """Free bytes where POSIX shared memory lives (Linux: /dev/shm, 64 MB in a default Docker
    container); None when unknown. Writing past it would kill the publisher with SIGBUS."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _Ring:
    """One shared-memory segment of ``slots`` slots of ``slot_nbytes`` bytes (publisher side)."""

    def __init__(self, prefix: str, slots: int, slot_nbytes: int) -> None:
        self.data_offset, self.stride, size = ring_layout(slots, slot_nbytes)
        self.slots = slots
        self.slot_nbytes = slot_nbytes
        while True:
            name = f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"
            try:
                self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
                break
            except FileExistsError:
                continue
        self.name = name
        buf = self.shm.buf
        assert buf is not None  # a segment just created (None only once closed)
        # fields first, magic last: a reader never sees a valid magic on a half-written block
        control = np.ndarray((CONTROL_BYTES // 8,), dtype=np.uint64, buffer=buf)
        control[:] = 0
        control[VERSION] = LAYOUT_VERSION
        control[NSLOTS] = slots
        control[SLOT_NBYTES] = slot_nbytes
        control[DATA_OFFSET] = self.data_offset
        control[PID] = os.getpid()
        control[MAGIC] = MAGIC
        self.control, self.records = ring_views(buf)
        self.records[:] = 0
        self.filled_at = [0.0] * slots  # monotonic time of each slot's fill
        self.announced = [False] * slots  # header sent, release not yet seen by the publisher

    def slot_array(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self.shm.buf, offset=self.data_offset + slot * self.stride)

    def busy(self) -> int:
        return int(np.count_nonzero(self.records[:, STATE] == FULL))

    def release_views(self) -> None:
        # numpy views export the mapping's buffer: drop them before closing the segment
        self.control = self.records = None  # type: ignore[assignment]


def _unlink_rings(rings: list[_Ring], owner_pid: int | None = None) -> None:
    """Unlink and unmap (the finalizer: also runs at interpreter exit). Never raises. A forked
    child that inherited the finalizer leaves its parent's segments alone."""
    if owner_pid is not None and os.getpid() != owner_pid:
        return
    while rings:
        ring = rings.pop()
        ring.release_views()
        try:
            ring.shm.unlink()  # POSIX: the name goes now; readers keep their mapping until they close
        except (FileNotFoundError, OSError):
            pass
        try:
            ring.shm.close()
        except (BufferError, OSError):
            pass  # a caller still holds a view; the mapping goes with the process


class ShmFramePublisher(FramePublisher):
    """``FramePublisher`` whose pixels travel through a shared-memory ring (same host only).

    ``send`` copies the frame into a free slot (so the caller may reuse its buffer at once;
    ``copy`` matters only for frames sent inline, as in ``FramePublisher``) and sends only the
    header. With no free slot: ``block=False`` drops the frame (counted in ``dropped``; ``seq``
    still advances, so the receiver counts it lost); ``block=True`` waits for the reader, at most
    ``send_timeout_ms`` when that is >= 0. As with ``FramePublisher``, a header is queued only
    to a connected receiver: with none, the frame is dropped and counted and its slot stays free.

    A slot the reader never releases (its header was lost when a daemon died or restarted) is
    reclaimed once it is ``reclaim_s`` seconds old *and* a receiver has been connected for
    ``reclaim_s`` seconds (``None``: never reclaim); a late header for it is then rejected as
    ``shm_stale`` by the reader, never read torn. While no receiver is connected (a daemon
    restarting) nothing is reclaimed. If a receiver has been connected
    for ``reclaim_s`` without releasing a single slot, it cannot see this host's shared memory
    (a container without the host's /dev/shm, say): the publisher logs it and sends the pixels
    inline over ZeroMQ from then on (``mode`` becomes ``"zmq"``). Addresses on another host (see
    :func:`same_host`) use inline ZeroMQ from the start; ``shm=False`` forces it.

    Segments are unlinked on ``close()`` and at interpreter exit; ``close`` first waits up to
    ``linger_s`` for the reader to take the frames still in the ring.
    """

    def __init__(
        self,
        address: str,
        stream: str = "camera",
        *,
        slots: int = 16,
        block: bool = False,
        hwm: int = 64,
        reclaim_s: float | None = 5.0,
        shm: bool | None = None,
        prefix: str = DEFAULT_PREFIX,
        send_timeout_ms: int = -1,
        connect_timeout_ms: int = 1000,
        context: zmq.Context | None = None,
        **defaults: Any,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots={slots}: a ring needs at least one slot (16 is a good default)")
        if not prefix or "_" in prefix or "/" in prefix or len(prefix) > 12:
            # the pid follows the prefix; macOS caps shared-memory names at 31 characters
            raise ValueError(f"prefix={prefix!r}: 1-12 characters, no '_' or '/'")
        super().__init__(
            address,
            stream,
            hwm=hwm,
            block=block,
            send_timeout_ms=send_timeout_ms,
            connect_timeout_ms=connect_timeout_ms,
            context=context,
            **defaults,
        )
        self.address = address
        self.slots = slots
        self.reclaim_s = reclaim_s
        self.prefix = prefix
        self.send_timeout_ms = send_timeout_ms
        self.mode = "shm" if (same_host(address) if shm is None else shm) else "zmq"
        self.reclaimed = 0
        self._ring: _Ring | None = None
        self._retiring: list[_Ring] = []
        self._gen = 0
        self._released = False  # a slot was released since the receiver (re)connected
        self._connected_at: float | None = None
        self._monitor: zmq.Socket | None = None
        self._next_look = 0.0
        if self.mode == "shm":
            self._watch_receiver(address)
        self._all_rings: list[_Ring] = []  # shared with the finalizer: it must not hold self
        self._finalizer = weakref.finalize(self, _unlink_rings, self._all_rings, os.getpid())

    @property
    def segment_names(self) -> list[str]:
        """Names of this publisher's live segments (the current ring last)."""
        return [r.name for r in self._all_rings]

    # -- is a receiver there? ---------------------------------------------------------------------

    def _watch_receiver(self, address: str) -> None:
        """Follow connects and disconnects of the receiver (ZeroMQ socket monitor), so that a daemon
        still starting up is not mistaken for one that lost its headers or cannot see the ring."""
        if address.startswith("inproc://"):
            self._connected_at = time.monotonic()  # no monitor events for inproc; bound already
            return
        assert self._sock is not None
        try:
            # a connection that came up before the monitor was there is seen in _connected_for
            # (reconnecting instead would race: with ZMQ_IMMEDIATE a frame could go down the old pipe)
            self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        except zmq.ZMQError as exc:
            log.debug("no socket monitor (%s): counting the receiver as connected from now", exc)
            self._close_monitor()
            self._connected_at = time.monotonic()

    def _connected_for(self) -> float:
        """Seconds the receiver has been connected (0 when it is not)."""
        mon = self._monitor
        now = time.monotonic()
        if mon is not None:
            from zmq.utils.monitor import recv_monitor_message

            while mon.poll(0):
                event = recv_monitor_message(mon)["event"]
                if event == zmq.EVENT_CONNECTED and self._connected_at is None:
                    self._connected_at = now
                elif event == zmq.EVENT_DISCONNECTED:
                    self._connected_at = None
                    self._released = False  # a new receiver must show it can see the ring
            if self._connected_at is None and self._sock is not None and self._sock.poll(0, zmq.POLLOUT):
                self._connected_at = now  # writable with ZMQ_IMMEDIATE: a receiver is connected
            self._next_look = now + 0.25
        return 0.0 if self._connected_at is None else now - self._connected_at

    def _close_monitor(self) -> None:
        if self._monitor is not None:
            try:
                if self._sock is not None:
                    self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
            self._monitor = None

    # -- sending -----------------------------------------------------------------------------------

    def send(self, array: np.ndarray, *, copy: bool | None = None, seq: int | None = None, **fields: Any) -> bool:
        if self._sock is None:
            raise RuntimeError("ShmFramePublisher is closed; create a new one")
        array = np.asarray(array)
        if self.mode == "zmq" or array.dtype.name not in DTYPES or array.nbytes == 0:
            # the receiver rejects such a frame with its reason; inline it so that it can
            return super().send(array, copy=copy, seq=seq, **fields)
        merged = {**self.defaults, **fields}
        merged.setdefault("time", time.time() - self._t0)
        if seq is not None:
            self.seq = int(seq)
        seq_now = self.seq
        self.seq += 1  # a frame we fail to send is a gap in seq: the receiver counts it as lost
        ring = self._ring_for(array.nbytes)
        if ring is None:  # no room in shared memory: inline from now on
            self.seq = seq_now
            return super().send(array, copy=copy, seq=seq_now, **fields)
        slot = self._acquire(ring)
        if slot is None:
            if self.mode == "zmq":  # switched while waiting: the daemon cannot see the ring
                self.seq = seq_now
                return super().send(array, copy=copy, seq=seq_now, **fields)
            self.dropped += 1
            return False
        record = ring.records[slot]
        self._gen += 1
        gen = self._gen
        # generation first: a reader still copying a reclaimed slot sees it change and rejects
        record[GEN] = gen
        # the slot holds native byte order, as the header's dtype name says (a big-endian frame is swapped)
        np.copyto(ring.slot_array(slot, array.shape, np.dtype(array.dtype.name)), array, casting="equiv")
        record[NBYTES] = array.nbytes
        record[STATE] = FULL
        now = time.monotonic()
        ring.filled_at[slot] = now
        if now >= self._next_look:
            self._connected_for()  # keep connect times current (a few microseconds, 4 times a second)
        shm = {"name": ring.name, "slot": slot, "nbytes": int(array.nbytes), "gen": gen}
        header = make_header(array, stream=self.stream, seq=seq_now, shm=shm, **merged)
        # like an inline frame: queued only to a connected receiver, else dropped and counted
        if not self._hand_over(encode(header, None), copy=True):
            record[STATE] = FREE  # never announced: the slot is ours again
            self.dropped += 1
            return False
        ring.announced[slot] = True
        self.sent += 1
        return True

    def _ring_for(self, nbytes: int) -> _Ring | None:
        ring = self._ring
        if ring is not None and nbytes <= ring.slot_nbytes:
            return ring
        slots = self.slots
        free = _shm_free_bytes()
        if free is not None:
            # leave room for other users of /dev/shm; shrink the ring rather than risk SIGBUS
            while slots > MIN_SLOTS and ring_layout(slots, nbytes)[2] > free // 2:
                slots //= 2
            if ring_layout(slots, nbytes)[2] > free // 2:
                log.warning(
                    "only %d MB free in /dev/shm, too little for a ring of %d-byte frames: sending "
                    "pixels over ZeroMQ instead (give the container more: docker run --shm-size=1g)",
                    free >> 20,
                    nbytes,
                )
                self.mode = "zmq"
                return None
            if slots < self.slots:
                log.warning("/dev/shm has %d MB free: ring of %d slots instead of %d", free >> 20, slots, self.slots)
        try:
            new = _Ring(self.prefix, slots, nbytes)
        except OSError as exc:
            log.warning("cannot create a shared-memory ring (%s): sending pixels over ZeroMQ instead", exc)
            self.mode = "zmq"
            return None
        self._all_rings.append(new)
        if ring is not None:
            # frames still in the old ring have headers in flight: unlink it once they are read
            ring.control[RETIRED] = 1
            self._retiring.append(ring)
            log.info("frame of %d bytes > slot of %d: new ring %s", nbytes, ring.slot_nbytes, new.name)
        self._ring = new
        return new

    def _acquire(self, ring: _Ring) -> int | None:
        """A free slot of ``ring``, waiting when ``block``; None when none can be had."""
        deadline = None
        if self.block and self.send_timeout_ms >= 0:
            deadline = time.monotonic() + self.send_timeout_ms / 1000
        pause = 0.0
        slot: int | None
        while True:
            states = ring.records[:, STATE]
            free = np.flatnonzero(states == FREE)
            if free.size:
                slot = int(free[0])
                if ring.announced[slot]:  # the reader took it: it sees our shared memory
                    ring.announced[slot] = False
                    self._released = True
                if self._retiring:
                    self._unlink_drained()
                return slot
            slot = self._reclaim(ring)
            if slot is not None or self.mode == "zmq":
                return slot
            if not self.block or (deadline is not None and time.monotonic() >= deadline):
                return None
            # the reader frees a slot within a frame time: yield first, then back off
            time.sleep(pause)
            pause = min(MAX_PAUSE_S, pause * 2 or 2e-5)

    def _reclaim(self, ring: _Ring) -> int | None:
        if self.reclaim_s is None:
            return None
        now = time.monotonic()
        slot = int(np.argmin(ring.filled_at))
        if now - ring.filled_at[slot] < self.reclaim_s or self._connected_for() < self.reclaim_s:
            return None  # the reader may be slow, or not connected yet: its headers are still queued
        if not self._released:
            log.warning(
                "the receiver at %s has been connected %.1f s without releasing a shared-memory "
                "slot: it cannot see this host's shared memory (a container without the host's "
                "/dev/shm?). Sending pixels over ZeroMQ from now on.",
                self.address,
                self._connected_for(),
            )
            self.mode = "zmq"
            self._close_monitor()
            return None
        self.reclaimed += 1
        log.warning(
            "reclaimed shared-memory slot %d after %.1f s unreleased (its header was lost?)",
            slot,
            now - ring.filled_at[slot],
        )
        return slot

    def _unlink_drained(self) -> None:
        for ring in list(self._retiring):
            if ring.busy() == 0:
                self._retiring.remove(ring)
                self._all_rings.remove(ring)
                _unlink_rings([ring])

    # -- closing -----------------------------------------------------------------------------------

    def close(self, linger_s: float = 5.0) -> None:
        """Close the socket, wait up to ``linger_s`` for the reader to take the frames still in the
        ring (their headers are on their way), then unlink every segment."""
        if self._sock is None:
            return
        deadline = time.monotonic() + linger_s  # one linger for both: the headers, then the pixels
        self._close_monitor()
        super().close(linger_s)  # with its own context, returns once the headers were handed over
        pause = 1e-4
        while any(r.busy() for r in self._all_rings) and time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(0.02, pause * 2)
        for ring in self._all_rings:
            ring.control[RETIRED] = 1
        self._ring = None
        self._retiring.clear()
        self._finalizer()

    def __enter__(self) -> ShmFramePublisher:
        return self


# -- reader side ------------------------------------------------------------------------------------
