"""The control socket: JSON commands over ZeroMQ ROUTER (daemon) / REQ (clients).

Commands: ``{"cmd": "status"}``, ``{"cmd": "stop"}``,
``{"cmd": "set", "engine": E, "param": P, "value": V}``, ``{"cmd": "enable"|"disable", "engine": E}``,
``{"cmd": "swap_model", "engine": E, "path": MODEL}``. Replies are JSON objects with ``ok``.
A malformed request gets ``{"ok": false, "error": ...}``; the server keeps running.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import zmq

from ..bridges.auth import check_token, create_token, read_token, remove_token
from ..bridges.transport import DEFAULT_CONTROL

__all__ = ["ControlClient", "ControlServer", "ControlTimeout"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 16


class ControlTimeout(TimeoutError):
    pass


class ControlServer:
    def __init__(self, address: str, handler: Callable[[dict[str, Any]], dict[str, Any]],
                 context: zmq.Context | None = None, *, require_token: bool = True) -> None:
        self.address = address
        self.handler = handler
        self.bad_requests = 0
        self.unauthorised = 0
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            self._sock.bind(address)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise OSError(f"cannot bind the control socket to {address}: {exc}; pass another --control") from exc
        # the token file is readable only by this user: other users of the PC cannot send commands
        self.token = create_token(address) if require_token else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="livescope-control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            parts = self._sock.recv_multipart()
            if len(parts) < 3:
                self.bad_requests += 1
                continue
            ident, body = parts[0], parts[-1]
            reply = self.handle_bytes(body)
            try:
                self._sock.send_multipart([ident, b"", json.dumps(reply, default=str).encode()], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client went away
        self._sock.close(linger=0)

    def handle_bytes(self, body: bytes) -> dict[str, Any]:
        if len(body) > MAX_REQUEST_BYTES:
            self.bad_requests += 1
            return {"ok": False, "error": "request too large"}
        try:
            request = json.loads(body)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ValueError('expected a JSON object with a string "cmd"')
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            self.bad_requests += 1
            return {"ok": False, "error": f"bad request: {str(exc)[:200]}"}
        if not check_token(self.token, request.get("token")):
            self.unauthorised += 1
            return {"ok": False, "error": "unauthorised: this daemon needs its control token (clients of the user "
                                          "who started it read it from livescope's runtime folder)"}
        request.pop("token", None)
        try:
            return self.handler(request)
        except Exception as exc:  # a failing command never takes the daemon down
            log.warning("control command %r failed: %s", request.get("cmd"), exc)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        else:
            self._sock.close(linger=0)
        if self.token is not None:
            remove_token(self.address)


class ControlClient:
    """REQ client; recreates its socket after a timeout (a REQ socket is unusable after one)."""

    def __init__(self, address: str = DEFAULT_CONTROL, timeout_s: float = 3.0,
                 context: zmq.Context | None = None, token: str | None = None) -> None:
        self.address = address
        self.token = token
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            self._sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            self._sock.connect(self.address)
        return self._sock

    def request(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        sock = self._socket()
        token = self.token or read_token(self.address)
        try:
            sock.send_json({"cmd": cmd, **kwargs, **({"token": token} if token else {})})
            return sock.recv_json()
        except zmq.Again:
            sock.close(linger=0)
            self._sock = None
            raise ControlTimeout(
                f"no answer from a livescope daemon at {self.address} within {self.timeout_ms / 1000:.0f} s; "
                "is it running (`livescope daemon`)? pass its address with --control"
            ) from None

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
