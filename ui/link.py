"""The viewer's line to the daemon's control socket, on its own thread.

A REQ socket can block for its whole timeout when the daemon is away, so the GUI thread never
touches it: it queues commands with :meth:`DaemonLink.request` and drains replies with
:meth:`DaemonLink.drain` on a timer. The thread asks for ``status`` twice a second and for new
``events`` once a second, and notices when the daemon goes away, comes back, or restarts (its
uptime goes backwards), so the viewer can say so and carry on by itself.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from typing import Any

from ..bridges.auth import read_token

__all__ = ["DaemonLink", "LinkMessage"]

log = logging.getLogger(__name__)

# (kind, payload): kind is "status", "events", "reply", "down", "up", "restarted"
LinkMessage = tuple[str, Any]


class DaemonLink:
    def __init__(
        self,
        address: str | None,
        *,
        status_every_s: float = 0.5,
        events_every_s: float = 1.0,
        timeout_s: float = 1.5,
        curve: Any = None,
    ) -> None:
        self.address = address
        self.curve = curve  # a livescope.bridges.auth.CurveClient for a daemon that runs CURVE
        self.status_every_s = status_every_s
        self.events_every_s = events_every_s
        self.timeout_ms = int(timeout_s * 1000)
        self.connected = False
        self.last_event_id = 0
        self._commands: queue.Queue[dict[str, Any]] = queue.Queue()
        self._out: queue.Queue[LinkMessage] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._uptime = -1.0
        self._thread = threading.Thread(target=self._run, name="livescope-view-control", daemon=True)
        if address:
            self._thread.start()

    # -- GUI side ------------------------------------------------------------------------------
    def request(self, cmd: str, **kwargs: Any) -> None:
        """Queue a command; its answer comes back from :meth:`drain` as ``("reply", (request, answer))``."""
        self._commands.put({"cmd": cmd, **kwargs})
        self._wake.set()

    def drain(self) -> list[LinkMessage]:
        out = []
        while True:
            try:
                out.append(self._out.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(3)

    # -- thread side ---------------------------------------------------------------------------
    def _run(self) -> None:
        import zmq

        ctx: zmq.Context[Any] = zmq.Context.instance()
        sock: zmq.Socket | None = None
        address = self.address
        if not address:  # the thread is started only with an address
            return
        next_status = next_events = 0.0

        def ask(request: dict[str, Any]) -> dict[str, Any] | None:
            nonlocal sock
            if sock is None:
                sock = ctx.socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
                sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
                if self.curve is not None:
                    self.curve.secure(sock)
                sock.connect(address)
            token = read_token(address)  # read each time: a restarted daemon has a new one
            try:
                sock.send(json.dumps({**request, **({"token": token} if token else {})}).encode())
                answer = json.loads(sock.recv())
            except zmq.Again:
                sock.close(linger=0)
                sock = None  # a REQ socket is unusable after a timeout: the next ask makes a new one
                self._went_down()
                return None
            except ValueError as exc:  # not JSON: not a livescope daemon, or a broken reply
                log.warning("control reply was not JSON: %s", exc)
                return {"ok": False, "error": f"unreadable reply: {exc}"}
            return answer

        while not self._stop.is_set():
            try:
                request = self._commands.get_nowait()
            except queue.Empty:
                request = None
            if request is not None:
                answer = ask(request)
                if answer is None:
                    answer = {"ok": False, "error": f"no answer from the daemon at {self.address}"}
                self._out.put(("reply", (request, answer)))
                next_status = 0.0  # show the effect at once
                continue
            now = time.monotonic()
            if now >= next_status:
                next_status = now + self.status_every_s
                status = ask({"cmd": "status"})
                if status is not None and status.get("ok", True):
                    self._came_up(status)
                    self._out.put(("status", status))
                elif status is not None:  # it answers but refuses (no token: another user's daemon)
                    self._out.put(("refused", status.get("error", "refused")))
            if self.connected and now >= next_events:
                next_events = now + self.events_every_s
                answer = ask({"cmd": "events", "after": self.last_event_id})
                if answer and answer.get("ok"):
                    events = answer.get("events") or []
                    if events:
                        self.last_event_id = max(int(e["id"]) for e in events)
                        self._out.put(("events", events))
            self._wake.wait(
                max(0.0, min(next_status, next_events if self.connected else next_status) - time.monotonic())
            )
            self._wake.clear()
        if sock is not None:
            sock.close(linger=0)

    def _went_down(self) -> None:
        if self.connected:
            self.connected = False
            self._out.put(("down", self.address))
        elif self._uptime < 0:
            self._out.put(("down", self.address))
            self._uptime = -0.5  # said once: "not running" until it answers

    def _came_up(self, status: dict[str, Any]) -> None:
        uptime = float(status.get("uptime_s") or 0.0)
        restarted = self._uptime >= 0 and uptime + 0.5 < self._uptime
        if not self.connected:
            self.connected = True
            self._out.put(("up", status))
        if restarted:
            self.last_event_id = 0  # a new daemon numbers its events from 1 again
            self._out.put(("restarted", status))
        self._uptime = uptime
