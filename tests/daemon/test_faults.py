"""Faults the daemon must survive: a full disk; a restart on the same output."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

from livescope.bridges.store import STATUS, read_records
from livescope.bridges.transport import FramePublisher
from livescope.daemon.cli import run_daemon
from livescope.daemon.config import DaemonConfig


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: a disk that fills up (needs root and mount, as in CI here; skipped elsewhere)."""
    if sys.platform != "linux":
        pytest.skip("tmpfs mounts are Linux-only")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.parametrize("shape", [(256, 128), (96, 128)])  # the disk fills in a shard write / in a resize
def test_disk_full_is_counted_store_stays_readable_producer_never_blocked(small_disk, free_address, shape):
    n = 150 if shape[0] == 256 else 300
    cfg = DaemonConfig(
        source="zmq",
        out=small_disk / "out.zarr",
        frames=n,
        ingest=free_address(),
        publish=None,
        control=None,
        exit_on_end=False,
        min_free_gb=0.0,
    )
    # 150 frames of 64 kB (9.8 MB) or 24 kB (3.7 MB + a grown time axis) onto a 6 MB disk
    n = 150 if shape[0] == 256 else 300
    frames = np.random.default_rng(0).integers(0, 4096, (n, *shape), dtype=np.uint16)
    results = []

    def publish(pipeline):
        pub = FramePublisher(cfg.ingest, stream="cam", block=True, send_timeout_ms=5000)
        for t in range(n):
            results.append(pub.send(frames[t], index={"t": t}))
        pub.close()

    summary = run_daemon(cfg, on_started=lambda p: threading.Thread(target=publish, args=(p,), daemon=True).start())
    assert all(results)  # the full disk never pushed back on the producer
    f = summary["frames"]
    assert f["received"] == n
    assert 0 < f["saved"] < n, f
    assert f["saved"] + f["lost"] == n, f
    assert summary["store"]["write_errors"] > 0 and "No space" in summary["store"]["last_error"]
    rec = read_records(cfg.out / "raw")
    saved = np.nonzero(rec["status"] == STATUS["saved"])[0]
    assert len(saved) == f["saved"]
    arr = zarr.open_array(str(cfg.out / "raw" / "0"), mode="r")
    for t in saved[:: max(1, len(saved) // 10)]:
        np.testing.assert_array_equal(arr[t], frames[t])


def test_restart_on_the_same_output_continues_as_a_new_segment(tmp_path, free_address):
    import json

    from livescope.bridges.sim import SimConfig, SimSample
    from livescope.bridges.store import StoreError

    out = tmp_path / "run.zarr"

    def cfg(**kw):
        return DaemonConfig(
            source="sim",
            out=out,
            frames=4,
            sim_shape=(32, 32),
            sim_interval_s=0.0,
            ingest=free_address(),
            publish=None,
            control=None,
            **kw,
        )

    run_daemon(cfg())
    with pytest.raises(StoreError, match="--resume"):
        run_daemon(cfg())
    summary = run_daemon(cfg(resume=True, sim_seed=1))
    assert summary["frames"]["saved"] == 4
    first = zarr.open_array(str(out / "raw" / "0"), mode="r")[...]
    second = zarr.open_array(str(out / "raw_seg1" / "0"), mode="r")[...]
    np.testing.assert_array_equal(first, np.stack([SimSample(SimConfig(shape=(32, 32))).render(t) for t in range(4)]))
    np.testing.assert_array_equal(
        second, np.stack([SimSample(SimConfig(shape=(32, 32), seed=1)).render(t) for t in range(4)])
    )
    root = json.loads((out / "zarr.json").read_text())["attributes"]["livescope"]
    assert [(i["path"], i["segment"]) for i in root["images"]] == [("raw", 0), ("raw_seg1", 1)]
    assert len(root["runs"]) == 1 and root["runs"][0]["saved"] == {"raw": 4}
