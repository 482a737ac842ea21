"""Store: the sCMOS case (2048x2048 uint16, 100 fps = 839 MB/s) through livescope's ImageWriter
against zarr-python 3, tensorstore and ome-writers, side by side; then a kill -9 check per writer.

Every writer runs in the same harness, built like the daemon: a producer thread offers frames
into a queue held to a memory budget (1024 MB, the daemon's default), a store thread takes them
and writes. livescope's path is the daemon's store thread: count saturated pixels, ``write``
(the plane goes into a shard buffer; full shards are written by tensorstore, left in flight),
and ``flush_due`` + ``poll`` every 20 ms. The peers are written "the straightforward way":

- zarr-python 3: ``create_array(shape=(0, y, x), chunks=(1, y, x))``, per frame
  ``resize`` + ``arr[t] = frame``;
- tensorstore zarr3: shape [0, y, x], chunks [1, y, x], per frame ``resize(...).result()`` +
  ``arr[t].write(frame).result()`` (default context);
- ome-writers 0.3.2 (tensorstore backend): open-ended t, ``stream.append(frame)``.

Runs (each on a clean page cache: the previous output is deleted and ``sync`` run in between):

1. raw as fast as the writer goes (the producer waits when the budget is full): MB/s sustained
   until ``close`` returned ("handed to the OS"), and including a final ``sync`` (on disk);
2. raw offered at 100 fps (paced) through livescope: frames lost over the budget, zero loss?
3. the same two with compression (blosc zstd, clevel 1, bit-shuffle) where the writer has it;
4. raw + a float32 product per frame (the passthrough engine's output, saved as the daemon
   saves products), as fast as it goes.

Frames are real: the W2S cell image (../shared/data/w2s_pairs) tiled to 2048x2048, scaled to
~100-2100 photo-electrons over an offset of 100, with Poisson and read noise (so compression
sees camera noise, not zeros). Outputs go to a temporary folder on the same disk as the repo
(``--dir`` to choose) and are deleted.

    python bench/bench_store.py            # full, ~4 min, writes < 20 GB in all (deleted)
    python bench/bench_store.py --quick    # < 1 min, ~5 GB
    python bench/bench_store.py --crash-only

Prints markdown tables.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SHAPE = (2048, 2048)
BUDGET_MB = 1024.0
POLL_S = 0.02


# -- frames -----------------------------------------------------------------------------------
def camera_frames(shape: tuple[int, int], n: int, seed: int = 0) -> list[np.ndarray]:
    """Real cells tiled to ``shape``, as an sCMOS camera would record them (12-bit range)."""
    path = DATA / "w2s_pairs" / "target_avg400_035_1.tif"
    if path.exists():
        import tifffile

        cells = tifffile.imread(path).astype(np.float32) / 255.0
    else:  # the shared data is absent: a smooth synthetic sample (said so in the output)
        print(f"note: {path} not found; using a synthetic sample", file=sys.stderr)
        yy, xx = np.mgrid[0:512, 0:512]
        cells = (0.5 + 0.5 * np.sin(yy / 17.0) * np.cos(xx / 23.0)).astype(np.float32)
    reps = (-(-shape[0] // cells.shape[0]), -(-shape[1] // cells.shape[1]))
    photons = 2000.0 * np.tile(cells, reps)[: shape[0], : shape[1]]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        e = rng.poisson(photons + 10.0).astype(np.float32) + rng.normal(100.0, 1.5, shape).astype(np.float32)
        out.append(np.clip(e, 0, 4095).astype(np.uint16))
    return out


# -- writers ----------------------------------------------------------------------------------
class LivescopeWriter:
    """OmeZarrStore + ImageWriter exactly as the daemon's store thread drives them."""

    name = "livescope ImageWriter"

    def __init__(self, path: Path, shape, dtype, *, compress: bool = False, products: bool = False) -> None:
        from livescope.bridges.store import ImageLayout, OmeZarrStore

        self.store = OmeZarrStore(path, overwrite=True, compress_raw=compress)
        layout = ImageLayout(plane_shape=tuple(shape), dtype=np.dtype(dtype).name, bits=12)
        self.raw = self.store.image("raw", 0, 0, layout)
        self.product = None
        if products:
            self.product = self.store.image("passthrough", 0, 0, ImageLayout(plane_shape=tuple(shape), dtype="float32"))
        self.sat_level = 2**12 - 1

    def write(self, t: int, frame: np.ndarray) -> None:
        sat = int(np.count_nonzero(frame >= self.sat_level))  # the daemon counts saturation here
        self.raw.write(t, 0, 0, frame, seq=t, time_s=t * 0.01, saturated=sat)
        if self.product is not None:
            self.product.write(t, 0, 0, frame.astype(np.float32), seq=t, time_s=t * 0.01)

    def poll(self) -> int:
        now = time.monotonic()
        for w in self.store.images.values():
            w.flush_due(now)
            w.poll()
        return self.raw.saved

    @property
    def in_flight(self) -> int:
        return sum(w.pending for w in self.store.images.values())

    def close(self) -> int:
        self.store.close()
        return self.raw.saved


