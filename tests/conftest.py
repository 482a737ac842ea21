from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

# Real test data kept in the repository (CC BY 4.0, see tests/data/real/SOURCES.md): every test
# that needs real data reads it from here, so a fresh clone runs every test.
REAL_DATA = Path(__file__).resolve().parent / "data" / "real"
# The optional shared folder (../shared/data beside the repository, or LIVESCOPE_SHARED_DATA):
# it holds data that may not be redistributed with the project (the W2S pairs, research use).
SHARED_DATA = Path(
    os.environ.get("LIVESCOPE_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
W2S_PAIRS = SHARED_DATA / "w2s_pairs"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "w2s: an optional extra on the W2S pairs (shared data, research use); deselected without them"
    )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``w2s`` repeat a check already made on the in-repo data with the W2S pairs;
    without the pairs they are deselected (reported in the summary and header), not skipped."""
    if W2S_PAIRS.is_dir():
        return
    dropped = [item for item in items if item.get_closest_marker("w2s")]
    if dropped:
        items[:] = [item for item in items if not item.get_closest_marker("w2s")]
        config.hook.pytest_deselected(items=dropped)


def pytest_report_header(config):
    if not W2S_PAIRS.is_dir():
        return (
            f"W2S pairs not found at {W2S_PAIRS}: tests marked w2s (optional extras) are deselected; "
            "set LIVESCOPE_SHARED_DATA to the folder that holds w2s_pairs/ to run them"
        )
    return f"W2S pairs: {W2S_PAIRS}"


@pytest.fixture
def free_address():
    from livescope.bridges.transport import free_tcp_address

    return free_tcp_address


@pytest.fixture
def real_data() -> Path:
    """The in-repo real data folder (tests/data/real); a missing file is a failure, not a skip."""
    if not REAL_DATA.is_dir():
        raise FileNotFoundError(f"{REAL_DATA} is missing: it is part of the repository (git checkout tests/data)")
    return REAL_DATA


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.02, message: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (no fixed sleeps as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def xvfb_display(first: int, screen: str):
    """Start an Xvfb on the first free display number from ``first`` (a generator for a pytest
    fixture: yields ``":N"``, stops the server after); the test skips without Xvfb."""
    import shutil
    import subprocess

    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb libxcb-icccm4 libxcb-keysyms1)")
    for n in range(first, first + 60):
        if not Path(f"/tmp/.X11-unix/X{n}").exists() and not Path(f"/tmp/.X{n}-lock").exists():
            break
    proc = subprocess.Popen(
        ["Xvfb", f":{n}", "-screen", "0", screen, "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: Path(f"/tmp/.X11-unix/X{n}").exists() or proc.poll() is not None, 10, message="Xvfb")
        if proc.poll() is not None:
            pytest.skip(f"Xvfb :{n} did not start")
        yield f":{n}"
    finally:
        proc.terminate()
        proc.wait(5)
