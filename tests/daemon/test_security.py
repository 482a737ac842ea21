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
    cfg = DaemonConfig(
        source="zmq",
        engines=["passthrough"],
        out=None,
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
    )
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
        for request in (
            {"cmd": "stop"},
            {"cmd": "disable", "engine": "passthrough"},
            {"cmd": "status"},
            {"cmd": "stop", "token": "0" * 32},
        ):
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


@pytest.mark.parametrize(
    "address, local",
    [
        ("tcp://127.0.0.1:5570", True),
        ("tcp://localhost:1", True),
        ("tcp://[::1]:5", True),
        ("ipc:///tmp/x", True),
        ("tcp://0.0.0.0:5570", False),
        ("tcp://192.168.1.4:5570", False),
        ("tcp://*:5570", False),
    ],
)
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

    cfg = DaemonConfig(
        source="zmq",
        engines=["passthrough"],
        out=None,
        ingest=free_address(),
        publish=None,
        control=None,
        exit_on_end=False,
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(free_address(), pipeline.handle, require_token=False)
    pipeline.start()
    values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=20)),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4),
        max_leaves=10,
    )
    commands = st.sampled_from(
        ["status", "set", "enable", "disable", "swap_model", "events", "emit", "fit", "nonsense", "", "STATUS"]
    )

    @settings(max_examples=150, deadline=None)
    @given(
        cmd=commands,
        extra=st.dictionaries(
            st.sampled_from(
                ["engine", "param", "value", "path", "after", "limit", "event", "frames", "steps", "seconds"]
            ),
            values,
            max_size=5,
        ),
    )
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
        for body in (
            b"[" * 5000 + b"]" * 5000,
            b'{"cmd": "status", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}",
            b"\xff\xfe\xfd",
            b'{"cmd": ' + b'"' + b"a" * 70000 + b'"}',
        ):
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


def _send_and_see_dropped(address: str, parts: list[bytes]) -> None:
    """Send one message from a fresh DEALER and wait until the daemon's end disconnects it (what
    libzmq does with a message part over ZMQ_MAXMSGSIZE); fails if that never happens."""
    from zmq.utils.monitor import recv_monitor_message

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(address)
        sock.send_multipart(parts, copy=False)
        assert monitor.poll(20000), "the oversize message was not refused (no disconnect within 20 s)"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)