class ZarrPythonWriter:
    name = "zarr-python 3 (resize + write per frame)"

    def __init__(self, path: Path, shape, dtype, *, compress: bool = False, products: bool = False) -> None:
        import zarr
        from zarr.codecs import BloscCodec

        compressors = BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle") if compress else None
        self.arr = zarr.create_array(
            store=str(path),
            shape=(0, *shape),
            chunks=(1, *shape),
            dtype=dtype,
            compressors=compressors,
            fill_value=0,
            zarr_format=3,
            overwrite=True,
        )
        self.shape = tuple(shape)
        self.saved = 0

    def write(self, t: int, frame: np.ndarray) -> None:
        self.arr.resize((t + 1, *self.shape))
        self.arr[t] = frame
        self.saved += 1

    def poll(self) -> int:
        return self.saved

    in_flight = 0

    def close(self) -> int:
        return self.saved


class TensorstoreWriter:
    name = "tensorstore (resize + write per frame, waiting)"

    def __init__(self, path: Path, shape, dtype, *, compress: bool = False, products: bool = False) -> None:
        import tensorstore as ts

        codecs: list[dict] = [{"name": "bytes", "configuration": {"endian": "little"}}]
        if compress:
            codecs.append(
                {
                    "name": "blosc",
                    "configuration": {
                        "cname": "zstd",
                        "clevel": 1,
                        "shuffle": "bitshuffle",
                        "typesize": 2,
                        "blocksize": 0,
                    },
                }
            )
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {
                "shape": [0, *shape],
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [1, *shape]}},
                "chunk_key_encoding": {"name": "default"},
                "data_type": np.dtype(dtype).name,
                "fill_value": 0,
                "codecs": codecs,
            },
        }
        self.arr = ts.open(spec, create=True, delete_existing=True).result()
        self.shape = list(shape)
        self.saved = 0

    def write(self, t: int, frame: np.ndarray) -> None:
        self.arr = self.arr.resize(exclusive_max=[t + 1, *self.shape]).result()
        self.arr[t].write(frame).result()
        self.saved += 1

    def poll(self) -> int:
        return self.saved

    in_flight = 0

    def close(self) -> int:
        return self.saved


class OmeWritersWriter:
    name = "ome-writers 0.3.2 (tensorstore backend, open-ended t)"

    def __init__(self, path: Path, shape, dtype, *, compress: bool = False, products: bool = False) -> None:
        from ome_writers import AcquisitionSettings, Dimension, OmeZarrFormat, create_stream

        dims = [
            Dimension(name="t", count=None, type="time", chunk_size=1),
            Dimension(name="y", count=shape[0], type="space"),
            Dimension(name="x", count=shape[1], type="space"),
        ]
        settings = AcquisitionSettings(
            root_path=str(path),
            dimensions=dims,
            dtype=np.dtype(dtype).name,
            format=OmeZarrFormat(backend="tensorstore"),
            compression="blosc-zstd" if compress else None,
            overwrite=True,
        )
        self.stream = create_stream(settings)
        self.saved = 0  # append returned; its tensorstore write may still be in flight

    def write(self, t: int, frame: np.ndarray) -> None:
        self.stream.append(frame)
        self.saved += 1

    def poll(self) -> int:
        return self.saved

    in_flight = 0

    def close(self) -> int:
        self.stream.close()
        return self.saved


WRITERS = {
    "livescope": LivescopeWriter,
    "zarr": ZarrPythonWriter,
    "tensorstore": TensorstoreWriter,
    "ome-writers": OmeWritersWriter,
}


