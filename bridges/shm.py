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
import math
import os
import secrets
import socket
import sys
import time
import weakref
from collections import OrderedDict
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import zmq

from .protocol import DTYPES, ProtocolError, encode, make_header
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

DEFAULT_PREFIX = "livescope"
MAGIC = int.from_bytes(b"LVSCSHM1", "little")
LAYOUT_VERSION = 1
FREE, FULL = 0, 1
# control block, as uint64 words
_MAGIC, _VERSION, _NSLOTS, _SLOT_NBYTES, _DATA_OFFSET, _PID, _RETIRED = range(7)
_CONTROL_BYTES = 64
_RECORD_WORDS = 8  # 64 bytes per slot record
_STATE, _GEN, _NBYTES = range(3)
_PAGE = 4096
_MIN_SLOTS = 2
_MAX_PAUSE_S = 1e-3  # longest nap of a blocked send between looks at the ring


def _align(n: int, to: int = _PAGE) -> int:
    return (n + to - 1) // to * to


def _layout(slots: int, slot_nbytes: int) -> tuple[int, int, int]:
    """(data offset, slot stride, total size) of a ring."""
    offset = _align(_CONTROL_BYTES + slots * _RECORD_WORDS * 8)
    stride = _align(slot_nbytes)
    return offset, stride, offset + slots * stride


