"""Load test: the highest frame rate the daemon sustains with zero lost raw frames, per engine
chain and frame size, and what happens just above it (engines skip, raw is kept or losses counted).

    python bench/bench_load.py [--seconds 6] [--sizes 512 2048] [--chains passthrough deconvolve]
    python bench/bench_load.py --fps 250 --seconds 600 --sizes 512 --chains none [--tmp /work/tmp]

A publisher process offers frames at a fixed rate on loopback (non-blocking sends: what it cannot
hand over is counted); the daemon runs in this process with a store in a temp folder. For each
chain the rate doubles until raw frames are lost, then the last clean rate is reported. With
``--fps`` each listed rate runs once per size and chain (``none``: no engines) and one line per run
reports offered, dropped at the publisher, received, saved, lost (and where), skipped per engine,
engine frames processed, peak store queue MB, peak RSS, MB written and MB/s, the store's disk
usage and the load averages at start and end.

Long runs write more than a disk holds (512x512 uint16 at 250 fps is 131 MB/s, 7.9 GB a minute),
so a janitor thread deletes the store's pixel shard files once they are ``--keep-s`` seconds old
(by then the kernel has written them back; the daemon does not read them again) and, if the store
still grows past ``--max-store-gb``, the oldest first; the bytes are counted before deletion. A run
stops early (and says so) when the disk's free space falls under ``--min-free-gb``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _publish(address: str, size: int, fps: float, seconds: float, result) -> None:
    from livescope.bridges.transport import FramePublisher

    rng = np.random.default_rng(0)
    frames = [rng.integers(90, 4000, (size, size), dtype=np.uint16) for _ in range(4)]
    pub = FramePublisher(address, stream="load", hwm=64)
    n = int(fps * seconds)
    late_max, drops = 0.0, []  # how late the publisher ran (s); (frame, how late) at its first drops
    t0 = time.perf_counter()
    for i in range(n):
        due = t0 + i / fps
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        else:
            late_max = max(late_max, -delay)
        before = pub.dropped
        pub.send(frames[i % 4], index={"t": i}, bits=12)
        if pub.dropped > before and len(drops) < 20:
            drops.append((i, round(max(-delay, 0.0), 3)))
    pub.end()
    result.put({"offered": n, "dropped_at_publisher": pub.dropped, "late_max_s": round(late_max, 3), "drops": drops})
    pub.close()


class _Janitor(threading.Thread):
    """Keeps a long run's store within the disk: deletes pixel shard files (1 MB and more) once
    they are ``keep_s`` old, and the oldest first while the store is over ``max_bytes``; counts
    what it deleted. Samples the store queue (peak MB) from the pipeline's status meanwhile."""

    def __init__(self, root: Path, keep_s: float, max_bytes: float, min_free: float) -> None:
        super().__init__(daemon=True, name="load-janitor")
        self.root, self.keep_s, self.max_bytes, self.min_free = root, keep_s, max_bytes, min_free
        self.deleted_bytes = self.deleted_files = self.peak_store_bytes = 0
        self.peak_queue_mb = self.peak_products_mb = 0.0
        self.low_disk = False
        self.pipeline = None
        self._halt = threading.Event()

    def _files(self) -> list[tuple[float, int, str]]:
        out = []
        for dirpath, _dirs, names in os.walk(self.root):
            for n in names:
                p = os.path.join(dirpath, n)
                try:
                    st = os.stat(p)
                except OSError:
                    continue
                out.append((st.st_mtime, st.st_size, p))
        return out

    def sweep(self, delete: bool = True) -> int:
        files = self._files()
        total = sum(f[1] for f in files)
        self.peak_store_bytes = max(self.peak_store_bytes, total)
        if not delete:
            return total
        now = time.time()
        big = sorted(f for f in files if f[1] >= 2**20 and os.sep + "c" + os.sep in f[2])
        for mtime, size, path in big:
            if now - mtime < self.keep_s and total <= self.max_bytes:
                break
            try:
                os.remove(path)
            except OSError:
                continue
            self.deleted_bytes += size
            self.deleted_files += 1
            total -= size
        return total

    def run(self) -> None:
        last = 0.0
        while not self._halt.wait(0.5):
            if self.pipeline is not None:
                q = self.pipeline.status()["queues"]
                self.peak_queue_mb = max(self.peak_queue_mb, q["store_mb"])
                self.peak_products_mb = max(self.peak_products_mb, q["products_mb"])
            if time.monotonic() - last > 5.0:
                last = time.monotonic()
                self.sweep()
                if shutil.disk_usage(self.root).free < self.min_free and not self.low_disk:
                    self.low_disk = True
                    if self.pipeline is not None:
                        self.pipeline.request_stop()

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _device_written(path: str) -> int | None:
    """Bytes the block device under ``path`` has written so far (Linux /sys/block; None elsewhere):
    what reached the disk, as opposed to the page cache (other processes' writes count too)."""
    try:
        dev = os.stat(path).st_dev
        link = os.path.realpath(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
        stat = Path(link, "stat")
        if not stat.exists():
            stat = Path(link).parent / "stat"
        return int(stat.read_text().split()[6]) * 512
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def run(
    size: int,
    fps: float,
    seconds: float,
    engines: list[str],
    *,
    tmp: str | None = None,
    keep_s: float = 45.0,
    max_store_gb: float = 10.0,
    min_free_gb: float = 15.0,
    complete: str = "during",
) -> dict:
    from livescope.bridges.transport import free_tcp_address
    from livescope.daemon.cli import run_daemon
    from livescope.daemon.config import DaemonConfig

    if tmp:
        Path(tmp).mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(tmp or tempfile.gettempdir()).free < min_free_gb * 1e9:
        raise SystemExit(
            f"less than {min_free_gb} GB free under {tmp or tempfile.gettempdir()}: free space "
            "or pick another folder with --tmp (or lower --min-free-gb)"
        )
    out = Path(tempfile.mkdtemp(prefix="livescope-load-", dir=tmp)) / "o.zarr"
    cfg = DaemonConfig(
        source="zmq",
        engines=engines,
        out=out,
        ingest=free_tcp_address(),
        publish=None,
        control=None,
        exit_on_end=True,
        min_free_gb=0.0,
        complete=complete,
    )
    ctx = mp.get_context("spawn")
    result = ctx.Queue()
    proc = ctx.Process(target=_publish, args=(cfg.ingest, size, fps, seconds, result))

    janitor = _Janitor(out.parent, keep_s, max_store_gb * 1e9, min_free_gb * 1e9)

    def start(pipeline):
        janitor.pipeline = pipeline
        janitor.start()
        proc.start()

    load_start = os.getloadavg()
    dev_start = _device_written(str(out.parent))
    t0 = time.perf_counter()
    try:
        try:
            summary = run_daemon(cfg, on_started=start)
        finally:
            janitor.stop()
        wall = time.perf_counter() - t0
        load_end = os.getloadavg()
        dev_end = _device_written(str(out.parent))
        pub = result.get(timeout=60)
        proc.join(10)
        store_bytes = janitor.sweep(delete=False)
    finally:
        shutil.rmtree(out.parent, ignore_errors=True)
    f = summary["frames"]
    lost = pub["offered"] - f["saved"]
    written = store_bytes + janitor.deleted_bytes
    return {
        "size": size,
        "fps": fps,
        "seconds": seconds,
        "chain": "+".join(engines) or "none",
        "complete": complete,
        "completed": summary.get("completion", {}).get("frames_completed", 0),
        "completion_to_go": summary.get("completion", {}).get("frames_to_go", 0),
        "offered": pub["offered"],
        "saved": f["saved"],
        "lost": lost,
        "dropped_at_publisher": pub["dropped_at_publisher"],
        "publisher_late_max_s": pub["late_max_s"],
        "publisher_drops_at_frame_late_s": pub["drops"],
        "received": f["received"],
        "lost_in_transport": f["lost_in_transport"],
        "dropped_over_budget": f["dropped_over_budget"],
        "lost_in_store": f["lost"] - f["lost_in_transport"],
        "dropped_at_close": f.get("dropped_at_close", 0),
        "skipped": f.get("skipped_frames", 0),
        "skipped_per_engine": f.get("skipped", {}),
        "processed": max((e["processed"] for e in summary["engines"].values()), default=0),
        "processed_per_engine": {n: e["processed"] for n, e in summary["engines"].items()},
        "peak_queue_mb": janitor.peak_queue_mb,
        "peak_products_mb": janitor.peak_products_mb,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "written_mb": round(written / 1e6, 1),
        "mb_per_s": round(written / 1e6 / seconds, 1),
        "device_written_mb": (
            round((dev_end - dev_start) / 1e6, 1) if dev_start is not None and dev_end is not None else None
        ),
        "store_peak_on_disk_mb": round(janitor.peak_store_bytes / 1e6, 1),
        "store_at_end_mb": round(store_bytes / 1e6, 1),
        "deleted_during_run_mb": round(janitor.deleted_bytes / 1e6, 1),
        "stopped_low_disk": janitor.low_disk,
        "load_start": [round(x, 2) for x in load_start],
        "load_end": [round(x, 2) for x in load_end],
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() - wall)),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048])
    ap.add_argument(
        "--chains",
        nargs="+",
        default=["passthrough", "register", "denoise", "deconvolve", "decompose"],
        help="engine chains, a+b for several; none: no engines",
    )
    ap.add_argument(
        "--fps", type=float, nargs="+", help="run these fixed rates once each (no doubling) and report each run"
    )
    ap.add_argument("--tmp", help="folder for the temporary stores (default: the system temp folder)")
    ap.add_argument("--keep-s", type=float, default=45.0, help="delete store shard files this old during a run")
    ap.add_argument("--max-store-gb", type=float, default=10.0, help="keep a run's store under this size")
    ap.add_argument("--min-free-gb", type=float, default=15.0, help="stop a run when the disk has less free")
    ap.add_argument(
        "--complete",
        default="during",
        choices=["during", "after", "off"],
        help="the daemon's completion of skipped frames' products (the janitor must keep raw shards the "
        "completer still reads: raise --keep-s above the run's length)",
    )
    args = ap.parse_args()
    opts = {
        "tmp": args.tmp,
        "keep_s": args.keep_s,
        "max_store_gb": args.max_store_gb,
        "min_free_gb": args.min_free_gb,
        "complete": args.complete,
    }
    if args.fps:
        print(
            "| frames | chain | fps | s | offered | dropped at publisher | received | saved | lost | skipped | "
            "engine processed | peak queue MB | peak RSS MB | MB/s written | load start -> end |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for size in args.sizes:
            for chain in args.chains:
                for fps in args.fps:
                    r = run(size, fps, args.seconds, [] if chain == "none" else chain.split("+"), **opts)
                    print(json.dumps(r), flush=True)
                    print(
                        f"| {size}x{size} | {r['chain']} | {fps:g} | {args.seconds:g} | {r['offered']} | "
                        f"{r['dropped_at_publisher']} | {r['received']} | {r['saved']} | {r['lost']} | "
                        f"{r['skipped']} | {r['processed']} | {r['peak_queue_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                        f"{r['mb_per_s']:.0f} | "
                        f"{r['load_start'][0]:.1f} -> {r['load_end'][0]:.1f} |",
                        flush=True,
                    )
        return
    print(
        "| frames | chain | highest clean rate (fps) | MB/s | engine processed | "
        "just above: offered -> saved (lost, skipped by engine) |"
    )
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for chain in args.chains:
            fps, clean, above = (40.0 if size == 512 else 5.0), None, None
            while fps <= (1280 if size == 512 else 160):
                r = run(size, fps, args.seconds, [] if chain == "none" else chain.split("+"), **opts)
                if r["lost"] == 0:
                    clean, fps = r, fps * 2
                else:
                    above = r
                    break
            mb = clean["fps"] * size * size * 2 / 1e6 if clean else 0
            c = f"{clean['fps']:.0f}" if clean else "< start"
            proc = f"{clean['processed']}/{clean['offered']}" if clean else "-"
            ab = (
                f"{above['offered']} -> {above['saved']} ({above['lost']} lost, {above['skipped']} skipped)"
                if above
                else "not reached"
            )
            print(f"| {size}x{size} | {chain} | {c} | {mb:.0f} | {proc} | {ab} |", flush=True)


if __name__ == "__main__":
    main()
