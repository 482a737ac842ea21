"""The hand-off every acquisition bridge needs: the acquisition thread puts a small tuple in a
bounded queue and returns at once; a sender thread builds the header and sends. A payload that
finds the queue full is counted in ``dropped`` and its ``seq`` is skipped, so the daemon counts it
as lost: nothing is lost silently. Subclasses say how a payload becomes (pixels, header).

With ``validate=True`` every header is checked against the wire protocol before it is sent (an
encode and a decode, tens of microseconds): a field the daemon would refuse, or that cannot be
encoded at all, is dropped from that frame and the frame is sent without it. Each dropped piece
of metadata is counted per cause in ``causes`` (and the frame once in ``meta_dropped``); the
first time a cause occurs it is logged as a warning, never once per frame. With
``report_counts=True`` every header carries ``sender`` = {dropped, meta_dropped} (cumulative), so
the daemon knows what never reached it."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from .protocol import ProtocolError, decode, encode, make_header
from .transport import FramePublisher

__all__ = ["QueuedSender"]

log = logging.getLogger(__name__)

# optional header fields, least needed first: the order in which a refused header is pared down
DROP_ORDER = (
    "meta",
    "sender",
    "camera",
    "pixel_size_affine",
    "binning",
    "interval_s",
    "z_step_um",
    "pixel_size_um",
    "bits",
    "channel",
    "time",
    "sizes",
    "index",
)


class _End:
    """The end-of-stream marker travels down the same queue, after the frames; ``seq`` is the
    count when it was queued (frames queued later follow it). ``send=False``: only report."""

    __slots__ = ("seq", "send", "report")

    def __init__(self, seq: int, send: bool = True, report: Callable[[], None] | None = None) -> None:
        self.seq, self.send, self.report = seq, send, report


class QueuedSender:
    def __init__(
        self,
        publisher: FramePublisher,
        *,
        buffer_frames: int = 256,
        end_on_close: bool = True,
        name: str = "livescope-sender",
        validate: bool = False,
        report_counts: bool = False,
    ) -> None:
        self.publisher = publisher
        self.end_on_close = end_on_close
        self.validate = validate
        self.report_counts = report_counts
        # frames are bounded by buffer_frames; markers (end, stop) always get in, so that queuing
        # one never waits on a stalled daemon
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.buffer_frames = buffer_frames
        self._pending = 0  # frames in the queue
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self.meta_dropped = 0  # frames sent with some of their metadata dropped (see causes)
        self.causes: Counter[str] = Counter()  # frames per cause: "meta:<reason>:<field>", "frame:<reason>"
        self._warned: set[str] = set()
        self._lock = threading.Lock()  # counters: written by the acquisition and the sender thread
        self._frame_drops: list[tuple[str, str]] = []  # what the frame being built lost (sender thread)
        self._closed = False
        self._close_deadline: float | None = None
        self._abandoned = False  # close() gave up waiting for a send: the frames left are counted there
        self._in_flight = False
        self._thread = threading.Thread(target=self._send_loop, name=name, daemon=True)
        self._thread.start()

    # -- acquisition thread: a queue entry, never a wait -----------------------------------
    def enqueue(self, *payload: Any) -> None:
        with self._lock:
            seq = self.seq
            self.seq += 1
            room = self._pending < self.buffer_frames
            if room:
                self._pending += 1
        if room:
            self._queue.put((seq, payload))
        else:
            self.count_lost(
                "queue_full",
                "the send queue is full (the daemon is slow or away): frames are "
                "dropped and reach the daemon as lost; a larger buffer_frames absorbs longer stalls",
            )

    def end(self, *, send: bool = True, report: Callable[[], None] | None = None) -> None:
        """Queue the end-of-stream marker: sent after every frame queued before it (``send=False``:
        only ``report`` is called then, from the sender thread, once those frames are out)."""
        if not self._closed:
            self._queue.put(_End(self.seq, send, report))

    # -- counting --------------------------------------------------------------------------
    def drop_meta(self, cause: str, detail: str = "") -> None:
        """Sender thread, while building a frame: part of its metadata could not be sent."""
        self._frame_drops.append((cause, detail))

    def _note(self, cause: str, detail: str, *, exc_info: Any = None) -> None:
        with self._lock:
            self.causes[cause] += 1
            first = cause not in self._warned
            self._warned.add(cause)
        if first:
            log.warning(
                "stream %r: %s%s (logged once; counted in stats()['causes'][%r])",
                self.publisher.stream,
                cause,
                f": {detail}" if detail else "",
                cause,
                exc_info=exc_info,
            )

    def count_lost(self, cause: str, detail: str = "", *, exc_info: Any = None) -> None:
        with self._lock:
            self.dropped += 1
        self._note(f"frame:{cause}", detail, exc_info=exc_info)

    # -- sender thread ---------------------------------------------------------------------
    def _frame(self, *payload: Any) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def _send_loop(self) -> None:
        # only this thread touches the socket (ZeroMQ sockets are not thread-safe): it also closes it
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                if isinstance(item, _End):
                    if not self._abandoned:
                        self._send_end(item)
                    continue
                seq, payload = item
                with self._lock:
                    self._pending -= 1
                    abandoned = self._abandoned
                if abandoned:  # taken after close() gave up: counted here, never sent
                    self.count_lost("closed", "frames still queued when the sender closed")
                    continue
                try:
                    self._send_frame(seq, payload)
                except Exception as exc:  # one bad frame must not stop the stream
                    self.count_lost(f"unsendable:{type(exc).__name__}", str(exc)[:200], exc_info=True)
        finally:
            linger = (
                0.0
                if self._abandoned or self._close_deadline is None
                else max(0.0, self._close_deadline - time.monotonic())
            )
            self.publisher.close(linger_s=linger)

    def _send_frame(self, seq: int, payload: tuple[Any, ...]) -> None:
        self._frame_drops = []
        image, header = self._frame(*payload)
        image = np.ascontiguousarray(image)
        if self.report_counts:
            header["sender"] = {"dropped": self.dropped, "meta_dropped": self.meta_dropped}
        if self.validate:
            header = self._valid_header(image, header, seq)
        if self._frame_drops:
            with self._lock:
                self.meta_dropped += 1
            for cause, detail in dict(self._frame_drops).items():
                self._note(f"meta:{cause}", detail)
        self._in_flight = True
        try:
            ok = self.publisher.send(image, seq=seq, **header)
        finally:
            with self._lock:
                self._in_flight = False
                abandoned = self._abandoned
        if abandoned:  # close() counted this frame as dropped while it waited
            return
        if ok:
            with self._lock:
                self.sent += 1
        else:
            self.count_lost(
                "not_delivered",
                "the daemon did not take the frame in time (not running, wrong "
                "address, or stalled): it reaches the daemon as lost",
            )

    def _valid_header(self, image: np.ndarray, header: dict[str, Any], seq: int) -> dict[str, Any]:
        """``header`` if the daemon would take it, else the header without the field it refuses
        (recorded with :meth:`drop_meta`); raises when not even a bare header can carry the frame
        (an image the protocol has no dtype or shape for)."""
        problem = self._problem(image, header, seq)
        if problem is None:
            return header
        # drop the fields at fault one at a time, never ``index`` (a frame without its place would
        # land in the wrong one: better refused and counted by the caller)
        current = dict(header)
        while problem is not None:
            keys = [k for k in DROP_ORDER if k in current] + [k for k in current if k not in DROP_ORDER]
            for key in (k for k in keys if k != "index"):
                trial = {k: v for k, v in current.items() if k != key}
                after = self._problem(image, trial, seq)
                if after is None or str(after) != str(problem):  # this field was (one of) the fault(s)
                    self.drop_meta(f"{problem.reason}:{key}", str(problem)[:200])
                    current, problem = trial, after
                    break
            else:
                raise problem
        return current

    def _problem(self, image: np.ndarray, header: dict[str, Any], seq: int) -> ProtocolError | None:
        try:
            head = encode(make_header(image, stream=self.publisher.stream, seq=seq, **header), None)[0]
            decode([head, image])
        except ProtocolError as exc:
            return exc
        except (TypeError, ValueError, OverflowError, RecursionError) as exc:  # JSON cannot hold it
            return ProtocolError("unencodable", f"{type(exc).__name__}: {exc}")
        return None

    def _send_end(self, item: _End) -> None:
        if item.send:
            self.publisher.seq = item.seq
            self.publisher.end()
        if item.report is not None:
            try:
                item.report()
            except Exception:
                log.exception("end-of-acquisition report failed")

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (and the end marker when ``end_on_close``) within ``timeout``
        seconds, stop the sender, close the socket. Frames still queued at the deadline are
        dropped and counted (see :meth:`_abandon`)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        self._close_deadline = deadline
        if self.end_on_close:
            self._queue.put(_End(self.seq))
        self._queue.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._abandon()

    def _abandon(self) -> None:
        """The deadline passed with the sender still waiting on a send (the daemon is away): count
        the frame it holds and those queued as dropped now, so that sent + dropped account for
        every frame when close() returns. The sender finishes that one send (the socket's send
        timeout), sends nothing more and closes its socket; it never holds the process at exit."""
        with self._lock:
            self._abandoned = True
            in_flight = self._in_flight
        if in_flight:
            self.count_lost("closed", "frames still queued when the sender closed")
        while True:
            try:
                taken = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(taken, tuple):
                with self._lock:
                    self._pending -= 1
                self.count_lost("closed", "frames still queued when the sender closed")
        self._queue.put(None)

    def stats(self) -> dict[str, int]:
        return {"frames": self.seq, "sent": self.sent, "dropped": self.dropped, "queued": self._pending}
