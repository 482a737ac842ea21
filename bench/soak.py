"""Soak: the daemon's resident memory over a long run at the demo's frame rate.

    python bench/soak.py [--seconds 120] [--engines register,deconvolve,decompose] [--csv rss.csv]

Runs ``livescope daemon --source sim`` as a subprocess and samples its RSS (Linux /proc) every
half second; prints the slope after warm-up. tests/daemon/test_soak.py runs a short version.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def soak(seconds: float, engines: str, out: str, interval: float = 0.05, size: int = 256) -> list[tuple[float, float]]:
    from livescope.bridges.transport import free_tcp_address

    frames = int(seconds / interval)
    cmd = [
        sys.executable,
        "-m",
        "livescope",
        "daemon",
        "--source",
        "sim",
        "--frames",
        str(frames),
        "--sim-size",
        str(size),
        "--sim-interval",
        str(interval),
        "--out",
        out,
        "--overwrite",
        "--ingest",
        free_tcp_address(),
        "--publish",
        free_tcp_address(),
        "--control",
        free_tcp_address(),
    ]
    if engines:
        cmd += ["--engines", engines]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    while proc.poll() is None:
        r = rss_mb(proc.pid)
        if r is not None:
            samples.append((time.monotonic() - t0, r))
        time.sleep(0.5)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read().decode()[-2000:])
    return samples


def slope_mb_per_min(samples: list[tuple[float, float]], warmup_s: float) -> float:
    import numpy as np

    pts = np.array([s for s in samples if s[0] >= warmup_s])
    if len(pts) < 4:
        raise ValueError("too few samples after warm-up")
    return float(np.polyfit(pts[:, 0], pts[:, 1], 1)[0] * 60)


def robust_slope_mb_per_min(samples: list[tuple[float, float]], warmup_s: float) -> float:
    """Theil-Sen slope (median of pairwise slopes) after warm-up, in MB/min.

    RSS after warm-up is a flat floor with short spikes of tens of MB (shard buffers being encoded
    and written); one spike near the end of a short run tilts a least-squares fit by more than a
    real leak would, the median of pairwise slopes ignores it.
    """
    import numpy as np

    pts = np.array([s for s in samples if s[0] >= warmup_s])
    if len(pts) < 4:
        raise ValueError("too few samples after warm-up")
    i, j = np.triu_indices(len(pts), k=1)
    dt = pts[j, 0] - pts[i, 0]
    keep = dt > 1.0
    return float(np.median((pts[j, 1] - pts[i, 1])[keep] / dt[keep]) * 60)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--engines", default="register,deconvolve,decompose")
    ap.add_argument("--out", default="/tmp/livescope-soak.zarr")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args()
    samples = soak(args.seconds, args.engines, args.out)
    warm = min(20.0, args.seconds / 4)
    print(
        f"RSS: start {samples[0][1]:.0f} MB, after warm-up {samples[int(len(samples) / 4)][1]:.0f} MB, "
        f"end {samples[-1][1]:.0f} MB, max {max(s[1] for s in samples):.0f} MB; slope after {warm:.0f} s: "
        f"{slope_mb_per_min(samples, warm):+.2f} MB/min least squares, "
        f"{robust_slope_mb_per_min(samples, warm):+.2f} MB/min Theil-Sen"
    )
    if args.csv:
        Path(args.csv).write_text("seconds,rss_mb\n" + "".join(f"{t:.1f},{r:.1f}\n" for t, r in samples))


if __name__ == "__main__":
    main()
