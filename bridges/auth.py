"""Who may talk to a daemon.

The control socket binds loopback by default, but loopback is open to every user of a shared
microscope PC. So each daemon makes a random token when it starts and writes it to a file only its
user can read (``runtime_dir()``, mode 0600 in a 0700 folder on POSIX; the user's private
LocalAppData on Windows). Every control request carries the token; clients of the same user find
it by the control address. A request without the right token gets nothing but an error.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
import sys
from pathlib import Path

__all__ = ["create_token", "is_loopback", "read_token", "remove_token", "runtime_dir", "token_file", "check_token"]


def runtime_dir() -> Path:
    override = os.environ.get("LIVESCOPE_RUNTIME_DIR")
    if override:
        base = Path(override)
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home())) / "livescope" / "run"
    else:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = Path(xdg) / "livescope" if xdg else Path.home() / ".livescope" / "run"
    base.mkdir(parents=True, exist_ok=True)
    if sys.platform != "win32":
        os.chmod(base, 0o700)
    return base


def token_file(address: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", address).strip("_")
    return runtime_dir() / f"control-{name}.token"


def create_token(address: str) -> str:
    token = secrets.token_hex(16)
    path = token_file(address)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, token.encode())
    finally:
        os.close(fd)
    if sys.platform != "win32":
        os.chmod(path, 0o600)
    return token


def read_token(address: str) -> str | None:
    try:
        return token_file(address).read_text().strip() or None
    except OSError:
        return None


def remove_token(address: str) -> None:
    try:
        token_file(address).unlink()
    except OSError:
        pass


def check_token(expected: str | None, given: object) -> bool:
    if expected is None:
        return True
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


def is_loopback(address: str) -> bool:
    """tcp://127.x / localhost / [::1], ipc:// and inproc:// are local to this machine."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    m = re.match(r"^tcp://(\[?[^\]]*\]?|[^:]*):", address)
    if not m:
        return False
    host = m.group(1).strip("[]")
    return host == "localhost" or host.startswith("127.") or host == "::1"
