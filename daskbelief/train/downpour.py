"""Downpour SGD: asynchronous model replicas around a sharded parameter server.

Each replica is one long-running Dask task bound to its own data shard. It keeps a local copy of
the parameters, fetches a fresh copy every ``n_fetch`` steps, accumulates gradients and pushes them
every ``n_push`` steps. The shards (Dask actors) apply each push on their own with the update rule
(Adagrad by default, as in the paper). Communication overlaps computation: a fetch issued before a
step is swapped in after it, and up to ``max_in_flight`` pushes travel while the replica computes.

Faults: a replica whose worker dies is rerun by Dask on another worker and resumes from the step
it had reported; a shard whose worker dies is recreated by the driver from the latest checkpoint
and the replicas reconnect to it (the parameter-server handle is published in a Dask Variable).
"""
from __future__ import annotations

import math
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass
from itertools import islice

import numpy as np
from distributed import Event, Variable, get_client, get_worker

from daskbelief import waits
from daskbelief.backend import get_backend, to_device, to_host
from daskbelief.checks import check_integer
from daskbelief.cluster import (client_or_local, default_local_workers, require_gpus,
                                require_threads, require_workers, warm_workers)
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.optim.rules import UpdateRule, make_rule
from daskbelief.ps import checkpoint
from daskbelief.ps.policy import place_blocks, place_replicas
from daskbelief.ps.server import CALL_TIMEOUT, RECOVERY_TIMEOUT, WAIT_SLICE, ParameterServer, ServerLost
from daskbelief.train.driver import Driver
from daskbelief.train.errors import DriverGone, RunLost
from daskbelief.train.recovery import Lease, LeaseWatch, lost_workers
from daskbelief.workarounds import leave_thread_pool, worker_info
from daskbelief.train.evaluate import announce_test, evaluate, test_row
from daskbelief.train.partition import Plan, as_plan
from daskbelief.train.partitioned import Blocks
from daskbelief.train.result import TrainResult


WARM_TIMEOUT = 3600.0  # seconds the other replicas wait for replica 0's warm start


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
    warmstart_steps: int
    device: str | None = None

    def name(self, what: str) -> str:
        """Name of one of the run's coordination objects (Dask Events and Variables)."""
        return f"{self.run}-{what}"

    @property
    def total_steps(self) -> int:
        """Steps this replica makes in the whole run, its warm start included."""
        if self.steps is not None:
            return self.steps + self.warmstart_steps
        return self.epochs * self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil((self.shard[1] - self.shard[0]) / self.batch_size)


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


