"""Event feedback on the pymmcore-plus path: an engine's event switches a running MDA to a fast
interval, and a quiet period switches it back (event-driven acquisition)."""

from __future__ import annotations

import time

import numpy as np

from livescope.bridges.feedback import AdaptiveTimelapse, EventFollower
from livescope.bridges.mmcore import attach
from livescope.bridges.sim import SimConfig, SimMicroscope
from livescope.daemon.config import DaemonConfig
from livescope.daemon.control import ControlServer
from livescope.daemon.pipeline import Pipeline
from livescope.engines import register_engine


@register_engine("test_flag_t5")
class FlagT5:
    """Flags time point 5 as an event, as the decomposition flags a novel frame."""

    name = "test_flag_t5"
    outputs = ()

    def setup(self, spec):
        pass

    def process(self, frame, info):
        if info.index.get("t") == 5:
            return {"events": [{"kind": "novelty", "score": 9.0}]}
        return {}


def test_events_switch_a_running_mda_to_fast_and_back(free_address):
    cfg = DaemonConfig(
        source="zmq",
        engines=["test_flag_t5"],
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
    scope = SimMicroscope(SimConfig(shape=(32, 32)))
    bridge = attach(scope.core, cfg.ingest)
    policy = AdaptiveTimelapse(slow_s=0.6, fast_s=0.05, quiet_s=0.5, frames=20)
    follower = EventFollower(cfg.control, policy.on_event)
    acquired: dict[int, tuple[float, str]] = {}
    scope.core.mda.events.frameReady.connect(
        lambda img, ev, meta: acquired.__setitem__(ev.index["t"], (time.monotonic(), ev.metadata["livescope_mode"]))
    )
    try:
        policy.run(scope.core)
    finally:
        follower.close()
        bridge.close()
        server.close()
        summary = pipeline.close()
    assert summary["frames"]["received"] == 20
    modes = [acquired[t][1] for t in range(20)]
    first_fast = modes.index("fast")
    assert modes[:first_fast] == ["slow"] * first_fast and first_fast == 6  # right after frame 5
    # back to slow after the quiet period, and only one switch each way
    switches = [m for _, m, _ in policy.switches]
    assert switches == ["fast", "slow"]
    times = np.array([acquired[t][0] for t in range(20)])
    gaps = np.diff(times)
    assert np.all(gaps[first_fast : first_fast + 5] < 0.2)
    # slow frames are scheduled from the MDA's start, so a late first frame (cold start, a busy
    # machine: seen 0.17 s) shortens only the first gap; the ones after it show the slow interval
    assert np.all(gaps[1:5] > 0.45), gaps[:5]
    # the trigger is recorded with the event's seq, and the switch did not wait out the slow interval
    trigger = policy.switches[0][2]
    assert trigger["seq"] == 5 and trigger["event_id"] == 1
    latency = times[first_fast] - times[5]
    assert latency < 0.45, latency  # the slow interval is 0.6 s: the switch did not wait it out
    assert follower.handled == 1 and follower.errors == 0
