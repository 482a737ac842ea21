"""kill -9 the daemon mid-stream: the store opens and holds every frame it reported saved."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr

from livescope.bridges.sim import SimConfig, SimSample
from livescope.bridges.store import STATUS, read_records, recover
from livescope.daemon.control import ControlClient, ControlTimeout
from tests.conftest import wait_for


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX; Windows uses TerminateProcess")
def test_kill_9_mid_stream_keeps_every_frame_reported_saved(tmp_path, free_address):
    out = tmp_path / "crash.zarr"
    control = free_address()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "livescope",
            "daemon",
            "--source",
            "sim",
            "--out",
            str(out),
            "--frames",
            "100000",
            "--sim-size",
            "64",
            "--sim-interval",
            "0.005",
            "--ingest",
            free_address(),
            "--publish",
            free_address(),
            "--control",
            control,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    client = ControlClient(control, timeout_s=1.0)
    try:

        def saved_enough():
            try:
                st = client.status()
            except ControlTimeout:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                return None
            return st if st.get("ok") and st["frames"]["saved"] >= 60 else None  # ok: the token file is there

        st = wait_for(saved_enough, timeout=60, interval=0.05, message="60 saved frames")
        reported = st["frames"]["saved"]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    rec = read_records(out / "raw")
    saved_t = np.nonzero(rec["status"] == STATUS["saved"])[0]
    assert len(saved_t) >= reported
    # saved frames are contiguous from t=0 and bit-exact
    assert np.array_equal(saved_t, np.arange(len(saved_t)))
    arr = zarr.open_array(str(out / "raw" / "0"), mode="r")
    sample = SimSample(SimConfig(shape=(64, 64), seed=0))
    for t in saved_t:
        np.testing.assert_array_equal(arr[t], sample.render(int(t)))
    # recover trims the time axis to what was saved, and the store stays readable
    assert recover(out)["raw"] == len(saved_t)
    assert zarr.open_array(str(out / "raw" / "0"), mode="r").shape[0] == len(saved_t)
