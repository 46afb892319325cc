"""Sandblaster L-BFGS on real LocalClusters of worker processes, against the reference L-BFGS.

Why 1e-5 relative is an honest tolerance for "the same iterates": Sandblaster runs the
reference's own L-BFGS code; every portion's float32 gradient comes from the same model code on
the same rows and parameters; portions are added in float64 (in a worker's accumulator, then in
the shards') and each shard finishes its slice with the reference's ``finish_gradient``; the loss
adds the portion losses in portion order, as the reference does. What differs is only the order
of float64 additions (the worker/shard grouping of the gradient sums, per-shard partial dot
products): relative 1e-16 effects, which reach a float32 vector only where a value lies within
1e-16 of a rounding boundary. In practice the runs agree bit for bit; 1e-5 leaves room for BLAS
kernels that order a matmul's sums differently in another process, while a portion counted twice
or lost would move the gradient by about 1/15 of itself -- four orders of magnitude above it.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from daskbelief import config as pipeline_config
from daskbelief import pipeline
from daskbelief.cluster import worker_info
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.nn import Dense, Sequential
from daskbelief.optim.lbfgs import LbfgsState
from daskbelief.optim.vectors import LocalVectors
from daskbelief.ps import checkpoint
from daskbelief.ps.server import ParameterServer
from daskbelief.train import sandblaster_tasks
from daskbelief.train.downpour import downpour
from daskbelief.train.reference import train_lbfgs
from daskbelief.train.sandblaster import IDLE_RULE, sandblaster
from daskbelief.train.sharded_vectors import ShardedVectors

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PORTION = 100  # 15 portions over the 1437 training rows of digits
PIPELINE = Path(__file__).resolve().parents[1] / "pipelines" / "digits-sandblaster.toml"


def mlp(cls=Sequential):
    return cls(input_shape=(64,), layers=[Dense(16, activation="tanh"), Dense(10)], l2=1e-3)


def reference(model, path, iterations):
    with threadpool_limits(1):  # as a nanny-started worker runs its BLAS
        return train_lbfgs(model, path, iterations=iterations, portion_size=PORTION, seed=0)


def assert_same_iterates(result, expect):
    """Per-iteration losses and final parameters equal to the reference's, to 1e-5 relative."""
    params, ref = expect
    ours = [h for h in result.history if h["loss"] is not None]
    assert [h["step"] for h in ours] == [h["iteration"] for h in ref.history]
    for mine, theirs in zip(ours, ref.history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), (mine, theirs)
    assert not np.array_equal(params, mlp().init(0))  # the iterates moved
    assert np.linalg.norm(result.params - params) <= 1e-5 * np.linalg.norm(params)
    assert result.summary["evaluations"] == ref.evaluations


def test_snapshots_are_the_iterates_handed_over_between_iterations(client, digits_path):
    """``on_snapshot`` replaces the test evaluations during the run: after every iteration
    (``eval_every`` shorter than one), the iterate, whose loss is the reference's at that
    iteration."""
    iterations, model, snaps = 6, mlp(), []
    result = sandblaster(model, digits_path, client=client, iterations=iterations,
                         portion_size=PORTION, shards=2, test=digits_path, eval_every=1e-3,
                         on_snapshot=lambda seconds, params: snaps.append((seconds, params)))
    _, ref = reference(model, digits_path, iterations)
    X, y = open_store(digits_path).read()
    losses = [model.loss_and_grad(params.astype(np.float64), X.astype(np.float64), y)[0]
              for _, params in snaps]
    assert losses == pytest.approx([h["loss"] for h in ref.history], rel=1e-4)
    assert [t for t, _ in snaps] == sorted(t for t, _ in snaps)
    tested = [h for h in result.history if h.get("test_accuracy") is not None]
    assert len(tested) == 1 and tested[0] is result.history[-1]  # the final evaluation only


