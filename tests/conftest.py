from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def free_address():
    from livescope.bridges.transport import free_tcp_address

    return free_tcp_address


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (the ../shared/data folder beside the repo)")
    return SHARED_DATA


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
