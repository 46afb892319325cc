"""Submitting to a cluster a user started: real `dask scheduler` and `dask worker` processes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

from daskbelief.cluster import worker_info

DASK = [sys.executable, "-m", "dask"]  # the `dask` command of this interpreter, console script or not


def _start(args, log: Path) -> subprocess.Popen:
    # A session of its own: the worker's nanny and its worker process are stopped together.
    return subprocess.Popen([*DASK, *args], stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture
def user_cluster(tmp_path):
    """A scheduler and two single-threaded workers, found through a scheduler file."""
    sched_file = tmp_path / "scheduler.json"
    procs = [_start(["scheduler", "--scheduler-file", str(sched_file), "--port", "0",
                     "--dashboard-address", ":0", "--preload", "daskbelief.monitor.dashboard"],
                    tmp_path / "scheduler.log")]
    try:
        deadline = time.time() + 60
        while not sched_file.exists():
            assert time.time() < deadline, (tmp_path / "scheduler.log").read_text()
            time.sleep(0.2)
        procs.append(_start(["worker", "--scheduler-file", str(sched_file), "--nworkers", "2",
                             "--nthreads", "2", "--memory-limit", "0"], tmp_path / "worker.log"))
        with Client(scheduler_file=str(sched_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=60)
        yield sched_file
    finally:
        for proc in reversed(procs):
            _stop(proc)


def test_train_through_the_cli_on_a_cluster_started_with_dask_scheduler_and_dask_worker(
        user_cluster, tmp_path, digits_path):
    config = Path(__file__).parents[1] / "pipelines" / "digits-downpour.toml"
    text = config.read_text().replace('path = "data/digits.zarr"', f'path = "{digits_path}"')
    (tmp_path / "digits.toml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "daskbelief.cli", "train", str(tmp_path / "digits.toml"),
                           "--scheduler-file", str(user_cluster), "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] >= 0.95 and summary["replicas"] == 4
    with Client(scheduler_file=str(user_cluster)) as client:
        assert len(worker_info(client)) == 2  # the user's cluster is left running
        replica_workers = {m["worker"] for _, m in client.get_events("daskbelief-replica")}
        assert replica_workers <= set(worker_info(client)) and replica_workers
