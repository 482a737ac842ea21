"""Fixtures shared by the daemon tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def client():
    """A dask.distributed LocalCluster of two thread workers, one per test module (start-up is the
    cost), shared by the tests that do not kill anything."""
    pytest.importorskip("distributed", reason="dask.distributed is not installed: pip install 'dask[distributed]'")
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()
