"""Downpour SGD: asynchronous model replicas around a sharded parameter server.

Each replica is one long-running Dask task bound to its own data shard. It keeps a local copy of
the parameters, fetches a fresh copy every ``n_fetch`` steps, accumulates gradients and pushes them
every ``n_push`` steps. The shards (Dask actors) apply each push on their own with the update rule
(Adagrad by default, as in the paper). Communication overlaps computation: a fetch issued before a
step is swapped in after it, and up to ``max_in_flight`` pushes travel while the replica computes.
"""
from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from distributed import Event, get_worker

from daskbelief.cluster import (client_or_local, default_local_workers, require_threads,
                                require_workers)
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.optim.rules import make_rule
from daskbelief.ps.server import ParameterServer
from daskbelief.train.evaluate import evaluate, evaluate_rows
from daskbelief.train.result import TrainResult


@dataclass(frozen=True)
class ReplicaPlan:
    """What one replica does: its data, its schedule and how it talks to the parameter server."""

    run: str
    replica: int
    url: str
    split: str
    shard: tuple[int, int]
    batch_size: int
    steps: int | None
    epochs: int | None
    n_fetch: int
    n_push: int
    seed: int
    overlap: bool
    max_in_flight: int
    report_every: int
    warm_event: str
    stop_event: str
    warmstart_steps: int


def validate(*, replicas: int, shards: int, n_fetch: int, n_push: int, batch_size: int,
             epochs, steps, warmstart_steps: int, max_in_flight: int) -> None:
    """Reject impossible settings before anything starts, naming the offending argument."""
    for name, value in [("replicas", replicas), ("shards", shards), ("n_fetch", n_fetch),
                        ("n_push", n_push), ("batch_size", batch_size),
                        ("max_in_flight", max_in_flight)]:
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs= or steps= (how long each replica trains)")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise ValueError(f"epochs/steps must be >= 1, got epochs={epochs!r} steps={steps!r}")
    if warmstart_steps < 0:
        raise ValueError(f"warmstart_steps must be >= 0, got {warmstart_steps}")