def downpour(model, data, *, client=None, replicas: int = 2, shards: int = 2, n_fetch: int = 5,
             n_push: int = 5, rule: str | dict | UpdateRule = "adagrad", batch_size: int = 32, epochs: int | None = None,
             steps: int | None = None, max_seconds: float | None = None,
             warmstart_steps: int = 0, test=None, seed: int = 0,
             params=None, overlap: bool = True, max_in_flight: int = 2, report_every: int = 20,
             eval_every: float | None = None, eval_rows: int = 10_000, checkpoint_dir=None,
             checkpoint_every: float | None = None, checkpoint_keep: int = 3, resume_from=None,
             partition: dict | Plan | None = None, device: str | None = None,
             config: dict | None = None) -> TrainResult:
    """Train ``model`` with Downpour SGD on a Dask cluster and return a ``TrainResult``.

    Parameters
    ----------
    model : Sequential
    data : DataStore or str -- the training store (a URL opens its ``train`` split)
    client : distributed.Client, optional -- default: the current client, else a local cluster
    replicas : number of model replicas R; each gets one contiguous data shard of the store and
        runs as one long task, so the cluster needs R worker threads
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
    max_seconds : stop every replica (cleanly, pushing what it holds) after this many seconds
    warmstart_steps : replica 0 trains alone for this many steps before the others start
    test : DataStore or str, optional -- evaluated every ``eval_every`` seconds and at the end
    seed : parameter init and data order
    params : initial flat parameter vector (default ``model.init(seed)``)
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
    config : the pipeline config, stored in checkpoints
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
    plan = as_plan(model, partition)
    if device not in (None, "numpy", "cupy"):
        raise ValueError(f"device must be None, 'numpy' or 'cupy', got {device!r}")
    if device is not None and plan is not None:
        raise ValueError("device= and partition= cannot be combined: model-parallel blocks "
                         "compute on the host")
    start_point = _start_point(model, seed, params, resume_from)

    with client_or_local(client, threads_per_worker=-(-replicas // default_local_workers())) as c:
        require_workers(c)
        require_threads(c, replicas, f"{replicas} Downpour replicas")
        warm_workers(c, __name__)
        if device == "cupy":
            require_gpus(c)
        run = f"downpour-{uuid.uuid4().hex[:8]}"
        replica_plans = [ReplicaPlan(run, r, store.url, store.split, data_shards[r], batch_size, steps,
                             epochs, n_fetch, n_push, seed, overlap, max_in_flight, report_every,
                             warmstart_steps if r == 0 else 0, device)
                         for r in range(replicas)]
        ps = ParameterServer.create(c, start_point.params, shards, rule)
        if start_point.shards is not None:
            ps.load_state_dicts(start_point.shards(ps.ranges))
        done = {p.replica: min(start_point.steps.get(f"replica-{p.replica}", 0), p.total_steps)
                for p in replica_plans}
        coordination = _coordinate(c, replica_plans[0], ps, done, warmstart_steps)
        events.emit(events.RUN, run=run, kind="start", algorithm="downpour",
                    **{k: v for k, v in asdict(replica_plans[0]).items()
                       if isinstance(v, (int, str)) and k != "run"})
        workers = require_workers(c)
        blocks = [None] * replicas
        if plan is not None:
            where = place_blocks(workers, ps.addresses(), replicas, plan.n_blocks)
            blocks = [Blocks.start(c, plan, start_point.params, ps=ps, replica=f"replica-{r}",
                                   overlap=overlap, max_in_flight=max_in_flight, addresses=where[r])
                      for r in range(replicas)]
        block_names = [p.name(f"blocks-{p.replica}") for p, b in zip(replica_plans, blocks) if b is not None]
        for p, b in zip(replica_plans, blocks):
            if b is not None:
                coordination["variables"].append(Variable(p.name(f"blocks-{p.replica}"), client=c))
                coordination["variables"][-1].set(b)
        homes = place_replicas(workers, ps.addresses(), replicas)

        def submit(r: int, home=None):
            return c.submit(run_replica, model, replica_plans[r], blocks[r],
                            key=f"{run}-replica-{r}-{uuid.uuid4().hex[:6]}", workers=home,
                            allow_other_workers=home is not None, pure=False, retries=0)

        futures = [submit(r, [home]) for r, home in enumerate(homes)]
        driver = Driver(c, run, ps, futures, model, test_store, coordination, blocks=block_names,
                        resubmit=submit,
                        eval_every=eval_every, eval_rows=eval_rows, max_seconds=max_seconds,
                        checkpoint_dir=checkpoint_dir,
                        checkpoint_every=checkpoint_every, initial=start_point.params,
                        checkpoint_meta={"model": model.to_dict(), "config": config or {},
                                         "keep": checkpoint_keep})
        try:
            outcomes = driver.wait()
            final, shard_stats = driver.final()
            driver.report_shards(shard_stats)  # the final counters, however short the run
            if checkpoint_dir is not None:
                driver.checkpoint()
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
        seconds = driver.seconds
        summary = {"algorithm": "downpour", "replicas": replicas, "shards": shards,
                   "n_fetch": n_fetch, "n_push": n_push, "seconds": seconds,
                   "samples": sum(o["samples"] for o in outcomes),
                   "updates_applied": sum(s["applied"] for s in shard_stats),
                   "updates_rejected": sum(s["rejected"] for s in shard_stats),
                   "updates_lost": driver.updates_lost, "shard_recoveries": driver.recoveries,
                   "replica_restarts": sum(o["attempt"] for o in outcomes),
                   "staleness_mean": float(np.mean([s["staleness_mean"] for s in shard_stats]))}
        summary["samples_per_second"] = summary["samples"] / seconds
        test_rows = driver.test_rows
        if test_store is not None:
            metrics = evaluate(model, final, test_store, client=c)
            summary.update({"test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")})
            test_rows.append(test_row(seconds, None, metrics))
            announce_test(run, test_rows[-1])  # the final evaluation is an eval event, as Sandblaster's
        events.emit(events.RUN, run=run, kind="end",
                    **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        history = _history(c.get_events(events.REPLICA), run, driver.started) + test_rows
    history.sort(key=lambda h: h["time"])
    return TrainResult(model, final, history, summary, shard_stats, outcomes)


@dataclass
class _StartPoint:
    """Where training starts: initial parameters, or a checkpoint's parameters, state, progress."""

    params: np.ndarray
    shards: object = None           # ranges -> per-shard snapshots, when resuming
    steps: dict = None              # replica name -> steps pushed before the checkpoint

    def __post_init__(self):
        self.steps = self.steps or {}