def test_sharded_vectors_do_what_local_vectors_do(client):
    values = np.random.default_rng(0).standard_normal(1001).astype(np.float32)
    ps = ParameterServer.create(client, values, 3, IDLE_RULE)
    try:
        sharded, local = ShardedVectors(ps.shards, ps.ranges), LocalVectors(1001)
        local.set("params", values.copy())
        for space in (sharded, local):
            space.copy("params", "a")
            space.mul("a", "a", "b")
            space.axpy(-0.3, "a", "b")
            space.scale(1.7, "b")
            space.zeros("c")
            space.axpy(2.0, "b", "c")
            space.swap("a", "c")
            space.copy("b", "d")
        assert sharded.flushes == 0  # operations that return nothing wait for the next dot
        pairs = [("a", "b"), ("c", "c"), ("b", "d")]
        np.testing.assert_allclose(sharded.dots(pairs), local.dots(pairs), rtol=1e-12)
        assert sharded.flushes == 1  # ... and travel with it: one call per shard
        for name in "abcd":
            np.testing.assert_array_equal(sharded.gather(name), local.get(name))
        assert sharded.dot("a", "c") == pytest.approx(local.dot("a", "c"), rel=1e-12)
        with pytest.raises(KeyError, match="no vector named 'zz'"):
            sharded.dot("zz", "a")
        with pytest.raises(ValueError, match="unknown operation 'explode'"):
            sharded.execute(("explode",))
    finally:
        ps.close()


def test_iterates_match_the_reference_and_the_loss_scipy(client, digits_path):
    iterations, model = 20, mlp()
    result = sandblaster(model, digits_path, client=client, iterations=iterations,
                         portion_size=PORTION, shards=2, test=digits_path,
                         eval_every=1e-3)  # an evaluation after each iteration, however fast
    assert_same_iterates(result, reference(model, digits_path, iterations))

    X, y = open_store(digits_path).read()
    X64 = X.astype(np.float64)

    def fun(p):  # the objective in float64, through the same model code
        return model.loss_and_grad(p, X64, y)

    scipy = minimize(fun, model.init(0).astype(np.float64), jac=True, method="L-BFGS-B",
                     options={"maxiter": iterations, "maxcor": 10, "gtol": 0, "ftol": 0})
    assert scipy.nit == iterations
    ours = fun(result.params.astype(np.float64))[0]
    assert ours == pytest.approx(result.summary["loss"], rel=1e-4)
    assert abs(ours - scipy.fun) <= 0.01 * scipy.fun, (ours, scipy.fun)

    s = result.summary
    n_workers = len(worker_info(client))
    assert sum(s["portions_per_worker"].values()) == 15 * s["evaluations"]  # each exactly once
    assert s["evaluations_restarted"] == 0 and s["contributions_refused"] == 0
    assert s["vector_fetches"] <= n_workers * s["evaluations"]  # at most once per evaluation
    assert s["samples"] == 1437 * s["evaluations"] and s["test_accuracy"] >= 0.9
    assert any(h["test_accuracy"] is not None for h in result.history[:-1])  # during training
    logged = [m for _, m in client.get_events(events.RUN) if m.get("run") == s["run"]]
    assert [m["iteration"] for m in logged if m["kind"] == "iteration"] == list(range(1, 21))
    assert {"start", "eval", "end"} <= {m["kind"] for m in logged}


def test_a_slowed_worker_with_backups_changes_nothing(digits_path):
    model = mlp()
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        workers = sorted(worker_info(c))
        slow = workers[2]
        result = sandblaster(model, digits_path, client=c, iterations=6, portion_size=PORTION,
                             shards=1, shard_workers=[workers[0]], _slow_workers={slow: 1000.0})
        portion_events = [m for _, m in c.get_events(events.PORTION)
                          if m.get("run") == result.summary["run"]]
    assert_same_iterates(result, reference(model, digits_path, 6))  # exactly once, so unchanged
    s = result.summary
    assert s["backups_launched"] >= 1 and s["backups_won"] >= 1, s
    assert s["evaluations_restarted"] == 0
    done = s["portions_per_worker"]
    assert done.get(slow, 0) < min(done[w] for w in workers if w != slow), done  # load balance
    counted = Counter((m["evaluation"], m["portion"]) for m in portion_events
                      if m.get("counted"))
    assert counted and max(counted.values()) == 1
    assert any(m.get("kind") == "backup-launched" for m in portion_events)


class DiesHoldingPortions(Sequential):
    """A real model whose worker process ``victim`` kills itself (SIGKILL) while it holds won
    portions not yet pushed to the shards: the worst moment to lose a worker."""

    victim = None

    def loss_and_grad(self, params, X, y, **kw):
        if os.getpid() == self.victim and any(s.pending for s in sandblaster_tasks._RUNS.values()):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().loss_and_grad(params, X, y, **kw)