def _views(buf: memoryview) -> tuple[np.ndarray, np.ndarray]:
    """The control words and the (slot, field) records of a mapped ring."""
    control = np.ndarray((_CONTROL_BYTES // 8,), dtype=np.uint64, buffer=buf)
    slots = int(control[_NSLOTS])
    records = np.ndarray((slots, _RECORD_WORDS), dtype=np.uint64, buffer=buf, offset=_CONTROL_BYTES)
    return control, records


# -- where is the daemon? ---------------------------------------------------------------------------


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
    return any(_is_local_ip(info[4][0]) for info in infos)


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
        self.data_offset, self.stride, size = _layout(slots, slot_nbytes)
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
        # fields first, magic last: a reader never sees a valid magic on a half-written block
        control = np.ndarray((_CONTROL_BYTES // 8,), dtype=np.uint64, buffer=buf)
        control[:] = 0
        control[_VERSION] = LAYOUT_VERSION
        control[_NSLOTS] = slots
        control[_SLOT_NBYTES] = slot_nbytes
        control[_DATA_OFFSET] = self.data_offset
        control[_PID] = os.getpid()
        control[_MAGIC] = MAGIC
        self.control, self.records = _views(buf)
        self.records[:] = 0
        self.filled_at = [0.0] * slots  # monotonic time of each slot's fill
        self.announced = [False] * slots  # header sent, release not yet seen by the publisher

    def slot_array(self, slot: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        return np.ndarray(shape, dtype=dtype, buffer=self.shm.buf, offset=self.data_offset + slot * self.stride)

    def busy(self) -> int:
        return int(np.count_nonzero(self.records[:, _STATE] == FULL))

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
        super().__init__(address, stream, hwm=hwm, block=block, send_timeout_ms=send_timeout_ms,
                         connect_timeout_ms=connect_timeout_ms, context=context, **defaults)
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
        record[_GEN] = gen
        # the slot holds native byte order, as the header's dtype name says (a big-endian frame is swapped)
        np.copyto(ring.slot_array(slot, array.shape, np.dtype(array.dtype.name)), array, casting="equiv")
        record[_NBYTES] = array.nbytes
        record[_STATE] = FULL
        now = time.monotonic()
        ring.filled_at[slot] = now
        if now >= self._next_look:
            self._connected_for()  # keep connect times current (a few microseconds, 4 times a second)
        shm = {"name": ring.name, "slot": slot, "nbytes": int(array.nbytes), "gen": gen}
        header = make_header(array, stream=self.stream, seq=seq_now, shm=shm, **merged)
        # like an inline frame: queued only to a connected receiver, else dropped and counted
        if not self._hand_over(encode(header, None), copy=True):
            record[_STATE] = FREE  # never announced: the slot is ours again
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
            while slots > _MIN_SLOTS and _layout(slots, nbytes)[2] > free // 2:
                slots //= 2
            if _layout(slots, nbytes)[2] > free // 2:
                log.warning("only %d MB free in /dev/shm, too little for a ring of %d-byte frames: sending "
                            "pixels over ZeroMQ instead (give the container more: docker run --shm-size=1g)",
                            free >> 20, nbytes)
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
            ring.control[_RETIRED] = 1
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
        while True:
            states = ring.records[:, _STATE]
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
            pause = min(_MAX_PAUSE_S, pause * 2 or 2e-5)

    def _reclaim(self, ring: _Ring) -> int | None:
        if self.reclaim_s is None:
            return None
        now = time.monotonic()
        slot = int(np.argmin(ring.filled_at))
        if now - ring.filled_at[slot] < self.reclaim_s or self._connected_for() < self.reclaim_s:
            return None  # the reader may be slow, or not connected yet: its headers are still queued
        if not self._released:
            log.warning("the receiver at %s has been connected %.1f s without releasing a shared-memory "
                        "slot: it cannot see this host's shared memory (a container without the host's "
                        "/dev/shm?). Sending pixels over ZeroMQ from now on.", self.address, self._connected_for())
            self.mode = "zmq"
            self._close_monitor()
            return None
        self.reclaimed += 1
        log.warning("reclaimed shared-memory slot %d after %.1f s unreleased (its header was lost?)",
                    slot, now - ring.filled_at[slot])
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
            ring.control[_RETIRED] = 1
        self._ring = None
        self._retiring.clear()
        self._finalizer()

    def __enter__(self) -> ShmFramePublisher:
        return self


# -- reader side ------------------------------------------------------------------------------------


class _Attached:
    """A segment mapped by the reader. Never registered with the resource tracker: before Python
    3.13 ``SharedMemory(name)`` registers every attach, and the tracker then *unlinks* the
    publisher's segment when the reader's process exits (and warns of a leak)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._shm: shared_memory.SharedMemory | None = None
        self._mmap: Any = None
        if sys.version_info >= (3, 13):
            self._shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
            self.buf = self._shm.buf
        elif os.name == "nt":
            self._shm = shared_memory.SharedMemory(name=name)  # no resource tracker on Windows
            self.buf = self._shm.buf
        else:
            self._mmap = _posix_attach(name)
            if self._mmap is None:  # no _posixshmem: attach, then take the registration back
                from multiprocessing import resource_tracker

                self._shm = shared_memory.SharedMemory(name=name)
                resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
                self.buf = self._shm.buf
            else:
                self.buf = memoryview(self._mmap)
        if len(self.buf) < _CONTROL_BYTES:
            self.close()
            raise ProtocolError("shm_bad", f"segment {name} is {len(self.buf)} bytes, not a livescope ring")
        control = np.ndarray((_CONTROL_BYTES // 8,), dtype=np.uint64, buffer=self.buf)
        if int(control[_MAGIC]) != MAGIC or int(control[_VERSION]) != LAYOUT_VERSION:
            del control
            self.close()
            raise ProtocolError("shm_bad", f"segment {name} is not a livescope ring (v{LAYOUT_VERSION})")
        self.control = control
        self.nslots = int(control[_NSLOTS])
        self.slot_nbytes = int(control[_SLOT_NBYTES])
        self.data_offset = int(control[_DATA_OFFSET])
        _, stride, size = _layout(self.nslots, self.slot_nbytes)
        if self.data_offset != _layout(self.nslots, self.slot_nbytes)[0] or len(self.buf) < size:
            del control
            self.control = None
            self.close()
            raise ProtocolError("shm_bad", f"segment {name}: layout does not fit its {len(self.buf)} bytes")
        self.stride = stride
        self.records = np.ndarray((self.nslots, _RECORD_WORDS), dtype=np.uint64, buffer=self.buf,
                                  offset=_CONTROL_BYTES)

    @property
    def retired(self) -> bool:
        return bool(self.control[_RETIRED])

    def close(self) -> None:
        self.control = self.records = None
        buf, self.buf = getattr(self, "buf", None), None
        try:
            if buf is not None:
                buf.release()
            if self._mmap is not None:
                self._mmap.close()
            if self._shm is not None:
                self._shm.close()  # close only: the segment belongs to the publisher
        except BufferError:
            pass


def _posix_attach(name: str) -> Any:
    """mmap a POSIX shared-memory segment by name without telling the resource tracker."""
    try:
        import _posixshmem
    except ImportError:
        return None
    import mmap

    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class ShmReader:
    """Reads frames out of publishers' rings; used by ``FrameReceiver`` for ``shm`` headers.

    ``read(header)`` returns a private copy of the slot and releases the slot at once. Segments
    are attached once and cached (at most ``max_segments``; retired ones are dropped when a newer
    segment is read). The reader never unlinks a segment: that is the publisher's job.
    """

    def __init__(self, max_segments: int = 16) -> None:
        self.max_segments = max_segments
        self._segments: OrderedDict[str, _Attached] = OrderedDict()
        self._last: str | None = None

    def read(self, header: dict[str, Any]) -> np.ndarray:
        shm = header.get("shm")
        if not isinstance(shm, dict):
            raise ProtocolError("shm_bad", "shm is not an object")
        name, slot, nbytes, gen = (shm.get(k) for k in ("name", "slot", "nbytes", "gen"))
        if not isinstance(name, str) or not name or "/" in name or len(name) > 200:
            raise ProtocolError("shm_bad", f"name={name!r}")
        for key, value in (("slot", slot), ("nbytes", nbytes), ("gen", gen)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ProtocolError("shm_bad", f"{key}={value!r}")
        try:
            dtype = np.dtype(header["dtype"])
            shape = tuple(int(s) for s in header["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("shm_bad", f"shape/dtype: {exc}") from None
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise ProtocolError("shm_bad", f"nbytes={nbytes}, shape {list(shape)} {dtype} needs "
                                f"{math.prod(shape) * dtype.itemsize}")
        seg = self._segment(name)
        if slot >= seg.nslots or nbytes > seg.slot_nbytes:
            raise ProtocolError("shm_bad", f"slot {slot} of {seg.nslots}, {nbytes} bytes in slots of {seg.slot_nbytes}")
        record = seg.records[slot]
        if int(record[_STATE]) != FULL or int(record[_GEN]) != gen or int(record[_NBYTES]) != nbytes:
            raise ProtocolError("shm_stale", f"{name} slot {slot}: generation {int(record[_GEN])}, header has {gen}"
                                " (already read, or reclaimed by the publisher)")
        src = np.ndarray(shape, dtype=dtype, buffer=seg.buf, offset=seg.data_offset + slot * seg.stride)
        out = src.copy()
        del src
        if int(record[_GEN]) != gen:  # reclaimed while we copied: the copy may be torn
            raise ProtocolError("shm_stale", f"{name} slot {slot} was reclaimed during the read")
        record[_STATE] = FREE
        return out

    def _segment(self, name: str) -> _Attached:
        seg = self._segments.get(name)
        if seg is not None:
            if name != self._last:
                self._segments.move_to_end(name)
                self._last = name
            return seg
        try:
            seg = _Attached(name)
        except FileNotFoundError:
            raise ProtocolError(
                "shm_missing",
                f"no shared-memory segment {name!r}: its publisher closed or died, or it runs on another "
                "host / in a container that does not share /dev/shm (use make_publisher(..., shm=False))",
            ) from None
        except (OSError, ValueError) as exc:
            raise ProtocolError("shm_missing", f"cannot attach {name!r}: {exc}") from None
        # a publisher that moved to a larger ring retired the old one: let its memory go
        for old in [n for n, s in self._segments.items() if s.retired]:
            self._segments.pop(old).close()
        while len(self._segments) >= self.max_segments:
            self._segments.popitem(last=False)[1].close()
        self._segments[name] = seg
        self._last = name
        return seg

    @property
    def attached(self) -> list[str]:
        return list(self._segments)

    def close(self) -> None:
        while self._segments:
            self._segments.popitem()[1].close()


# -- after a crash ----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    # POSIX only: on Windows os.kill(pid, 0) would send CTRL_C_EVENT
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    except OSError:
        return True  # cannot tell: keep the segment
    return True


def cleanup_stale(prefix: str = DEFAULT_PREFIX, *, shm_dir: str | os.PathLike[str] = "/dev/shm") -> list[str]:
    """Unlink the ring segments of publishers that died without cleaning up (SIGKILL, power cut of
    the process): those named ``<prefix>_<pid>_*`` whose pid is no longer running. Returns the
    names removed.

    Linux only (segments are files in /dev/shm); a no-op elsewhere: on Windows a segment vanishes
    with its last handle, and macOS cannot list its POSIX shared memory. A pid reused by an
    unrelated process keeps its segment (kept, not wrongly removed); segments of a publisher in
    another pid namespace (container) sharing /dev/shm are judged by a pid this host cannot see,
    so run it where the publishers run.
    """
    if not sys.platform.startswith("linux"):
        return []
    root = Path(shm_dir)
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return []
    for path in entries:
        parts = path.name.split("_")
        if len(parts) != 3 or parts[0] != prefix or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot remove stale segment %s: %s", path, exc)
            continue
        log.info("removed stale shared-memory segment %s (publisher pid %d is gone)", path.name, pid)
        removed.append(path.name)
    return removed