def _start_point(model, seed: int, params, resume_from) -> _StartPoint:
    if resume_from is None:
        init = model.init(seed) if params is None else np.asarray(params, dtype=np.float32)
        if len(init) != model.size:
            raise ValueError(f"params has {len(init)} values, the model has {model.size} parameters")
        return _StartPoint(init)
    ckpt = checkpoint.load_to_resume(resume_from, model.to_dict(), "downpour")

    def snapshots(ranges):
        return [{"params": ckpt.params[a:b], "state": {k: v[a:b] for k, v in ckpt.state.items()},
                 "version": max(ckpt.versions), "applied": 0} for a, b in ranges]

    return _StartPoint(ckpt.params, snapshots, ckpt.replica_steps())


def _coordinate(client, plan: ReplicaPlan, ps, done: dict[int, int], warmstart_steps: int) -> dict:
    """The run's Events and Variables: warm start, stop, the current server, each replica's progress."""
    warm, stop = Event(plan.name("warm"), client=client), Event(plan.name("stop"), client=client)
    if warmstart_steps == 0 or done[0] >= warmstart_steps:
        warm.set()
    server = Variable(plan.name("ps"), client=client)
    server.set((0, ps))
    variables = [server]
    for replica, steps_done in done.items():
        variables.append(Variable(plan.name(f"progress-{replica}"), client=client))
        variables[-1].set({"done": steps_done, "attempt": -1})
    lease = Lease(client, plan.name("lease"))
    lease.start()
    return {"warm": warm, "stop": stop, "ps": server, "lease": lease,
            "variables": variables + [lease.var]}


def _history(replica_events, run: str, start: float) -> list[dict]:
    """History rows from the scheduler's log of replica events (``(timestamp, msg)`` pairs)."""
    return [{"time": msg["time"] - start, "step": msg["step"], "replica": msg["replica"],
             "loss": msg["loss"], "test_loss": None, "test_accuracy": None}
            for _, msg in replica_events if msg.get("run") == run]


def _batches(store, plan: ReplicaPlan, done: int):
    """The replica's remaining minibatches, resuming after the first ``done`` steps of its schedule.

    The schedule is epochs 0, 1, ... of the shard's minibatches in order, exactly what the
    reference trainer reads, cut at ``total_steps``.
    """
    remaining = plan.total_steps - done
    epoch, skip = divmod(done, plan.steps_per_epoch)
    while remaining > 0:
        batches = islice(store.minibatches(plan.shard, plan.batch_size, seed=plan.seed, epoch=epoch),
                         skip, skip + remaining)
        for batch in batches:
            remaining -= 1
            yield batch
        epoch, skip = epoch + 1, 0




