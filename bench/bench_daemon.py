"""Daemon overhead per frame: ``run_daemon`` fed over ZeroMQ, against the bare transport.

A publisher process (multiprocessing, spawn) sends N frames of 512x512 uint16 as fast as it can
(``FramePublisher(block=True)``, so a slow daemon slows it down instead of dropping) into a daemon
run in this process with ``source="zmq"``, no preview and no control socket:

- no engines, no store: ingest only (receive, validate, route, account);
- passthrough engine, no store: + the worker thread and the engine chain;
- no engines, raw store: + the store thread writing OME-Zarr;
- passthrough + raw store (products not saved);
- passthrough + raw store + the float32 product saved.

End-to-end frames/s = N / (first send -> ``run_daemon`` returned, store flushed and closed).
References in the same run: raw pyzmq and livescope's FramePublisher -> FrameReceiver between
two processes (bench_transport.py's code), and the overhead per frame is
1/fps(daemon) - 1/fps(livescope transport).

    python bench/bench_daemon.py            # full: 3 trials of 3000 frames, ~2 min
    python bench/bench_daemon.py --quick    # 1 trial of 1000 frames, < 1 min

Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_transport as bt  # noqa: E402

from livescope.bridges.transport import FramePublisher, free_tcp_address  # noqa: E402
from livescope.daemon.cli import run_daemon  # noqa: E402
from livescope.daemon.config import DaemonConfig  # noqa: E402

SHAPE = (512, 512)
ROOT = Path(__file__).resolve().parents[1]


def _publisher(address: str, n: int, go, results) -> None:
    frames = bt._frames(SHAPE)
    # A private context, terminated below: that waits until every queued frame is delivered. With
    # the default Context.instance() a process that exits right after close() can lose its last
    # frames and crash (SIGSEGV in pyzmq's zero-copy cleanup at interpreter exit).
    ctx = zmq.Context()
    pub = FramePublisher(address, stream="bench", block=True, pixel_size_um=0.1, bits=12, context=ctx)
    go.wait(60)
    t0 = time.monotonic()
    for i in range(n):
        pub.send(frames[i % len(frames)], index={"t": i})
    t1 = time.monotonic()
    pub.end()
    pub.close(linger_s=60)
    ctx.term()
    results.put({"t_start": t0, "t_sent": t1, "sent": pub.sent, "dropped": pub.dropped})


CONFIGS = [
    ("no engines, no store", [], False, False),
    ("passthrough, no store", ["passthrough"], False, False),
    ("no engines, raw store", [], True, False),
    ("passthrough, raw store", ["passthrough"], True, False),
    ("passthrough, raw store + float32 product", ["passthrough"], True, True),
]


def _watchdog(pipeline, patience_s: float = 30.0) -> None:
    """Stop a run that stopped receiving (frames lost on the way would make it wait forever)."""
    last, since = -1, time.monotonic()
    while pipeline.state in ("starting", "running"):
        time.sleep(0.5)
        if pipeline.received != last:
            last, since = pipeline.received, time.monotonic()
        elif time.monotonic() - since > patience_s:
            print(f"watchdog: no frame for {patience_s:.0f} s at {last} received; stopping", file=sys.stderr)
            pipeline.request_stop()
            return


def run_one(engines: list[str], store: bool, products: bool, n: int, tmp: Path) -> dict:
    mp_ctx = mp.get_context("spawn")
    address = free_tcp_address()
    out = tmp / "daemon-out" if store else None
    cfg = DaemonConfig(
        source="zmq",
        engines=list(engines),
        out=out,
        overwrite=True,
        ingest=address,
        publish=None,
        control=None,
        frames=n,
        save_products=products,
    )
    go = mp_ctx.Event()
    results = mp_ctx.Queue()
    proc = mp_ctx.Process(target=_publisher, args=(address, n, go, results), daemon=True)
    proc.start()

    def started(pipeline) -> None:
        go.set()
        threading.Thread(target=_watchdog, args=(pipeline,), daemon=True).start()

    cpu0 = os.times()
    summary = run_daemon(cfg, on_started=started)
    t_done = time.monotonic()
    cpu1 = os.times()
    pub = results.get(timeout=60)
    proc.join(30)
    if out is not None:
        shutil.rmtree(out, ignore_errors=True)
    wall = t_done - pub["t_start"]
    f = summary["frames"]
    eng = summary["engines"].get("passthrough", {})
    return {
        "fps": n / wall,
        "send_fps": n / (pub["t_sent"] - pub["t_start"]),
        "received": f["received"],
        "saved": f["saved"],
        "lost": f["lost"],
        "processed": eng.get("processed", 0),
        "skipped": sum(f["skipped"].values()),
        "cpu": ((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall,
        "lat_chain": summary["latency"]["chain"].get("p50_ms"),
        "lat_store": summary["latency"]["store"].get("p50_ms"),
    }


def transport_reference(n: int, trials: int) -> dict[str, float]:
    mp_ctx = mp.get_context("spawn")
    conn, child = mp_ctx.Pipe()
    proc = mp_ctx.Process(target=bt._sender, args=(child,), daemon=True)
    proc.start()
    ctx = zmq.Context()
    out: dict[str, list[float]] = {"raw": [], "livescope": []}
    try:
        for _ in range(trials):
            for mode in ("raw", "livescope"):
                address = free_tcp_address()
                conn.send(("send", mode, address, SHAPE, n))
                out[mode].append((bt._recv_raw if mode == "raw" else bt._recv_livescope)(address, conn, n, ctx))
    finally:
        conn.send(("quit",))
        proc.join(10)
        ctx.term()
    return {k: statistics.median(v) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 trial of 1000 frames (< 1 min)")
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--trials", type=int, default=None)
    args = ap.parse_args()
    n = args.frames or (1000 if args.quick else 3000)
    trials = args.trials or (1 if args.quick else 3)
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("livescope").setLevel(logging.ERROR)  # its per-run INFO lines would drown the table
    tmp = Path(tempfile.mkdtemp(prefix="livescope-bench-daemon-", dir=ROOT.parent))
    rows: dict[str, list[dict]] = {label: [] for label, *_ in CONFIGS}
    try:
        ref = transport_reference(n, trials)
        for _ in range(trials):
            for label, engines, store, products in CONFIGS:
                rows[label].append(run_one(engines, store, products, n, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    mb = SHAPE[0] * SHAPE[1] * 2 / 1e6
    us_ls = 1e6 / ref["livescope"]
    print(
        f"\nDaemon, {SHAPE[0]}x{SHAPE[1]} uint16 over tcp, {n} frames, median of {trials} trial(s); "
        f"{platform.machine()}, {os.cpu_count()} cores\n"
    )
    print(
        "| path | frames/s end to end | MB/s | us/frame | overhead vs transport, us/frame | sender fps "
        "| received | saved | processed / skipped | lost | CPU cores | chain p50 ms | store p50 ms |"
    )
    print("|" + "---|" * 13)
    print(
        f"| raw pyzmq PUSH/PULL | {ref['raw']:,.0f} | {ref['raw'] * mb:,.0f} | {1e6 / ref['raw']:.0f} "
        "| | | | | | | | | |"
    )
    print(
        f"| livescope transport (FramePublisher -> FrameReceiver) | {ref['livescope']:,.0f} | "
        f"{ref['livescope'] * mb:,.0f} | {us_ls:.0f} | 0 | | | | | | | | |"
    )
    for label, res in rows.items():
        med = {k: statistics.median([r[k] for r in res if r[k] is not None] or [float("nan")]) for k in res[0]}
        us = 1e6 / med["fps"]
        print(
            f"| daemon: {label} | {med['fps']:,.0f} | {med['fps'] * mb:,.0f} | {us:.0f} | {us - us_ls:+.0f} | "
            f"{med['send_fps']:,.0f} | {med['received']:.0f} | {med['saved']:.0f} | "
            f"{med['processed']:.0f} / {med['skipped']:.0f} | {med['lost']:.0f} | {med['cpu']:.2f} | "
            f"{med['lat_chain']} | {med['lat_store']} |"
        )
    print("\nAll trials (end-to-end frames/s):")
    for label, res in rows.items():
        print(f"- {label}: {[round(r['fps']) for r in res]}")


if __name__ == "__main__":
    main()
