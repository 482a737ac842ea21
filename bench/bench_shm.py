"""Same-host fast path: shared-memory ring vs ZeroMQ, throughput and CPU cost, side by side.

For 512x512 and 2048x2048 uint16 frames, in the same run, sender in its own process (spawn):

- ``shm (headers tcp)`` / ``shm (headers ipc)``: ``ShmFramePublisher(block=True, slots=16)`` ->
  ``FrameReceiver.recv()``; pixels memcpy'd into a ring slot, copied out by the receiver (which
  then owns a private array), only the JSON header over ZeroMQ;
- ``livescope tcp`` / ``livescope ipc``: ``FramePublisher(block=True)`` -> ``FrameReceiver.recv()``;
- ``raw pyzmq ipc``: PUSH ``send_multipart([header, buffer], copy=False)`` -> PULL
  ``recv_multipart(copy=False)`` + ``np.frombuffer`` (no validation: the ZeroMQ ceiling);
- ``memcpy``: ``np.copyto`` of one frame in one process, for scale.

Throughput is (frames - 1) / (time from the first to the last frame received). CPU cost is the
process CPU time (``time.process_time``: all threads, ZeroMQ's I/O threads included) of the
sender, from its first send until the receiver has everything, plus the receiver's over its
receive loop, per GB moved. Trials alternate the paths so that load from other jobs hits all alike;
the table shows medians and the best trial (on a shared machine, the trial least slowed by
other jobs). Trials are short (~1 GB each) and many, because load from other jobs comes and goes
on a scale of seconds.

    python bench/bench_shm.py            # 7 trials, ~1-2 min
    python bench/bench_shm.py --quick    # 2 trials
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from livescope.bridges.protocol import encode, make_header
from livescope.bridges.shm import ShmFramePublisher
from livescope.bridges.transport import FramePublisher, FrameReceiver, free_tcp_address, ipc_available

HWM = 64
N_BUFFERS = 4  # distinct frames cycled by the sender (a camera's ring of buffers)
PATHS = ["shm (headers tcp)", "shm (headers ipc)", "livescope tcp", "livescope ipc", "raw pyzmq ipc"]


def _frames(shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(90, 4000, size=shape, dtype=np.uint16) for _ in range(N_BUFFERS)]


def _sender(conn) -> None:
    """Runs in its own process: executes ("send", path, address, shape, n) commands."""
    ctx = zmq.Context()
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        _, path, address, shape, n = cmd
        frames = _frames(shape)
        conn.send("ready")
        cpu0 = time.process_time()
        if path == "raw pyzmq ipc":
            head = encode(make_header(frames[0], stream="bench", seq=0), None)[0]
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, HWM)
            sock.connect(address)
            for i in range(n):
                sock.send_multipart([head, memoryview(frames[i % N_BUFFERS]).cast("B")], copy=False)
            conn.recv()  # "done": the receiver has every frame
            sock.close(linger=0)
        else:
            if path.startswith("shm"):
                pub = ShmFramePublisher(address, stream="bench", hwm=HWM, block=True, slots=16, context=ctx)
            else:
                pub = FramePublisher(address, stream="bench", hwm=HWM, block=True, context=ctx)
            for i in range(n):
                if not pub.send(frames[i % N_BUFFERS]):
                    raise RuntimeError("a blocking send failed")
            conn.recv()  # "done"
            pub.close(linger_s=0)
        conn.send(time.process_time() - cpu0)
    ctx.term()


def _trial(
    path: str, address: str, shape: tuple[int, int], conn, n: int, ctx: zmq.Context
) -> tuple[float, float, float]:
    """(frames/s, receiver CPU s, sender CPU s)."""
    raw = path == "raw pyzmq ipc"
    if raw:
        sock = ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.RCVHWM, HWM)
        sock.bind(address)
    else:
        rx = FrameReceiver(address, bind=True, hwm=HWM, context=ctx)
    try:
        conn.send(("send", path, address, shape, n))
        conn.recv()  # "ready"
        cpu0 = time.process_time()
        first = last = 0.0
        total = 0
        for i in range(n):
            if raw:
                parts = sock.recv_multipart(copy=False)
                arr = np.frombuffer(parts[1].buffer, dtype=np.uint16)
            else:
                frame = rx.recv(timeout_ms=20_000)
                if frame is None:
                    raise RuntimeError(f"{path}: no frame within 20 s")
                arr = frame.array
            total += arr.size
            if i == 0:
                first = time.perf_counter()
        last = time.perf_counter()
        cpu_recv = time.process_time() - cpu0
        if not raw:
            st = rx.stats()
            assert st["received"] == n and st["lost"] == 0 and st["rejected"] == 0, st
        assert total == n * shape[0] * shape[1]
    finally:
        if raw:
            sock.close(linger=0)
        else:
            rx.close()
    conn.send("done")
    cpu_send = conn.recv()
    return (n - 1) / (last - first), cpu_recv, cpu_send


def _memcpy_fps(shape: tuple[int, int], seconds: float) -> float:
    src = _frames(shape)[0]
    dst = np.empty_like(src)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(dst, src)
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 trials")
    ap.add_argument("--trials", type=int, default=None)
    args = ap.parse_args()
    trials = args.trials or (2 if args.quick else 7)
    counts = {(2048, 2048): 120, (512, 512): 2000}
    paths = [p for p in PATHS if "ipc" not in p or ipc_available()]

    mp_ctx = mp.get_context("spawn")
    conn, child = mp_ctx.Pipe()
    proc = mp_ctx.Process(target=_sender, args=(child,), daemon=True)
    proc.start()
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="livescope-bench-shm-")
    results: dict[tuple, dict[str, list[tuple[float, float, float]]]] = {}
    try:
        i = 0
        for shape, n in counts.items():
            res = results.setdefault(shape, {p: [] for p in paths})
            for _ in range(trials):
                for path in paths:
                    i += 1
                    address = f"ipc://{tmp}/b{i}.sock" if path.endswith("ipc") else free_tcp_address()
                    res[path].append(_trial(path, address, shape, conn, n, ctx))
        memcpy = {shape: _memcpy_fps(shape, 0.5 if args.quick else 2.0) for shape in counts}
    finally:
        conn.send(("quit",))
        proc.join(10)
        ctx.term()
        for p in Path(tmp).glob("*"):
            p.unlink()
        os.rmdir(tmp)

    print(
        f"\nSame-host transport, uint16 frames, sender in its own process; median of {trials} trial(s); "
        f"Python {sys.version.split()[0]}, pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, "
        f"{platform.machine()}, {os.cpu_count()} cores\n"
    )
    print(
        "| frame | path | MB/s (median) | frames/s (median) | vs livescope ipc | vs raw pyzmq ipc | "
        "MB/s (best) | CPU-s per GB (send + receive) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape, res in results.items():
        mb = shape[0] * shape[1] * 2 / 1e6
        gb = counts[shape] * mb / 1e3
        for path, runs in res.items():
            fps = statistics.median(r[0] for r in runs)
            best = max(r[0] for r in runs)
            per_run = [((r[2] + r[1]) / gb, r[2] / gb, r[1] / gb) for r in runs]
            cpu = [statistics.median(x) for x in zip(*per_run, strict=True)]
            ratios = []
            for ref in ("livescope ipc", "raw pyzmq ipc"):
                # per-trial ratios: the paths of one round ran seconds apart, under similar load
                ratios.append(
                    f"{statistics.median(a[0] / b[0] for a, b in zip(runs, res[ref], strict=True)):.2f}x"
                    if ref in res
                    else ""
                )
            print(
                f"| {shape[0]}x{shape[1]} | {path} | {fps * mb:,.0f} | {fps:,.0f} | {ratios[0]} | {ratios[1]} | "
                f"{best * mb:,.0f} | {cpu[0]:.2f} ({cpu[1]:.2f} + {cpu[2]:.2f}) |"
            )
        fps = memcpy[shape]
        print(f"| {shape[0]}x{shape[1]} | memcpy (np.copyto, one process) | {fps * mb:,.0f} | {fps:,.0f} | | | | |")
    print("\nPycro-Manager's Java-Python bridge: 100-200 MB/s as published by its authors (quoted, not measured here).")
    print("\nAll trials (frames/s):")
    for shape, res in results.items():
        for path, runs in res.items():
            print(f"- {shape[0]}x{shape[1]} {path}: {[round(r[0]) for r in runs]}")


if __name__ == "__main__":
    main()