class _Link:
    """A replica's traffic with the parameter server: fetches, bounded pushes in flight, recovery.

    A gradient buffer is reused only after the shards acknowledged the push that carried it, so
    memory stays at ``limit + 1`` buffers however far the replica runs ahead. Any failure of a
    server call becomes ``ServerLost``; ``recover`` then waits for the driver to publish a server
    with the lost shard recreated, and drops what was in flight to the old one.

    A call to a shard whose worker died may never be answered at all (distributed 2026.8 leaves
    such an actor future pending when the actor's own future can no longer complete), so replies
    are awaited in slices of ``WAIT_SLICE`` seconds, and between slices the replica gives up on
    the call once the driver has published a newer server.
    """

    def __init__(self, plan: ReplicaPlan, size: int, lease: LeaseWatch):
        self.var, self.lease = Variable(plan.name("ps")), lease
        generation, ps = self.var.get(timeout=CALL_TIMEOUT)
        self.generation, self.ps = generation, ps.here()
        self.limit = plan.max_in_flight if plan.overlap else 1
        self.replica = f"replica-{plan.replica}"
        self.free = [np.zeros(size, dtype=np.float32) for _ in range(self.limit + 1)]
        self.flight: deque = deque()
        self.pending = None
        self.staleness: list[int] = []
        self.pushes_lost = 0

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- any failure to reach a shard means: recover
            raise ServerLost(f"{type(e).__name__}: {e}") from e

    def _wait(self, reply):
        return waits.result(reply, timeout=RECOVERY_TIMEOUT, every=WAIT_SLICE, give_up=self._replaced,
                            what=f"{self.replica}: a parameter shard's reply")

    def _replaced(self):
        if self.var.get(timeout=CALL_TIMEOUT)[0] > self.generation:
            return ServerLost("a shard did not answer and the driver has replaced it")
        return self.lease.give_up()

    def fetch(self, out=None):
        return self._call(lambda: self.ps.gather(self.ps.fetch_async(), out, self._wait))

    def fetch_begin(self) -> None:
        self.pending = self._call(self.ps.fetch_async)

    def fetch_end(self, out):
        """The fetched parameters (into ``out``) and versions, or None when none was pending."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        return self._call(self.ps.gather, pending, out, self._wait)

    def buffer(self) -> np.ndarray:
        """A buffer (contents undefined) to accumulate the next push into, waiting for one if
        all travel."""
        if not self.free:
            self._settle_oldest()
        return self.free.pop()

    def release(self, buf) -> None:
        """Give back a buffer that will not be pushed (its gradient was lost with a shard)."""
        self.free.append(buf)

    def push(self, grad, versions, steps_done: int, wait_now: bool) -> None:
        """Push ``grad`` (a buffer from ``buffer``) computed on parameters of ``versions``;
        ``steps_done`` counts the replica's steps including those in ``grad``."""
        self.flight.append((self._call(self.ps.push_async, grad, versions, self.replica, steps_done),
                            grad, versions))
        while len(self.flight) > (0 if wait_now else self.limit):
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        replies, grad, versions = self.flight[0]
        new = self._call(lambda: [self._wait(r) for r in replies])
        self.flight.popleft()
        self.staleness.extend(v - 1 - base for v, base in zip(new, versions))
        self.free.append(grad)

    def drain(self) -> None:
        while self.flight:
            self._settle_oldest()

    def recover(self, timeout: float = RECOVERY_TIMEOUT) -> None:
        """Wait for a server newer than the one that failed; forget the old one's traffic."""
        def newer():
            generation, ps = self.var.get(timeout=CALL_TIMEOUT)
            return (generation, ps) if generation > self.generation else None

        self.generation, ps = waits.until(newer, timeout=timeout, every=0.2, give_up=self.lease.give_up,
                                          what=f"{self.replica}: the driver to recover a lost shard")
        self.ps = ps.here()
        self.pushes_lost += len(self.flight)
        self.free.extend(grad for _, grad, _ in self.flight)
        self.flight.clear()
        self.pending = None


