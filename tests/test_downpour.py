"""Downpour SGD on a real LocalCluster of worker processes, against the reference trainer."""
from __future__ import annotations

import sys

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

from daskbelief.data import open_store
from daskbelief.nn import Dense, Sequential
from daskbelief.optim.rules import adagrad
from daskbelief.train.downpour import downpour
from daskbelief.train.reference import schedule, train_sgd

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def mlp(hidden=32, l2=1e-4):
    return Sequential(input_shape=(64,), layers=[Dense(hidden, activation="relu"), Dense(10)],
                      loss="softmax_cross_entropy", l2=l2)


def test_one_replica_without_overlap_equals_reference_adagrad(client, digits_path):
    model, store = mlp(), open_store(digits_path, split="train")
    rule = adagrad(lr=0.05)
    result = downpour(model, store, client=client, replicas=1, shards=3, n_fetch=1, n_push=1,
                      rule=rule, batch_size=16, steps=60, overlap=False, seed=3)
    with threadpool_limits(1):
        expect, _ = train_sgd(model, store, rule, batch_size=16, steps=60, seed=3)
    assert not np.array_equal(expect, model.init(3))  # training moved the parameters
    np.testing.assert_allclose(result.params, expect, rtol=0, atol=1e-6)
    assert result.summary["updates_applied"] == 60 * 3


def test_snapshots_are_the_servers_parameters_handed_over_while_it_trains(client, digits_path):
    """``on_snapshot`` replaces the driver's test evaluations during the run: each snapshot is
    the shards' parameters at some step, which for one replica without overlap are the
    reference's after that many steps."""
    model, store = mlp(), open_store(digits_path, split="train")
    rule, snaps = adagrad(lr=0.05), []
    result = downpour(model, store, client=client, replicas=1, shards=1, n_fetch=1, n_push=1,
                      rule=rule, batch_size=16, steps=400, overlap=False, seed=3,
                      test=digits_path, eval_every=0.02,
                      on_snapshot=lambda seconds, params: snaps.append((seconds, params)))
    trajectory = [model.init(3)]
    with threadpool_limits(1):
        train_sgd(model, store, rule, batch_size=16, steps=400, seed=3, report_every=1,
                  callback=lambda row, params: trajectory.append(params.copy()))
    steps = [next((k for k, ref in enumerate(trajectory)
                   if np.allclose(params, ref, rtol=0, atol=1e-6)), None) for _, params in snaps]
    assert len(snaps) >= 2 and None not in steps, steps
    assert steps == sorted(steps) and steps[-1] > steps[0]  # taken while it trained, in order
    assert [t for t, _ in snaps] == sorted(t for t, _ in snaps)
    assert len({id(params) for _, params in snaps}) == len(snaps)  # each its own array
    tested = [h for h in result.history if h.get("test_accuracy") is not None]
    assert len(tested) == 1 and tested[0] is result.history[-1]  # the final evaluation only


def test_snapshots_are_refused_where_no_process_holds_the_parameters(client, digits_path):
    with pytest.raises(ValueError, match="on_snapshot must be callable"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=1, on_snapshot="every")
    with pytest.raises(ValueError, match="on_snapshot= and partition= cannot be combined"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=1,
                 partition={"kind": "horizontal", "k": 2}, on_snapshot=print)


