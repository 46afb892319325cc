"""Elastic Downpour (replicas="auto") on real clusters that grow and shrink mid-run: workers added
(``cluster.scale``), retired (``client.retire_workers``), killed (SIGKILL) and managed by
``cluster.adapt``, at moments drawn from a seeded RNG (the seed is printed)."""
from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

from daskbelief.nn import Dense, Sequential
from daskbelief.optim.rules import make_rule
from daskbelief.ps.policy import threads_to_fill
from daskbelief.train.downpour import downpour
from daskbelief.train.elastic import Ledger, batches_per_unit, read_unit, unit_batches, unit_ranges
from daskbelief.train.evaluate import evaluate_rows, finish
from daskbelief.train.reference import train_sgd
from daskbelief.data import open_store
from daskbelief.workarounds import worker_info
from test_submission import _start, _stop, user_cluster  # noqa: F401 -- `dask scheduler`, `dask worker`

pytestmark = pytest.mark.timeout(240)
RULE = {"name": "adagrad", "lr": 0.05}
EPOCHS = 60


def mlp():
    return Sequential((64,), [Dense(128, "relu"), Dense(10)], l2=1e-4)


def accuracy(model, params, path) -> float:
    store = open_store(path, split="test")
    return finish([evaluate_rows(model, params, store, 0, store.n)], store.task)["accuracy"]


@pytest.fixture(scope="module")
def reference_accuracy(digits_path):
    """The single-process trainer's test accuracy after as many passes over the data."""
    model = mlp()
    with threadpool_limits(1):
        params, _ = train_sgd(model, digits_path, RULE, batch_size=32, epochs=EPOCHS, seed=0)
    return accuracy(model, params, digits_path)


def assert_every_unit_read_once(result, path, unit_chunks=1, batch_size=32, epochs=EPOCHS):
    """The pieces every replica read (its outcome's ``units``) tile each unit of each epoch."""
    batches = batches_per_unit(unit_ranges(open_store(path), unit_chunks), batch_size)
    read = {}
    for o in result.replica_outcomes:
        for epoch, unit, first, stop in o["units"]:
            read.setdefault((epoch, unit), []).append((first, stop))
    assert sorted(read) == [(e, u) for e in range(epochs) for u in range(len(batches))]
    for (epoch, unit), pieces in read.items():
        edges = [b for piece in sorted(pieces) for b in piece]
        assert edges[0] == 0 and edges[-1] == batches[unit], (epoch, unit, pieces)
        assert all(edges[i] == edges[i + 1] for i in range(1, len(edges) - 1, 2)), (epoch, unit, pieces)


def run_events(client, run_kind: str) -> list[dict]:
    return [m for _, m in client.get_events("daskbelief-run") if m.get("kind") == run_kind]


def shard_holders(client) -> set[str]:
    actors = client.run(lambda dask_worker: sorted(map(str, dask_worker.state.actors)))
    return {w for w, keys in actors.items() if any(k.startswith("parameter-shard") for k in keys)}


class Scenario(threading.Thread):
    """Runs ``steps`` (callables of the client, the cluster and the RNG) one after the other once
    training is under way; the first error ends it and is reported by the test."""

    def __init__(self, client, cluster, seed: int, steps):
        super().__init__(daemon=True)
        self.client, self.cluster, self.rng, self.steps = client, cluster, random.Random(seed), steps
        self.log, self.error = [], None

    def run(self):
        try:
            for step in self.steps:
                self.log.append(step(self))
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = repr(e)

    def replica_events(self):
        return [m for _, m in self.client.get_events("daskbelief-replica")]

    def wait_for(self, check, what: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = check()
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"gave up after {timeout:.0f}s waiting for {what}")

    def after_steps(self, low: int, high: int):
        """Wait until some replica made a number of steps drawn from [low, high]."""
        at = self.rng.randint(low, high)
        self.wait_for(lambda: any(m["step"] >= at for m in self.replica_events()),
                      f"a replica at step {at}")
        return f"step {at}"


def scale_up(s: Scenario):
    s.after_steps(10, 40)
    before = set(worker_info(s.client))
    s.cluster.scale(len(before) + 1)
    new = s.wait_for(lambda: set(worker_info(s.client)) - before, "the new worker")
    s.wait_for(lambda: any(m["worker"] in new for m in s.replica_events()),
               "a replica on the new worker to report")
    return ("scaled up", sorted(new))


def replica_workers_without_shards(s: Scenario) -> list[str]:
    """Live workers whose replicas have reported, holding no parameter shard."""
    hosting = {m["worker"] for m in s.replica_events()} & set(worker_info(s.client))
    return sorted(hosting - shard_holders(s.client))


