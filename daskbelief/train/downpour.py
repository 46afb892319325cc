"""Downpour SGD: asynchronous model replicas around a sharded parameter server.

Each replica is one long-running Dask task bound to its own data shard (``replica.run_replica``).
It keeps a local copy of the parameters, fetches a fresh copy every ``n_fetch`` steps, accumulates
gradients and pushes them every ``n_push`` steps. The shards (Dask actors) apply each push on their own with the update rule
(Adagrad by default, as in the paper). Communication overlaps computation: a fetch issued before a
step is swapped in after it, and up to ``max_in_flight`` pushes travel while the replica computes.

Faults: a replica whose worker dies is rerun by Dask on another worker and resumes from the step
it had reported; a shard whose worker dies is recreated by the driver (``driver.Driver``) from the
latest checkpoint, or the initial parameters, and the replicas reconnect to it (the
parameter-server handle is published in a Dask Variable); see docs/architecture.md, "Faults".
"""
from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, replace
from functools import partial

import numpy as np
from distributed import Event, Variable

from daskbelief.checks import check_integer
from daskbelief.cluster import default_local_workers, require_gpus, require_threads, require_workers
from daskbelief.monitor import events
from daskbelief.optim.rules import UpdateRule, make_rule
from daskbelief.ps.compress import check_kind
from daskbelief.ps.policy import place_blocks, place_replicas
from daskbelief.ps.sources import Ranged
from daskbelief.train import elastic
from daskbelief.train.driver import Driver
from daskbelief.train.elastic import ElasticDriver
from daskbelief.train.errors import RunLost
from daskbelief.train.evaluate import BlockEvaluator
from daskbelief.train.partition import Plan, as_plan
from daskbelief.train.partitioned import Blocks
from daskbelief.train.recovery import Lease
from daskbelief.train.replica import ReplicaSpec, run_elastic_replica, run_replica
from daskbelief.train.result import TrainResult
from daskbelief.train.run import (announce, check_on_snapshot, cluster, finish_run, open_data,
                                  parameter_server, run_id, start_point, summary)
from daskbelief.workarounds import HandleVariable


def validate(*, replicas: int, shards: int, n_fetch: int, n_push: int, batch_size: int,
             epochs, steps, warmstart_steps: int, max_in_flight: int) -> None:
    """Reject impossible settings before anything starts, naming the offending argument."""
    for name, value in [("replicas", replicas), ("shards", shards), ("n_fetch", n_fetch),
                        ("n_push", n_push), ("batch_size", batch_size),
                        ("max_in_flight", max_in_flight)]:
        check_integer(name, value, 1)
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps= (how long each replica trains)")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise ValueError(f"epochs/steps must be >= 1, got epochs={epochs!r} steps={steps!r}")
    if warmstart_steps < 0:
        raise ValueError(f"warmstart_steps must be >= 0, got {warmstart_steps}")