def test_a_worker_killed_mid_evaluation_changes_nothing(digits_path):
    model = mlp(DiesHoldingPortions)
    with LocalCluster(n_workers=3, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        workers = sorted(worker_info(c))
        pids = c.run(os.getpid)
        model.victim = pids[workers[2]]  # the shards and the ledger live on workers[0]
        # push_every is large so that everything a worker wins waits for the final flush
        result = sandblaster(model, digits_path, client=c, iterations=6, portion_size=PORTION,
                             shards=2, shard_workers=[workers[0]], push_every=1000)
        assert model.victim not in c.run(os.getpid).values()  # it really died
    assert result.summary["evaluations_restarted"] >= 1, result.summary
    assert_same_iterates(result, reference(mlp(), digits_path, 6))


def test_max_seconds_stops_between_iterations(client, digits_path):
    result = sandblaster(mlp(), digits_path, client=client, iterations=10**6, tolerance=0.0,
                         portion_size=PORTION, max_seconds=1.0)
    s = result.summary
    assert 1 <= s["iterations"] < 10**6 and s["message"] == "reached max_seconds=1"
    assert s["loss"] == result.history[-1]["loss"] and np.isfinite(result.params).all()
    X, y = open_store(digits_path).read()  # the returned iterate is the one the loss belongs to
    loss = result.model.loss_and_grad(result.params.astype(np.float64), X.astype(np.float64), y)[0]
    assert loss == pytest.approx(s["loss"], rel=1e-4)


def test_a_run_resumed_from_its_checkpoint_goes_on_as_if_never_stopped(client, digits_path,
                                                                        tmp_path):
    """Stop after 4 iterations (its final checkpoint), resume to 9 -- on 3 shards where the first
    run had 2, so every shard reads its range across the saved slices: the iterations after the
    stop are the reference's, as are the final parameters; nothing is evaluated twice."""
    model, root = mlp(), tmp_path / "ckpts"
    first = sandblaster(model, digits_path, client=client, iterations=4, portion_size=PORTION,
                        shards=2, checkpoint_dir=root, checkpoint_every=1e9)
    ckpt = checkpoint.latest(root)
    saved = checkpoint.load(ckpt)
    assert saved.lbfgs["iteration"] == 4 and len(checkpoint.complete(root)) == 1  # the final one
    np.testing.assert_array_equal(saved.params, first.params)  # the iterate, as parameters
    assert sorted(saved.vectors) == sorted(LbfgsState(**saved.lbfgs).vectors())
    assert checkpoint.describe(ckpt)["algorithm"] == "sandblaster"
    written = [m for _, m in client.get_events(events.RUN)
               if m.get("run") == first.summary["run"] and m["kind"] == "checkpoint"]
    assert [m["path"] for m in written] == [str(ckpt)] and written[0]["seconds"] > 0

    resumed = sandblaster(model, digits_path, client=client, iterations=9, portion_size=PORTION,
                          shards=3, resume_from=ckpt, checkpoint_dir=root, checkpoint_every=1e-3)
    params, ref = reference(model, digits_path, 9)
    ours = [h for h in resumed.history if h["loss"] is not None]
    assert [h["step"] for h in ours] == [5, 6, 7, 8, 9]
    for mine, theirs in zip(ours, ref.history[4:]):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), (mine, theirs)
    assert np.linalg.norm(resumed.params - params) <= 1e-5 * np.linalg.norm(params)
    s = resumed.summary
    assert s["iterations"] == 9 and s["resumed_at"] == 4
    assert first.summary["evaluations"] + s["evaluations"] == ref.evaluations
    assert checkpoint.load(checkpoint.latest(root)).lbfgs["iteration"] == 9  # every iteration
    assert len(checkpoint.complete(root)) == 3  # ... keeping the newest 3

    ckpt = checkpoint.latest(root)
    with pytest.raises(ValueError, match="history of size 10; history=5 cannot resume it"):
        sandblaster(model, digits_path, client=client, history=5, resume_from=ckpt)
    with pytest.raises(ValueError, match="different model"):
        sandblaster(mlp_wider(), digits_path, client=client, resume_from=ckpt)
    with pytest.raises(ValueError, match="written by sandblaster, the run trains with downpour"):
        downpour(model, digits_path, client=client, steps=10, resume_from=ckpt)


def mlp_wider():
    return Sequential(input_shape=(64,), layers=[Dense(24, activation="tanh"), Dense(10)], l2=1e-3)