class _Stepper:
    """A plain replica's steps: a local copy of the parameters, its gradient accumulator, and the
    ``_Link`` to the parameter server (fetch every ``n_fetch`` steps, push every ``n_push``)."""

    def __init__(self, model, plan: ReplicaPlan, first_step: int, lease: LeaseWatch):
        self.model, self.plan, self.first = model, plan, first_step
        self.link = _Link(plan, model.size, lease)
        self.params, self.versions = _connect(self.link, None)
        self.grad, self.acc, self.acc_steps = None, None, 0
        self.steps_done = first_step

    @property
    def staleness(self) -> list[int]:
        return self.link.staleness

    @property
    def pushes_lost(self) -> int:
        return self.link.pushes_lost

    def step(self, step: int, X, y) -> float | None:
        """One minibatch; None when a shard was lost meanwhile (the step's gradient with it)."""
        plan, link = self.plan, self.link
        try:
            if step > 0 and step % plan.n_fetch == 0:
                if plan.overlap:
                    link.fetch_begin()
                else:
                    self.params, self.versions = link.fetch(self.params)
                    self._fetched()
            loss = self._gradient(step, X, y)
            fetched = link.fetch_end(self.params)
            if fetched is not None:
                self.params, self.versions = fetched
                self._fetched()
            self.acc_steps += 1
            self.steps_done = step + 1
            if self.acc_steps == plan.n_push:
                link.push(self._take_push(), self.versions, self.steps_done,
                          wait_now=not plan.overlap)
            return loss
        except ServerLost:
            link.recover()
            self.params, self.versions = _connect(link, self.params)
            self._fetched()
            self._drop()
            return None

    def _gradient(self, step: int, X, y) -> float:
        """Add the minibatch's gradient into the accumulation; return its loss. The first
        gradient of a push is computed straight into its buffer, later ones into one reused
        buffer and added: no per-step allocation of a model-sized array."""
        if self.acc is None:
            self.acc = self.link.buffer()
            loss, _ = self.model.loss_and_grad(self.params, X, y, out=self.acc,
                                               validate=step == self.first)
            return loss
        if self.grad is None:
            self.grad = np.empty_like(self.params)
        loss, _ = self.model.loss_and_grad(self.params, X, y, out=self.grad, validate=False)
        self.acc += self.grad
        return loss

    def _fetched(self) -> None:
        """Fresh parameters arrived in ``self.params`` (nothing to do when computing there)."""

    def _take_push(self) -> np.ndarray:
        """The host buffer to push now; the next step starts a new accumulation."""
        acc, self.acc, self.acc_steps = self.acc, None, 0
        return acc

    def _drop(self) -> None:
        """Forget the accumulation: its gradient was lost with a shard."""
        if self.acc is not None:
            self.link.release(self.acc)
        self.acc, self.acc_steps = None, 0

    def finish(self) -> None:
        """Push what is accumulated and wait for every push in flight."""
        try:
            if self.acc_steps:
                self.link.push(self._take_push(), self.versions, self.steps_done, wait_now=True)
            self.link.drain()
        except ServerLost:
            self.link.pushes_lost += 1


class _DeviceStepper(_Stepper):
    """A plain replica computing on a device (``plan.device``: "cupy" for the worker's GPU;
    "numpy" runs this very path on a second host copy, which is how it is tested without one).

    The parameters and the gradient sums live on the device; only fetches (every ``n_fetch``
    steps) and pushes (every ``n_push``) cross between host and device, each one copy.
    """

    def __init__(self, model, plan: ReplicaPlan, first_step: int, lease: LeaseWatch):
        super().__init__(model, plan, first_step, lease)
        xp = get_backend(plan.device)
        self.dev_params = xp.array(self.params, copy=True)
        self.dev_acc, self.dev_grad = xp.empty_like(self.dev_params), xp.empty_like(self.dev_params)

    def _gradient(self, step: int, X, y) -> float:
        first = self.acc_steps == 0
        loss, _ = self.model.loss_and_grad(self.dev_params, X, y,
                                           out=self.dev_acc if first else self.dev_grad,
                                           validate=step == self.first)
        if not first:
            self.dev_acc += self.dev_grad
        return loss

    def _fetched(self) -> None:
        to_device(self.params, self.dev_params)

    def _take_push(self) -> np.ndarray:
        buf = self.link.buffer()
        to_host(self.dev_acc, buf)
        self.acc_steps = 0
        return buf

    def _drop(self) -> None:
        self.acc_steps = 0


