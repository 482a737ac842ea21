"""ZeroMQ CURVE: only clients whose key is in the allow-list get frames in, previews out, or
commands through; a non-loopback bind without keys refuses to start. Real sockets, loopback."""

from __future__ import annotations

import os
import stat
import sys
import time

import numpy as np
import pytest
import zmq

from livescope.bridges.auth import CurveClient, CurveKeysMissing, allow_client, init_keys, make_client_keys
from livescope.bridges.transport import FramePublisher, PreviewSubscriber, RestoreClient
from livescope.daemon.cli import main, run_daemon
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlClient, ControlServer, ControlTimeout
from livescope.daemon.pipeline import Pipeline
from tests.conftest import wait_for

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq was built without CURVE")


@pytest.fixture
def keys(tmp_path):
    """The daemon's keys (server + one allowed client) and an intruder's key pair that knows the
    server's public key but is not in the allow-list."""
    made = init_keys(tmp_path / "keys")
    make_client_keys(tmp_path / "intruder")
    good = CurveClient.from_dir(made["folder"])
    intruder = CurveClient(tmp_path / "intruder" / "client.key_secret", made["server_public"])
    return made, good, intruder


def test_keys_init_makes_private_keys_and_allow_refuses_secrets(tmp_path):
    folder = tmp_path / "k"
    assert main(["keys", "init", "--dir", str(folder)]) == 0
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "allowed/client.key"):
        assert (folder / name).is_file(), name
    if sys.platform != "win32":
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(folder / "allowed").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(folder / "server.key_secret").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(folder / "client.key_secret").st_mode) == 0o600
    before = (folder / "server.key_secret").read_bytes()
    assert main(["keys", "init", "--dir", str(folder)]) == 2  # never silently replaces keys
    assert (folder / "server.key_secret").read_bytes() == before
    with pytest.raises(ValueError, match="SECRET"):
        allow_client(folder / "client.key_secret", folder)
    assert main(["keys", "client", "--dir", str(tmp_path / "viewer")]) == 0
    assert (
        main(["keys", "allow", str(tmp_path / "viewer" / "client.key"), "--dir", str(folder), "--name", "viewer"]) == 0
    )
    assert (folder / "allowed" / "viewer.key").read_bytes() == (tmp_path / "viewer" / "client.key").read_bytes()