@pytest.mark.parametrize("kw,message", [
    ({"history": 0}, "history must be an integer >= 1"),
    ({"portion_size": 5000}, "portion_size=5000 is larger than the batch"),
    ({"portion_size": 200, "batch_rows": 100}, r"portion_size=200 is larger than the batch \(100"),
    ({"portion_size": 0}, "portion_size must be an integer >= 1"),
    ({"shards": 0}, "shards must be an integer >= 1"),
    ({"shards": 10**6}, "more than the model's"),
    ({"iterations": 0}, "iterations must be an integer >= 1"),
    ({"batch_rows": 10**6}, "batch_rows=1000000 is more than the 1437 rows"),
    ({"tolerance": -1.0}, "tolerance must be"),
    ({"backups": "yes"}, "backups must be True or False"),
    ({"push_every": 0}, "push_every must be"),
    ({"eval_every": 0}, "eval_every must be"),
    ({"max_seconds": -1}, "max_seconds must be"),
    ({"checkpoint_every": 0}, "checkpoint_every must be"),
    ({"checkpoint_keep": 0}, "checkpoint_keep must be an integer >= 1"),
    ({"params": np.zeros(5, np.float32)}, r"params has shape \(5,\)"),
    ({"_slow_workers": {"tcp://x:1": 0.5}}, "_slow_workers"),
])
def test_bad_settings_are_refused_before_work_starts(client, digits_path, kw, message):
    with pytest.raises(ValueError, match=message):
        sandblaster(mlp(), digits_path, client=client, **kw)
    assert not client.futures  # nothing was submitted


def test_shards_form_the_prospective_pair_only_where_that_costs_less_than_a_round_trip():
    from daskbelief.train.sandblaster import prospective_dots

    assert prospective_dots(605, 10)             # digits 64-16-10 over 2 shards
    assert not prospective_dots(2_324_992, 10)   # the speech MLP over 2 shards


def test_a_shard_finishing_an_evaluation_runs_only_operations_that_return_nothing():
    from daskbelief.ps.shard import ParameterShard

    model = Sequential((4,), [Dense(2)])
    shard = ParameterShard(0, 0, model.size, np.arange(model.size, dtype=np.float32), IDLE_RULE)
    shard.prepare_objective(model, 1)
    shard.open_evaluation(1, "params")
    with pytest.raises(ValueError, match="only operations that return nothing .* got 'dots'"):
        shard.finish_evaluation(1, "params", "g", [], None, [("dots", [("g", "g")])])
    _, (dot,), _ = shard.finish_evaluation(1, "params", "g", [("y", "params")], None,
                                          [("combine", [("params", 2.0)], "y")])  # still open
    assert dot == pytest.approx(2 * float(np.sum(np.arange(model.size) ** 2)))


def test_a_read_that_overtakes_its_evaluations_opening_is_told_to_ask_again():
    """The coordinator opens an evaluation while its portions travel: a read of a tag newer
    than any opened says EARLY (ask again); a read of an older one, None (a leftover)."""
    from daskbelief.ps.shard import EARLY, ParameterShard, early

    model = Sequential((4,), [Dense(2)])
    shard = ParameterShard(0, 0, model.size, np.arange(model.size, dtype=np.float32), IDLE_RULE)
    shard.prepare_objective(model, 1)
    assert shard.read_evaluated(1) == EARLY  # nothing opened yet
    shard.open_evaluation(1, "params")
    np.testing.assert_array_equal(shard.read_evaluated(1), np.arange(model.size))
    assert shard.read_evaluated(2) == EARLY
    shard.open_evaluation(2, "params")
    assert shard.read_evaluated(1) is None
    shard.finish_evaluation(2, "params", "g")
    assert shard.read_evaluated(2) is None and shard.read_evaluated(3) == EARLY
    assert early([np.zeros(3), EARLY, None, EARLY]) == [1, 3]


def test_a_portion_asks_the_shards_again_until_they_opened_its_evaluation_or_it_is_abandoned():
    from daskbelief.ps.shard import EARLY

    state = sandblaster_tasks._WorkerRun(Sequential((4,), [Dense(2)]))
    answers = iter([[EARLY, 1.0], [EARLY, 1.0], [2.0, 1.0]])
    asked = []
    replies = sandblaster_tasks._opened(state, 5, lambda: asked.append(1) or next(answers))
    assert replies == [2.0, 1.0] and len(asked) == 3
    state.abandoned = 5  # the coordinator gave the evaluation up while a shard still said EARLY
    with pytest.raises(sandblaster_tasks.Abandoned):
        sandblaster_tasks._opened(state, 5, lambda: [EARLY])


