"""The hand-off every acquisition bridge needs: the acquisition thread puts a small tuple in a
bounded queue and returns at once; a sender thread builds the header and sends. A payload that
finds the queue full is counted in ``dropped`` and its ``seq`` is skipped, so the daemon counts it
as lost: nothing is lost silently. Subclasses say how a payload becomes (pixels, header)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import numpy as np

from .transport import FramePublisher

__all__ = ["QueuedSender"]

log = logging.getLogger(__name__)

END = object()  # the end-of-stream marker travels down the same queue, after the frames


class QueuedSender:
    def __init__(self, publisher: FramePublisher, *, buffer_frames: int = 256, end_on_close: bool = True,
                 name: str = "livescope-sender") -> None:
        self.publisher = publisher
        self.end_on_close = end_on_close
        self._queue: queue.Queue = queue.Queue(maxsize=buffer_frames)
        self.seq = 0
        self.sent = 0
        self.dropped = 0
        self._closed = False
        self._thread = threading.Thread(target=self._send_loop, name=name, daemon=True)
        self._thread.start()

    # -- acquisition thread: a queue entry, never a wait -----------------------------------
    def enqueue(self, *payload: Any) -> None:
        seq = self.seq
        self.seq += 1
        try:
            self._queue.put_nowait((seq, payload))
        except queue.Full:
            self.dropped += 1

    def end(self) -> None:
        """Queue the end-of-stream marker: sent after every frame queued before it."""
        if not self._closed:
            self._queue.put(END)

    # -- sender thread ---------------------------------------------------------------------
    def _frame(self, *payload: Any) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if item is END:
                self.publisher.seq = self.seq
                self.publisher.end()
                continue
            seq, payload = item
            try:
                image, header = self._frame(*payload)
                if self.publisher.send(np.ascontiguousarray(image), seq=seq, **header):
                    self.sent += 1
                else:
                    self.dropped += 1
            except Exception:  # one bad frame must not stop the stream
                log.exception("could not send frame seq=%d", seq)
                self.dropped += 1

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (and the end marker when ``end_on_close``) within ``timeout``
        seconds, stop the sender, close the socket. Frames still queued at the deadline are
        dropped and counted."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout
        for marker in ([END] if self.end_on_close else []) + [None]:
            while True:
                try:
                    self._queue.put(marker, timeout=max(0.01, deadline - time.monotonic()))
                    break
                except queue.Full:  # the daemon is away: give up the oldest frame, it becomes a seq gap
                    try:
                        if self._queue.get_nowait() not in (None, END):
                            self.dropped += 1
                    except queue.Empty:
                        pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self.publisher.close(linger_s=max(0.0, deadline - time.monotonic()))

    def stats(self) -> dict[str, int]:
        return {"frames": self.seq, "sent": self.sent, "dropped": self.dropped, "queued": self._queue.qsize()}
