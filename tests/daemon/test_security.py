from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import zmq

from livescope.bridges.auth import is_loopback, read_token, token_file
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlClient, ControlServer
from livescope.daemon.pipeline import Pipeline

from tests.conftest import wait_for


def test_control_requires_the_token_and_the_token_file_is_private(free_address):
    cfg = DaemonConfig(source="zmq", engines=["passthrough"], out=None, ingest=free_address(), publish=None,
                       control=free_address(), exit_on_end=False)
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    try:
        path = token_file(cfg.control)
        assert path.exists() and read_token(cfg.control) == server.token
        if sys.platform != "win32":
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        intruder = zmq.Context.instance().socket(zmq.REQ)
        intruder.setsockopt(zmq.RCVTIMEO, 3000)
        intruder.connect(cfg.control)
        for request in ({"cmd": "stop"}, {"cmd": "disable", "engine": "passthrough"}, {"cmd": "status"},
                        {"cmd": "stop", "token": "0" * 32}):
            intruder.send(json.dumps(request).encode())
            reply = json.loads(intruder.recv())
            assert reply["ok"] is False and "unauthorised" in reply["error"] and "frames" not in reply
        intruder.close(0)
        assert server.unauthorised == 4
        assert pipeline.state == "running" and pipeline.engine_states["passthrough"].enabled
        client = ControlClient(cfg.control)  # the same user: finds the token
        assert client.status()["ok"]
        client.close()
    finally:
        server.close()
        pipeline.close()
    assert not token_file(cfg.control).exists()  # removed when the daemon stops


@pytest.mark.parametrize("address, local", [("tcp://127.0.0.1:5570", True), ("tcp://localhost:1", True),
                                             ("tcp://[::1]:5", True), ("ipc:///tmp/x", True),
                                             ("tcp://0.0.0.0:5570", False), ("tcp://192.168.1.4:5570", False),
                                             ("tcp://*:5570", False)])
def test_loopback_detection(address, local):
    assert is_loopback(address) is local


def test_non_loopback_bind_is_refused_without_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("LIVESCOPE_KEYS_DIR", str(tmp_path / "no-keys"))  # whatever keys this machine has
    with pytest.raises(OSError, match="CURVE.*livescope keys init"):
        Pipeline(DaemonConfig(source="zmq", out=None, ingest="tcp://0.0.0.0:0", publish=None, control=None))


def test_fuzzed_control_requests_never_crash_the_server(free_address):
    import math

    from hypothesis import given, settings
    from hypothesis import strategies as st

    cfg = DaemonConfig(source="zmq", engines=["passthrough"], out=None, ingest=free_address(), publish=None,
                       control=None, exit_on_end=False)
    pipeline = Pipeline(cfg)
    server = ControlServer(free_address(), pipeline.handle, require_token=False)
    pipeline.start()
    values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                                    st.text(max_size=20)),
                          lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5),
                                                                                            children, max_size=4),
                          max_leaves=10)
    commands = st.sampled_from(["status", "set", "enable", "disable", "swap_model", "events", "emit", "fit",
                                "nonsense", "", "STATUS"])

    @settings(max_examples=150, deadline=None)
    @given(cmd=commands, extra=st.dictionaries(st.sampled_from(["engine", "param", "value", "path", "after",
                                                                 "limit", "event", "frames", "steps", "seconds"]),
                                               values, max_size=5))
    def check(cmd, extra):
        request = {"cmd": cmd, **extra}
        try:
            body = json.dumps(request, allow_nan=True).encode()
        except (TypeError, ValueError):
            return
        reply = server.handle_bytes(body)
        assert isinstance(reply, dict) and "ok" in reply
        json.dumps(reply, default=str)  # always serialisable

    try:
        check()
        # deeply nested and non-UTF-8 bodies
        for body in (b"[" * 5000 + b"]" * 5000, b'{"cmd": "status", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                     b"\xff\xfe\xfd", b'{"cmd": ' + b'"' + b"a" * 70000 + b'"}'):
            reply = server.handle_bytes(body)
            assert reply["ok"] is False
        assert pipeline.state == "running" and server.handle_bytes(b'{"cmd": "status"}')["ok"]
        assert not math.isnan(pipeline.status()["uptime_s"])
    finally:
        server.close()
        pipeline.close()


@pytest.mark.skipif(sys.platform == "win32" or not zmq.has("ipc"), reason="ipc sockets are POSIX only")
def test_ipc_sockets_the_daemon_binds_are_owner_only(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    os.chmod(folder, 0o755)  # a folder others may enter: the socket files themselves must keep them out
    names = ("ingest", "publish", "control", "restore")
    addresses = {name: f"ipc://{folder}/{name}" for name in names}
    cfg = DaemonConfig(source="zmq", engines=[], out=None, exit_on_end=False, **addresses)
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    try:
        def modes():
            return {n: stat.S_IMODE(os.stat(folder / n).st_mode) if (folder / n).exists() else None for n in names}

        # the restore socket is bound by its own thread: wait for it
        wait_for(lambda: set(modes().values()) == {0o600}, timeout=5, message="0600 on every socket file")
        client = ControlClient(cfg.control)
        assert client.status()["ok"]  # the owner still connects
        client.close()
    finally:
        server.close()
        pipeline.close()