def test_model_parallel_blocks_answer_early_until_the_shards_open_the_evaluation(client):
    """A model-parallel replica's blocks read their ranges of the evaluated vector from real
    shard actors: EARLY before the opening (the portion asks again), the values after it."""
    from daskbelief.ps.shard import EARLY
    from daskbelief.train import partition as P
    from daskbelief.train.partitioned import Blocks

    model = mlp()
    params = model.init(0)
    ps = ParameterServer.create(client, params, 2, IDLE_RULE)
    blocks = None
    try:
        [r.result() for r in [s.prepare_objective(model, 10) for s in ps.shards]]
        blocks = Blocks.start(client, P.horizontal(model, 2), params, ps=ps)
        assert blocks.call("load_evaluated", [(1,)] * 2) == [EARLY, EARLY]
        [r.result() for r in [s.run_ops([("open_evaluation", 1, "params")]) for s in ps.shards]]
        assert blocks.call("load_evaluated", [(1,)] * 2) == [True, True]
        [r.result() for r in [s.run_ops([("open_evaluation", 2, "params")]) for s in ps.shards]]
        assert blocks.call("load_evaluated", [(0,)] * 2) == [False, False]  # a leftover
    finally:
        if blocks is not None:
            blocks.close()
        ps.close()


def test_the_ledger_starts_an_evaluation_at_its_first_word_and_older_claims_lose():
    """Nobody opens an evaluation on the ledger: the first word of a newer tag does."""
    import asyncio

    async def claims():
        ledger = sandblaster_tasks.PortionLedger(3)
        await ledger.started(1, 0, "w0")
        out = [await ledger.claim(1, 0, 0.1), await ledger.claim(1, 0, 0.1),  # 2 left; a copy
               await ledger.claim(2, 1, 0.1),                                 # tag 2 starts
               await ledger.claim(1, 2, 0.1)]                                 # a leftover
        snap = await ledger.snapshot(2)
        return out, snap
    out, snap = asyncio.run(claims())
    assert out == [2, -1, 2, -1]
    assert set(snap["finished"]) == {1} and snap["running"] == {}


def test_models_that_do_not_fit_the_data_are_refused(client, digits_path):
    with pytest.raises(ValueError, match="input size does not fit"):
        sandblaster(Sequential((32,), [Dense(10)]), digits_path, client=client)
    with pytest.raises(ValueError, match="class count mismatch"):
        sandblaster(Sequential((64,), [Dense(7)]), digits_path, client=client)


def test_a_cluster_with_no_workers_is_refused(digits_path):
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        with pytest.raises(RuntimeError, match="0 worker"):
            sandblaster(mlp(), digits_path, client=c, iterations=1)


def test_the_digits_pipeline_reaches_90_percent(cluster, digits_path, tmp_path):
    config = pipeline_config.load(PIPELINE)
    config["dataset"]["path"] = digits_path
    config["train"]["iterations"] = 15
    summary = pipeline.run(config, tmp_path, scheduler=cluster.scheduler_address)
    assert summary["algorithm"] == "sandblaster" and summary["iterations"] == 15
    assert summary["test_accuracy"] >= 0.9
    assert summary["seconds"] > 0 and summary["samples_per_second"] > 0
    assert summary["run"].startswith("sandblaster-")  # the skeleton's summary, as Downpour's
    assert summary["samples"] == summary["evaluations"] * summary["batch_rows"]
    assert '"kind": "iteration"' in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.parametrize("kind", ["horizontal", "vertical"])
def test_model_parallel_replicas_reproduce_the_reference(client, digits_path, kind):
    """Every worker homes a replica of two block actors that fetch and push only their own
    ranges. A partitioned pass adds some products in another float32 order (partial sums of a
    dense layer split by inputs): ~1e-7 relative per gradient, so the iterates of 8 iterations
    stay within 1e-4 of the reference's, where a portion lost or counted twice would be ~7% off."""
    from daskbelief.train import partition

    model = mlp()
    plan = {"horizontal": partition.horizontal, "vertical": partition.vertical}[kind](model, 2)
    result = sandblaster(model, digits_path, client=client, partition=plan, iterations=8,
                         portion_size=PORTION, tolerance=0.0, seed=0)
    params, ref = reference(model, digits_path, 8)
    ours = [h["loss"] for h in result.history if h["loss"] is not None]
    np.testing.assert_allclose(ours, [h["loss"] for h in ref.history], rtol=1e-4)
    assert np.linalg.norm(result.params - params) <= 1e-4 * np.linalg.norm(params)
    assert result.summary["partition"] == f"{kind}/2"
    assert sum(result.summary["portions_per_worker"].values()) == result.summary["evaluations"] * 15


