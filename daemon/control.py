"""The control socket: JSON commands over ZeroMQ ROUTER (daemon) / REQ (clients).

Commands: ``{"cmd": "status"}``, ``{"cmd": "stop"}``,
``{"cmd": "set", "engine": E, "param": P, "value": V}``, ``{"cmd": "enable"|"disable", "engine": E}``,
``{"cmd": "swap_model", "engine": E, "path": MODEL}``. Replies are JSON objects with ``ok``.
A malformed request gets ``{"ok": false, "error": ...}``; the server keeps running. A message part
over 64 kB never reaches the daemon: libzmq drops it, and disconnects its sender, before taking
memory for it (``ZMQ_MAXMSGSIZE``).

Who may send commands: on a plain (loopback) socket, whoever holds the daemon's token (only its
user can read it). With CURVE (``curve=``), only clients whose key is in the allow-list connect at
all, and the allowed key stands for the token: a client on another machine cannot read the token
file, and a request over CURVE carries the client's verified key.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import zmq

from ..bridges.auth import check_token, create_token, read_token, remove_token, restrict_ipc
from ..bridges.transport import DEFAULT_CONTROL

if TYPE_CHECKING:
    from ..bridges.auth import CurveClient, CurveServer

__all__ = ["ControlClient", "ControlServer", "ControlTimeout"]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 1 << 16
MAX_REQUEST_PARTS = 4  # identity, delimiter, body (a REQ client); anything longer is not a request


class ControlTimeout(TimeoutError):
    pass


class ControlServer:
    def __init__(
        self,
        address: str,
        handler: Callable[[dict[str, Any]], dict[str, Any]],
        context: zmq.Context | None = None,
        *,
        require_token: bool = True,
        curve: CurveServer | None = None,
    ) -> None:
        self.address = address
        self.handler = handler
        self.bad_requests = 0
        self.unauthorised = 0
        self._curve = curve
        self._ctx = curve.acquire() if curve is not None else context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        # libzmq drops a larger message part, and disconnects its sender, before allocating it: no
        # request is held in memory before it is checked (the slack covers CURVE's envelope)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES + 1024)
        if curve is not None:
            curve.secure(self._sock)
        try:
            self._sock.bind(address)
            restrict_ipc(address)  # an ipc control socket: only this user may connect
        except zmq.ZMQError as exc:
            self._sock.close()
            if curve is not None:
                curve.release()
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
            parts = self._recv_parts()
            if not 3 <= len(parts) <= MAX_REQUEST_PARTS:
                self.bad_requests += 1
                continue
            ident, body = parts[0].bytes, parts[-1]
            reply = self.handle_bytes(body.bytes, curve_client=self._curve_user(body))
            try:
                self._sock.send_multipart([ident, b"", json.dumps(reply, default=str).encode()], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the client went away
        self._sock.close(linger=0)
        if self._curve is not None:
            self._curve.release()

    def _recv_parts(self) -> list[zmq.Frame]:
        """One message's parts, keeping at most one more than a request has (the rest are read
        and let go, so a message of many parts is not held twice)."""
        parts = [self._sock.recv(copy=False)]
        while parts[-1].more:
            part = self._sock.recv(copy=False)
            if len(parts) <= MAX_REQUEST_PARTS:
                parts.append(part)
            else:
                parts[-1] = part  # keep the last one: its ``more`` flag ends the loop
        return parts

    def _curve_user(self, frame: zmq.Frame) -> str | None:
        """The client key ZAP verified for this message (CURVE only), else None."""
        if self._curve is None:
            return None
        try:
            user = frame.get("User-Id")
            return str(user) if user else None
        except zmq.ZMQError:
            return None

    def handle_bytes(self, body: bytes, *, curve_client: str | None = None) -> dict[str, Any]:
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
        if curve_client is None and not check_token(self.token, request.get("token")):
            self.unauthorised += 1
            return {
                "ok": False,
                "error": "unauthorised: this daemon needs its control token (clients of the user "
                "who started it read it from livescope's runtime folder)",
            }
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
        elif not self._sock.closed:
            self._sock.close(linger=0)
            if self._curve is not None:
                self._curve.release()
        if self.token is not None:
            remove_token(self.address)


class ControlClient:
    """REQ client; recreates its socket after a timeout (a REQ socket is unusable after one)."""

    def __init__(
        self,
        address: str = DEFAULT_CONTROL,
        timeout_s: float = 3.0,
        context: zmq.Context | None = None,
        token: str | None = None,
        curve: CurveClient | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self.curve = curve
        self.timeout_ms = int(timeout_s * 1000)
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVTIMEO, self.timeout_ms)
            self._sock.setsockopt(zmq.SNDTIMEO, self.timeout_ms)
            if self.curve is not None:
                self.curve.secure(self._sock)
            self._sock.connect(self.address)
        return self._sock

    def request(self, cmd: str, **kwargs: Any) -> dict[str, Any]:
        sock = self._socket()
        token = self.token or read_token(self.address)
        try:
            sock.send_json({"cmd": cmd, **kwargs, **({"token": token} if token else {})})
            reply = sock.recv_json()
            if not isinstance(reply, dict):
                raise RuntimeError(
                    f"the daemon at {self.address} answered {reply!r}, not a reply object: "
                    "is another program listening on that control address?"
                )
            return reply
        except zmq.Again:
            sock.close(linger=0)
            self._sock = None
            hint = (
                "if it runs CURVE, pass --curve or --curve-dir"
                if self.curve is None
                else "with CURVE, a daemon also stays silent to a key not in its allow-list (`livescope keys allow`)"
            )
            raise ControlTimeout(
                f"no answer from a livescope daemon at {self.address} within {self.timeout_ms / 1000:g} s; "
                f"is it running (`livescope daemon`)? pass its address with --control; {hint}"
            ) from None

    def status(self) -> dict[str, Any]:
        return self.request("status")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