def retire_one(s: Scenario):
    s.after_steps(0, 40)
    victim = s.rng.choice(s.wait_for(lambda: replica_workers_without_shards(s),
                                     "a replica on a worker without shards"))
    s.client.retire_workers(workers=[victim])
    return ("retired", victim)


def scale_down(s: Scenario):
    """``cluster.scale`` back down: SpecCluster retires the newest worker (the one added)."""
    s.after_steps(0, 30)
    before = set(worker_info(s.client))
    s.cluster.scale(len(before) - 1)
    gone = s.wait_for(lambda: before - set(worker_info(s.client)), "a worker to leave")
    return ("scaled down", sorted(gone))


def kill_one(s: Scenario):
    s.after_steps(10, 60)
    victim = s.rng.choice(s.wait_for(lambda: replica_workers_without_shards(s),
                                     "a replica on a worker without shards"))
    pid = s.client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    return ("killed", victim)


def adapt(s: Scenario):
    s.after_steps(0, 30)
    s.cluster.adapt(minimum=3, maximum=3, interval="200ms")
    return ("adapt", 3, 3)


def seeded() -> int:
    seed = int(os.environ.get("DASKBELIEF_ELASTIC_SEED", random.randrange(10**6)))
    print(f"elastic scenario seed: {seed} (rerun with DASKBELIEF_ELASTIC_SEED={seed})")
    return seed


@pytest.fixture(scope="module")
def grown_and_shrunk(digits_path):
    """One run on 2 single-thread workers: a third worker added, scaled down again, then a
    replica's worker (one holding no shard) retired, at seeded moments."""
    seed = seeded()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        scenario = Scenario(client, cluster, seed, [scale_up, scale_down, retire_one])
        scenario.start()
        result = downpour(mlp(), digits_path, test=digits_path, client=client, replicas="auto",
                          shards=1, rule=RULE, batch_size=32, epochs=EPOCHS, report_every=10,
                          seed=0)
        scenario.join(timeout=10)
        yield result, scenario, {k: run_events(client, k) for k in
                                 ("replica-joined", "replica-retired", "replica-lost",
                                  "replica-restarted")}


def test_a_worker_added_mid_run_gets_a_replica_that_trains(grown_and_shrunk):
    result, scenario, events = grown_and_shrunk
    assert scenario.error is None, (scenario.error, scenario.log)
    new = scenario.log[0][1]
    joined = [m for m in events["replica-joined"] if m["worker"] in new]
    assert joined, events
    trained = [o for o in result.replica_outcomes if o["worker"] in new]
    assert trained and all(o["steps"] > 0 for o in trained), result.replica_outcomes
    assert result.summary["replicas_joined"] == 3 and result.summary["replicas_max_live"] == 3


def test_a_retired_worker_lets_its_replica_go_without_a_failure(grown_and_shrunk, digits_path,
                                                                reference_accuracy):
    result, scenario, events = grown_and_shrunk
    assert scenario.error is None, (scenario.error, scenario.log)
    (scaled_down,), victim = scenario.log[1][1], scenario.log[2][1]
    assert scaled_down == scenario.log[0][1][0]  # the worker added went again
    retired = [o for o in result.replica_outcomes if o["status"] == "retired"]
    assert sorted(o["worker"] for o in retired) == sorted([scaled_down, victim]), result.replica_outcomes
    assert sorted(m["worker"] for m in events["replica-retired"]) == sorted([scaled_down, victim])
    assert not events["replica-lost"] and not events["replica-restarted"]
    summary = result.summary
    assert summary["replicas_retired"] == 2 and summary["replicas_lost"] == 0
    assert summary["replica_restarts"] == 0 and summary["shard_recoveries"] == 0
    assert sorted(o["status"] for o in result.replica_outcomes) == ["done", "retired", "retired"]
    # asynchronous, so not the reference's parameters: within 2 points of its accuracy
    assert summary["test_accuracy"] >= reference_accuracy - 0.02, (summary, reference_accuracy)


def test_every_unit_of_every_epoch_is_read_exactly_once_through_joins_and_retirements(
        grown_and_shrunk, digits_path):
    result, _, _ = grown_and_shrunk
    assert_every_unit_read_once(result, digits_path)
    store = open_store(digits_path)
    units = unit_ranges(store, 1)
    for o in result.replica_outcomes:  # each replica trained on exactly the rows it says it read
        rows = sum(min(stop * 32, b - a) - first * 32 for _, u, first, stop in o["units"]
                   for a, b in [units[u]])
        assert o["samples"] == rows, o
    assert result.summary["samples"] == EPOCHS * store.n


