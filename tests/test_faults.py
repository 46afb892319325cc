"""Downpour under real failures: worker processes killed by pid with SIGKILL mid-training."""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from daskbelief import waits
from daskbelief.monitor import events
from daskbelief.nn import Dense, Sequential
from daskbelief.ps import checkpoint
from daskbelief.ps.sources import Fresh
from daskbelief.testing import chaos
from daskbelief.workarounds import worker_info
from daskbelief.train.downpour import downpour

pytestmark = pytest.mark.timeout(240)


def mlp():
    return Sequential((64,), [Dense(128, "relu"), Dense(10)], l2=1e-4)


def actors_by_worker(client) -> dict[str, list[str]]:
    """The actor keys each worker holds (parameter shards are ``parameter-shard-*``)."""
    return client.run(lambda dask_worker: sorted(map(str, dask_worker.state.actors)))


class Killer(threading.Thread):
    """Waits until training is under way, picks a victim worker with ``choose`` and SIGKILLs its
    process (the nanny then starts a fresh one, as a cluster manager would)."""

    def __init__(self, client, choose, *, after_step: int = 30, timeout: float = 120):
        super().__init__(daemon=True)
        self.client, self.choose, self.after_step, self.timeout = client, choose, after_step, timeout
        self.victim = None
        self.error = None

    def run(self):
        try:
            deadline = time.time() + self.timeout
            while time.time() < deadline:
                events = [m for _, m in self.client.get_events("daskbelief-replica")]
                victim = self.choose(self.client, [m for m in events if m["step"] >= self.after_step])
                if victim is not None:
                    pid = self.client.run(os.getpid, workers=[victim])[victim]
                    os.kill(pid, signal.SIGKILL)
                    self.victim = victim
                    return
                time.sleep(0.1)
            self.error = "training never reached the point to kill a worker"
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = repr(e)


def replica_worker_without_shards(client, events):
    """A worker that runs a replica and holds no parameter shard."""
    holders = {w for w, keys in actors_by_worker(client).items()
               if any(k.startswith("parameter-shard") for k in keys)}
    busy = {m["worker"] for m in events} - holders
    return min(busy) if busy else None


def a_shard_holder_once_checkpointed(checkpoint_dir):
    def choose(client, events):
        if not events or checkpoint.latest(checkpoint_dir) is None:
            return None
        holders = [w for w, keys in actors_by_worker(client).items()
                   if any(k.startswith("parameter-shard-0") for k in keys)]
        return holders[0] if holders else None
    return choose


