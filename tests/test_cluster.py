"""Finding workers on a real cluster, while the client's own periodic refresh runs."""
from __future__ import annotations

import dask
import pytest
from distributed import Client

from daskbelief.cluster import require_threads, require_workers, worker_info


def test_worker_info_sees_every_worker_while_the_client_refreshes_its_cache(cluster):
    # The client refreshes its cached scheduler info (with no workers in it) every 5 ms here;
    # client.scheduler_info() then reports an empty cluster a few percent of the time.
    with dask.config.set({"distributed.client.scheduler-info-interval": "5ms"}), \
            Client(cluster) as client:
        expected = {nanny.worker_address for nanny in cluster.workers.values()}
        seen = [set(worker_info(client)) for _ in range(500)]
    assert all(s == expected for s in seen), f"{sum(s != expected for s in seen)} of 500 differed"


def test_too_few_workers_or_threads_is_a_clear_error(client):
    assert len(require_workers(client, 2)) == 2
    with pytest.raises(RuntimeError, match="has 2 worker\\(s\\); this run needs at least 3"):
        require_workers(client, 3)
    with pytest.raises(RuntimeError, match="need 5 worker threads .* has 4"):
        require_threads(client, 5, "5 replicas")
