"""Who may talk to a daemon.

The control socket binds loopback by default, but loopback is open to every user of a shared
microscope PC. So each daemon makes a random token when it starts and writes it to a file only its
user can read (``runtime_dir()``, mode 0600 in a 0700 folder on POSIX; the user's private
LocalAppData on Windows). Every control request carries the token; clients of the same user find
it by the control address. A request without the right token gets nothing but an error.

Any address other than loopback needs ZeroMQ CURVE (and loopback may ask for it too, which also
closes the previews to other users of the PC): the daemon's sockets get the server's key pair
(:class:`CurveServer`) and accept only clients whose public key lies in the allow-list folder;
clients carry their own key pair and the server's public key (:class:`CurveClient`). Keys are made
by ``livescope keys init`` (:func:`init_keys`) in a folder only the user can read.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
from pathlib import Path

import zmq

__all__ = [
    "CurveClient",
    "CurveKeysMissing",
    "CurveServer",
    "allow_client",
    "check_token",
    "create_token",
    "default_keys_dir",
    "init_keys",
    "is_loopback",
    "make_client_keys",
    "private_ipc_address",
    "read_token",
    "remove_token",
    "restrict_ipc",
    "runtime_dir",
    "token_file",
]

log = logging.getLogger(__name__)


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


def private_ipc_address(name: str) -> str:
    """An ipc:// address in the user-private runtime folder (0700): other users cannot connect.

    libzmq creates the socket file with the process umask, so the folder is what keeps it private;
    the file is also set to 0600 by :func:`restrict_ipc` after the bind."""
    if sys.platform == "win32" or not zmq.has("ipc"):
        raise OSError("ipc sockets are not available on this platform")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    path = runtime_dir() / f"{safe}-{os.getpid()}-{secrets.token_hex(3)}.ipc"
    if len(str(path)) > 100:  # the AF_UNIX path limit is ~107 bytes
        raise OSError(f"the runtime folder path is too long for an ipc socket: {path}; set LIVESCOPE_RUNTIME_DIR")
    return f"ipc://{path}"


def restrict_ipc(address: str) -> None:
    """Owner-only permissions on a bound ipc socket file (POSIX)."""
    if address.startswith("ipc://") and sys.platform != "win32":
        try:
            os.chmod(address[len("ipc://") :], 0o600)
        except OSError:
            pass


# -- CURVE -------------------------------------------------------------------------------------
# The key folder: server.key (public) + server.key_secret, client.key + client.key_secret, and
# allowed/ holding the public keys of every client the daemon accepts.
SERVER, CLIENT, ALLOWED = "server", "client", "allowed"


class CurveKeysMissing(OSError):
    """The CURVE key files livescope needs are not there (the message says how to make them)."""


def default_keys_dir() -> Path:
    """``$LIVESCOPE_KEYS_DIR``, else ``%APPDATA%\\livescope\\keys`` on Windows, else
    ``$XDG_CONFIG_HOME/livescope/keys`` (``~/.config/livescope/keys``)."""
    override = os.environ.get("LIVESCOPE_KEYS_DIR")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("APPDATA", Path.home())) / "livescope" / "keys"
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "livescope" / "keys"


def _keys_dir(folder: str | os.PathLike | None) -> Path:
    return Path(folder).expanduser() if folder else default_keys_dir()


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if sys.platform != "win32":  # Windows: the user's profile folder is already private
        os.chmod(path, 0o700)
    return path


def _make_pair(folder: Path, name: str, overwrite: bool) -> tuple[Path, Path]:
    import zmq.auth

    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    if secret.exists() and not overwrite:
        raise FileExistsError(
            f"{secret} exists; keep it, or replace it with --force (clients holding the old key will be refused)"
        )
    for path in (public, secret):
        path.unlink(missing_ok=True)
    public_s, secret_s = zmq.auth.create_certificates(str(folder), name)
    if sys.platform != "win32":
        os.chmod(secret_s, 0o600)
        os.chmod(public_s, 0o644)
    return Path(public_s), Path(secret_s)


def init_keys(folder: str | os.PathLike | None = None, *, overwrite: bool = False) -> dict[str, Path]:
    """Make a server key pair, a client key pair and an allow-list holding that client's key."""
    folder = _private_dir(_keys_dir(folder))
    server_public, server_secret = _make_pair(folder, SERVER, overwrite)
    client_public, client_secret = _make_pair(folder, CLIENT, overwrite)
    allowed = _private_dir(folder / ALLOWED)
    shutil.copyfile(client_public, allowed / client_public.name)
    return {
        "folder": folder,
        "server_public": server_public,
        "server_secret": server_secret,
        "client_public": client_public,
        "client_secret": client_secret,
        "allowed": allowed,
    }