# -- the harness --------------------------------------------------------------------------------
def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _ome(path: Path) -> Path:
    """ome-writers appends its suffix to the path it is given."""
    return Path(str(path) + ".ome.zarr")


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(_ome(path), ignore_errors=True)


def _sync() -> float:
    t0 = time.perf_counter()
    if hasattr(os, "sync"):
        os.sync()
    return time.perf_counter() - t0


def run_stream(
    writer_cls, out: Path, frames: list[np.ndarray], *, seconds: float, fps: float | None, max_frames: int, **writer_kw
) -> dict:
    """Offer frames (paced at ``fps``, or as fast as the budget allows) for ``seconds``; write them
    on a store thread; close; sync. Returns the measurements."""
    _remove(out)
    _sync()
    gc.collect()
    nbytes = frames[0].nbytes
    budget = int(BUDGET_MB * 2**20)
    q: queue.Queue = queue.Queue()
    state = {"queued": 0, "offered": 0, "lost": 0, "peak_queued": 0, "peak_rss": _rss_mb(), "done": False}
    cond = threading.Condition()
    rss0 = state["peak_rss"]
    writer = writer_cls(out, frames[0].shape, frames[0].dtype, **writer_kw)

    def producer() -> None:
        t0 = time.perf_counter()
        i = 0
        while i < max_frames and time.perf_counter() - t0 < seconds:
            if fps is not None:
                delay = t0 + i / fps - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            with cond:
                if fps is None:
                    while state["queued"] + nbytes > budget:
                        cond.wait(0.05)
                if state["queued"] + nbytes <= budget:
                    state["queued"] += nbytes
                    state["peak_queued"] = max(state["peak_queued"], state["queued"])
                    q.put((i, frames[i % len(frames)]))
                else:
                    state["lost"] += 1  # the daemon records these as lost
            state["offered"] += 1
            if i % 8 == 0:
                state["peak_rss"] = max(state["peak_rss"], _rss_mb())
            i += 1
        state["done"] = True

    cpu0 = os.times()
    t_start = time.perf_counter()
    th = threading.Thread(target=producer, daemon=True)
    th.start()
    last_poll = 0.0
    peak_in_flight = 0
    while True:
        try:
            t, frame = q.get(timeout=0.05)
        except queue.Empty:
            if state["done"] and q.empty():
                break
            t = None
        if t is not None:
            writer.write(t, frame)
            with cond:
                state["queued"] -= nbytes
                cond.notify()
        now = time.perf_counter()
        if now - last_poll > POLL_S or t is None:
            last_poll = now
            writer.poll()
            peak_in_flight = max(peak_in_flight, writer.in_flight)
            state["peak_rss"] = max(state["peak_rss"], _rss_mb())
    th.join()
    t_offer_end = time.perf_counter()
    saved = writer.close()
    t_closed = time.perf_counter()
    cpu1 = os.times()
    t_sync = _sync()
    on_disk = _du(out) + _du(_ome(out))
    del writer
    _remove(out)
    wall = t_closed - t_start
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "offered": state["offered"],
        "lost": state["lost"],
        "saved": saved,
        "mb_s": saved * nbytes / wall / 1e6,
        "mb_s_sync": saved * nbytes / (wall + t_sync) / 1e6,
        "fps": saved / wall,
        "wall_s": wall,
        "close_s": t_closed - t_offer_end,
        "sync_s": t_sync,
        "cpu_cores": cpu / wall,
        "peak_queue_mb": state["peak_queued"] / 2**20,
        "peak_rss_mb": state["peak_rss"] - rss0,
        "peak_in_flight": peak_in_flight,
        "ratio": on_disk / max(saved * nbytes, 1),
    }


def dd_ceiling(out_dir: Path, mb: int) -> float | None:
    """Sequential direct-I/O write speed of this disk (dd oflag=direct), MB/s."""
    if not shutil.which("dd"):
        return None
    target = out_dir / "dd.bin"
    try:
        t0 = time.perf_counter()
        subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=8M", f"count={mb // 8}", "oflag=direct"],
            check=True,
            capture_output=True,
        )
        return mb * 2**20 / (time.perf_counter() - t0) / 1e6
    except (subprocess.CalledProcessError, OSError):
        return None
    finally:
        target.unlink(missing_ok=True)


# -- kill -9 ------------------------------------------------------------------------------------
CRASH_SHAPE = (512, 512)


def _pattern_base() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 60000, CRASH_SHAPE, dtype=np.uint16)


