"""A stateful property-based test of the daemon's ingest (hypothesis rule-based state machine).

A model of what the daemon must hold is driven by random sequences of valid, odd-but-valid and
invalid frames from several streams, publisher restarts, shape changes and control requests. After
every step: ingest is alive, every frame has been counted (accepted or refused with a reason),
queued memory stays under the budget. At teardown the store is closed and read back: every frame
the model accepted is on disk bit-exact exactly once, nothing else is.

CI runs a bounded number of examples; ``LIVESCOPE_STATEFUL_EXAMPLES=500`` runs it long (bench).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import zarr
import zmq
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from livescope.bridges.store import STATUS, read_records
from livescope.bridges.transport import free_tcp_address
from livescope.daemon.config import DaemonConfig
from livescope.daemon.pipeline import Pipeline

SHAPES = [(8, 8), (6, 10), (4, 4)]
STREAMS = ["a", "b"]
BUDGET_MB = 4.0


def _pattern(uid: int, shape: tuple[int, int]) -> np.ndarray:
    """A frame whose pixels say who it is: every plane is distinct and checkable bit for bit."""
    return ((np.arange(shape[0] * shape[1], dtype=np.uint32).reshape(shape) * 31 + uid * 977) % 65521).astype(np.uint16)


class DaemonIngest(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pipeline: Pipeline | None = None
        self.tmp = None

    @initialize()
    def start(self) -> None:
        import tempfile
        from pathlib import Path

        self.tmp = tempfile.TemporaryDirectory(prefix="livescope-stateful-")
        self.out = Path(self.tmp.name) / "out.zarr"
        cfg = DaemonConfig(
            source="zmq",
            out=self.out,
            ingest=free_tcp_address(),
            publish=None,
            control=None,
            exit_on_end=False,
            memory_budget_mb=BUDGET_MB,
        )
        self.pipeline = Pipeline(cfg)
        self.pipeline.start()
        self.ctx = zmq.Context.instance()
        self.socks: dict[str, zmq.Socket] = {}
        self.seq: dict[str, int] = {}
        self.routed_seq: dict[str, int] = {}
        self.epoch: dict[str, int] = {}
        self.next_t: dict[tuple, int] = {}  # (stream, epoch, shape) -> next time index
        self.sent_t: dict[tuple, list[int]] = {}
        self.accepted: dict[int, np.ndarray] = {}  # uid -> pixels the daemon must save
        self.uid = 0
        self.sent = 0
        self.refused = 0
        self.unattributable = 0
        for s in STREAMS:
            self._connect(s)

    def _connect(self, stream: str) -> None:
        old = self.socks.get(stream)
        if old is not None:
            old.close(linger=5000)
        sock = self.ctx.socket(zmq.PUSH)
        sock.connect(self.pipeline.cfg.ingest)
        self.socks[stream] = sock
        self.seq[stream] = 0
        self.routed_seq[stream] = -1
        self.epoch[stream] = self.epoch.get(stream, -1) + 1

    def _send(self, stream: str, header: dict | bytes, payload: bytes | None, routed: bool = False) -> None:
        """``routed``: the frame passes the wire checks and reaches the daemon's routing."""
        head = header if isinstance(header, bytes) else json.dumps(header).encode()
        self.socks[stream].send_multipart([head] + ([payload] if payload is not None else []))
        if routed:
            self.routed_seq[stream] = self.seq[stream]
        if not isinstance(header, bytes):  # garbage carries no seq, so it takes none
            self.seq[stream] += 1
        self.sent += 1

    def _header(self, stream: str, shape, **fields) -> dict:
        return {"v": 1, "stream": stream, "seq": self.seq[stream], "shape": list(shape), "dtype": "uint16", **fields}

    # -- rules -----------------------------------------------------------------------------
    @rule(stream=st.sampled_from(STREAMS), shape=st.sampled_from(SHAPES))
    def valid_frame(self, stream, shape) -> None:
        key = (stream, self.epoch[stream], shape)
        t = self.next_t.get(key, 0)
        self.uid += 1
        arr = _pattern(self.uid, shape)
        self._send(stream, self._header(stream, shape, index={"t": t}, channel="GFP"), arr.tobytes(), routed=True)
        self.next_t[key] = t + 1
        self.sent_t.setdefault(key, []).append(t)
        self.accepted[self.uid] = arr

    @rule(stream=st.sampled_from(STREAMS), shape=st.sampled_from(SHAPES))
    def odd_but_valid_frame(self, stream, shape) -> None:
        # metadata a sender owns (passed on untouched), a camera block, sampling in odd units
        key = (stream, self.epoch[stream], shape)
        t = self.next_t.get(key, 0)
        self.uid += 1
        arr = _pattern(self.uid, shape)
        header = self._header(
            stream,
            shape,
            index={"t": t},
            meta={"channels": 3, "x": [1, {"y": None}]},
            camera={"offset": 100, "gain": 0.5},
            interval_s=0.0,
            binning=2,
        )
        self._send(stream, header, arr.tobytes(), routed=True)
        self.next_t[key] = t + 1
        self.sent_t.setdefault(key, []).append(t)
        self.accepted[self.uid] = arr

    @rule(
        stream=st.sampled_from(STREAMS),
        kind=st.sampled_from(["bad_json", "size_mismatch", "binning", "sizes", "outside_sizes", "huge_t", "bad_dtype"]),
    )
    def invalid_frame(self, stream, kind) -> None:
        shape = SHAPES[0]
        payload = np.zeros(shape, np.uint16).tobytes()
        key = (stream, self.epoch[stream], shape)
        t = self.next_t.get(key, 0)
        if kind == "bad_json":  # names no stream: the receiver may also see a gap in that stream's seq
            self._send(stream, b"{not json", payload)
            self.unattributable += 1
        elif kind == "size_mismatch":
            self._send(stream, self._header(stream, shape, index={"t": t}), payload[:-2])
        elif kind == "binning":
            self._send(stream, self._header(stream, shape, index={"t": t}, binning="2x2"), payload)
        elif kind == "sizes":
            self._send(stream, self._header(stream, shape, index={"t": t}, sizes={"c": "two"}), payload)
        elif kind == "outside_sizes":
            self._send(stream, self._header(stream, shape, index={"t": t, "c": 1}, sizes={"c": 1}), payload)
        elif kind == "huge_t" and key in self.sent_t:  # a jump within an image (a new one may start anywhere)
            self._send(stream, self._header(stream, shape, index={"t": t + 10**7}), payload, routed=True)
        elif kind == "huge_t":
            return
        else:
            self._send(stream, self._header(stream, shape, index={"t": t}) | {"dtype": "complex64"}, payload)
        self.refused += 1

    @precondition(lambda self: any(self.sent_t.values()))
    @rule(data=st.data())
    def duplicate_frame(self, data) -> None:
        keys = [k for k, ts in self.sent_t.items() if ts and k[1] == self.epoch[k[0]]]
        if not keys:
            return
        stream, _, shape = data.draw(st.sampled_from(sorted(keys)))
        t = data.draw(st.sampled_from(self.sent_t[(stream, self.epoch[stream], shape)]))
        self._send(
            stream, self._header(stream, shape, index={"t": t}), np.zeros(shape, np.uint16).tobytes(), routed=True
        )
        self.refused += 1

    @precondition(lambda self: any(v >= 1 for v in self.seq.values()))
    @rule(data=st.data())
    def publisher_restarts(self, data) -> None:
        # seq from 0 again: a new segment for every shape of this stream (a restart is seen as seq
        # going back, on any message that names its stream and seq, refused or not)
        stream = data.draw(st.sampled_from(sorted(s for s, v in self.seq.items() if v >= 1)))
        self._connect(stream)  # seq from 0 again: a new segment for every shape of this stream

    @rule()
    def status_request(self) -> None:
        reply = self.pipeline.handle({"cmd": "status"})
        assert reply["ok"] and reply["state"] == "running"

    # -- after every step ------------------------------------------------------------------
    def _counted(self) -> int:
        st_ = self.pipeline.status()["frames"]
        return st_["received"] + st_["rejected"]

    @invariant()
    def every_frame_is_counted_and_ingest_is_alive(self) -> None:
        if self.pipeline is None:
            return
        deadline = time.monotonic() + 10
        while self._counted() < self.sent and time.monotonic() < deadline:
            time.sleep(0.005)
        f = self.pipeline.status()["frames"]
        assert f["received"] == len(self.accepted), json.dumps(f["rejected_by_reason"])
        assert f["rejected"] == self.refused, f
        # a refused message that still names its stream and seq is not also a lost frame; one that
        # is not even JSON cannot be told apart from a lost frame of the stream it interrupted
        assert f["lost"] <= self.unattributable, f
        alive = {t.name for t in self.pipeline._threads if t.is_alive()}
        assert "livescope-ingest" in alive and "livescope-store" in alive
        q = self.pipeline.status()["queues"]
        assert q["store_mb"] <= BUDGET_MB

    def teardown(self) -> None:
        if self.pipeline is None:
            return
        try:
            for sock in self.socks.values():
                sock.close(linger=5000)
            summary = self.pipeline.close()
            assert summary["frames"]["saved"] == len(self.accepted), summary["frames"]
            found: dict[int, int] = {}
            for image in sorted(p for p in self.out.iterdir() if p.is_dir() and p.name.startswith("raw")):
                data = zarr.open_array(str(image / "0"), mode="r")[...]
                status = read_records(image)["status"]
                for lead in zip(*np.nonzero(status == STATUS["saved"]), strict=True):
                    plane = data[lead]
                    uid = next(
                        (
                            u
                            for u, a in self.accepted.items()
                            if a.shape == plane.shape and a[0, 0] == plane[0, 0] and np.array_equal(a, plane)
                        ),
                        None,
                    )
                    assert uid is not None, f"{image.name}{lead}: a plane nobody sent as valid"
                    found[uid] = found.get(uid, 0) + 1
            assert found == {u: 1 for u in self.accepted}, "every accepted frame on disk exactly once"
        finally:
            self.tmp.cleanup()


DaemonIngest.TestCase.settings = settings(
    max_examples=int(os.environ.get("LIVESCOPE_STATEFUL_EXAMPLES", "6")),
    stateful_step_count=int(os.environ.get("LIVESCOPE_STATEFUL_STEPS", "30")),
    deadline=None,
    # a failing run shows its steps unshrunk in CI (each step is a real daemon round trip);
    # LIVESCOPE_STATEFUL_SHRINK=1 shrinks it on a developer's machine
    phases=[p for p in Phase if p != Phase.shrink or os.environ.get("LIVESCOPE_STATEFUL_SHRINK")],
    suppress_health_check=[HealthCheck.too_slow],
)
test_daemon_ingest_state_machine = DaemonIngest.TestCase