def test_non_loopback_bind_without_keys_refuses_and_names_keys_init(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIVESCOPE_KEYS_DIR", str(tmp_path / "no-keys"))
    with pytest.raises(CurveKeysMissing, match=r"not a loopback address.*livescope keys init"):
        Pipeline(DaemonConfig(source="zmq", out=None, ingest="tcp://0.0.0.0:0", publish=None, control=None))
    rc = main(
        [
            "daemon",
            "--source",
            "zmq",
            "--ingest",
            "tcp://127.0.0.1:0",
            "--publish",
            "tcp://*:0",
            "--control",
            "tcp://127.0.0.1:0",
            "--frames",
            "1",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "--publish tcp://*:0" in err and "livescope keys init" in err
    # --curve on loopback without keys: refused too, and so is an allow-list nobody is in
    with pytest.raises(CurveKeysMissing, match="livescope keys init"):
        Pipeline(
            DaemonConfig(source="zmq", out=None, ingest="tcp://127.0.0.1:0", publish=None, control=None, curve=True)
        )
    made = init_keys(tmp_path / "k")
    made["allowed"].joinpath("client.key").unlink()
    with pytest.raises(CurveKeysMissing, match="livescope keys allow"):
        Pipeline(
            DaemonConfig(
                source="zmq",
                out=None,
                ingest="tcp://127.0.0.1:0",
                publish=None,
                control=None,
                curve_dir=str(made["folder"]),
            )
        )


def test_only_allowed_keys_send_frames_see_previews_and_send_commands(keys, free_address, tmp_path):
    made, good, intruder = keys
    cfg = DaemonConfig(
        source="zmq",
        engines=["passthrough"],
        out=None,
        ingest=free_address(),
        publish=free_address(),
        control=free_address(),
        restore=free_address(),
        exit_on_end=False,
        preview_hz=50.0,
        curve=True,
        curve_dir=str(made["folder"]),
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle, curve=pipeline.curve)
    pipeline.start()
    server.start()
    subs = {
        "good": PreviewSubscriber(cfg.publish, curve=good),
        "intruder": PreviewSubscriber(cfg.publish, curve=intruder),
        "plain": PreviewSubscriber(cfg.publish),
    }
    pubs = {
        "intruder": FramePublisher(cfg.ingest, stream="intruder", curve=intruder),
        "plain": FramePublisher(cfg.ingest, stream="plain"),
    }
    good_pub = FramePublisher(cfg.ingest, stream="good", curve=good)
    seen = {name: 0 for name in subs}
    frame = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    try:
        for pub in pubs.values():  # the unwelcome frames go first: were they let in, they would come first
            for _ in range(5):
                pub.send(frame)
        sent = 0

        def good_frames_arrive_and_previews_reach_the_good_viewer():
            nonlocal sent
            good_pub.send(frame)
            sent += 1
            for name, sub in subs.items():
                seen[name] += len(sub.latest())
            return seen["good"] > 0 and pipeline.received > 0

        wait_for(
            good_frames_arrive_and_previews_reach_the_good_viewer,
            timeout=20,
            message="frames from the allowed publisher and previews at the allowed viewer",
        )
        time.sleep(0.3)  # time for anything unwelcome that got through to show
        for name, sub in subs.items():
            seen[name] += len(sub.latest())
        st = pipeline.receiver.stats()
        assert st["received"] == pipeline.received <= sent
        assert pipeline.received > 0 and st["rejected"] == 0
        assert {stream for stream, _ in pipeline.receiver._next_seq} == {"good"}  # no frame of another stream got in
        assert seen["intruder"] == 0 and seen["plain"] == 0 and seen["good"] > 0
        assert pipeline.curve.refused >= 1  # the intruder's handshakes were refused by the allow-list

        # commands: the intruder holds even the right token (same user here) and is not answered
        token = server.token
        for client in (
            ControlClient(cfg.control, timeout_s=0.5, curve=intruder, token=token),
            ControlClient(cfg.control, timeout_s=0.5, token=token),
        ):
            with pytest.raises(ControlTimeout):
                client.request("stop")
            client.close()
        assert pipeline.state == "running" and not pipeline._stop.is_set()
        # the capture-time restore socket too
        restorers = [RestoreClient(cfg.restore, timeout_s=t, curve=c) for c, t in ((intruder, 0.5), (good, 5))]
        assert restorers[0].restore(frame)[0] is None
        restored, header = restorers[1].restore(frame)
        assert restored is not None and np.array_equal(restored, frame.astype(np.float32)), header
        for r in restorers:
            r.close()
        # an allowed key stands for the token (a remote client cannot read the token file)
        client = ControlClient(cfg.control, timeout_s=3, curve=good, token="not-the-token")
        status = client.status()
        assert status["ok"] and status["curve"]["refused_clients"] >= 1
        client.close()
        # allowing a key takes effect at the next connection, without a restart
        allow_client(tmp_path / "intruder" / "client.key", made["folder"], name="intruder")
        client = ControlClient(cfg.control, timeout_s=3, curve=intruder)
        assert client.status()["ok"]
        client.close()
    finally:
        good_pub.close(0)
        for pub in pubs.values():
            pub.close(0)
        for sub in subs.values():
            sub.close()
        server.close()
        pipeline.close()
    assert pipeline.curve.closed  # the authenticator thread and the context are gone


def test_in_process_source_with_curve_uses_an_owner_only_ipc_endpoint(keys, free_address, tmp_path, monkeypatch):
    if sys.platform == "win32" or not zmq.has("ipc"):
        pytest.skip("ipc sockets are POSIX only; on Windows an in-process source with CURVE is refused")
    monkeypatch.setenv("LIVESCOPE_RUNTIME_DIR", str(tmp_path / "run"))
    made, good, _ = keys
    cfg = DaemonConfig(
        source="sim",
        engines=[],
        out=None,
        frames=4,
        ingest=free_address(),
        publish=None,
        control=None,
        sim_shape=(32, 32),
        sim_interval_s=0.0,
        curve=True,
        curve_dir=str(made["folder"]),
    )
    modes = []

    def look(pipeline):
        path = pipeline.source_ingest[len("ipc://") :]
        modes.append((stat.S_IMODE(os.stat(path).st_mode), stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode)))

    summary = run_daemon(cfg, on_started=look)
    assert summary["frames"]["received"] == 4
    assert modes == [(0o600, 0o700)]
    assert not list((tmp_path / "run").glob("*.ipc"))  # removed at stop