def test_an_oversize_control_message_is_dropped_by_libzmq_and_the_daemon_still_answers(free_address):
    cfg = DaemonConfig(
        source="zmq",
        engines=[],
        out=None,
        ingest=free_address(),
        publish=None,
        control=free_address(),
        exit_on_end=False,
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    try:
        _send_and_see_dropped(cfg.control, [b"", b"x" * (64 << 20)])  # no token, 64 MB
        # a message of too many parts is read, counted and let go
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(cfg.control)
        dealer.send_multipart([b"", *[b"{}"] * 50])
        wait_for(lambda: server.bad_requests == 1, timeout=5, message="the many-part message counted")
        dealer.close(0)
        client = ControlClient(cfg.control)
        assert client.status()["ok"]
        client.close()
        # the 64 MB message never reached Python: not read, not counted as unauthorised or too large
        assert server.unauthorised == 0 and server.bad_requests == 1
    finally:
        server.close()
        pipeline.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc (Linux)")
def test_the_daemon_process_does_not_grow_on_oversize_control_messages(free_address):
    import subprocess
    import threading

    def peak_mb(pid: int) -> float:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024

    control = free_address()
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livescope",
            "daemon",
            "--source",
            "zmq",
            "--ingest",
            free_address(),
            "--publish",
            free_address(),
            "--control",
            control,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = ControlClient(control, timeout_s=10)
    try:
        wait_for(lambda: client.status()["ok"], timeout=60, message="the daemon answers")  # its token exists
        before = peak_mb(daemon.pid)
        # two at once, 96 MB each, without the token
        refused: list[bool] = []

        def send() -> None:
            _send_and_see_dropped(control, [b"", bytes(96 << 20)])
            refused.append(True)

        senders = [threading.Thread(target=send) for _ in range(2)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        assert refused == [True, True], "a 96 MB message was not refused"
        assert client.status()["ok"]
        grown = peak_mb(daemon.pid) - before
        assert grown < 32, f"the daemon's peak RSS grew {grown:.0f} MB on two refused 96 MB messages"
        assert client.request("stop")["ok"]
        assert daemon.wait(30) == 0
    finally:
        client.close()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def test_control_paths_are_confined_to_the_output_folder_and_errors_tell_nothing(tmp_path, free_address):
    out = tmp_path / "run.zarr"
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.lsmodel"
    secret.write_bytes(b"not a zip")
    absent = outside / "absent.lsmodel"
    cfg = DaemonConfig(
        source="zmq",
        engines=["denoise", "deconvolve", "decompose"],
        out=out,
        ingest=free_address(),
        publish=None,
        control=None,
        exit_on_end=False,
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(free_address(), pipeline.handle, require_token=False)
    pipeline.start()

    def ask(**request):
        return server.handle_bytes(json.dumps(request).encode())

    try:
        before = {n: dict(s.params) for n, s in pipeline.engine_states.items()}
        path_params = [
            ("denoise", "model"),
            ("denoise", "calibration"),
            ("deconvolve", "psf"),
            ("deconvolve", "model"),
            ("decompose", "model"),
            ("decompose", "fit_out"),
        ]
        for engine, param in path_params:
            for value in (str(secret), str(absent), "../outside/secret.lsmodel", "/etc/shadow"):
                reply = ask(cmd="set", engine=engine, param=param, value=value)
                assert reply["ok"] is False and "outside the output folder" in reply["error"], (engine, param, reply)
            # an existing and a missing file outside get the same answer, but for the name itself
            errors = [
                ask(cmd="set", engine=engine, param=param, value=str(p))["error"].replace(str(p), "P")
                for p in (secret, absent)
            ]
            assert errors[0] == errors[1]
        swaps = [
            ask(cmd="swap_model", engine="denoise", path=str(p))["error"].replace(str(p), "P") for p in (secret, absent)
        ]
        assert swaps[0] == swaps[1] and "outside the output folder" in swaps[0]
        if sys.platform != "win32":
            (out / "link.lsmodel").symlink_to(secret)  # a link inside that leads outside
            assert "outside" in ask(cmd="set", engine="denoise", param="model", value="link.lsmodel")["error"]
        assert {n: dict(s.params) for n, s in pipeline.engine_states.items()} == before  # nothing taken
        # inside the output folder: taken, as an absolute path there
        assert ask(cmd="set", engine="deconvolve", param="psf", value="psf.tif")["ok"]
        assert pipeline.engine_states["deconvolve"].params["psf"] == str((out / "psf.tif").resolve())
        assert ask(cmd="set", engine="deconvolve", param="psf", value=[[0, 1, 0], [1, 4, 1], [0, 1, 0]])["ok"]
        # a misspelled parameter is refused before it is stored for the next stream
        reply = ask(cmd="set", engine="denoise", param="modle", value="x.lsmodel")
        assert reply["ok"] is False and "has no parameter 'modle'" in reply["error"]
        assert "modle" not in pipeline.engine_states["denoise"].params
    finally:
        server.close()
        pipeline.close()


def test_emitted_events_get_the_daemons_ids_and_followers_keep_up(free_address):
    cfg = DaemonConfig(
        source="zmq", engines=[], out=None, ingest=free_address(), publish=None, control=None, exit_on_end=False
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(free_address(), pipeline.handle, require_token=False)
    pipeline.start()

    def ask(**request):
        return server.handle_bytes(json.dumps(request).encode())

    try:
        first = ask(cmd="emit", event={"id": "abc", "kind": "click", "emitted": "yesterday"})["event"]
        assert first["id"] == 1 and first["source_id"] == "abc" and first["source_emitted"] == "yesterday"
        assert isinstance(first["emitted"], float)
        assert ask(cmd="emit", event={"id": 1e15, "kind": "click"})["event"]["id"] == 2
        reply = ask(cmd="events", after=0)
        assert reply["ok"] and [e["id"] for e in reply["events"]] == [1, 2] and reply["last"] == 2
        third = pipeline.add_event({"id": -5, "kind": "engine"})  # an engine's event: numbered the same way
        assert third["id"] == 3 and third["source_id"] == -5
        assert [e["id"] for e in ask(cmd="events", after=reply["last"])["events"]] == [3]  # a follower sees it
        for bad in ([1, 2], "text", {"big": "x" * 5000}):
            refused = ask(cmd="emit", event=bad)
            assert refused["ok"] is False and "emit" in refused["error"]
        assert ask(cmd="events", after=True)["ok"] is False
        assert ask(cmd="events", after=0)["last"] == 3
    finally:
        server.close()
        pipeline.close()