def test_a_run_continued_with_its_rule_state_equals_one_reference_run_carrying_it(client, digits_path):
    """``params=`` plus ``rule_state=`` from a first run continue Adagrad where it stopped: the
    second run equals the reference loop that keeps one accumulator through both runs' batches
    (and differs from a restart of the rule)."""
    model, store = mlp(), open_store(digits_path, split="train")
    rule = adagrad(lr=0.05)
    kw = dict(client=client, replicas=1, shards=2, n_fetch=1, n_push=1, rule=rule, batch_size=16,
              steps=30, overlap=False, seed=3)
    first = downpour(model, store, **kw)
    second = downpour(model, store, params=first.params, rule_state=first.rule_state, **kw)
    params = model.init(3)
    state, grad = rule.init(params), np.empty_like(params)
    with threadpool_limits(1):
        for _ in range(2):
            for X, y in schedule(store, 16, 3, steps=30):
                model.loss_and_grad(params, X, y, out=grad)
                rule.apply(params, grad, state)
    np.testing.assert_allclose(second.params, params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(second.rule_state["sum_sq"], state["sum_sq"], rtol=1e-5, atol=1e-6)
    restarted = downpour(model, store, params=first.params, **kw)
    assert np.abs(restarted.params - params).max() > 1e-3
    with pytest.raises(ValueError, match="rule_state holds"):
        downpour(model, store, params=first.params, rule_state={"velocity": params}, **kw)


def test_four_replicas_reach_96_percent_and_every_replica_updates_every_shard(client, digits_path):
    model = mlp(hidden=128)
    result = downpour(model, digits_path, test=digits_path, client=client, replicas=4, shards=2,
                      n_fetch=5, n_push=5, rule=adagrad(lr=0.05), batch_size=32, epochs=30,
                      warmstart_steps=20, seed=0, eval_every=0.5)
    assert result.summary["test_accuracy"] >= 0.96, result.summary
    for shard in result.shard_stats:
        assert sorted(shard["per_replica"]) == [f"replica-{r}" for r in range(4)], shard
        assert shard["rejected"] == 0
    assert {h["replica"] for h in result.history if h["replica"] is not None} == {0, 1, 2, 3}
    assert any(h["test_accuracy"] is not None for h in result.history)
    assert np.isfinite(result.params).all()
    probs = result.predict(open_store(digits_path, split="test").read(0, 5)[0])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


class PoisonedMLP(Sequential):
    """A real model whose every third gradient is NaN: what a diverging replica sends."""

    calls = 0

    def loss_and_grad(self, params, X, y, **kw):
        loss, grad = super().loss_and_grad(params, X, y, **kw)
        PoisonedMLP.calls += 1
        if PoisonedMLP.calls % 3 == 0:
            grad[::7] = np.nan
        return loss, grad


def test_non_finite_gradients_are_rejected_and_parameters_stay_finite(client, digits_path):
    model = PoisonedMLP(input_shape=(64,), layers=[Dense(16, activation="relu"), Dense(10)])
    result = downpour(model, digits_path, client=client, replicas=2, shards=2, n_fetch=1,
                      n_push=1, batch_size=16, steps=30)
    assert result.summary["updates_rejected"] > 0
    assert result.summary["updates_applied"] > 0
    assert np.isfinite(result.params).all()
    assert all(s["params_finite"] for s in result.shard_stats)


def test_model_that_does_not_fit_the_data_is_refused(client, digits_path):
    model = Sequential(input_shape=(32,), layers=[Dense(10)])
    with pytest.raises(ValueError, match="32|64"):
        downpour(model, digits_path, client=client, replicas=1, steps=1)


def test_more_replicas_than_data_shards_is_refused(client, digits_path):
    with pytest.raises(ValueError, match="replicas=1000"):
        downpour(mlp(), digits_path, client=client, replicas=1000, steps=1)


@pytest.mark.parametrize("kw,word", [({"n_push": 0}, "n_push"), ({"n_fetch": -1}, "n_fetch"),
                                     ({"shards": 0}, "shards"), ({"steps": None}, "epochs")])
def test_bad_settings_are_refused_before_work_starts(client, digits_path, kw, word):
    args = {"replicas": 1, "steps": 5} | kw
    with pytest.raises(ValueError, match=word):
        downpour(mlp(), digits_path, client=client, **args)


def test_a_cluster_with_no_workers_is_refused(digits_path):
    with LocalCluster(n_workers=0, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as c:
        with pytest.raises(RuntimeError, match="0 worker"):
            downpour(mlp(), digits_path, client=c, replicas=1, steps=1)


def test_max_seconds_stops_every_replica_cleanly(client, digits_path):
    result = downpour(mlp(), digits_path, client=client, replicas=2, shards=2, steps=10**7,
                      max_seconds=1.0, report_every=5)
    steps = [o["steps"] for o in result.replica_outcomes]
    assert all(0 < s < 10**7 for s in steps)  # stopped, long before the end
    assert result.summary["updates_applied"] > 0 and np.isfinite(result.params).all()


def test_the_run_log_sees_every_event_from_start_to_end(client, digits_path):
    from daskbelief.monitor.events import RUN, EventLog

    log = EventLog(client)
    try:
        result = downpour(mlp(), digits_path, client=client, replicas=2, steps=20, report_every=5)
    finally:
        log.close()
    kinds = [e["kind"] for e in log.of(RUN)]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds
    end = log.of(RUN)[-1]
    assert end["samples"] == result.summary["samples"] and end["algorithm"] == "downpour"
    assert end["run"] == result.summary["run"] == log.of(RUN)[0]["run"]  # the skeleton's summary
    assert result.summary["samples"] == 2 * 20 * 32
    assert result.summary["samples_per_second"] == pytest.approx(
        result.summary["samples"] / result.summary["seconds"])
    assert len(log.of("daskbelief-replica")) == 2 * 4  # every report of both replicas


def test_the_device_path_computes_exactly_what_the_host_path_does(client, digits_path):
    """device="numpy" runs the GPU code path (parameters and gradient sums on the 'device',
    fetches and pushes crossing to the host) on a second host copy: bit for bit the same."""
    model, store = mlp(), open_store(digits_path, split="train")
    rule = adagrad(lr=0.05)
    args = dict(client=client, replicas=1, shards=2, rule=rule, batch_size=16, steps=30,
                overlap=False, seed=3)
    once = downpour(model, store, n_fetch=1, n_push=1, device="numpy", **args)
    with threadpool_limits(1):
        expect, _ = train_sgd(model, store, rule, batch_size=16, steps=30, seed=3)
    np.testing.assert_allclose(once.params, expect, rtol=0, atol=1e-6)
    host = downpour(model, store, n_fetch=3, n_push=3, **args)
    device = downpour(model, store, n_fetch=3, n_push=3, device="numpy", **args)
    np.testing.assert_array_equal(device.params, host.params)


def test_device_cupy_is_refused_where_workers_have_no_gpu(client, digits_path):
    from daskbelief.backend import gpu_available

    if gpu_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="device='cupy' needs CuPy and a CUDA device"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=1, device="cupy")
    with pytest.raises(ValueError, match="device must be"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=1, device="tpu")


def test_downpour_trains_on_gpus(client, digits_path):
    from daskbelief.backend import gpu_available

    if not all(client.run(gpu_available).values()):
        pytest.skip("needs CuPy and a CUDA device on every worker")
    result = downpour(mlp(hidden=128), digits_path, test=digits_path, client=client, replicas=2,
                      shards=2, rule=adagrad(lr=0.05), batch_size=32, epochs=20, device="cupy")
    assert result.summary["test_accuracy"] >= 0.95


def test_a_finished_run_leaves_no_actor_and_no_variable_behind(client, digits_path):
    """Shards and the run's coordination Variables go with the run: a long-lived cluster does not
    accumulate them run after run."""
    from daskbelief import waits

    def actors():
        return {k for keys in client.run(lambda dask_worker: list(map(str, dask_worker.state.actors))).values()
                for k in keys}

    before = actors()
    downpour(mlp(), digits_path, client=client, replicas=1, shards=2, steps=10, seed=0)
    waits.until(lambda: not (actors() - before), timeout=30, what="the run's actors to be released")
    variables = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.extensions["variables"].variables))
    assert not [v for v in variables if v.startswith("downpour-")], variables


