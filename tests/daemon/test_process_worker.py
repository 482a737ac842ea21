"""Workers that Dask's nanny starts get ``MALLOC_TRIM_THRESHOLD_`` set, which makes every array
above 128 kB be mapped and its pages faulted in afresh (2-3x the time per frame of deconvolve,
bench/bench_process_worker.py); ``tune_worker_malloc`` undoes it. Checked by counting page faults
in a fresh process started the way the nanny starts one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    from livescope.daemon.distributed import tune_worker_malloc

    def faults_per_frame(n=40):
        a = np.ones((512, 512), np.float32)
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(n):
            b = a * 2.0  # a new 1 MB array per step, freed at the next: an engine's temporaries
            b += 1.0
        return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / n

    faults_per_frame()  # first use: the heap (or the mapping) grows once
    before = faults_per_frame()
    changed = tune_worker_malloc()
    faults_per_frame()  # the heap grows once to hold the arrays
    print(json.dumps({"before": before, "changed": changed, "after": faults_per_frame(),
                      "again": tune_worker_malloc()}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux) only")
def test_tune_worker_malloc_stops_the_page_faults_the_nanny_setting_causes():
    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}  # as distributed.nanny.pre-spawn-environ
    out = json.loads(
        subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )
    if not out["changed"]:
        pytest.skip("not glibc: mallopt is not available")
    assert out["before"] > 200  # 256 pages of 4 kB per 1 MB array, faulted in on every step
    assert out["after"] < 10
    assert out["again"] is False  # once per process
    # without the variable (a plain process, a thread worker) nothing is changed
    env.pop("MALLOC_TRIM_THRESHOLD_")
    plain = json.loads(
        subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True, timeout=60
        ).stdout
    )
    assert plain["changed"] is False and plain["before"] < 50  # glibc adapts its thresholds itself