class _PartitionedStepper:
    """A model-parallel replica's steps: its block actors compute the step together, each
    fetching and pushing only its own parameter ranges.

    A shard lost: the driver hands the blocks the recovered server (and so does this stepper,
    should the driver's hand-over miss them); they fetch from it and carry on. A block lost with
    its worker: the blocks are recreated on live workers from the server's parameters, published
    for the driver's hand-overs, and the step is retried; the gradient they held is lost.
    """

    MAX_REBUILDS = 10  # block sets one replica may recreate before its failure is final

    def __init__(self, blocks, plan: ReplicaPlan, first_step: int, lease: LeaseWatch):
        self.blocks, self.plan, self.first, self.lease = blocks, plan, first_step, lease
        self.var = Variable(plan.name("ps"))
        self.generation = self.var.get(timeout=CALL_TIMEOUT)[0]
        self.staleness: list[int] = []
        self.pushes_lost = 0
        self.rebuilds = 0
        self.steps_done = first_step
        self.n_blocks = blocks.plan.n_blocks
        self._fetch()

    def step(self, step: int, X, y) -> float | None:
        """One minibatch; None when a shard or a block was lost meanwhile (the step's gradient
        with it)."""
        plan = self.plan
        fetch = step > 0 and step % plan.n_fetch == 0
        push = (step - self.first + 1) % plan.n_push == 0
        try:
            out = self.blocks.train_step(X, y, tag=(plan.run, plan.replica, step), fetch=fetch,
                                         push=push, steps_done=step + 1)
        except DriverGone:
            raise
        except Exception as e:  # noqa: BLE001 -- sorted out by _recover: a shard, a block, or final
            self.pushes_lost += 1
            self._fetch(e)
            return None
        self.steps_done = step + 1
        self.staleness.extend(s for _, st in out for s in st)
        return sum(loss for loss, _ in out)

    def _fetch(self, error: Exception | None = None) -> None:
        """Every block fetches its ranges, after recovering from ``error`` (and from whatever
        fails meanwhile)."""
        for _ in range(self.MAX_REBUILDS + 1):
            try:
                if error is not None and not self._recover(error):
                    raise error
                self.blocks.call("fetch", [()] * self.n_blocks)
                return
            except DriverGone:
                raise
            except Exception as e:  # noqa: BLE001 -- see _recover
                if e is error:
                    raise
                error = e
        raise error

    def _recover(self, error: Exception) -> bool:
        """After ``error`` from the blocks: take a recovered server, or recreate lost blocks;
        False when neither explains the error."""
        client = get_client()
        lost = lost_workers(client, [a._address for a in self.blocks.actors])
        if lost:
            self._rebuild(client, lost)
            return True
        generation, ps = self.var.get(timeout=CALL_TIMEOUT)
        if generation > self.generation:
            self.generation = generation
            self.blocks.call("set_server", [(ps,)] * self.n_blocks)
        return isinstance(error, (ServerLost, waits.WaitTimeout, OSError))

    def _rebuild(self, client, lost: list[str]) -> None:
        """New blocks on live workers, from a server whose shards are all alive."""
        if self.rebuilds >= self.MAX_REBUILDS:
            raise RuntimeError(f"replica {self.plan.replica}: its blocks were lost "
                               f"{self.rebuilds} times over")
        self.rebuilds += 1
        started, plan = time.time(), self.plan

        def usable():
            generation, ps = self.var.get(timeout=CALL_TIMEOUT)
            return None if lost_workers(client, ps.addresses()) else (generation, ps)

        generation, ps = waits.until(usable, timeout=RECOVERY_TIMEOUT, every=0.5, give_up=self.lease.give_up,
                                     what=f"replica {plan.replica}: a parameter server with every shard alive")
        params, _ = ps.here().fetch(timeout=RECOVERY_TIMEOUT, give_up=self.lease.give_up)
        where = place_blocks(sorted(worker_info(client)), ps.addresses(), 1, self.n_blocks)[0]
        old, self.generation = self.blocks, generation
        self.blocks = Blocks.start(client, old.plan, params, ps=ps, replica=f"replica-{plan.replica}",
                                   overlap=plan.overlap, max_in_flight=plan.max_in_flight,
                                   addresses=where)
        Variable(plan.name(f"blocks-{plan.replica}")).set(self.blocks, timeout=CALL_TIMEOUT)
        old.close()
        events.emit(events.RUN, run=plan.run, kind="blocks-recovered", replica=plan.replica,
                    lost_workers=lost, workers=where, seconds=time.time() - started)

    def finish(self) -> None:
        try:
            for st in self.blocks.call("flush", [(self.steps_done,)] * self.n_blocks):
                self.staleness.extend(st)
        except Exception:  # noqa: BLE001 -- a shard or a block lost at the very end
            self.pushes_lost += 1
        self.blocks.close()


