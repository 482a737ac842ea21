"""What ZeroMQ CURVE costs: livescope's data path with and without CURVE, side by side.

``FramePublisher(block=True).send(frame)`` in its own process -> ``FrameReceiver.recv()`` over
tcp://127.0.0.1, for 512x512 and 2048x2048 uint16 frames, in the same run:

- ``plain``: no security mechanism (what loopback uses by default);
- ``curve``: both sockets speak CURVE (keys made by ``livescope.bridges.auth.init_keys`` in a temp
  folder; the receiver's ZAP handler checks the allow-list once per connection, then every
  message is encrypted and authenticated).

Trials alternate plain / curve so that load from other jobs hits both alike; the table shows the
median, and CPU seconds per GB moved (sender + receiver processes, all their threads).

    python bench/bench_curve.py            # 5 trials, ~1 min
    python bench/bench_curve.py --quick    # 3 trials, fewer frames, ~20 s
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import zmq

from livescope.bridges.auth import CurveClient, CurveServer, init_keys
from livescope.bridges.transport import FramePublisher, FrameReceiver, free_tcp_address

HWM = 64
N_BUFFERS = 4


def _frames(shape: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(90, 4000, size=shape, dtype=np.uint16) for _ in range(N_BUFFERS)]


def _sender(conn, keys: str) -> None:
    """Own process: runs ("send", mode, address, shape, n); replies with its CPU seconds."""
    curve = CurveClient.from_dir(keys)
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            break
        _, mode, address, shape, n = cmd
        frames = _frames(shape)
        conn.send("ready")
        cpu0 = time.process_time()
        pub = FramePublisher(address, stream="bench", hwm=HWM, block=True, curve=curve if mode == "curve" else None)
        for i in range(n):
            pub.send(frames[i % N_BUFFERS])
        pub.close(linger_s=120)  # its own context: returns once every frame was handed over
        conn.send(time.process_time() - cpu0)


def _receive(address: str, conn, n: int, curve: CurveServer | None) -> tuple[float, float, float]:
    """(frames/s, receiver CPU-s, sender CPU-s)."""
    rx = FrameReceiver(address, bind=True, hwm=HWM, curve=curve)
    try:
        conn.recv()  # "ready"
        cpu0 = time.process_time()
        got, first = 0, 0.0
        while got < n:
            frame = rx.recv(timeout_ms=20_000)
            if frame is None:
                raise RuntimeError("no frame within 20 s")
            got += 1
            if got == 1:
                first = time.perf_counter()
        last = time.perf_counter()
        cpu = time.process_time() - cpu0
        st = rx.stats()
        assert st["received"] == n and st["lost"] == 0 and st["rejected"] == 0, st
        assert frame.array is not None and frame.array.shape == (frame.header["shape"][0], frame.header["shape"][1])
    finally:
        rx.close()
    sender_cpu = conn.recv()
    return (n - 1) / (last - first), cpu, sender_cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 trials, fewer frames")
    ap.add_argument("--trials", type=int, default=None)
    args = ap.parse_args()
    trials = args.trials or (3 if args.quick else 5)
    counts = {(512, 512): 1000 if args.quick else 3000, (2048, 2048): 60 if args.quick else 200}

    keys = tempfile.mkdtemp(prefix="livescope-curve-bench-")
    init_keys(keys, overwrite=True)
    curve = CurveServer(keys)
    curve.acquire()  # held for the whole run: one authenticator, as in the daemon
    mp_ctx = mp.get_context("spawn")
    conn, child = mp_ctx.Pipe()
    proc = mp_ctx.Process(target=_sender, args=(child, keys), daemon=True)
    proc.start()
    results: dict[tuple, dict[str, list[tuple[float, float, float]]]] = {}
    try:
        for shape, n in counts.items():
            res = results.setdefault(shape, {"plain": [], "curve": []})
            for _ in range(trials):
                for mode in ("plain", "curve"):
                    address = free_tcp_address()
                    conn.send(("send", mode, address, shape, n))
                    fps, rx_cpu, tx_cpu = _receive(address, conn, n, curve if mode == "curve" else None)
                    res[mode].append((fps, (rx_cpu + tx_cpu) / (n * shape[0] * shape[1] * 2 / 1e9)))
    finally:
        conn.send(("quit",))
        proc.join(10)
        curve.release()
        shutil.rmtree(keys, ignore_errors=True)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"\nCURVE cost, tcp://127.0.0.1, uint16 frames, sender in its own process; median of {trials} "
        f"trial(s); pyzmq {zmq.__version__}, libzmq {zmq.zmq_version()}, {platform.machine()}, "
        f"{os.cpu_count()} cores, load {load:.1f}\n"
    )
    print("| frame | plain MB/s | plain fps | CURVE MB/s | CURVE fps | CURVE / plain | CPU-s per GB plain / CURVE |")
    print("|---|---|---|---|---|---|---|")
    for shape, res in results.items():
        mb = shape[0] * shape[1] * 2 / 1e6
        plain = statistics.median(r[0] for r in res["plain"])
        cur = statistics.median(r[0] for r in res["curve"])
        cpu_p = statistics.median(r[1] for r in res["plain"])
        cpu_c = statistics.median(r[1] for r in res["curve"])
        print(
            f"| {shape[0]}x{shape[1]} | {plain * mb:,.0f} | {plain:,.0f} | {cur * mb:,.0f} | {cur:,.1f} | "
            f"{cur / plain:.2f} | {cpu_p:.2f} / {cpu_c:.2f} |"
        )
    print("\nAll trials (frames/s):")
    for shape, res in results.items():
        print(
            f"- {shape[0]}x{shape[1]}: plain {[round(r[0]) for r in res['plain']]}, "
            f"curve {[round(r[0], 1) for r in res['curve']]}"
        )


if __name__ == "__main__":
    main()
