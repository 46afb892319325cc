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


def test_workers_we_start_reuse_large_buffers_instead_of_faulting_them_in_each_call():
    """Nanny-started workers get ``WORKER_MALLOC`` (distributed's own setting makes every buffer
    over 128 KiB a fresh mmap): a LocalCluster made under ``reusing_buffers``, and a ``dask
    worker`` process given ``worker_environ()``, whose other pre-spawn settings stay."""
    import os
    import subprocess
    import sys

    from distributed import LocalCluster

    from daskbelief.cluster import WORKER_MALLOC, reusing_buffers, worker_environ

    with reusing_buffers(), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                         dashboard_address=":0") as local, Client(local) as c:
        seen = c.run(lambda: {k: os.environ.get(k) for k in (*WORKER_MALLOC, "OMP_NUM_THREADS")})
    assert list(seen.values()) == [{**WORKER_MALLOC, "OMP_NUM_THREADS": "1"}]
    script = ("import os; from distributed.nanny import _get_env_variables as get; "
              "print({**os.environ, **get('distributed.nanny.pre-spawn-environ')})")
    read = subprocess.run([sys.executable, "-c", script], env={**os.environ, **worker_environ()},
                          capture_output=True, text=True)
    env = eval(read.stdout)  # noqa: S307 -- our own child's repr of a dict of strings
    assert {k: env[k] for k in WORKER_MALLOC} == WORKER_MALLOC and env["OMP_NUM_THREADS"] == "1"


def test_a_runs_streams_batch_promptly_inside_prompt_streams_and_as_before_after(client):
    """distributed batches stream messages (10 ms client->scheduler, 5 ms scheduler->worker):
    inside ``prompt_streams`` they wait at most PROMPT_INTERVAL, and leave as they were."""
    from daskbelief.workarounds import PROMPT_INTERVAL, prompt_streams

    def intervals(dask_scheduler=None):
        return sorted({s.interval for s in dask_scheduler.stream_comms.values()}
                      | {dask_scheduler.client_comms[client_id].interval})

    client_id = client.id
    own, theirs = client.scheduler_comm.interval, client.run_on_scheduler(intervals)
    assert own > PROMPT_INTERVAL and min(theirs) > PROMPT_INTERVAL
    with prompt_streams(client):
        assert client.scheduler_comm.interval == PROMPT_INTERVAL
        assert client.run_on_scheduler(intervals) == [PROMPT_INTERVAL]
    assert client.scheduler_comm.interval == own
    assert client.run_on_scheduler(intervals) == theirs


def test_prompt_streams_leave_the_batching_alone_where_the_config_says_so(client):
    import dask

    from daskbelief.workarounds import prompt_streams

    own = client.scheduler_comm.interval
    with dask.config.set({"daskbelief.prompt-streams": False}), prompt_streams(client):
        assert client.scheduler_comm.interval == own