def downpour(model, data, *, client=None, replicas: int | str = 2, max_replicas: int | None = None,
             unit_chunks: int = 1, shards: int = 2, n_fetch: int = 5,
             n_push: int = 5, rule: str | dict | UpdateRule = "adagrad", batch_size: int = 32, epochs: int | None = None,
             steps: int | None = None, max_seconds: float | None = None,
             warmstart_steps: int = 0, test=None, seed: int = 0,
             params=None, rule_state: dict | None = None, overlap: bool = True,
             max_in_flight: int = 2, report_every: int = 20,
             eval_every: float | None = None, eval_rows: int = 10_000, checkpoint_dir=None,
             checkpoint_every: float | None = None, checkpoint_keep: int = 3, resume_from=None,
             partition: dict | Plan | None = None, device: str | None = None,
             compression: str | None = None, topk_fraction: float = 0.01,
             fetch_compression: str | None = None, staleness_bound: int | None = None,
             on_snapshot=None, config: dict | None = None) -> TrainResult:
    """Train ``model`` with Downpour SGD on a Dask cluster and return a ``TrainResult``.

    Parameters
    ----------
    model : Sequential
    data : DataStore or str -- the training store (a URL opens its ``train`` split)
    client : distributed.Client, optional -- default: the current client, else a local cluster
    replicas : number of model replicas R; each gets one contiguous data shard of the store and
        runs as one long task, so the cluster needs R worker threads. ``"auto"``: elastic replicas,
        one on every worker thread present or joining while the run lasts (up to
        ``max_replicas``), all drawing data units from one shared queue (``train.elastic``); a
        worker retired gracefully lets its replicas push, hand back their unit and stop
    max_replicas : with ``replicas="auto"``, the most replicas at once (None: one per thread)
    unit_chunks : with ``replicas="auto"``, store chunks per data unit
    shards : number of parameter-server shards S (actors placed on distinct workers)
    n_fetch, n_push : a replica fetches parameters every ``n_fetch`` steps and pushes its
        accumulated gradient (the sum of ``n_push`` minibatch gradients) every ``n_push`` steps.
        Summed pushes computed on parameters up to ``n_fetch`` steps old, interleaved from several
        replicas, are harsher on Adagrad than one replica's steps: expect to need a smaller
        ``lr`` than the single-process trainer's (a third of it for 2 replicas in
        ``benchmarks/paper.py``)
    rule : "adagrad" | "sgd" | "momentum" | dict | UpdateRule -- applied by every shard
    batch_size : minibatch size of each replica step
    epochs, steps : exactly one: passes over each replica's shard, or steps per replica
        (elastic replicas: ``epochs`` only, passes over the whole store)
    max_seconds : stop every replica (cleanly, pushing what it holds) after this many seconds
    warmstart_steps : replica 0 trains alone for this many steps before the others start
    test : DataStore or str, optional -- evaluated every ``eval_every`` seconds and at the end
    seed : parameter init and data order
    params : initial flat parameter vector (default ``model.init(seed)``)
    rule_state : the update rule's state to start from (a previous result's ``rule_state``, e.g.
        Adagrad's accumulator), so that continuing a run with ``params=`` does not restart the
        rule: without it Adagrad's first steps are again ``lr * sign(g)`` on every parameter
    overlap : overlap fetches and pushes with computation (False: blocking, the exact-oracle mode)
    max_in_flight : pushes a replica may have travelling at once (bounds its memory)
    report_every : steps between a replica's progress events
    eval_every : seconds between test evaluations during training (None: only at the end)
    eval_rows : test rows used by the evaluations during training
    checkpoint_dir, checkpoint_every : write a checkpoint there every so many seconds and at the
        end; a shard lost with its worker is recreated from the latest one
    checkpoint_keep : how many complete checkpoints to keep (older ones are deleted)
    resume_from : a checkpoint path: parameters, rule state and each replica's progress resume
    partition : a ``partition.Plan`` of ``model`` or a table such as ``{"kind": "horizontal",
        "k": 2}``: each replica is then spread over the plan's block actors (model parallelism),
        each block fetching and pushing only its own parameter ranges
    device : None (replicas compute on host NumPy arrays) or "cupy": every replica computes on
        its worker's GPU, its parameters and gradient sums on the device and only fetches and
        pushes crossing to the host ("numpy" runs that same path on the host, for testing)
    compression : None (exact float32 pushes, the default) or "bf16", "topk", "topk-bf16": each
        push is rounded to bf16 and/or thinned to its ``topk_fraction`` largest entries, and the
        replica keeps what was dropped and adds it to its next push (error feedback,
        ``ps.compress``)
    topk_fraction : the share of each shard's slice a top-k push carries
    fetch_compression : None (exact fetches, the default) or "bf16": the parameters a replica
        fetches travel rounded to bf16 (half the bytes; its gradients are computed on the rounded
        values, the shards keep and update float32)
    staleness_bound : None (fully asynchronous, the paper's) or s >= 0: a replica more than ``s``
        pushes ahead of the slowest replica waits before pushing (stale-synchronous parallel;
        a replica that has not pushed for ``ps.asynchrony.STALL_SECONDS`` holds nobody back)
    on_snapshot : ``on_snapshot(seconds, params)``, called by the driver every ``eval_every``
        seconds instead of its test evaluation, with the seconds since training started and the
        parameters the shards hold then (a fresh array each time): to evaluate them later, off
        the cores that train, or to keep them. The final test evaluation stays. Not with
        ``partition`` (no process holds a model-parallel run's parameters whole)
    config : the pipeline config, stored in checkpoints
    """
    store, test_store = open_data(model, data, test)
    elastic_run = replicas == "auto"
    rule = make_rule(rule)
    plan = _check(model, store, replicas=replicas, max_replicas=max_replicas,
                  unit_chunks=unit_chunks, shards=shards, n_fetch=n_fetch, n_push=n_push,
                  batch_size=batch_size, epochs=epochs, steps=steps,
                  warmstart_steps=warmstart_steps, max_in_flight=max_in_flight,
                  partition=partition, device=device, compression=compression,
                  fetch_compression=fetch_compression, staleness_bound=staleness_bound,
                  resume_from=resume_from, on_snapshot=on_snapshot)
    start = _start_point(model, seed, params, resume_from, rule_state, rule)
    n_specs = 1 if elastic_run else replicas

    with cluster(client, "daskbelief.train.replica",
                 threads_per_worker=-(-n_specs // default_local_workers())) as c:
        if not elastic_run:
            require_threads(c, replicas, f"{replicas} Downpour replicas")
        if device == "cupy":
            require_gpus(c)
        run = run_id("downpour")
        rows = [(0, store.n)] if elastic_run else store.row_ranges(replicas)
        specs = [ReplicaSpec(run, r, store.url, store.split, rows[r], batch_size, steps, epochs,
                             n_fetch, n_push, seed, overlap, max_in_flight, report_every,
                             warmstart_steps if r == 0 else 0, device, compression,
                             topk_fraction, fetch_compression=fetch_compression,
                             staleness_bound=staleness_bound)
                 for r in range(n_specs)]
        ps = parameter_server(c, start.params, shards, rule, restore=start.restore)
        if start.shards is not None:
            ps.load_state_dicts(start.shards(ps.ranges))
        done = {p.replica: min(start.steps.get(f"replica-{p.replica}", 0), p.total_steps)
                for p in specs}
        coordination = _coordinate(c, specs[0], ps, done, warmstart_steps)
        announce(run, "downpour", {k: v for k, v in asdict(specs[0]).items() if k != "run"})
        workers = require_workers(c)
        blocks = _start_blocks(c, workers, plan, ps, specs, coordination,
                               overlap=overlap, max_in_flight=max_in_flight)
        # a model-parallel run evaluates through blocks of its own and, keeping checkpoints,
        # leaves its model in the last one: no process ever holds the whole vector
        evaluator = None if plan is None or test_store is None else BlockEvaluator(c, plan)
        in_checkpoint = plan is not None and checkpoint_dir is not None
        if elastic_run:
            driver_for = _elastic_driver(c, model, specs[0], store, unit_chunks, max_replicas,
                                         epochs)
        else:
            driver_for = _fixed_driver(c, workers, model, specs, blocks, ps)
        driver = driver_for(c, run, ps, model=model, test_store=test_store,
                            coordination=coordination,
                            blocks=[p.name(f"blocks-{p.replica}")
                                    for p, b in zip(specs, blocks) if b is not None],
                            eval_every=eval_every, eval_rows=eval_rows, max_seconds=max_seconds,
                            checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                            initial=start.params, evaluator=evaluator, on_snapshot=on_snapshot,
                            checkpoint_meta={"model": model.to_dict(), "config": config or {},
                                             "normaliser": store.normaliser.to_dict(),
                                             "keep": checkpoint_keep})
        try:
            outcomes = driver.wait()
            final, shard_stats, final_state = driver.final(gather=not in_checkpoint)
            driver.report_shards(shard_stats)  # the final counters, however short the run
            metrics = None if evaluator is None else driver.test_metrics(test_store.n)
        except RunLost:
            raise
        except Exception:
            driver.check_scheduler(probe=True)
            raise
        finally:
            driver.close()
            for b in blocks:
                if b is not None:
                    b.close()
            if evaluator is not None:
                evaluator.close()
        figures = summary(run, "downpour", seconds=driver.seconds,
                          samples=sum(o["samples"] for o in outcomes), replicas=replicas,
                          shards=shards, n_fetch=n_fetch, n_push=n_push,
                          **_own_figures(driver, outcomes, shard_stats))
        if elastic_run:
            figures.update(driver.counts(), max_replicas=max_replicas, unit_chunks=unit_chunks)
        history = _history(c.get_events(events.REPLICA), run, driver.started) + driver.test_rows
        return finish_run(model, final, run=run, client=c, test_store=test_store,
                          seconds=driver.seconds, step=None, summary=figures, history=history,
                          normaliser=store.normaliser, shard_stats=shard_stats,
                          replica_outcomes=outcomes, rule_state=final_state, metrics=metrics,
                          checkpoint=driver.last_checkpoint(), plan=plan)


def _check(model, store, *, replicas, max_replicas, unit_chunks, shards, n_fetch, n_push,
           batch_size, epochs, steps, warmstart_steps, max_in_flight, partition, device,
           compression, fetch_compression, staleness_bound, resume_from,
           on_snapshot) -> Plan | None:
    """Every setting checked, one line naming the argument, before a cluster starts; returns
    the model-parallel plan (None: replicas compute whole)."""
    elastic_run = replicas == "auto"
    if elastic_run:
        elastic.validate(max_replicas=max_replicas, unit_chunks=unit_chunks, steps=steps,
                         warmstart_steps=warmstart_steps, partition=partition,
                         resume_from=resume_from)
    elif isinstance(replicas, str):
        raise ValueError(f"replicas must be an integer >= 1 or 'auto', got {replicas!r}")
    elif max_replicas is not None:
        raise ValueError(f"max_replicas= needs replicas='auto', got replicas={replicas!r}")
    validate(replicas=1 if elastic_run else replicas, shards=shards, n_fetch=n_fetch,
             n_push=n_push, batch_size=batch_size, epochs=epochs, steps=steps,
             warmstart_steps=warmstart_steps, max_in_flight=max_in_flight)
    if not elastic_run and replicas > store.n_chunks:
        raise ValueError(f"replicas={replicas} need one data shard each, but the store "
                         f"{store.url} has only {store.n_chunks} chunks: use fewer replicas or "
                         "rewrite the store with smaller chunk_rows")
    plan = as_plan(model, partition)
    if device not in (None, "numpy", "cupy"):
        raise ValueError(f"device must be None, 'numpy' or 'cupy', got {device!r}")
    check_kind(compression)
    if staleness_bound is not None:
        check_integer("staleness_bound", staleness_bound, 0)
        if plan is not None:
            raise ValueError("staleness_bound= and partition= cannot be combined: model-parallel "
                             "blocks push on their own")
    if fetch_compression not in (None, "bf16"):
        raise ValueError(f"fetch_compression must be None or 'bf16', got {fetch_compression!r}")
    if (compression is not None or fetch_compression is not None) and plan is not None:
        raise ValueError("compression= and partition= cannot be combined: model-parallel blocks "
                         "push and fetch exact float32")
    check_on_snapshot(on_snapshot)
    if on_snapshot is not None and plan is not None:
        raise ValueError("on_snapshot= and partition= cannot be combined: no process holds a "
                         "model-parallel run's parameters whole")
    if device is not None and plan is not None:
        raise ValueError("device= and partition= cannot be combined: model-parallel blocks "
                         "compute on the host")
    return plan


def _start_blocks(client, workers: list[str], plan: Plan | None, ps, specs: list[ReplicaSpec],
                  coordination: dict, *, overlap: bool, max_in_flight: int) -> list:
    """Each replica's model-parallel blocks (None each without a plan), placed beside the
    shards, each fetching its ranges from them, their handles published where the replica
    task and the driver find them."""
    if plan is None:
        return [None] * len(specs)
    where = place_blocks(workers, ps.addresses(), len(specs), plan.n_blocks)
    blocks = []
    for spec in specs:
        blocks.append(Blocks.start(client, plan, None, ps=ps, replica=f"replica-{spec.replica}",
                                   overlap=overlap, max_in_flight=max_in_flight,
                                   addresses=where[spec.replica]))
        coordination["variables"].append(HandleVariable(spec.name(f"blocks-{spec.replica}"),
                                                        client=client))
        coordination["variables"][-1].set(blocks[-1])
    return blocks


def _fixed_driver(client, workers: list[str], model, specs: list[ReplicaSpec], blocks: list, ps):
    """The driver of R fixed replicas, each one long task homed beside the shards (a
    model-parallel replica: on its input block's worker, ``Blocks.input_home``) and rerun
    elsewhere (from its reported step) when its worker is lost."""
    def submit(r: int, home=None):
        return client.submit(run_replica, model, specs[r], blocks[r],
                             key=f"{specs[r].run}-replica-{r}-{uuid.uuid4().hex[:6]}",
                             workers=home, allow_other_workers=home is not None, pure=False,
                             retries=0)

    homes = [home if b is None else b.input_home()
             for home, b in zip(place_replicas(workers, ps.addresses(), len(specs)), blocks)]
    return partial(Driver, futures=[submit(r, [home]) for r, home in enumerate(homes)],
                   resubmit=submit)


def _elastic_driver(client, model, spec: ReplicaSpec, store, unit_chunks: int, max_replicas,
                    epochs: int):
    """The driver of elastic replicas: one started on every worker thread present or joining,
    all drawing data units from the shared ledger."""
    units = elastic.unit_ranges(store, unit_chunks)

    def start(r: int, worker: str):
        return client.submit(run_elastic_replica, model, replace(spec, replica=r), units,
                             key=f"{spec.run}-replica-{r}-{uuid.uuid4().hex[:6]}",
                             workers=[worker], allow_other_workers=False, pure=False, retries=0)

    return partial(ElasticDriver, start=start, max_replicas=max_replicas,
                   ledger=(elastic.batches_per_unit(units, spec.batch_size), epochs, spec.seed))


def _own_figures(driver, outcomes: list[dict], shard_stats: list[dict]) -> dict:
    """Downpour's figures: the fate of the pushes, recoveries and restarts, staleness, and how
    much of the replicas' traffic stayed in shared memory (``shared_memory_fraction``: of the
    replica-shard pairs, those of one host that reached each other through it; None when no
    replica said, as model-parallel ones, whose blocks do the traffic)."""
    near = [o["shards_shared"] for o in outcomes if o.get("shards_shared") is not None]
    return {"shared_memory_fraction": (sum(near) / (len(near) * len(shard_stats))
                                       if near and shard_stats else None),
            "updates_applied": sum(s["applied"] for s in shard_stats),
            "updates_rejected": sum(s["rejected"] for s in shard_stats),
            "updates_lost": driver.updates_lost, "updates_regained": driver.updates_regained,
            "shard_recoveries": driver.recoveries,
            "replica_restarts": sum(o["attempt"] for o in outcomes),
            "bound_waits": sum(o.get("bound_waits", 0) for o in outcomes),
            "pushes_compensated": sum(s["compensated"] for s in shard_stats),
            "staleness_mean": float(np.mean([s["staleness_mean"] for s in shard_stats]))}


@dataclass
class _StartPoint:
    """Where training starts: initial parameters, or a checkpoint's parameters and progress."""

    params: Ranged
    restore: object = None          # the checkpoint resumed: each shard reads its own range
    shards: object = None           # ranges -> per-shard snapshots of a given ``rule_state``
    steps: dict = None              # replica name -> steps pushed before the checkpoint

    def __post_init__(self):
        self.steps = self.steps or {}


def _start_point(model, seed: int, params, resume_from, rule_state=None,
                 rule: UpdateRule | None = None) -> _StartPoint:
    """The skeleton's start point, with what Downpour restores besides: each replica's
    progress from the checkpoint resumed (whose shards' rule state the shards read
    themselves), or each shard's slice of ``rule_state``."""
    point = start_point(model, params, seed, resume_from, "downpour")
    ckpt = point.resumed
    if ckpt is not None:
        return _StartPoint(point.params, restore=ckpt.path, steps=ckpt.replica_steps())
    if rule_state is None:
        return _StartPoint(point.params)
    state = {name: np.asarray(v, dtype=np.float32) for name, v in rule_state.items()}
    expected = set(rule.init(np.zeros(1, dtype=np.float32)))
    if set(state) != expected:
        raise ValueError(f"rule_state holds {sorted(state)}, the rule {rule.name!r} keeps "
                         f"{sorted(expected)}")
    for name, v in state.items():
        if v.shape != (model.size,):
            raise ValueError(f"rule_state[{name!r}] has shape {v.shape}, the model has "
                             f"{model.size} parameters")
    return _StartPoint(point.params, shards=_snapshots(point.params.whole(), state, 0))


def _snapshots(params: np.ndarray, state: dict, version: int):
    """``ranges -> [snapshot]``: each shard's slice of ``params`` and of the rule's ``state`` at
    ``version``, as ``ParameterServer.load_state_dicts`` takes them."""
    return lambda ranges: [{"params": params[a:b], "state": {k: v[a:b] for k, v in state.items()},
                            "version": version, "applied": 0} for a, b in ranges]


def _coordinate(client, spec: ReplicaSpec, ps, done: dict[int, int], warmstart_steps: int) -> dict:
    """The run's Events and Variables: warm start, stop, the current server, each replica's progress."""
    warm, stop = Event(spec.name("warm"), client=client), Event(spec.name("stop"), client=client)
    if warmstart_steps == 0 or done[0] >= warmstart_steps:
        warm.set()
    server = HandleVariable(spec.name("ps"), client=client)
    server.set((0, ps))
    variables = [server]
    for replica, steps_done in done.items():
        variables.append(Variable(spec.name(f"progress-{replica}"), client=client))
        variables[-1].set({"done": steps_done, "attempt": -1})
    lease = Lease(client, spec.name("lease"))
    lease.start()
    return {"warm": warm, "stop": stop, "ps": server, "lease": lease,
            "variables": variables + [lease.var]}


def _history(replica_events, run: str, start: float) -> list[dict]:
    """History rows from the scheduler's log of replica events (``(timestamp, msg)`` pairs)."""
    return [{"time": msg["time"] - start, "step": msg["step"], "replica": msg["replica"],
             "loss": msg["loss"], "test_loss": None, "test_accuracy": None}
            for _, msg in replica_events if msg.get("run") == run]