@pytest.fixture
def three_workers():
    with LocalCluster(n_workers=3, threads_per_worker=2, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        yield client


def test_a_killed_replica_is_restarted_and_training_still_reaches_its_target(three_workers, digits_path):
    killer = Killer(three_workers, replica_worker_without_shards)
    killer.start()
    result = downpour(mlp(), digits_path, test=digits_path, client=three_workers, replicas=2,
                      shards=1, n_fetch=5, n_push=5, rule={"name": "adagrad", "lr": 0.05},
                      batch_size=32, epochs=80, report_every=10, seed=0)
    killer.join(timeout=10)
    assert killer.error is None and killer.victim is not None, killer.error
    assert result.summary["replica_restarts"] >= 1, result.replica_outcomes
    assert result.summary["shard_recoveries"] == 0
    assert sorted(o["replica"] for o in result.replica_outcomes) == [0, 1]
    assert result.summary["test_accuracy"] >= 0.95, result.summary
    assert np.isfinite(result.params).all()


def adopted_and_lost(client, run: str) -> tuple[int, int]:
    """The updates run ``run``'s recoveries counted lost, and those adopted copies regained."""
    kinds = [m for _, m in client.get_events(events.RUN) if m.get("run") == run]
    return (sum(m["updates_lost"] for m in kinds if m.get("kind") == "shard-recovered"),
            sum(m["updates_regained"] for m in kinds if m.get("kind") == "shard-adopted"))


@pytest.mark.parametrize("seed", [21])
def test_a_shard_lost_late_without_a_checkpoint_takes_the_replicas_copy(digits_path, seed):
    """No checkpoint to restore from: the shard comes back with its initial values, and the
    replica, which holds the slice as it last fetched it, hands it over. One replica fetching
    and pushing every step and waiting for each push (overlap=False) makes the copy exact and
    the updates lost known: what the restored shard lacks at the end is what the shard that
    stayed has beyond it, a push or two, not the hundreds the run had made by then."""
    victims, moments = chaos.draws(seed)
    shard, after = int(victims.integers(2)), float(moments.uniform(150, 250))
    print(f"seed {seed}: shard {shard}'s holder killed after replica step {after:.0f} of 300", flush=True)
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        since = time.time()

        def kill():
            waits.until(lambda: chaos.replica_steps(client, since) >= after, timeout=60,
                        what=f"replica step {after:.0f}")
            holder, = chaos.shard_holders(client, shard)
            return chaos.replica_steps(client, since), chaos.kill_worker(client, holder)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            killed = pool.submit(kill)
            result = downpour(mlp(), digits_path, test=digits_path, client=client, replicas=1,
                              shards=2, n_fetch=1, n_push=1, overlap=False,
                              rule={"name": "adagrad", "lr": 0.05}, batch_size=32, steps=300,
                              report_every=5, seed=0)
            step, _ = killed.result(timeout=10)
        run, = {m["run"] for _, m in client.get_events(events.RUN)
                if m.get("kind") == "start" and m["time"] >= since}
        versions = shard_versions(client, run)
        lost, regained = adopted_and_lost(client, run)
    summary = result.summary
    print("killed at step", step, "; versions:", versions, "; lost", lost, "regained", regained, summary)
    assert summary["shard_recoveries"] == 1 and regained > 0, summary
    assert summary["updates_lost"] == lost - regained == versions[1 - shard] - versions[shard], summary
    assert summary["updates_lost"] <= 2 and summary["updates_regained"] == regained, summary
    assert summary["test_accuracy"] >= 0.95, summary


@pytest.mark.parametrize("partition", [None, {"kind": "horizontal", "k": 2}])
def test_a_lost_parameter_shard_is_recreated_from_the_latest_checkpoint(three_workers, digits_path,
                                                                        tmp_path, partition):
    """Plain replicas, and model-parallel ones whose blocks talk to the shards themselves."""
    ckpts = tmp_path / "checkpoints"
    killer = Killer(three_workers, a_shard_holder_once_checkpointed(ckpts))
    killer.start()
    result = downpour(mlp(), digits_path, test=digits_path, client=three_workers, replicas=2,
                      shards=2 if partition is None else 1, n_fetch=5, n_push=5,
                      rule={"name": "adagrad", "lr": 0.05},
                      batch_size=32, epochs=80 if partition is None else 12, report_every=10,
                      seed=0, checkpoint_dir=ckpts, checkpoint_every=0.5, partition=partition)
    killer.join(timeout=10)
    assert killer.error is None and killer.victim is not None, killer.error
    summary = result.summary
    assert summary["shard_recoveries"] >= 1, summary
    recovered = [m for _, m in three_workers.get_events("daskbelief-run")
                 if m.get("kind") == "shard-recovered"]
    assert recovered and all(m["checkpoint"].startswith(str(ckpts)) for m in recovered), recovered
    lost, regained = adopted_and_lost(three_workers, summary["run"])
    assert summary["updates_lost"] == lost - regained and summary["updates_regained"] == regained
    assert summary["test_accuracy"] >= 0.95, summary
    # a model-parallel run leaves its model in its last checkpoint
    params = (result.params if partition is None
              else checkpoint.load(result.checkpoint, arrays=False).params)
    assert np.isfinite(params).all()
    assert all(s["params_finite"] for s in result.shard_stats)


# -- faults the cluster chooses: seeded random victims at random moments -------------------------

def any_worker(seed: int):
    """A ``choose`` for ``Killer``: a worker drawn at random (seeded) among those the run uses."""
    rng = random.Random(seed)

    def choose(client, events):
        return rng.choice(sorted(worker_info(client))) if events else None
    return choose


def shard_holders(client) -> set[str]:
    return {w for w, keys in actors_by_worker(client).items()
            if any(k.startswith("parameter-shard") for k in keys)}


# Any worker lost at a random step with no spare thread and no checkpoint: tests/test_chaos.py's
# plain-no-spare cases (seeded victims and moments on 3 single-threaded workers, 3 replicas).


def test_a_lost_block_is_recreated_and_its_replica_resumes(three_workers, digits_path):
    """The named case of issue 13: a model-parallel block's worker is killed (one holding no
    shard, so that it is the block, not the server, that is lost)."""
    def block_holder(client, events):
        if not events:
            return None
        blocks = {w for w, keys in actors_by_worker(client).items()
                  if any(k.startswith("partition-block") for k in keys)}
        candidates = sorted(blocks - shard_holders(client))
        return candidates[0] if candidates else None

    killer = Killer(three_workers, block_holder, after_step=20)
    killer.start()
    result = downpour(mlp(), digits_path, test=digits_path, client=three_workers, replicas=1,
                      shards=1, n_fetch=5, n_push=5, rule={"name": "adagrad", "lr": 0.05},
                      batch_size=32, epochs=8, report_every=10, seed=0,
                      partition={"kind": "horizontal", "k": 2})
    killer.join(timeout=10)
    assert killer.error is None and killer.victim is not None, killer.error
    rebuilt = [m for _, m in three_workers.get_events("daskbelief-run")
               if m.get("kind") == "blocks-recovered"]
    assert rebuilt and killer.victim in rebuilt[0]["lost_workers"], rebuilt
    assert killer.victim not in rebuilt[0]["workers"]
    outcome, = result.replica_outcomes  # the replica itself may have been on the victim too
    assert outcome["pushes_lost"] >= 1 or outcome["attempt"] >= 1, outcome
    assert result.summary["test_accuracy"] >= 0.9, result.summary


# -- what cannot be survived, and a driver that dies ----------------------------------------------

# The driver killed and the scheduler killed are tests/test_chaos.py's, on real `dask scheduler`
# and `dask worker` processes through the CLI.


def test_every_worker_lost_at_once_and_restarted_by_its_nanny(digits_path):
    """The named case of the chaos report: no worker running at all for a moment. The replica's
    home is gone for good (its task waits in ``no-worker``) and so is the shard: both come back
    on the restarted worker."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        killer = Killer(client, any_worker(0), after_step=20)
        killer.start()
        result = downpour(mlp(), digits_path, test=digits_path, client=client, replicas=1,
                          shards=1, n_fetch=5, n_push=5, rule={"name": "adagrad", "lr": 0.05},
                          batch_size=32, epochs=15, report_every=5, seed=0)
        killer.join(timeout=10)
        assert killer.error is None and killer.victim is not None, killer.error
        kinds = [m.get("kind") for _, m in client.get_events("daskbelief-run")]
    assert "shard-recovered" in kinds and "replica-restarted" in kinds, kinds
    assert result.summary["test_accuracy"] >= 0.9, result.summary


def in_the_write(path: Path) -> bool:
    """True while ``path`` is a checkpoint being written: there, and not (yet) complete."""
    try:
        return not json.loads((path / "zarr.json").read_text())["attributes"].get("complete")
    except FileNotFoundError:
        return path.exists()  # the group not created yet, or being deleted
    except (json.JSONDecodeError, KeyError):
        return True  # zarr.json half-written


class CheckpointKiller(threading.Thread):
    """Once a replica passed a seeded random step, SIGKILLs a seeded random shard holder a
    seeded random moment (0-5 ms) into the next checkpoint write that is still under way then
    (the checkpoint directory there and not complete): ``(path, victim, shard)``."""

    def __init__(self, client, root: Path, seed: int, timeout: float = 60):
        super().__init__(daemon=True)
        self.client, self.root, self.seed, self.timeout = client, root, seed, timeout
        victims, moments = chaos.draws(seed)
        self.shard = int(victims.integers(2))
        self.after, self.delay = float(moments.uniform(20, 60)), float(moments.uniform(0, 0.005))
        self.killed, self.error = None, None

    def run(self):
        try:
            print(f"seed {self.seed}: shard {self.shard}'s holder, {self.delay * 1e3:.1f} ms into the "
                  f"first checkpoint written after step {self.after:.0f}", flush=True)
            since = time.time()
            waits.until(lambda: chaos.replica_steps(self.client, since) >= self.after,
                        timeout=self.timeout, what=f"replica step {self.after:.0f}")
            holder, = chaos.shard_holders(self.client, self.shard)
            pid = chaos.worker_pids(self.client)[holder]
            seen = {p.name for p in self.root.iterdir()}
            deadline = time.monotonic() + self.timeout
            while time.monotonic() < deadline:
                for path in sorted(self.root.iterdir()):
                    if path.name in seen or not in_the_write(path):
                        continue
                    seen.add(path.name)
                    time.sleep(self.delay)
                    if in_the_write(path):
                        chaos.sigkill(pid)
                        self.killed = (path, holder)
                        return
                time.sleep(0.001)
            self.error = "no checkpoint write was caught under way"
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = repr(e)


def shard_versions(client, run: str) -> dict[int, int]:
    """Each shard's last reported version in run ``run`` (the driver reports them at the end)."""
    return {m["shard"]: m["version"] for _, m in client.get_events(events.SHARD) if m.get("run") == run}


@pytest.mark.parametrize("seed", [3])
def test_a_shard_holder_lost_while_a_checkpoint_is_written(digits_path, tmp_path, seed):
    """The write in progress is discarded (only complete checkpoints remain), the shard comes
    back from the last complete one, the run finishes and resumes from it. One replica pushing
    every step and waiting for each push (overlap=False) makes the updates lost known: every push
    reaches every shard, so what the restored shard lacks at the end is what the shard that
    stayed has beyond it, and the run must count exactly that."""
    root = tmp_path / "checkpoints"
    root.mkdir()
    train = dict(test=digits_path, replicas=1, shards=2, n_fetch=1, n_push=1, overlap=False,
                 rule={"name": "adagrad", "lr": 0.05}, batch_size=32, report_every=5, seed=0,
                 checkpoint_dir=root, checkpoint_every=0.2)
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        killer = CheckpointKiller(client, root, seed)
        since = time.time()
        killer.start()
        result = downpour(mlp(), digits_path, client=client, steps=300, **train)
        killer.join(timeout=10)
        assert killer.error is None and killer.killed is not None, killer.error
        half, victim = killer.killed
        run, = {m["run"] for _, m in client.get_events(events.RUN)
                if m.get("kind") == "start" and m["time"] >= since}
        versions = shard_versions(client, run)
        recovered = [m for _, m in client.get_events(events.RUN)
                     if m.get("run") == run and m.get("kind") == "shard-recovered"]
    print("killed", victim, "while writing", half, "; recovered:", recovered, "; versions:", versions)
    assert [m["shard"] for m in recovered] == [killer.shard] and recovered[0]["lost_worker"] == victim
    assert recovered[0]["checkpoint"] != str(half)
    kept = sorted(root.iterdir())
    assert kept and kept == checkpoint.complete(root), kept
    survivor = 1 - killer.shard
    assert result.summary["updates_lost"] == versions[survivor] - versions[killer.shard] > 0, (
        result.summary, versions)
    assert result.summary["test_accuracy"] >= 0.9, result.summary

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        resumed = downpour(mlp(), digits_path, client=client, steps=320,
                           **{**train, "resume_from": checkpoint.latest(root)})
    assert resumed.summary["test_accuracy"] >= 0.9, resumed.summary


def test_the_updates_a_restored_shard_lacks_count_from_its_own_saved_version():
    """Shard 0 restored at version 9 while shard 2, saved at 12, is at 18 now: every push went to
    both, so shard 0 lacks 18 - 9 (the 3 that shard 2 was saved ahead are missing too)."""
    from daskbelief.train.recovery import updates_missing

    assert updates_missing({1: 17, 2: 18}, [9, 10, 12], restored=0) == 9
    assert updates_missing({1: 17, 2: 18}, [9, 10, 12]) == 7  # without: per survivor's own
    assert updates_missing({0: 3}, [4, 0], restored=0) == 0


def bare_driver(client, run: str, ps, futures, model, **kwargs):
    """A Downpour ``Driver`` over ``futures`` (none: no replica) and ``ps``, with the run's real
    coordination objects, driven by a test instead of ``downpour()``: for the named cases of
    the run's end, which no kill timed from outside can reach reliably."""
    from daskbelief.train.downpour import _coordinate
    from daskbelief.train.driver import Driver
    from daskbelief.train.replica import ReplicaSpec

    spec = ReplicaSpec(run, 0, "", "train", (0, 1), 1, 1, None, 1, 1, 0, False, 1, 1, 0)
    return Driver(client, run, ps, futures, model, None, _coordinate(client, spec, ps, {0: 0}, 0),
                  **kwargs)


@pytest.mark.parametrize("seed", [5])
def test_a_shard_holder_lost_as_the_run_ends_is_recovered_before_the_final_state(three_workers,
                                                                                 tmp_path, seed):
    """The named case of the chaos benchmark at a kill every 0.7 s: a shard's worker died once the
    replicas were done, and the final checkpoint failed with a raw ``OSError``. The end of a run
    (parameters, rule state, counters, last checkpoint) is one recovering attempt: the lost shard
    (seeded) comes back from the latest checkpoint and all of it describes the recovered server."""
    from daskbelief.optim.rules import make_rule
    from daskbelief.ps.server import ParameterServer

    client, model = three_workers, mlp()
    lost = int(chaos.draws(seed)[0].integers(2))
    print(f"seed {seed}: shard {lost}'s holder killed after the replicas finished", flush=True)
    ps = ParameterServer.create(client, model.init(0), 2, make_rule({"name": "adagrad", "lr": 0.1}))
    driver = bare_driver(client, "downpour-endtest", ps, [], model, checkpoint_dir=tmp_path,
                         initial=Fresh(model, 0), checkpoint_meta={"model": model.to_dict()})
    try:
        grad = np.random.default_rng(seed).standard_normal(model.size).astype(np.float32)
        for _ in range(2):
            ps.push(grad, [0, 0], replica="replica-0")
        saved = driver.checkpoint()
        ps.push(grad, [2, 2], replica="replica-0")
        chaos.sigkill(chaos.worker_pids(client)[ps.addresses()[lost]])
        params, stats, state = driver.final()
    finally:
        driver.close()
    a, b = ps.ranges[lost]
    restored = checkpoint.load(saved, 0, model.size)
    final = checkpoint.load(checkpoint.latest(tmp_path), 0, model.size)
    assert checkpoint.latest(tmp_path) != saved and driver.recoveries == 1
    np.testing.assert_array_equal(params[a:b], restored.params[a:b])
    np.testing.assert_array_equal(state["sum_sq"][a:b], restored.state["sum_sq"][a:b])
    np.testing.assert_array_equal(final.params, params)
    np.testing.assert_array_equal(final.state["sum_sq"], state["sum_sq"])
    survivor = slice(*ps.ranges[1 - lost])
    assert not np.array_equal(params[survivor], restored.params[survivor])  # its third push stays
    assert sorted(s["version"] for s in stats) == [2, 3] and driver.updates_lost == 1


def _dies_the_first_time(marker: str) -> dict:
    """A replica stand-in whose first run kills its own worker process (the marker says it ran)."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return {"replica": 0, "samples": 1, "attempt": 0}


def test_a_replica_dask_gave_up_on_as_the_others_finish_is_submitted_again(tmp_path):
    """The named case of the chaos benchmark at a kill every 0.65 s: the last replica still
    running ended in ``KilledWorker`` and the driver took it for an outcome (raising it) because
    every future was done. A failed replica is submitted again whenever it failed."""
    import dask

    from daskbelief.ps.server import ParameterServer

    marker = str(tmp_path / "ran")
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster, Client(cluster) as client:
        first = client.submit(_dies_the_first_time, marker, pure=False)
        waits.until(lambda: first.status == "error", timeout=60, what="the first attempt to fail")
        waits.until(lambda: worker_info(client), timeout=60, what="the nanny to restart the worker")
        ps = ParameterServer.create(client, np.zeros(4, dtype=np.float32), 1)
        driver = bare_driver(client, "downpour-giveup", ps, [first], mlp(),
                             resubmit=lambda r: client.submit(_dies_the_first_time, marker, pure=False))
        try:
            outcomes = driver.wait()
        finally:
            driver.close()
        restarted = [m for _, m in client.get_events(events.RUN)
                     if m.get("run") == "downpour-giveup" and m.get("kind") == "replica-restarted"]
    assert outcomes == [{"replica": 0, "samples": 1, "attempt": 0}] and driver.resubmits == [1]
    assert len(restarted) == 1, restarted


def _hangs_until(name: str) -> dict:
    """A replica stand-in that hangs (no push, no failure) until the test sets Event ``name``."""
    from distributed import Event

    Event(name).wait(timeout=120)
    return {"replica": 0, "samples": 0, "attempt": 0}


def test_replicas_that_all_stop_pushing_without_failing_end_the_run_with_runlost(client):
    """A hang no failure reveals: the replica runs on and never pushes. Once no shard's version
    moved for ``daskbelief.stall-timeout`` seconds (1 s here), ``wait()`` raises ``RunLost``
    naming it, long before the replica would return (120 s: then there would be no error)."""
    import dask
    from distributed import Event

    from daskbelief.ps.server import ParameterServer
    from daskbelief.train.errors import RunLost

    ps = ParameterServer.create(client, np.zeros(4, dtype=np.float32), 1)
    hang = f"hang-{os.getpid()}-{time.time_ns()}"
    future = client.submit(_hangs_until, hang, pure=False)
    driver = bare_driver(client, "downpour-stalled", ps, [future], mlp(), watch_every=0.1)
    try:
        with dask.config.set({"daskbelief.stall-timeout": 1.0}), pytest.raises(RunLost) as lost:
            driver.wait()
    finally:
        Event(hang, client=client).set()
        driver.close()
    assert "lost every replica: none pushed for" in str(lost.value), lost.value
