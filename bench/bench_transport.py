"""Transport: livescope's FramePublisher -> FrameReceiver against raw pyzmq, side by side.

For 512x512 and 2048x2048 uint16 frames over tcp://127.0.0.1 and ipc://, in the same run:

- ``raw pyzmq``: PUSH ``send_multipart([header, buffer], copy=False)`` -> PULL
  ``recv_multipart(copy=False)`` + ``np.frombuffer`` on the received buffer (the ceiling);
- ``livescope``: ``FramePublisher(block=True).send(frame)`` (JSON header built per frame) ->
  ``FrameReceiver.recv()`` (poll, validate every header, count seq gaps, zero-copy decode);
- ``memcpy``: ``np.copyto`` of the same frame in one process (what a copy would cost).

The sender runs in a separate process (multiprocessing, spawn) and sends the same few buffers
over and over; both sides use a high-water mark of 64. The wire carries the same bytes in both
modes (the raw header is a livescope header encoded once). Trials alternate raw / livescope so
that load from other jobs hits both alike; the table shows the median.

    python bench/bench_transport.py            # full: 7 trials, ~1 min
    python bench/bench_transport.py --quick    # 3 trials, ~15 s
    python bench/bench_transport.py --profile  # cProfile of the livescope receive loop

Prints a markdown table: MB/s, frames/s and the ratio to raw pyzmq (goal >= 0.8).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from livescope.bridges.protocol import encode, make_header
from livescope.bridges.transport import FramePublisher, FrameReceiver, free_tcp_address, ipc_available

HWM = 64
N_BUFFERS = 4  # distinct frames cycled by the sender (a camera's ring of buffers)


def _frames(shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(90, 4000, size=shape, dtype=np.uint16) for _ in range(N_BUFFERS)]


def _sender(conn) -> None:
    """Runs in its own process: executes ("send", mode, address, shape, n) commands."""
    ctx = zmq.Context()
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        _, mode, address, shape, n = cmd
        frames = _frames(shape)
        conn.send("ready")
        if mode == "raw":
            head = encode(make_header(frames[0], stream="bench", seq=0), None)[0]
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, HWM)
            sock.connect(address)
            for i in range(n):
                sock.send_multipart([head, memoryview(frames[i % N_BUFFERS]).cast("B")], copy=False)
            sock.close(linger=-1)  # returns once queued; the context keeps delivering
        else:
            pub = FramePublisher(address, stream="bench", hwm=HWM, block=True, context=ctx)
            for i in range(n):
                pub.send(frames[i % N_BUFFERS])
            pub.close(linger_s=60)
        conn.send("sent")
    ctx.term()


def _recv_raw(address: str, conn, n: int, ctx: zmq.Context) -> float:
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.bind(address)
    try:
        conn.recv()  # "ready"
        first = None
        for i in range(n):
            parts = sock.recv_multipart(copy=False)
            arr = np.frombuffer(parts[1].buffer, dtype=np.uint16)
            if i == 0:
                first = time.perf_counter()
        last = time.perf_counter()
        assert arr.size > 0
    finally:
        sock.close(linger=0)
    conn.recv()  # "sent"
    return (n - 1) / (last - first)


def _recv_livescope(address: str, conn, n: int, ctx: zmq.Context, profile: bool = False) -> float:
    rx = FrameReceiver(address, bind=True, hwm=HWM, context=ctx)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
    try:
        conn.recv()
        first = None
        got = 0
        if prof:
            prof.enable()
        while got < n:
            frame = rx.recv(timeout_ms=10_000)
            if frame is None:
                raise RuntimeError("no frame within 10 s")
            got += 1
            if got == 1:
                first = time.perf_counter()
        last = time.perf_counter()
        if prof:
            prof.disable()
        st = rx.stats()
        assert st["received"] == n and st["lost"] == 0 and st["rejected"] == 0, st
    finally:
        rx.close()
    conn.recv()
    if prof:
        import pstats

        pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    return (n - 1) / (last - first)


def _memcpy_fps(shape: tuple[int, int], seconds: float) -> float:
    src = _frames(shape)[0]
    dst = np.empty_like(src)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        np.copyto(dst, src)
        n += 1
    return n / (time.perf_counter() - t0)


def _address(kind: str, tmp: str, i: int) -> str:
    if kind == "tcp":
        return free_tcp_address()
    return f"ipc://{tmp}/bench-{i}.sock"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 trials, fewer frames (~15 s)")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="profile the livescope receiver (512x512 tcp)")
    args = ap.parse_args()
    trials = args.trials or (3 if args.quick else 7)
    counts = {(512, 512): 1500 if args.quick else 6000, (2048, 2048): 100 if args.quick else 400}
    kinds = ["tcp"] + (["ipc"] if ipc_available() else [])

    mp_ctx = mp.get_context("spawn")
    conn, child = mp_ctx.Pipe()
    proc = mp_ctx.Process(target=_sender, args=(child,), daemon=True)
    proc.start()
    ctx = zmq.Context()
    tmp = tempfile.mkdtemp(prefix="livescope-bench-")
    results: dict[tuple, dict[str, list[float]]] = {}
    try:
        if args.profile:
            n = counts[(512, 512)]
            conn.send(("send", "livescope", address := _address("tcp", tmp, 0), (512, 512), n))
            _recv_livescope(address, conn, n, ctx, profile=True)
            return
        i = 0
        for shape, n in counts.items():
            for kind in kinds:
                res = results.setdefault((shape, kind), {"raw": [], "livescope": []})
                for _ in range(trials):
                    for mode in ("raw", "livescope"):
                        i += 1
                        address = _address(kind, tmp, i)
                        conn.send(("send", mode, address, shape, n))
                        fps = (_recv_raw if mode == "raw" else _recv_livescope)(address, conn, n, ctx)
                        res[mode].append(fps)
        memcpy = {shape: _memcpy_fps(shape, 0.5 if args.quick else 2.0) for shape in counts}
    finally:
        conn.send(("quit",))
        proc.join(10)
        ctx.term()
        for p in Path(tmp).glob("*"):
            p.unlink()
        os.rmdir(tmp)

    print(
        f"\nTransport, uint16 frames, sender in its own process; median of {trials} trial(s); "
        f"pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, {platform.machine()}, {os.cpu_count()} cores\n"
    )
    print("| frame | path | raw pyzmq MB/s | raw fps | livescope MB/s | livescope fps | livescope / raw |")
    print("|---|---|---|---|---|---|---|")
    for (shape, kind), res in results.items():
        mb = shape[0] * shape[1] * 2 / 1e6
        raw = statistics.median(res["raw"])
        ls = statistics.median(res["livescope"])
        print(
            f"| {shape[0]}x{shape[1]} | {kind} | {raw * mb:,.0f} | {raw:,.0f} | {ls * mb:,.0f} | {ls:,.0f} "
            f"| {ls / raw:.2f} |"
        )
    for shape, fps in memcpy.items():
        mb = shape[0] * shape[1] * 2 / 1e6
        print(f"| {shape[0]}x{shape[1]} | memcpy (np.copyto) | {fps * mb:,.0f} | {fps:,.0f} | | | |")
    print("\nAll trials (frames/s):")
    for (shape, kind), res in results.items():
        print(
            f"- {shape[0]}x{shape[1]} {kind}: raw {[round(x) for x in res['raw']]}, "
            f"livescope {[round(x) for x in res['livescope']]}"
        )


if __name__ == "__main__":
    main()