@pytest.mark.parametrize("compression", ["bf16", "topk-bf16"])
def test_compressed_pushes_reach_the_exact_runs_accuracy(client, digits_path, compression):
    """bf16 / top-k pushes with error feedback against the same run with exact pushes (two
    replicas, two shards): the accuracy of the exact run, within 2 points, while the shards
    receive half (bf16) or a tenth (top-k 5% in bf16, with int32 indices) of the bytes."""
    runs = {}
    for kind in (None, compression):
        runs[kind] = downpour(mlp(hidden=64), digits_path, test=digits_path, client=client,
                              replicas=2, shards=2, rule=adagrad(lr=0.05), batch_size=32,
                              epochs=15, seed=1, compression=kind, topk_fraction=0.05)
    exact, packed = runs[None].summary, runs[compression].summary
    assert packed["test_accuracy"] >= exact["test_accuracy"] - 0.02, (exact, packed)
    sent = [sum(s["bytes_in"] for s in r.shard_stats) / r.summary["updates_applied"]
            for r in (runs[None], runs[compression])]
    assert sent[1] <= sent[0] * (0.5 if compression == "bf16" else 0.1), sent
    with pytest.raises(ValueError, match="compression must be one of"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=5, compression="zip")


def test_delay_compensation_and_a_staleness_bound_train_and_do_what_they_say(client, digits_path):
    """DC-ASGD (the rule's delay_compensation) corrects the replicas' pushes on every shard, and a
    staleness bound of 0 keeps the two replicas in lockstep (no push lands more than one ahead of
    the slowest replica on shard 0, and the replicas did wait); both still learn digits."""
    kw = dict(test=digits_path, client=client, replicas=2, shards=2, batch_size=32, epochs=15,
              seed=1)
    dc = downpour(mlp(hidden=64), digits_path,
                  rule={"name": "adagrad", "lr": 0.05, "delay_compensation": 0.5}, **kw)
    assert dc.summary["test_accuracy"] >= 0.9, dc.summary
    assert dc.summary["pushes_compensated"] >= dc.summary["updates_applied"] // 2, dc.summary
    ssp = downpour(mlp(hidden=64), digits_path, rule=adagrad(lr=0.05), staleness_bound=0, **kw)
    assert ssp.summary["test_accuracy"] >= 0.9, ssp.summary
    assert ssp.shard_stats[0]["max_lead"] <= 1 and ssp.summary["bound_waits"] > 0, ssp.summary
    free = downpour(mlp(hidden=64), digits_path, rule=adagrad(lr=0.05), steps=5,
                    **{k: v for k, v in kw.items() if k != "epochs"})
    assert free.summary["bound_waits"] == 0 and free.summary["pushes_compensated"] == 0
    with pytest.raises(ValueError, match="staleness_bound must be an integer >= 0"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=5, staleness_bound=-1)


def test_bf16_fetches_reach_the_exact_runs_accuracy_at_half_the_bytes(client, digits_path):
    """Replicas computing on parameters fetched as bf16 (pushes exact): the exact run's accuracy
    within 2 points, exactly half the bytes out of the shards per fetch (the final parameters
    come from the shards' state, not a fetch)."""
    runs = {}
    for kind in (None, "bf16"):
        runs[kind] = downpour(mlp(hidden=64), digits_path, test=digits_path, client=client,
                              replicas=2, shards=2, rule=adagrad(lr=0.05), batch_size=32,
                              epochs=15, seed=1, fetch_compression=kind)
    exact, rounded = runs[None].summary, runs["bf16"].summary
    assert rounded["test_accuracy"] >= exact["test_accuracy"] - 0.02, (exact, rounded)
    per_fetch = [sum(s["bytes_out"] for s in r.shard_stats) / sum(s["fetches"] for s in r.shard_stats)
                 for r in (runs[None], runs["bf16"])]
    assert per_fetch[1] == per_fetch[0] / 2, per_fetch
    with pytest.raises(ValueError, match="fetch_compression must be None or 'bf16'"):
        downpour(mlp(), digits_path, client=client, replicas=1, steps=5, fetch_compression="topk")