def test_under_adapt_with_a_worker_killed_the_run_finishes_with_the_right_accuracy(
        digits_path, reference_accuracy):
    """``adapt`` grows the cluster from 2 workers to 3 mid-run, and a replica's worker is killed:
    its replica is lost (its unit read again), the nanny's fresh worker gets a new one."""
    seed = seeded()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        scenario = Scenario(client, cluster, seed, [adapt, kill_one])
        scenario.start()
        result = downpour(mlp(), digits_path, test=digits_path, client=client, replicas="auto",
                          shards=1, rule=RULE, batch_size=32, epochs=EPOCHS, report_every=10,
                          seed=0, unit_chunks=2)
        scenario.join(timeout=10)
        lost = run_events(client, "replica-lost")
    assert scenario.error is None, (scenario.error, scenario.log)
    summary = result.summary
    assert [m["worker"] for m in lost] == [scenario.log[1][1]], lost
    assert summary["replicas_lost"] == 1 and summary["replica_restarts"] == 1
    assert summary["replicas_joined"] >= 3 and summary["replicas_retired"] == 0
    assert_every_unit_read_once(result, digits_path, unit_chunks=2)
    assert summary["test_accuracy"] >= reference_accuracy - 0.02, (summary, reference_accuracy)


def test_one_elastic_replica_without_overlap_equals_training_in_the_ledgers_order(client, digits_path):
    """The oracle: one process reading the units in the ledger's seeded order, batch by batch."""
    model, store, rule = mlp(), open_store(digits_path), make_rule(RULE)
    result = downpour(model, store, client=client, replicas="auto", max_replicas=1, shards=2,
                      n_fetch=1, n_push=1, rule=RULE, batch_size=32, epochs=2, overlap=False,
                      seed=5, unit_chunks=3)
    params = model.init(5)
    state, grad = rule.init(params), np.empty_like(params)
    units = unit_ranges(store, 3)
    with threadpool_limits(1):
        for epoch in range(2):
            for unit in np.random.default_rng([5, epoch]).permutation(len(units)):
                for X, y in unit_batches(read_unit(store, units[unit], 5, epoch, int(unit)), 32, 0):
                    model.loss_and_grad(params, X, y, out=grad)
                    rule.apply(params, grad, state)
    np.testing.assert_allclose(result.params, params, rtol=0, atol=1e-5)
    assert result.summary["replicas_joined"] == 1 and result.summary["replicas_max_live"] == 1


def test_the_ledger_hands_back_and_requeues_so_each_unit_is_read_once():
    ledger = Ledger([2, 3, 2], epochs=2, seed=0)
    a, a2 = ledger.take(0, {}), ledger.take(0, {})       # reading a, a2 taken ahead
    ledger.leave(0, a, a[2] + 1, {"status": "retired"})  # read one batch of a: the rest goes back
    assert list(ledger.pending)[:2] == [(a[0], a[1], a[2] + 1), a2]
    b = ledger.take(1, {})
    ledger.lose(1, "w")                                  # killed: its whole piece goes back
    assert ledger.pending[0] == b
    c, c2 = ledger.take(2, {}), ledger.take(2, {})
    ledger.leave(2, c2, 0, {"status": "stopped"})        # read c to its end, none of c2
    assert ledger.pending[0] == c2 and c not in ledger.pending
    assert ledger.take(2, {}) == "done"                  # it left: it gets nothing more
    finished = 0
    while (piece := ledger.take(3, {}, finished)) != "done":
        assert piece != "wait"
        finished = 1
    assert ledger.finished()
    reads = sorted(p for r in ledger.read.values() for p in r)
    assert {(e, u) for e, u, _, _ in reads} == {(e, u) for e in range(2) for u in range(3)}
    assert sum(stop - first for _, _, first, stop in reads) == 2 * 7


def test_free_threads_are_filled_up_to_the_maximum_off_the_shard_holders_first():
    threads = {"a": 2, "b": 1, "c": 2}
    assert threads_to_fill(threads, [], ["a"], None) == ["b", "c", "a", "c", "a"]
    assert threads_to_fill(threads, ["c", "gone"], ["a"], 4) == ["b", "c"]
    assert threads_to_fill(threads, ["a", "a", "b", "c", "c"], [], None) == []