def test_a_plan_for_another_model_is_refused(client, digits_path):
    from daskbelief.train import partition

    with pytest.raises(ValueError, match="plan was made for another model"):
        sandblaster(mlp(), digits_path, client=client, iterations=1,
                    partition=partition.horizontal(Sequential((64,), [Dense(10)]), 1))


def shard_holders(client) -> list[str]:
    """The workers holding a parameter shard now (found on the workers, not chosen)."""
    held = client.run(lambda dask_worker: [str(k) for k in dask_worker.state.actors])
    return sorted(w for w, keys in held.items()
                  if any(k.startswith("parameter-shard") for k in keys))


class ShardHolderKiller(threading.Thread):
    """SIGKILLs the process of a seeded random shard holder at a seeded random moment: a random
    delay (0-50 ms) after the iteration-``at`` event of the next Sandblaster run to start."""

    def __init__(self, client, seed: int, at: int, timeout: float = 120.0):
        super().__init__(daemon=True)
        self.client, self.rng, self.at, self.timeout = client, random.Random(seed), at, timeout
        self.started = time.time()
        self.victim = self.pid = self.error = None

    def run(self):
        try:
            deadline = time.time() + self.timeout
            while time.time() < deadline:
                logged = [m for _, m in self.client.get_events(events.RUN)
                          if m.get("time", 0) >= self.started]
                if any(m["kind"] == "iteration" and m["iteration"] >= self.at for m in logged):
                    time.sleep(self.rng.uniform(0.0, 0.05))
                    self.victim = self.rng.choice(shard_holders(self.client))
                    self.pid = self.client.run(os.getpid, workers=[self.victim])[self.victim]
                    os.kill(self.pid, signal.SIGKILL)
                    return
                time.sleep(0.02)
            self.error = f"the run never reached iteration {self.at} within {self.timeout:g} s"
        except Exception as e:  # noqa: BLE001 -- reported by the test
            self.error = repr(e)


@pytest.mark.parametrize("seed, threads, checkpoints", [(11, 2, False), (12, 1, True),
                                                         (13, 1, False)])
def test_a_shard_holder_killed_at_random_is_survived(digits_path, tmp_path, seed, threads,
                                                     checkpoints):
    """Kill a random shard holder at a random iteration (seeded, printed): the run restores
    every shard from its last checkpoint (or the start point) and runs the lost iterations
    again, so it still follows the reference iterate by iterate. threads=1: every worker is a
    shard holder and every thread computes portions -- no spare thread for the recovery."""
    iterations, at = 15, random.Random(seed).randint(2, 5)  # room to kill on a fast machine
    print(f"seed {seed}: kill a shard holder after iteration {at}, {threads} thread(s) a worker")
    n_workers = 3 if threads == 2 else 2
    with LocalCluster(n_workers=n_workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as c:
        killer = ShardHolderKiller(c, seed, at)
        killer.start()
        result = sandblaster(mlp(), digits_path, client=c, iterations=iterations,
                             portion_size=PORTION, shards=2, tolerance=0.0,
                             checkpoint_dir=tmp_path / "ckpts" if checkpoints else None,
                             checkpoint_every=0.05 if checkpoints else None)
        killer.join(5)
        logged = [m for _, m in c.get_events(events.RUN) if m.get("run") == result.summary["run"]]
        alive = c.run(os.getpid).values()
    assert killer.error is None and killer.pid is not None, killer.error
    print(f"killed {killer.victim} (pid {killer.pid}); summary {result.summary}")
    assert killer.pid not in alive  # it really died
    s = result.summary
    assert s["shard_holders_lost"] == 1 and s["iterations"] == iterations, s
    recoveries = [m for m in logged if m["kind"] == "recovery"]
    assert len(recoveries) == 1 and killer.victim in recoveries[0]["lost"], recoveries
    if checkpoints:
        assert "ckpt-" in recoveries[0]["restored_from"], recoveries
    else:
        assert recoveries[0]["restored_from"] == "the start point"
    params, ref = reference(mlp(), digits_path, iterations)
    ours = [h for h in result.history if h["loss"] is not None]
    assert [h["step"] for h in ours] == list(range(1, iterations + 1))
    for mine, theirs in zip(ours, ref.history):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5), (mine, theirs)
    assert np.linalg.norm(result.params - params) <= 1e-5 * np.linalg.norm(params)