def crash_child(writer: str, path: str) -> None:
    """Write frames t = base + t forever, printing each new count of frames the writer reports saved."""
    base = _pattern_base()
    w = WRITERS[writer](Path(path), CRASH_SHAPE, "uint16")
    reported = 0
    last_poll = time.perf_counter()
    t = 0
    while True:
        w.write(t, base + np.uint16(t % 65536))
        t += 1
        now = time.perf_counter()
        if now - last_poll > POLL_S:
            last_poll = now
            n = w.poll()
            if n != reported:
                reported = n
                sys.stdout.write(f"saved {n}\n")
                sys.stdout.flush()


def _array_path(writer: str, path: Path) -> Path:
    if writer == "livescope":
        return path / "raw" / "0"
    if writer == "ome-writers":
        return _ome(path) / "0"
    return path


def crash_test(writer: str, tmp: Path, min_reported: int = 100, delay_s: float = 0.0) -> dict:
    path = tmp / f"crash-{writer}"
    proc = subprocess.Popen(
        [sys.executable, __file__, "--crash-child", writer, str(path)], stdout=subprocess.PIPE, text=True
    )
    reported = 0
    t0 = time.monotonic()
    assert proc.stdout is not None
    for line in proc.stdout:
        reported = int(line.split()[1])
        if reported >= min_reported or time.monotonic() - t0 > 30:
            break
    time.sleep(delay_s)  # so the kill lands anywhere in a write, not just after a report
    os.kill(proc.pid, 9)
    for line in proc.stdout:  # what it printed before it died
        reported = int(line.split()[1])
    proc.wait()
    res: dict = {"writer": writer, "reported": reported}
    try:
        import zarr

        arr = zarr.open_array(str(_array_path(writer, path)), mode="r")
        data = arr[...]
        base = _pattern_base()
        intact = [bool(np.array_equal(data[t], base + np.uint16(t % 65536))) for t in range(data.shape[0])]
        res["opens"] = "yes"
        res["shape_t"] = data.shape[0]
        res["intact"] = sum(intact)
        res["intact_prefix"] = next((i for i, ok in enumerate(intact) if not ok), len(intact))
        res["fill_frames"] = sum(1 for t in range(data.shape[0]) if not intact[t] and not data[t].any())
        res["corrupt"] = sum(1 for t in range(data.shape[0]) if not intact[t] and data[t].any())
        res["reported_not_intact"] = sum(1 for t in range(min(reported, len(intact))) if not intact[t]) + max(
            0, reported - len(intact)
        )
        if writer == "livescope":
            from livescope.bridges.store import STATUS, read_records, recover

            status = read_records(path / "raw")["status"]
            saved_idx = np.nonzero(status == STATUS["saved"])[0]
            res["records_saved"] = int(saved_idx.size)
            res["records_saved_not_intact"] = int(sum(1 for t in saved_idx if t >= len(intact) or not intact[t]))
            rec = recover(path)
            res["after_recover_t"] = zarr.open_array(str(path / "raw" / "0"), mode="r").shape[0]
            res["recover"] = rec
    except Exception as exc:  # a store that does not open after the crash is a result, not an error
        res["opens"] = f"no: {type(exc).__name__}: {str(exc)[:120]}"
    finally:
        _remove(path)
    return res


# -- report -------------------------------------------------------------------------------------
def _row(label: str, r: dict, note: str = "") -> str:
    zero = "yes" if r["lost"] == 0 else f"no ({r['lost']} lost)"
    return (
        f"| {label} | {r['offered']} | {r['saved']} | {zero} | {r['mb_s']:,.0f} | {r['fps']:.1f} | "
        f"{r['mb_s_sync']:,.0f} | {r['close_s']:.1f} + {r['sync_s']:.1f} | {r['cpu_cores']:.2f} | "
        f"{r['peak_queue_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['ratio']:.2f} | {note} |"
    )