def downpour(model, data, *, client=None, replicas: int = 2, shards: int = 2, n_fetch: int = 5,
             n_push: int = 5, rule="adagrad", batch_size: int = 32, epochs: int | None = None,
             steps: int | None = None, warmstart_steps: int = 0, test=None, seed: int = 0,
             params=None, overlap: bool = True, max_in_flight: int = 2, report_every: int = 20,
             eval_every: float | None = None, eval_rows: int = 10_000) -> TrainResult:
    """Train ``model`` with Downpour SGD on a Dask cluster and return a ``TrainResult``.

    Parameters
    ----------
    model : Sequential
    data : DataStore or str -- the training store (a URL opens its ``train`` split)
    client : distributed.Client, optional -- default: the current client, else a local cluster
    replicas : number of model replicas R; each gets one contiguous data shard of the store
    shards : number of parameter-server shards S (actors placed on distinct workers)
    n_fetch, n_push : a replica fetches parameters every ``n_fetch`` steps and pushes its
        accumulated gradient every ``n_push`` steps
    rule : "adagrad" | "sgd" | "momentum" | dict | UpdateRule -- applied by every shard
    batch_size : minibatch size of each replica step
    epochs, steps : exactly one: passes over each replica's shard, or steps per replica
    warmstart_steps : replica 0 trains alone for this many steps before the others start
    test : DataStore or str, optional -- evaluated every ``eval_every`` seconds and at the end
    seed : parameter init and data order
    params : initial flat parameter vector (default ``model.init(seed)``)
    overlap : overlap fetches and pushes with computation (False: blocking, the exact-oracle mode)
    max_in_flight : pushes a replica may have travelling at once (bounds its memory)
    report_every : steps between a replica's progress events
    eval_every : seconds between test evaluations during training (None: only at the end)
    eval_rows : test rows used by the evaluations during training
    """
    store = open_store(data, split="train") if isinstance(data, str) else data
    test_store = open_store(test, split="test") if isinstance(test, str) else test
    validate(replicas=replicas, shards=shards, n_fetch=n_fetch, n_push=n_push,
             batch_size=batch_size, epochs=epochs, steps=steps, warmstart_steps=warmstart_steps,
             max_in_flight=max_in_flight)
    model.check_data(store.feature_shape, store.n_classes)
    if test_store is not None:
        model.check_data(test_store.feature_shape, test_store.n_classes)
    if replicas > store.n_chunks:
        raise ValueError(f"replicas={replicas} need one data shard each, but the store "
                         f"{store.url} has only {store.n_chunks} chunks: use fewer replicas or "
                         "rewrite the store with smaller chunk_rows")
    data_shards = store.shards(replicas)
    rule = make_rule(rule)
    init = model.init(seed) if params is None else np.asarray(params, dtype=np.float32)
    if len(init) != model.size:
        raise ValueError(f"params has {len(init)} values, the model has {model.size} parameters")

    with client_or_local(client, threads_per_worker=-(-replicas // default_local_workers())) as c:
        require_workers(c)
        require_threads(c, replicas, f"{replicas} Downpour replicas")
        run = f"downpour-{uuid.uuid4().hex[:8]}"
        ps = ParameterServer.create(c, init, shards, rule)
        warm, stop = Event(f"{run}-warm", client=c), Event(f"{run}-stop", client=c)
        if warmstart_steps == 0:
            warm.set()
        plans = [ReplicaPlan(run, r, store.url, store.split, data_shards[r], batch_size, steps,
                             epochs, n_fetch, n_push, seed, overlap, max_in_flight, report_every,
                             warm.name, stop.name, warmstart_steps if r == 0 else 0)
                 for r in range(replicas)]
        events.emit(events.RUN, run=run, kind="start", algorithm="downpour",
                    **{k: v for k, v in asdict(plans[0]).items() if isinstance(v, (int, str))})
        start = time.time()
        futures = [c.submit(run_replica, model, ps, plan, key=f"{run}-replica-{plan.replica}",
                            pure=False) for plan in plans]
        try:
            test_rows = _monitor(futures, ps, model, test_store, eval_every, eval_rows, run)
            outcomes = c.gather(futures)
            seconds = time.time() - start
            final, _ = ps.fetch()
            shard_stats = ps.stats()
        finally:
            stop.set()
            c.cancel(futures)
            ps.close()
        summary = {"algorithm": "downpour", "replicas": replicas, "shards": shards,
                   "n_fetch": n_fetch, "n_push": n_push, "seconds": seconds,
                   "samples": sum(o["samples"] for o in outcomes),
                   "updates_applied": sum(s["applied"] for s in shard_stats),
                   "updates_rejected": sum(s["rejected"] for s in shard_stats),
                   "staleness_mean": float(np.mean([s["staleness_mean"] for s in shard_stats]))}
        summary["samples_per_second"] = summary["samples"] / seconds
        if test_store is not None:
            metrics = evaluate(model, final, test_store, client=c)
            summary.update({"test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")})
            test_rows.append({"time": seconds, "step": None, "replica": None, "loss": None,
                              "test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")})
        history = _history(c.get_events(events.REPLICA), run, start) + test_rows
    history.sort(key=lambda h: h["time"])
    result = TrainResult(model, final, history, summary)
    result.shard_stats = shard_stats
    result.replica_outcomes = outcomes
    return result


def _monitor(futures, ps, model, test_store, eval_every, eval_rows, run) -> list[dict]:
    """Wait for the replicas, evaluating the current parameters on the test set now and then.

    Returns as soon as every replica finished or one failed (the caller's gather raises it).
    """
    rows, start, last = [], time.time(), time.time()
    while not all(f.done() for f in futures):
        if any(f.status == "error" for f in futures):
            return rows
        time.sleep(0.05)
        if test_store is None or eval_every is None or time.time() - last < eval_every:
            continue
        last = time.time()
        params, _ = ps.fetch()
        m = evaluate_rows(model, params, test_store, 0, min(eval_rows, test_store.n))
        row = {"time": last - start, "step": None, "replica": None, "loss": None,
               "test_loss": m["loss_sum"] / m["n"],
               "test_accuracy": m["correct"] / m["n"] if test_store.task == "classification" else None}
        rows.append(row)
        events.emit(events.RUN, run=run, kind="eval", **{k: v for k, v in row.items() if v is not None})
    return rows


def _history(replica_events, run: str, start: float) -> list[dict]:
    """History rows from the scheduler's log of replica events (``(timestamp, msg)`` pairs)."""
    return [{"time": msg["time"] - start, "step": msg["step"], "replica": msg["replica"],
             "loss": msg["loss"], "test_loss": None, "test_accuracy": None}
            for _, msg in replica_events if msg.get("run") == run]