def run_replica(model, plan: ReplicaPlan, blocks=None) -> dict:
    """One Downpour replica: train on its data shard against the parameter server.

    Runs as a Dask task that leaves its worker's thread pool (recoveries create actors, which need
    a pool thread); ``blocks`` (a ``partitioned.Blocks``) makes it a model-parallel replica.
    Returns its step count, samples and recent loss. Replicas other than replica 0 wait for the
    warm-start event before their first step. If the task is rerun after its worker died, it
    resumes after the last step it reported. It stops when its driver's lease expires.
    """
    leave_thread_pool()
    progress = Variable(plan.name(f"progress-{plan.replica}"))
    state = progress.get(timeout=CALL_TIMEOUT)
    attempt, done = state["attempt"] + 1, state["done"]
    progress.set({"done": done, "attempt": attempt})
    lease = LeaseWatch(plan.name("lease"))
    worker = get_worker().address
    try:
        if plan.replica or not plan.warmstart_steps:
            warm = Event(plan.name("warm"))
            waits.until(lambda: warm.wait(timeout=1.0), timeout=WARM_TIMEOUT, every=0.0,
                        give_up=lease.give_up, what=f"replica {plan.replica}: the warm start")
        return _train(model, plan, blocks, lease, attempt, done, progress, worker)
    except DriverGone:
        return {"replica": plan.replica, "steps": 0, "samples": 0, "worker": worker,
                "attempt": attempt, "pushes_lost": 0, "loss": float("nan"), "staleness_mean": 0.0,
                "orphaned": True}


def _train(model, plan: ReplicaPlan, blocks, lease: LeaseWatch, attempt: int, done: int,
           progress, worker: str) -> dict:
    """The replica's loop: steps, progress reports, the warm-start signal, stopping."""
    stop = Event(plan.name("stop"))
    store = open_store(plan.url, split=plan.split)
    if blocks is not None:
        stepper = _PartitionedStepper(blocks, plan, done, lease)
    else:
        stepper = (_Stepper if plan.device is None else _DeviceStepper)(model, plan, done, lease)
    losses: deque = deque(maxlen=plan.report_every)
    samples, step = 0, done
    tick = time.time()
    for X, y in _batches(store, plan, done):
        if lease.expired():
            raise DriverGone(f"replica {plan.replica}: the driver's lease expired")
        loss = stepper.step(step, X, y)
        if loss is None:
            continue
        losses.append(float(loss))
        samples += len(X)
        step += 1
        if step == plan.warmstart_steps:
            Event(plan.name("warm")).set()
        if step % plan.report_every == 0:
            progress.set({"done": step, "attempt": attempt})
            now = time.time()
            events.emit(events.REPLICA, run=plan.run, replica=plan.replica, step=step,
                        batch_size=plan.batch_size, loss=float(np.mean(losses)), worker=worker,
                        samples_per_s=plan.report_every * plan.batch_size / max(now - tick, 1e-9),
                        staleness=float(np.mean(stepper.staleness[-20:])) if stepper.staleness else 0.0)
            tick = now
            if stop.is_set():
                break
    stepper.finish()
    if plan.warmstart_steps:
        Event(plan.name("warm")).set()  # never leave the others waiting, however short the shard
    progress.set({"done": step, "attempt": attempt})
    return {"replica": plan.replica, "steps": step - done, "samples": samples, "worker": worker,
            "attempt": attempt, "pushes_lost": stepper.pushes_lost,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "staleness_mean": float(np.mean(stepper.staleness)) if stepper.staleness else 0.0}


def _connect(link: _Link, out):
    """Fetch the parameters, waiting through server recoveries."""
    while True:
        try:
            return link.fetch(out)
        except ServerLost:
            link.recover()
