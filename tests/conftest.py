"""Shared fixtures: one real LocalCluster of worker processes and one digits store per session."""
from __future__ import annotations

import pytest
from distributed import Client, LocalCluster


@pytest.fixture(scope="session")
def cluster():
    """Two worker processes with two threads each: room for four concurrent replicas."""
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as c:
        yield c


@pytest.fixture
def client(cluster):
    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="session")
def digits_path(tmp_path_factory):
    import daskbelief_datasets as recipes

    path = tmp_path_factory.mktemp("data") / "digits.zarr"
    recipes.build("digits", str(path))
    return str(path)