HEADER = (
    "| writer / run | offered | saved | zero loss | MB/s to OS | fps | MB/s incl. sync | close + sync s "
    "| CPU cores | peak queue MB | peak RSS MB | disk/raw | note |\n|" + "---|" * 13
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (< 1 min)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp folder beside the repo)")
    ap.add_argument("--crash-only", action="store_true")
    ap.add_argument("--no-crash", action="store_true")
    ap.add_argument("--crash-child", nargs=2, metavar=("WRITER", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.crash_child:
        crash_child(*args.crash_child)
        return
    tmp = Path(tempfile.mkdtemp(prefix="livescope-bench-store-", dir=args.dir or ROOT.parent))
    try:
        if not args.crash_only:
            _throughput(args.quick, tmp)
        if not args.no_crash:
            _crash_table(tmp, 1 if args.quick else 3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _throughput(quick: bool, tmp: Path) -> None:
    import importlib.metadata as md

    frames = camera_frames(SHAPE, 8)
    mb = frames[0].nbytes / 1e6
    fast_s, fast_n = (3.0, 60) if quick else (8.0, 200)
    paced_s = 3.0 if quick else 8.0
    out = tmp / "out"
    rows: list[str] = []

    def note_of(r: dict) -> str:
        return f"{r['wall_s']:.1f} s"

    print(
        f"\nStore, {SHAPE[0]}x{SHAPE[1]} uint16 ({mb:.1f} MB/frame; 100 fps = {100 * mb:,.0f} MB/s); "
        f"budget {BUDGET_MB:.0f} MB; zarr {md.version('zarr')}, tensorstore {md.version('tensorstore')}, "
        f"ome-writers {md.version('ome-writers')}; {platform.machine()}, {os.cpu_count()} cores",
        flush=True,
    )
    dd = dd_ceiling(tmp, 1024 if quick else 2048)
    print(f"dd oflag=direct ceiling: {dd:,.0f} MB/s" if dd else "dd: not measured", flush=True)
    for cls in WRITERS.values():
        r = run_stream(cls, out, frames, seconds=fast_s, fps=None, max_frames=fast_n)
        rows.append(_row(f"{cls.name}: raw, as fast as it goes", r, note_of(r)))
        print(rows[-1], flush=True)
    r = run_stream(LivescopeWriter, out, frames, seconds=paced_s, fps=100.0, max_frames=10**9)
    rows.append(_row("livescope: raw, offered at 100 fps", r, note_of(r)))
    print(rows[-1], flush=True)
    for cls in WRITERS.values():
        r = run_stream(cls, out, frames, seconds=fast_s * 0.75, fps=None, max_frames=fast_n, compress=True)
        rows.append(_row(f"{cls.name}: blosc zstd, as fast as it goes", r, note_of(r)))
        print(rows[-1], flush=True)
    r = run_stream(LivescopeWriter, out, frames, seconds=paced_s / 2, fps=100.0, max_frames=10**9, compress=True)
    rows.append(_row("livescope: blosc zstd, offered at 100 fps", r, note_of(r)))
    print(rows[-1], flush=True)
    r = run_stream(LivescopeWriter, out, frames, seconds=fast_s * 0.75, fps=None, max_frames=fast_n // 2, products=True)
    rows.append(
        _row(
            "livescope: raw + float32 product, as fast as it goes",
            r,
            f"{r['wall_s']:.1f} s; MB/s counts raw only, 3x bytes written",
        )
    )
    print(rows[-1], flush=True)
    print("\n" + HEADER)
    for row in rows:
        print(row)


def _crash_table(tmp: Path, repeats: int) -> None:
    print(
        f"\nkill -9 mid-stream, {repeats} kill(s) per writer (512x512 uint16 frames t = base + t, "
        "killed 0-0.3 s after >= 100 frames were reported):\n"
    )
    print(
        "| writer | reported saved | opens | shape t | intact frames | intact prefix | fill-value frames "
        "| corrupt | reported but not intact | extra |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    delays = np.random.default_rng(1).uniform(0.0, 0.3, repeats)
    for key, delay in [(k, d) for k in WRITERS for d in delays]:
        r = crash_test(key, tmp, delay_s=float(delay))
        if r.get("opens") != "yes":
            print(f"| {key} | {r['reported']} | {r['opens']} | | | | | | | |")
            continue
        extra = ""
        if key == "livescope":
            extra = (
                f"records saved {r['records_saved']} (not intact: {r['records_saved_not_intact']}); "
                f"t after recover() {r['after_recover_t']}"
            )
        print(
            f"| {key} | {r['reported']} | {r['opens']} | {r['shape_t']} | {r['intact']} | {r['intact_prefix']} | "
            f"{r['fill_frames']} | {r['corrupt']} | {r['reported_not_intact']} | {extra} |",
            flush=True,
        )


if __name__ == "__main__":
    mp.freeze_support()
    main()
