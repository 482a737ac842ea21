"""The shared-memory ring's layout and its reader: what ``FrameReceiver`` needs to take pixels out
of a ring that an ``ShmFramePublisher`` (bridges/shm.py) filled. Kept apart from the publisher so
that the receiver (bridges/transport.py) and the publisher (which builds on transport's
``FramePublisher``) import it without importing each other. The layout is described in shm.py.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections import OrderedDict
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import ProtocolError

__all__ = ["DEFAULT_PREFIX", "ShmReader", "cleanup_stale"]

log = logging.getLogger("livescope.bridges.shm")


DEFAULT_PREFIX = "livescope"
MAGIC = int.from_bytes(b"LVSCSHM1", "little")
LAYOUT_VERSION = 1
FREE, FULL = 0, 1
# control block, as uint64 words
MAGIC, VERSION, NSLOTS, SLOT_NBYTES, DATA_OFFSET, PID, RETIRED = range(7)
CONTROL_BYTES = 64
_RECORD_WORDS = 8  # 64 bytes per slot record
STATE, GEN, NBYTES = range(3)
_PAGE = 4096
MIN_SLOTS = 2
MAX_PAUSE_S = 1e-3  # longest nap of a blocked send between looks at the ring


def _align(n: int, to: int = _PAGE) -> int:
    return (n + to - 1) // to * to


def ring_layout(slots: int, slot_nbytes: int) -> tuple[int, int, int]:
    """(data offset, slot stride, total size) of a ring."""
    offset = _align(CONTROL_BYTES + slots * _RECORD_WORDS * 8)
    stride = _align(slot_nbytes)
    return offset, stride, offset + slots * stride


def ring_views(buf: memoryview) -> tuple[np.ndarray, np.ndarray]:
    """The control words and the (slot, field) records of a mapped ring."""
    control = np.ndarray((CONTROL_BYTES // 8,), dtype=np.uint64, buffer=buf)
    slots = int(control[NSLOTS])
    records = np.ndarray((slots, _RECORD_WORDS), dtype=np.uint64, buffer=buf, offset=CONTROL_BYTES)
    return control, records


# -- where is the daemon? ---------------------------------------------------------------------------


class _Attached:
    """A segment mapped by the reader. Never registered with the resource tracker: before Python
    3.13 ``SharedMemory(name)`` registers every attach, and the tracker then *unlinks* the
    publisher's segment when the reader's process exits (and warns of a leak)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._shm: shared_memory.SharedMemory | None = None
        self._mmap: Any = None
        # the mapping and the views on it: None once closed (views first, so the mapping can go)
        self.buf: memoryview | None
        self.control: np.ndarray | None = None
        self.records: np.ndarray | None = None
        buf: memoryview | None
        if sys.version_info >= (3, 13):
            self._shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
            buf = self._shm.buf
        elif os.name == "nt":
            self._shm = shared_memory.SharedMemory(name=name)  # no resource tracker on Windows
            buf = self._shm.buf
        else:
            self._mmap = _posix_attach(name)
            if self._mmap is None:  # no _posixshmem: attach, then take the registration back
                from multiprocessing import resource_tracker

                self._shm = shared_memory.SharedMemory(name=name)
                resource_tracker.unregister(self._shm._name, "shared_memory")  # type: ignore[attr-defined]
                buf = self._shm.buf
            else:
                buf = memoryview(self._mmap)
        self.buf = buf
        assert buf is not None  # an open segment's buffer (None only after its close)
        if len(buf) < CONTROL_BYTES:
            self.close()
            raise ProtocolError("shm_bad", f"segment {name} is {len(buf)} bytes, not a livescope ring")
        control = np.ndarray((CONTROL_BYTES // 8,), dtype=np.uint64, buffer=buf)
        if int(control[MAGIC]) != MAGIC or int(control[VERSION]) != LAYOUT_VERSION:
            del control
            self.close()
            raise ProtocolError("shm_bad", f"segment {name} is not a livescope ring (v{LAYOUT_VERSION})")
        self.control = control
        self.nslots = int(control[NSLOTS])
        self.slot_nbytes = int(control[SLOT_NBYTES])
        self.data_offset = int(control[DATA_OFFSET])
        _, stride, size = ring_layout(self.nslots, self.slot_nbytes)
        if self.data_offset != ring_layout(self.nslots, self.slot_nbytes)[0] or len(buf) < size:
            del control
            self.control = None
            self.close()
            raise ProtocolError("shm_bad", f"segment {name}: layout does not fit its {len(buf)} bytes")
        self.stride = stride
        self.records = np.ndarray((self.nslots, _RECORD_WORDS), dtype=np.uint64, buffer=buf, offset=CONTROL_BYTES)

    @property
    def retired(self) -> bool:
        assert self.control is not None, "closed segment"
        return bool(self.control[RETIRED])

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


def _count(shm: dict[str, Any], key: str) -> int:
    """A non-negative integer field of an ``shm`` header (not a bool)."""
    value = shm.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError("shm_bad", f"{key}={value!r}")
    return value


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
        name = shm.get("name")
        if not isinstance(name, str) or not name or "/" in name or len(name) > 200:
            raise ProtocolError("shm_bad", f"name={name!r}")
        slot, nbytes, gen = (_count(shm, key) for key in ("slot", "nbytes", "gen"))
        try:
            dtype = np.dtype(header["dtype"])
            shape = tuple(int(s) for s in header["shape"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError("shm_bad", f"shape/dtype: {exc}") from None
        if math.prod(shape) * dtype.itemsize != nbytes:
            raise ProtocolError(
                "shm_bad", f"nbytes={nbytes}, shape {list(shape)} {dtype} needs {math.prod(shape) * dtype.itemsize}"
            )
        seg = self._segment(name)
        if slot >= seg.nslots or nbytes > seg.slot_nbytes:
            raise ProtocolError("shm_bad", f"slot {slot} of {seg.nslots}, {nbytes} bytes in slots of {seg.slot_nbytes}")
        assert seg.records is not None, "closed segment"  # closed ones leave the cache
        record = seg.records[slot]
        if int(record[STATE]) != FULL or int(record[GEN]) != gen or int(record[NBYTES]) != nbytes:
            raise ProtocolError(
                "shm_stale",
                f"{name} slot {slot}: generation {int(record[GEN])}, header has {gen}"
                " (already read, or reclaimed by the publisher)",
            )
        src = np.ndarray(shape, dtype=dtype, buffer=seg.buf, offset=seg.data_offset + slot * seg.stride)
        out = src.copy()
        del src
        if int(record[GEN]) != gen:  # reclaimed while we copied: the copy may be torn
            raise ProtocolError("shm_stale", f"{name} slot {slot} was reclaimed during the read")
        record[STATE] = FREE
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
