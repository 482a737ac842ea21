"""Event-driven acquisition latency: from the frame that triggers an event to the first frame
acquired at the new interval, on a real pymmcore-plus MDA (the built-in simulated microscope)
streaming into a daemon whose engine flags one frame, with the AdaptiveTimelapse policy.

    python bench/bench_feedback.py [--repeats 5] [--slow 1.0] [--fast 0.05]

Prints the latency split: acquisition of the trigger -> event emitted by the daemon -> event
received by the policy -> first fast frame acquired.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def one_run(slow: float, fast: float, trigger_t: int = 4) -> dict[str, float]:
    from livescope.bridges.feedback import AdaptiveTimelapse, EventFollower
    from livescope.bridges.mmcore import attach
    from livescope.bridges.sim import SimConfig, SimMicroscope
    from livescope.bridges.transport import free_tcp_address
    from livescope.daemon.config import DaemonConfig
    from livescope.daemon.control import ControlServer
    from livescope.daemon.pipeline import Pipeline
    from livescope.engines import register_engine

    @register_engine("bench_flag")
    class Flag:
        name = "bench_flag"
        outputs = ()

        def setup(self, spec):
            pass

        def process(self, frame, info):
            if info.index.get("t") == trigger_t:
                return {"events": [{"kind": "novelty", "score": 9.0}]}
            return {}

    cfg = DaemonConfig(
        source="zmq",
        engines=["bench_flag"],
        out=None,
        ingest=free_tcp_address(),
        publish=None,
        control=free_tcp_address(),
        exit_on_end=False,
    )
    pipeline = Pipeline(cfg)
    server = ControlServer(cfg.control, pipeline.handle)
    pipeline.start()
    server.start()
    scope = SimMicroscope(SimConfig(shape=(256, 256)))
    bridge = attach(scope.core, cfg.ingest)
    policy = AdaptiveTimelapse(slow_s=slow, fast_s=fast, quiet_s=10 * fast, frames=trigger_t + 4)
    received: dict[str, float] = {}

    def on_event(ev):
        received.setdefault("t", time.monotonic())
        policy.on_event(ev)

    follower = EventFollower(cfg.control, on_event, poll_s=0.005)
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
        pipeline.close()
        scope.close()
    first_fast = min(t for t, (_, m) in acquired.items() if m == "fast")
    t_trigger = acquired[trigger_t][0]
    emitted = pipeline.events[0]["emitted"]  # wall clock
    wall_minus_mono = time.time() - time.monotonic()
    return {
        "trigger_to_event_ms": 1000 * (emitted - wall_minus_mono - t_trigger),
        "event_to_policy_ms": 1000 * (received["t"] - (emitted - wall_minus_mono)),
        "policy_to_fast_frame_ms": 1000 * (acquired[first_fast][0] - received["t"]),
        "trigger_to_fast_frame_ms": 1000 * (acquired[first_fast][0] - t_trigger),
        "first_fast_t": first_fast,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--slow", type=float, default=1.0)
    ap.add_argument("--fast", type=float, default=0.05)
    args = ap.parse_args()
    runs = [one_run(args.slow, args.fast) for _ in range(args.repeats)]
    keys = ["trigger_to_event_ms", "event_to_policy_ms", "policy_to_fast_frame_ms", "trigger_to_fast_frame_ms"]
    print(f"| latency (slow {args.slow} s -> fast {args.fast} s, {args.repeats} runs, 256x256) | median ms | max ms |")
    print("|---|---|---|")
    for k in keys:
        v = np.array([r[k] for r in runs])
        print(f"| {k.replace('_', ' ')} | {np.median(v):.1f} | {v.max():.1f} |")
    print(f"\nfirst fast frame index: {sorted({r['first_fast_t'] for r in runs})} (trigger at t=4)")


if __name__ == "__main__":
    main()
