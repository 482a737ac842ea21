"""Feedback to the acquisition: events from livescope's engines drive what the microscope does next.

Events (the decomposition's novelty, registration's drift, ...) are numbered by the daemon and
fetched in order over its control socket (``{"cmd": "events", "after": LAST_ID}``): a reliable,
acknowledged channel (the client's ``after`` cursor is its acknowledgement), unlike PUB/SUB which
drops. :class:`EventFollower` polls it on a thread and hands each event to a policy.

:class:`AdaptiveTimelapse` is the example policy, after Mahecic et al. (Nature Methods 2022,
event-driven acquisition): a pymmcore-plus MDA whose time interval switches from slow to fast while
events keep coming, and back after a quiet period. It is an iterable of ``useq.MDAEvent`` for
``core.run_mda``; the same ``on_event`` hook serves Pycro-Manager's ``event_queue``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from .auth import read_token

__all__ = ["AdaptiveTimelapse", "EventFollower", "StageCorrection"]

log = logging.getLogger(__name__)


class EventFollower:
    """Fetch the daemon's events in order and call ``callback(event)`` for each, on a thread."""

    def __init__(
        self,
        control: str,
        callback: Callable[[dict[str, Any]], None],
        *,
        poll_s: float = 0.005,
        after: int = 0,
        kinds: set[str] | None = None,
        context: zmq.Context | None = None,
        curve: Any = None,
    ) -> None:
        self.control = control
        self.curve = curve  # a livescope.bridges.auth.CurveClient for a daemon that runs CURVE
        self.callback = callback
        self.poll_s = poll_s
        self.last_id = after
        self.kinds = kinds
        self.handled = 0
        self.errors = 0
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="livescope-event-follower", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sock = None
        while not self._stop.is_set():
            if sock is None:
                sock = self._ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, 1000)
                if self.curve is not None:
                    self.curve.secure(sock)
                sock.connect(self.control)
            try:
                request = {"cmd": "events", "after": self.last_id, "token": read_token(self.control)}
                sock.send(json.dumps(request).encode())
                reply = json.loads(sock.recv())
            except zmq.Again:
                sock.close(linger=0)
                sock = None  # the daemon is away: reconnect, resume after the last handled id
                continue
            for event in reply.get("events", []):
                self.last_id = event["id"]
                if self.kinds is not None and event.get("kind") not in self.kinds:
                    continue
                try:
                    self.callback(event)
                    self.handled += 1
                except Exception:  # a failing policy must not stop the channel
                    self.errors += 1
                    log.exception("event policy failed on event %s", event.get("id"))
            if not reply.get("events"):
                self._stop.wait(self.poll_s)
        if sock is not None:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(3)


class AdaptiveTimelapse:
    """An MDA event stream whose interval is ``fast_s`` while events arrive and ``slow_s`` after
    ``quiet_s`` seconds without one.

        policy = AdaptiveTimelapse(slow_s=2.0, fast_s=0.2, quiet_s=10, frames=500)
        follower = EventFollower("tcp://127.0.0.1:5572", policy.on_event)
        policy.run(core)   # core.mda.run(policy) with hardware sequencing off

    Each acquired event carries ``metadata["livescope_mode"]`` ("slow" or "fast") and, for the
    first fast frame, the id and seq of the livescope event that switched it.
    """

    def __init__(
        self,
        *,
        slow_s: float,
        fast_s: float,
        quiet_s: float,
        frames: int,
        channel: str | None = None,
        kinds: set[str] | None = None,
    ) -> None:
        if not 0 < fast_s <= slow_s:
            raise ValueError("need 0 < fast_s <= slow_s")
        self.slow_s, self.fast_s, self.quiet_s = slow_s, fast_s, quiet_s
        self.frames = frames
        self.channel = channel
        self.kinds = kinds
        self.mode = "slow"
        self._last_event: float | None = None
        self._pending_trigger: dict[str, Any] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.switches: list[tuple[float, str, dict[str, Any] | None]] = []
        self.received_events = 0
        self._lock = threading.Lock()

    def on_event(self, event: dict[str, Any]) -> None:
        if self.kinds is not None and event.get("kind") not in self.kinds:
            return
        with self._lock:
            self.received_events += 1
            self._last_event = time.monotonic()
            if self.mode == "slow":
                self._pending_trigger = {
                    "event_id": event.get("id"),
                    "seq": event.get("seq"),
                    "received": time.monotonic(),
                }
        self._wake.set()  # cut the current slow wait short

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def run(self, core: Any) -> None:
        """Run on a pymmcore-plus core. Hardware sequencing is switched off for the run: it makes
        the runner read events ahead, which would defeat a policy that decides the next one late."""
        engine = core.mda.engine
        old = getattr(engine, "use_hardware_sequencing", None)
        if old is not None:
            engine.use_hardware_sequencing = False
        try:
            core.mda.run(self)
        finally:
            if old is not None:
                engine.use_hardware_sequencing = old

    def _next_mode(self, now: float) -> str:
        with self._lock:
            recent = self._last_event is not None and now - self._last_event < self.quiet_s
        return "fast" if recent else "slow"

    def __iter__(self) -> Iterator[Any]:
        from useq import MDAEvent

        for t in range(self.frames):
            # wait until the last acquisition + the interval of the current mode; an event
            # arriving during a slow wait wakes us, and the shorter interval applies at once
            while not self._stop.is_set() and t > 0:
                now = time.monotonic()
                interval = self.fast_s if self._next_mode(now) == "fast" else self.slow_s
                due = self._last_acq + interval
                if now >= due:
                    break
                self._wake.wait(due - now)
                self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            mode = self._next_mode(now)
            meta: dict[str, Any] = {"livescope_mode": mode}
            if mode != self.mode:
                with self._lock:
                    trigger, self._pending_trigger = self._pending_trigger, None
                self.switches.append((now, mode, trigger))
                if trigger is not None:
                    meta["livescope_trigger"] = {k: v for k, v in trigger.items() if k != "received"}
                self.mode = mode
            self._last_acq = now
            kwargs: dict[str, Any] = {"index": {"t": t}, "metadata": meta}
            if self.channel:
                kwargs["channel"] = {"config": self.channel, "group": "Channel"}
            yield MDAEvent(**kwargs)

    _last_acq = 0.0


class StageCorrection:
    """Policy: move the XY stage by each drift event's ``stage_um`` (from the ``register`` engine
    with ``feedback=True``), so the sample comes back under the camera.

        follower = EventFollower(control, StageCorrection(core).on_event, kinds={"drift"})

    ``stage_um`` is already in stage (x, y) micrometres through the camera-to-stage affine
    (pymmcore-plus ``getPixelSizeAffine``); the sign is the one that undoes the drift.
    """

    def __init__(self, core: Any, *, max_step_um: float = 50.0) -> None:
        self.core = core
        self.max_step_um = max_step_um
        self.moves: list[tuple[float, float]] = []

    def on_event(self, event: dict[str, Any]) -> None:
        if event.get("kind") != "drift" or "stage_um" not in event:
            return
        dx, dy = (float(v) for v in event["stage_um"][:2])
        if max(abs(dx), abs(dy)) > self.max_step_um:
            log.warning("drift correction of (%.1f, %.1f) um refused: over %.0f um", dx, dy, self.max_step_um)
            return
        self.core.setRelativeXYPosition(dx, dy)
        self.moves.append((dx, dy))