@pytest.mark.parametrize("kw, words", [
    ({"replicas": "auto", "partition": {"kind": "horizontal", "k": 2}}, "partition="),
    ({"replicas": "auto", "max_replicas": 0}, "max_replicas must be an integer >= 1"),
    ({"replicas": "auto", "unit_chunks": 0}, "unit_chunks must be an integer >= 1"),
    ({"replicas": "auto", "steps": 10, "epochs": None}, "steps="),
    ({"replicas": "auto", "warmstart_steps": 5}, "warmstart_steps="),
    ({"replicas": "auto", "resume_from": "/nowhere"}, "resume_from="),
    ({"replicas": 2, "max_replicas": 3}, "max_replicas= needs replicas='auto'"),
    ({"replicas": "many"}, "replicas must be an integer >= 1"),
])
def test_bad_elastic_settings_are_refused_before_work_starts(digits_path, kw, words):
    args = {"epochs": 1, **kw}
    with pytest.raises(ValueError, match=words) as info:
        downpour(mlp(), digits_path, client=None, **args)
    assert "\n" not in str(info.value)


def test_a_pipeline_trains_elastic_replicas_and_logs_their_comings(client, tmp_path, digits_path):
    """On the current client (the shared cluster): up to max_replicas of its four threads."""
    import json
    import tomllib

    from daskbelief import pipeline
    from daskbelief.config import ConfigError, validate

    text = (Path(__file__).parents[1] / "pipelines" / "digits-downpour.toml").read_text()
    config = tomllib.loads(text.replace("replicas = 4", 'replicas = "auto"\nmax_replicas = 2')
                           .replace("warmstart_steps = 20", "").replace("epochs = 30", "epochs = 8"))
    config["dataset"]["path"] = digits_path
    summary = pipeline.run(validate(config), tmp_path / "run")
    assert summary["replicas"] == "auto" and summary["replicas_joined"] == 2
    assert summary["replicas_max_live"] == 2 and summary["test_accuracy"] > 0.9, summary
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert len([e for e in logged if e.get("kind") == "replica-joined"]) == 2
    bad = tomllib.loads(text.replace("replicas = 4", 'replicas = "auto"\nmax_replicas = "two"'))
    with pytest.raises(ValueError, match="max_replicas"):
        validate(bad)
    warm = tomllib.loads(text.replace("replicas = 4", 'replicas = "auto"'))  # warmstart_steps = 20
    with pytest.raises(ConfigError, match=r"\[train\]: replicas='auto' cannot be combined with warmstart_steps="):
        pipeline.prepare(validate(warm))


def test_max_seconds_stops_elastic_replicas_and_starts_no_more(client, digits_path):
    result = downpour(mlp(), digits_path, client=client, replicas="auto", shards=1, rule=RULE,
                      epochs=10_000, max_seconds=1.0, seed=0)
    assert {o["status"] for o in result.replica_outcomes} == {"stopped"}, result.replica_outcomes
    assert result.summary["replicas_joined"] == 4 and result.summary["samples"] > 0


def test_on_dask_scheduler_and_dask_worker_a_worker_stopped_with_sigterm_retires_its_replica(
        user_cluster, tmp_path, digits_path):
    """The ledger on a scheduler process of its own; a `dask worker` joining mid-run and then
    stopped with SIGTERM to its main process (as Kubernetes stops a pod) retires its replica.
    (SIGTERM to the worker process itself kills it at once: that replica is lost.)"""
    rng = random.Random(seed := seeded())
    with Client(scheduler_file=str(user_cluster), timeout=60) as client:
        def scenario():
            before = set(worker_info(client))
            proc = _start(["worker", "--scheduler-file", str(user_cluster), "--nthreads", "1",
                           "--memory-limit", "0"], tmp_path / "extra-worker.log")
            s = Scenario(client, None, seed, [])
            try:
                new = s.wait_for(lambda: set(worker_info(client)) - before, "the extra worker", 90)
                at = rng.randint(10, 20)
                s.wait_for(lambda: any(m["worker"] in new and m["step"] >= at
                                       for m in s.replica_events()), f"its replica at step {at}", 90)
                os.kill(proc.pid, signal.SIGTERM)  # the `dask worker` process: its nanny
                proc.wait(timeout=60)
                log.append(sorted(new))
            finally:
                _stop(proc)

        log: list = []
        thread = threading.Thread(target=scenario, daemon=True)
        thread.start()
        result = downpour(mlp(), digits_path, client=client, replicas="auto", shards=1, rule=RULE,
                          epochs=EPOCHS, report_every=10, seed=0)
        thread.join(timeout=90)
    assert log, "the extra worker never joined, trained and stopped during the run"
    (extra,) = log[0]
    statuses = sorted((o["worker"] == extra, o["status"]) for o in result.replica_outcomes)
    assert statuses == [(False, "done")] * 4 + [(True, "retired")], result.replica_outcomes
    assert result.summary["replicas_lost"] == 0 and result.summary["replicas_joined"] == 5
    assert_every_unit_read_once(result, digits_path)