def _batches(store, plan: ReplicaPlan):
    """The replica's minibatches: ``steps`` of them, or ``epochs`` passes over its shard."""
    if plan.steps is not None:
        stream = store.stream(plan.shard, plan.batch_size, seed=plan.seed)
        for _ in range(plan.steps + plan.warmstart_steps):
            yield next(stream)
        stream.close()
        return
    for epoch in range(plan.epochs):
        yield from store.minibatches(plan.shard, plan.batch_size, seed=plan.seed, epoch=epoch)


class _Pushes:
    """Gradient buffers and the pushes in flight; at most ``limit`` pushes travel at once.

    A buffer is reused only after the shards acknowledged the push that carried it, so memory
    stays at ``limit + 1`` buffers however far the replica runs ahead.
    """

    def __init__(self, ps, size: int, limit: int, replica: str):
        self.ps, self.limit, self.replica = ps, limit, replica
        self.free = [np.zeros(size, dtype=np.float32) for _ in range(limit + 1)]
        self.flight: deque = deque()
        self.staleness: list[int] = []

    def buffer(self) -> np.ndarray:
        """A zeroed buffer to accumulate the next push into, waiting for one if all travel."""
        if not self.free:
            self._settle_oldest()
        buf = self.free.pop()
        buf.fill(0.0)
        return buf

    def send(self, grad, versions, wait_now: bool) -> None:
        """Push ``grad`` (a buffer from ``buffer``) computed on parameters of ``versions``."""
        self.flight.append((self.ps.push_async(grad, versions, self.replica), grad, versions))
        while len(self.flight) > (0 if wait_now else self.limit):
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        replies, grad, versions = self.flight.popleft()
        for reply, base in zip(replies, versions):
            self.staleness.append(reply.result() - 1 - base)
        self.free.append(grad)

    def drain(self) -> None:
        while self.flight:
            self._settle_oldest()


def run_replica(model, ps, plan: ReplicaPlan) -> dict:
    """One Downpour replica: train on its data shard against the parameter server.

    Runs as a Dask task; returns its step count, samples and mean loss. Replicas other than
    replica 0 wait for the warm-start event before their first step.
    """
    replica = f"replica-{plan.replica}"
    if plan.warmstart_steps == 0:
        Event(plan.warm_event).wait()
    stop = Event(plan.stop_event)
    store = open_store(plan.url, split=plan.split)
    params, versions = ps.fetch()
    pushes = _Pushes(ps, ps.size, plan.max_in_flight if plan.overlap else 1, replica)
    acc, acc_steps = None, 0
    pending = None
    losses, samples, step = [], 0, 0
    tick = time.time()
    worker = get_worker().address
    for X, y in _batches(store, plan):
        if step > 0 and step % plan.n_fetch == 0:
            if plan.overlap:
                pending = ps.fetch_async()
            else:
                params, versions = ps.fetch(out=params)
        loss, grad = model.loss_and_grad(params, X, y)
        if pending is not None:
            params, versions = ps.gather(pending, out=params)
            pending = None
        if acc is None:
            acc = pushes.buffer()
        acc += grad
        acc_steps += 1
        if acc_steps == plan.n_push:
            pushes.send(acc, versions, wait_now=not plan.overlap)
            acc, acc_steps = None, 0
        losses.append(float(loss))
        samples += len(X)
        step += 1
        if step == plan.warmstart_steps:
            Event(plan.warm_event).set()
        if step % plan.report_every == 0:
            if stop.is_set():
                break
            now = time.time()
            recent = losses[-plan.report_every:]
            events.emit(events.REPLICA, run=plan.run, replica=plan.replica, step=step,
                        loss=float(np.mean(recent)), worker=worker,
                        samples_per_s=plan.report_every * plan.batch_size / max(now - tick, 1e-9),
                        staleness=float(np.mean(pushes.staleness[-20:])) if pushes.staleness else 0.0)
            tick = now
    if acc is not None:
        pushes.send(acc, versions, wait_now=True)
    pushes.drain()
    if plan.warmstart_steps:
        Event(plan.warm_event).set()  # never leave the others waiting, however short the shard
    return {"replica": plan.replica, "steps": step, "samples": samples, "worker": worker,
            "loss": float(np.mean(losses[-plan.report_every:])) if losses else float("nan"),
            "staleness_mean": float(np.mean(pushes.staleness)) if pushes.staleness else 0.0}
