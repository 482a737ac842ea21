"""Denoising speed, head to head: denoising models and BM3D, round after round, in one run.

    python bench/bench_denoise_speed.py                                 # shipped model vs BM3D
    python bench/bench_denoise_speed.py --model /tmp/old.lsmodel --rounds 8 # and another model file
    git show d71f73d:engines/models/denoise_default.lsmodel > /tmp/old.lsmodel  # the concatenated-skip model

A machine's speed drifts within minutes (other jobs, clocks), so a model timed now and BM3D timed
a minute later give a ratio that drifts too. Here every contender lives in its own process (two
ONNX Runtime sessions in one process disturb each other's thread pools) and they take turns:
each round, each contender denoises ``--frames`` 512x512 frames (BM3D: one, the W2S 085_1 noisy
input at its tuned sigma, 1.5 x ``estimate_sigma``, as bench/bench_denoise.py runs it), and
reports its own per-frame times. The table gives each one's median and best frame, and the median over
rounds of BM3D's time over each model's time in the same round. Needs ``pip install -e ".[bench]"`` (bm3d, PyWavelets).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def worker(kind: str, arg: str, frames: int, backend: str) -> None:
    """One contender: answers each stdin line with a JSON list of per-frame seconds."""
    if kind == "model":
        from livescope.engines import FrameInfo, StreamSpec, create_engine

        eng = create_engine("denoise", model=arg or None, backend=backend)
        eng.setup(StreamSpec(shape=(512, 512), dtype="uint16", bits=12))
        frame = np.random.default_rng(0).integers(0, 4000, (512, 512)).astype(np.uint16)
        seq = [0]

        def one() -> None:
            seq[0] += 1
            eng.process(frame, FrameInfo(seq=seq[0]))

        one()  # session made, first run
        name = f"{eng.describe()['backend_running']}"
    else:
        import bm3d
        import tifffile
        from skimage.restoration import estimate_sigma

        xn = tifffile.imread(DATA / "w2s_pairs" / "input_avg1_085_1.tif").astype(np.float64) / 255.0
        sigma = 1.5 * float(estimate_sigma(xn))
        frames = 1

        def one() -> None:
            bm3d.bm3d(xn, sigma_psd=sigma)

        name = f"bm3d sigma {sigma:.4f}"
    print(json.dumps({"ready": name}), flush=True)
    for _ in sys.stdin:
        times = []
        for _ in range(frames):
            t = time.perf_counter()
            one()
            times.append(time.perf_counter() - t)
        print(json.dumps(times), flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, action="append", default=[], help="another model file (repeatable)")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--frames", type=int, default=10, help="frames per round for each model")
    p.add_argument("--backend", default="onnxruntime")
    p.add_argument("--no-bm3d", dest="bm3d", action="store_false")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "ARG"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.frames, a.backend)

    from livescope.engines import modelfile

    models = {f"shipped default ({modelfile.load().hash})": ""}
    for m in a.model:
        models[f"{m.name} ({modelfile.load(m).hash})"] = str(m)
    kinds = [("model", label, path) for label, path in models.items()]
    if a.bm3d:
        kinds.append(("bm3d", "BM3D tuned (085_1 input)", "-"))
    procs = {}
    for kind, label, arg in kinds:
        cmd = [sys.executable, __file__, "--worker", kind, arg or "", "--frames", str(a.frames),
               "--backend", a.backend]  # fmt: skip
        procs[label] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = json.loads(procs[label].stdout.readline())["ready"]
        print(f"- {label}: {ready}", file=sys.stderr)
    times: dict[str, list[list[float]]] = {label: [] for label in procs}
    for r in range(a.rounds):
        for label, proc in procs.items():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            times[label].append(json.loads(proc.stdout.readline()))
        print(f"round {r + 1}/{a.rounds}", file=sys.stderr)
    for proc in procs.values():
        proc.stdin.close()
        proc.wait(timeout=60)

    print(f"machine: {platform.machine()}, 2-core VM; {a.rounds} rounds, {a.frames} frames per model per round, "
          f"backend {a.backend}\n")  # fmt: skip
    bm = times.get("BM3D tuned (085_1 input)")
    head = "| contender | median ms per frame | best ms | frames/s (median) |"
    print(head + (" BM3D / this, median over rounds |" if bm else ""))
    print("|---|---|---|---|" + ("---|" if bm else ""))
    for label, rounds in times.items():
        flat = [t for rd in rounds for t in rd]
        med = statistics.median(flat)
        row = f"| {label} | {1000 * med:.1f} | {1000 * min(flat):.1f} | {1 / med:.1f} |"
        if bm:
            ratio = statistics.median(bm[i][0] / statistics.median(rd) for i, rd in enumerate(rounds))
            row += f" {ratio:.1f}x |"
        print(row)


if __name__ == "__main__":
    main()