def make_client_keys(folder: str | os.PathLike | None = None, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A client key pair only (on a viewer's machine): returns (public, secret)."""
    return _make_pair(_private_dir(_keys_dir(folder)), CLIENT, overwrite)


def allow_client(
    public_key_file: str | os.PathLike, folder: str | os.PathLike | None = None, name: str | None = None
) -> Path:
    """Copy a client's public key into the allow-list of the keys in ``folder``."""
    import zmq.auth

    src = Path(public_key_file)
    try:
        _, secret = zmq.auth.load_certificate(src)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{src} is not a ZeroMQ public key file: {exc}") from None
    if secret is not None:
        raise ValueError(
            f"{src} holds a SECRET key: give the client's public key file (the .key, not "
            ".key_secret); a secret key never leaves its machine"
        )
    allowed = _private_dir((_keys_dir(folder)) / ALLOWED)
    dest = allowed / f"{name or src.stem}.key"
    if dest.exists() and dest.read_bytes() != src.read_bytes():
        raise FileExistsError(f"{dest} holds another key; choose another name (--name)")
    shutil.copyfile(src, dest)
    return dest


def _load_pair(folder: Path, name: str, what: str) -> tuple[bytes, bytes]:
    import zmq.auth

    path = folder / f"{name}.key_secret"
    if not path.exists():
        raise CurveKeysMissing(
            f"no CURVE {what} key at {path}. Make the keys with `livescope keys init` (or `livescope keys init "
            f"--dir {folder}`), then on each client machine use the client key pair and the server's public key "
            "(docs/reliability.md#curve)"
        )
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise CurveKeysMissing(f"{path} holds no secret key; recreate the keys with `livescope keys init --force`")
    return public, secret


class _AllowList:
    """ZAP credentials provider: public keys in the allow-list folder, re-read when it changes (a
    ``livescope keys allow`` takes effect without a restart); refusals are counted."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.refused = 0
        self._keys: set[bytes] = set()
        self._stamp: tuple = ()
        self._warned = 0.0
        self._reload()

    def _reload(self) -> None:
        import zmq.auth

        files = sorted(self.folder.glob("*.key"))
        stamp = tuple((f.name, f.stat().st_mtime_ns) for f in files)
        if stamp == self._stamp:
            return
        keys = set()
        for f in files:
            try:
                keys.add(zmq.auth.load_certificate(f)[0])
            except (OSError, ValueError) as exc:
                log.warning("allow-list: skipping %s (%s)", f, exc)
        self._keys, self._stamp = keys, stamp

    def callback(self, domain: str, client_key: bytes) -> bool:
        self._reload()
        if client_key in self._keys:
            return True
        self.refused += 1
        now = time.monotonic()
        if now - self._warned > 10:  # a scanner must not flood the log
            self._warned = now
            log.warning("refused a CURVE client whose key is not in %s (%d refused so far)", self.folder, self.refused)
        return False


class CurveServer:
    """CURVE for every socket a daemon binds: one context whose ZAP handler checks client keys
    against the allow-list. Sockets made with ``acquire()``'s context and passed to ``secure()``
    before ``bind`` accept only allowed clients; the last ``release()`` stops it."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        from zmq.auth.thread import ThreadAuthenticator

        self.folder = _keys_dir(folder)
        self.public_key, self._secret_key = _load_pair(self.folder, SERVER, "server")
        allowed = self.folder / ALLOWED
        if not allowed.is_dir() or not any(allowed.glob("*.key")):
            raise CurveKeysMissing(
                f"no client keys allowed in {allowed}: nobody could connect. Allow one with `livescope keys allow "
                f"CLIENT.key --dir {self.folder}` (or make a fresh set with `livescope keys init`)"
            )
        self.allow_list = _AllowList(allowed)
        self.context = zmq.Context()
        self._auth = ThreadAuthenticator(self.context, log=logging.getLogger(__name__ + ".zap"))
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=self.allow_list)
        self._users = 0
        self._lock = threading.Lock()
        self.closed = False

    @property
    def refused(self) -> int:
        return self.allow_list.refused

    def secure(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self.public_key
        sock.curve_server = True

    def acquire(self) -> zmq.Context:
        with self._lock:
            if self.closed:
                raise RuntimeError("this CurveServer was closed; create a new one")
            self._users += 1
        return self.context

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users <= 0
        if last:
            self.close()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        self._auth.stop()
        self.context.term()  # the sockets of every user are closed by now


class CurveClient:
    """The client side: our key pair and the server's public key, set on a socket before connect.

    ``CurveClient.from_dir(D)`` reads ``D/client.key_secret`` and ``D/server.key`` (the layout that
    ``livescope keys init`` / ``livescope keys client`` make)."""

    def __init__(self, client_secret_file: str | os.PathLike, server_public_file: str | os.PathLike) -> None:
        import zmq.auth

        self.public_key, secret = zmq.auth.load_certificate(client_secret_file)
        if secret is None:
            raise CurveKeysMissing(f"{client_secret_file} holds no secret key: give the client's .key_secret file")
        self._secret_key = secret
        try:
            self.server_key = zmq.auth.load_certificate(server_public_file)[0]
        except OSError:
            raise CurveKeysMissing(
                f"no server public key at {server_public_file}: copy the daemon's server.key "
                "there (it is public; the daemon's keys folder has it)"
            ) from None

    @classmethod
    def from_dir(cls, folder: str | os.PathLike | None = None) -> CurveClient:
        folder = _keys_dir(folder)
        secret = folder / f"{CLIENT}.key_secret"
        if not secret.exists():
            raise CurveKeysMissing(
                f"no CURVE client key at {secret}: make one with `livescope keys client --dir "
                f"{folder}` and allow its .key on the daemon's PC (`livescope keys allow`), or "
                "use the keys `livescope keys init` made"
            )
        return cls(secret, folder / f"{SERVER}.key")

    def secure(self, sock: zmq.Socket) -> None:
        sock.curve_secretkey = self._secret_key
        sock.curve_publickey = self.public_key
        sock.curve_serverkey = self.server_key
