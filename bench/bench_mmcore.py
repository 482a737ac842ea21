"""How much the pymmcore-plus bridge slows an MDA: the same UniMMCore acquisition (the built-in
simulated camera, interval 0) with and without ``livescope.bridges.mmcore.attach``, side by side.

    python bench/bench_mmcore.py [--frames 300] [--size 512]

The daemon (a FrameReceiver draining into memory) runs in another process, as in real use.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np


def _drain(address: str, n: int, ready, done) -> None:
    from livescope.bridges.transport import FrameReceiver

    rx = FrameReceiver(address)
    ready.set()
    got = 0
    deadline = time.monotonic() + 120
    while got < n and time.monotonic() < deadline:
        if rx.recv(100) is not None:
            got += 1
    done.put(got)
    rx.close()


def _run(frames: int, size: int, address: str | None) -> tuple[float, dict]:
    from livescope.bridges.mmcore import attach
    from livescope.bridges.sim import SimConfig, SimMicroscope

    scope = SimMicroscope(SimConfig(shape=(size, size)))
    # render cost is part of both runs; pre-render so the camera itself costs ~nothing
    frame = scope.sample.render(0)
    scope.sample.render = lambda *a, out=None, **k: np.copyto(out, frame) if out is not None else frame  # type: ignore
    bridge = attach(scope.core, address) if address else None
    seq = scope.sequence(frames=frames, interval_s=0)
    t0 = time.perf_counter()
    scope.core.mda.run(seq)
    elapsed = time.perf_counter() - t0
    stats = {}
    if bridge:
        deadline = time.monotonic() + 60
        while bridge.stats()["queued"] and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = bridge.stats()
        bridge.close()
    return elapsed, stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    from livescope.bridges.transport import free_tcp_address

    base, _ = _run(args.frames, args.size, None)
    addr = free_tcp_address()
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_drain, args=(addr, args.frames, ready, done))
    proc.start()
    ready.wait(30)
    bridged, stats = _run(args.frames, args.size, addr)
    received = done.get(timeout=120)
    proc.join(10)
    print(f"| MDA of {args.frames} frames {args.size}x{args.size} uint16 | ms/frame | frames/s |")
    print("|---|---|---|")
    print(f"| no bridge | {1000 * base / args.frames:.3f} | {args.frames / base:.0f} |")
    print(
        f"| with livescope bridge (daemon in another process) | {1000 * bridged / args.frames:.3f} | "
        f"{args.frames / bridged:.0f} |"
    )
    print(
        f"\nslow-down: {bridged / base:.3f}x; sent {stats.get('sent')}, dropped {stats.get('dropped')}, "
        f"received by the daemon {received}"
    )


if __name__ == "__main__":
    main()
