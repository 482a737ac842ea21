"""Counters and latency percentiles, cheap enough to update per frame."""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

__all__ = ["Latency", "Rate"]


class Latency:
    """The last ``n`` durations of one stage; p50/p99 on demand."""

    def __init__(self, n: int = 512) -> None:
        self._ms: deque[float] = deque(maxlen=n)
        self.count = 0
        self.total_s = 0.0

    def add(self, seconds: float) -> None:
        self._ms.append(seconds * 1000.0)
        self.count += 1
        self.total_s += seconds

    def summary(self) -> dict[str, float | int]:
        if not self._ms:
            return {"count": self.count}
        arr = np.fromiter(self._ms, float)
        p50, p99 = np.percentile(arr, [50, 99])
        return {"count": self.count, "p50_ms": round(float(p50), 3), "p99_ms": round(float(p99), 3)}


class Rate:
    """Events per second over a sliding window of a few seconds."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._times: deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            self._times.append(now)
            while self._times and now - self._times[0] > self.window_s:
                self._times.popleft()

    def per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._times and now - self._times[0] > self.window_s:
                self._times.popleft()
            return round(len(self._times) / self.window_s, 2)
