"""A Downpour replica: the long-running task that trains on one data shard against the
parameter server (``run_replica``), and its steppers.

It keeps a local copy of the parameters, fetches a fresh copy every ``n_fetch`` steps,
accumulates gradients and pushes them every ``n_push`` steps, with a fetch overlapped with the
step before it and up to ``max_in_flight`` pushes travelling (``_Link``). A model-parallel replica
drives its block actors instead (``_PartitionedStepper``). It leaves its worker's thread pool,
resumes after a rerun from the step it reported, follows recovered servers, recreates lost blocks,
and stops when its driver's lease expires.
"""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice

import numpy as np
from distributed import Event, Variable, get_client, get_worker

from daskbelief import waits
from daskbelief.backend import get_backend, to_device, to_host
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.optim.staleness import must_wait
from daskbelief.ps import shared
from daskbelief.ps.compress import Feedback
from daskbelief.ps.policy import place_blocks
from daskbelief.ps.pushes import PushWindow, fetch_due, push_due
from daskbelief.ps.server import CALL_TIMEOUT, RECOVERY_TIMEOUT, WAIT_SLICE, ServerLost
from daskbelief.train import elastic
from daskbelief.train.errors import DriverGone
from daskbelief.train.partitioned import Blocks
from daskbelief.train.recovery import LeaseWatch, gone, lost_workers
from daskbelief.workarounds import HandleVariable, leave_thread_pool, worker_info


WARM_TIMEOUT = 3600.0  # seconds the other replicas wait for replica 0's warm start


@dataclass(frozen=True)
class ReplicaSpec:
    """What one replica does: its data, its schedule and how it talks to the parameter server."""

    run: str
    replica: int
    url: str
    split: str
    rows: tuple[int, int]
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
    compression: str | None = None
    topk_fraction: float = 0.01
    fetch_compression: str | None = None
    staleness_bound: int | None = None

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
        return math.ceil((self.rows[1] - self.rows[0]) / self.batch_size)


def _batches(store, spec: ReplicaSpec, done: int):
    """The replica's remaining minibatches, resuming after the first ``done`` steps of its schedule.

    The schedule is epochs 0, 1, ... of the shard's minibatches in order, exactly what the
    reference trainer reads, cut at ``total_steps``.
    """
    epoch, skip = divmod(done, spec.steps_per_epoch)
    return islice(store.stream(spec.rows, spec.batch_size, seed=spec.seed, start_epoch=epoch),
                  skip, skip + max(spec.total_steps - done, 0))


def _with_next(batches):
    """``((X, y), next X)`` for each batch (None after the last): a model-parallel replica sends
    the next inputs to its blocks while they compute the step."""
    batches = iter(batches)
    current = next(batches, None)
    for upcoming in batches:
        yield current, upcoming[0]
        current = upcoming
    if current is not None:
        yield current, None


class _Link:
    """A replica's traffic with the parameter server: fetches, bounded pushes in flight, recovery.

    Its pushes follow the one schedule of every parameter-server client (``ps.pushes``: the
    in-flight window, buffer reuse, staleness). Any failure of a server call becomes
    ``ServerLost``; ``recover`` then waits for the driver to publish a server with the lost shard
    recreated, and drops what was in flight to the old one.

    A call to a shard whose worker died may never be answered at all (distributed 2026.8 leaves
    such an actor future pending when the actor's own future can no longer complete), so replies
    are awaited in slices of ``WAIT_SLICE`` seconds, and between slices the replica gives up on
    the call once the driver has published a newer server.
    """

    def __init__(self, spec: ReplicaSpec, size: int, lease: LeaseWatch):
        self.var, self.lease = HandleVariable(spec.name("ps")), lease
        self.replica = f"replica-{spec.replica}"
        generation, ps = self.var.get(timeout=CALL_TIMEOUT)
        self.generation, self.ps = generation, self._near(ps)
        # buffers that shards on this host read where they lie (``ps.shared``)
        self.window = PushWindow(size, spec.max_in_flight, spec.overlap, allocate=shared.empty)
        self.pending = None
        self.pushes_lost = 0
        self.feedback = (None if spec.compression is None
                         else Feedback(spec.compression, spec.topk_fraction))
        self.fetch_kind = spec.fetch_compression
        self.bound, self.ahead = spec.staleness_bound, 0  # pushes ahead of the slowest, at most
        self.bound_waits, self.bound_wait_seconds = 0, 0.0

    def _near(self, ps):
        """``ps.here()``, asking the shards for their shared memory no longer than their workers
        live: a replica rerun after a loss can be handed the server that lost a shard, whose
        answer would otherwise be awaited for ten seconds before the first step finds it lost."""
        return ps.here(give_up=gone(get_client(), ps.addresses(), f"{self.replica}: shared memory"))

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
        return self._call(lambda: self.ps.gather(self.ps.fetch_async(self.fetch_kind, self.replica),
                                                 out, self._wait))

    def fetch_begin(self) -> None:
        self.pending = self._call(self.ps.fetch_async, self.fetch_kind, self.replica)

    def fetch_end(self, out):
        """The fetched parameters (into ``out``) and versions, or None when none was pending."""
        if self.pending is None:
            return None
        pending, self.pending = self.pending, None
        return self._call(self.ps.gather, pending, out, self._wait)

    @property
    def staleness(self) -> list[int]:
        return self.window.staleness

    def buffer(self) -> np.ndarray:
        """A buffer (contents undefined) to accumulate the next push into, waiting for one if
        all travel."""
        if self.window.must_settle():
            self._settle_oldest()
        return self.window.buffer()

    def release(self, buf) -> None:
        """Give back a buffer that will not be pushed (its gradient was lost with a shard)."""
        self.window.release(buf)

    def push(self, grad, versions, steps_done: int, wait_now: bool) -> None:
        """Push ``grad`` (a buffer from ``buffer``) computed on parameters of ``versions``;
        ``steps_done`` counts the replica's steps including those in ``grad``."""
        self._keep_bound()
        encode = None if self.feedback is None else self.feedback.encode
        self.ahead += 1
        self.window.launch(self._call(self.ps.push_async, grad, versions, self.replica, steps_done,
                                      encode), grad, versions)
        while self.window.over(now=wait_now):
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        replies, versions = self.window.oldest()
        new = self._call(lambda: [self._wait(r) for r in replies])
        self.window.settled(zip(new, versions))

    def drain(self) -> None:
        while self.window.over(now=True):
            self._settle_oldest()

    def _keep_bound(self) -> None:
        """Under a staleness bound, push only while at most ``bound`` pushes ahead of the
        slowest replica (stale-synchronous parallel: bound 0 is lockstep). ``ahead`` only
        overestimates (the slowest only moves on), so the shard is asked only when it says
        wait; a replica that stops pushing (lost, not yet resubmitted) holds nobody back once
        the shard sees it stalled (``ps.asynchrony.STALL_SECONDS``)."""
        if not must_wait(self.ahead, 0, self.bound):
            return
        started = time.time()
        self.drain()  # its own pushes landed, the shard's count is exact

        def caught_up():
            self.ahead = self._wait(self._call(self.ps.shards[0].lead, self.replica))
            return not must_wait(self.ahead, 0, self.bound)

        if not caught_up():
            self.bound_waits += 1
            waits.until(caught_up, timeout=RECOVERY_TIMEOUT, every=0.002,
                        give_up=self.lease.give_up,
                        what=f"{self.replica}: the slowest replica, under the staleness bound")
        self.bound_wait_seconds += time.time() - started

    def leave(self) -> None:
        """Tell the shards this replica has finished (a staleness bound stops counting it)."""
        if self.bound is not None:
            self._call(lambda: [self._wait(s.leave(self.replica)) for s in self.ps.shards])

    def recover(self, copy=None, timeout: float = RECOVERY_TIMEOUT) -> None:
        """Wait for a server newer than the one that failed; forget the old one's traffic.
        ``copy``: the parameters and versions this replica last fetched, offered to the shards
        recreated meanwhile (``offer``)."""
        def newer():
            generation, ps = self.var.get(timeout=CALL_TIMEOUT)
            return (generation, ps) if generation > self.generation else None

        old = self.generation
        self.generation, ps = waits.until(newer, timeout=timeout, every=0.2, give_up=self.lease.give_up,
                                          what=f"{self.replica}: the driver to recover a lost shard")
        self.ps = self._near(ps)
        self.pushes_lost += self.window.drop()
        self.pending = None
        if copy is not None:
            self.offer(*copy, old)

    def offer(self, params, versions, generation: int) -> None:
        """Offer the slices of ``params`` (fetched at ``versions`` from the server of
        ``generation``) to the shards recreated since, which take a slice holding more updates
        than the checkpoint or start they came from (``ParameterServer.offer_copy``). Best
        effort: a shard that fails here is found lost by the next call."""
        try:
            self.ps.offer_copy(params, versions, generation, self._wait)
        except Exception:  # noqa: BLE001 -- the next fetch or push meets the same loss
            pass


class _Stepper:
    """A plain replica's steps: a local copy of the parameters, its gradient accumulator, and the
    ``_Link`` to the parameter server (fetch every ``n_fetch`` steps, push every ``n_push``)."""

    def __init__(self, model, spec: ReplicaSpec, first_step: int, lease: LeaseWatch):
        self.model, self.spec, self.first = model, spec, first_step
        self.link = _Link(spec, model.size, lease)
        self.params, self.versions = _connect(self.link, None)
        self.grad, self.acc, self.acc_steps = None, None, 0
        self.steps_done = first_step

    @property
    def staleness(self) -> list[int]:
        return self.link.staleness

    @property
    def pushes_lost(self) -> int:
        return self.link.pushes_lost

    @property
    def bound_waits(self) -> int:
        return self.link.bound_waits

    @property
    def shards_shared(self) -> int:
        """Shards the replica reaches through shared memory (``ps.shared``), not over TCP."""
        return sum(isinstance(s, shared.SharedShard) for s in self.link.ps.shards)

    def step(self, step: int, X, y, ahead=None) -> float | None:
        """One minibatch; None when a shard was lost meanwhile (the step's gradient with it).
        ``ahead`` (the next batch's inputs) is always None here: only a model-parallel replica
        reads ahead (``_PartitionedStepper``)."""
        spec, link = self.spec, self.link
        try:
            if fetch_due(step, spec.n_fetch):
                if spec.overlap:
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
            if push_due(self.acc_steps, spec.n_push):
                link.push(self._take_push(), self.versions, self.steps_done,
                          wait_now=not spec.overlap)
            return loss
        except ServerLost:
            link.recover(copy=(self.params, self.versions))
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
        """Push what is accumulated and wait for every push in flight. A shard lost meanwhile
        (these pushes with it): wait for its recovery to hand it this replica's copy, which
        may be the newest left of the slice."""
        try:
            if self.acc_steps:
                self.link.push(self._take_push(), self.versions, self.steps_done, wait_now=True)
            self.link.drain()
            self.link.leave()
        except ServerLost:
            self.link.pushes_lost += 1
            self.link.recover(copy=(self.params, self.versions))


class _DeviceStepper(_Stepper):
    """A plain replica computing on a device (``spec.device``: "cupy" for the worker's GPU;
    "numpy" runs this very path on a second host copy, which is how it is tested without one).

    The parameters and the gradient sums live on the device; only fetches (every ``n_fetch``
    steps) and pushes (every ``n_push``) cross between host and device, each one copy.
    """

    def __init__(self, model, spec: ReplicaSpec, first_step: int, lease: LeaseWatch):
        super().__init__(model, spec, first_step, lease)
        xp = get_backend(spec.device)
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
    bound_waits = 0    # a staleness bound is refused with partition=
    shards_shared = None  # the blocks reach the shards themselves

    def __init__(self, blocks, spec: ReplicaSpec, first_step: int, lease: LeaseWatch):
        self.blocks, self.spec, self.lease = blocks, spec, lease
        self.var = HandleVariable(spec.name("ps"))
        self.generation = self.var.get(timeout=CALL_TIMEOUT)[0]
        self.staleness: list[int] = []
        self.pushes_lost = 0
        self.rebuilds = 0
        self.steps_done, self.accumulated = first_step, 0  # steps whose gradients the blocks hold
        self.n_blocks = blocks.plan.n_blocks
        self._fetch()

    def step(self, step: int, X, y, ahead=None) -> float | None:
        """One minibatch; None when a shard or a block was lost meanwhile (the step's gradient
        with it). ``ahead``: the next batch's inputs, sent to the blocks during this step."""
        spec = self.spec
        push = push_due(self.accumulated + 1, spec.n_push)
        try:
            out = self.blocks.train_step(X, y, tag=(spec.run, spec.replica, step),
                                         fetch=fetch_due(step, spec.n_fetch), push=push,
                                         steps_done=step + 1, ahead=ahead)
        except DriverGone:
            raise
        except Exception as e:  # noqa: BLE001 -- sorted out by _recover: a shard, a block, or final
            self.pushes_lost += 1
            self.accumulated = 0
            self._fetch(e)
            return None
        self.accumulated = 0 if push else self.accumulated + 1
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
        self._take_newer_server()
        return isinstance(error, (ServerLost, waits.WaitTimeout, OSError))

    def _take_newer_server(self) -> None:
        """Hand the blocks the published server if it is newer than theirs (a recovery)."""
        generation, ps = self.var.get(timeout=CALL_TIMEOUT)
        if generation > self.generation:
            self.generation = generation
            self.blocks.call("set_server", [(ps,)] * self.n_blocks)

    def _rebuild(self, client, lost: list[str]) -> None:
        """New blocks on live workers, from a server whose shards are all alive."""
        if self.rebuilds >= self.MAX_REBUILDS:
            raise RuntimeError(f"replica {self.spec.replica}: its blocks were lost "
                               f"{self.rebuilds} times over")
        self.rebuilds += 1
        started, spec = time.time(), self.spec

        def usable():
            generation, ps = self.var.get(timeout=CALL_TIMEOUT)
            return None if lost_workers(client, ps.addresses()) else (generation, ps)

        generation, ps = waits.until(usable, timeout=RECOVERY_TIMEOUT, every=0.5, give_up=self.lease.give_up,
                                     what=f"replica {spec.replica}: a parameter server with every shard alive")
        where = place_blocks(sorted(worker_info(client)), ps.addresses(), 1, self.n_blocks)[0]
        old, self.generation = self.blocks, generation
        self.blocks = Blocks.start(client, old.plan, None, ps=ps, replica=f"replica-{spec.replica}",
                                   overlap=spec.overlap, max_in_flight=spec.max_in_flight,
                                   addresses=where)
        HandleVariable(spec.name(f"blocks-{spec.replica}")).set(self.blocks, timeout=CALL_TIMEOUT)
        old.close()
        # a shard recovered between ``usable`` and the publication above was handed to the
        # blocks the driver found published then, the old ones: give the new ones its server
        # (the driver publishes the server before it reads the blocks, so one of the two sees it)
        self._take_newer_server()
        events.emit(events.RUN, run=spec.run, kind="blocks-recovered", replica=spec.replica,
                    lost_workers=lost, workers=where, seconds=time.time() - started)

    def finish(self) -> None:
        try:
            for st in self.blocks.call("flush", [(self.steps_done,)] * self.n_blocks):
                self.staleness.extend(st)
        except Exception:  # noqa: BLE001 -- a shard or a block lost at the very end
            self.pushes_lost += 1
        self.blocks.close()


def run_replica(model, spec: ReplicaSpec, blocks=None) -> dict:
    """One Downpour replica: train on its data shard against the parameter server.

    Runs as a Dask task that leaves its worker's thread pool (recoveries create actors, which need
    a pool thread); ``blocks`` (a ``partitioned.Blocks``) makes it a model-parallel replica.
    Returns its step count, samples and recent loss. Replicas other than replica 0 wait for the
    warm-start event before their first step. If the task is rerun after its worker died, it
    resumes after the last step it reported. It stops when its driver's lease expires.
    """
    leave_thread_pool()
    progress = Variable(spec.name(f"progress-{spec.replica}"))
    state = progress.get(timeout=CALL_TIMEOUT)
    attempt, done = state["attempt"] + 1, state["done"]
    progress.set({"done": done, "attempt": attempt})
    lease = LeaseWatch(spec.name("lease"))
    worker = get_worker().address
    try:
        if spec.replica or not spec.warmstart_steps:
            warm = Event(spec.name("warm"))
            waits.until(lambda: warm.wait(timeout=1.0), timeout=WARM_TIMEOUT, every=0.0,
                        give_up=lease.give_up, what=f"replica {spec.replica}: the warm start")
        return _train(model, spec, blocks, lease, attempt, done, progress, worker)
    except DriverGone:
        return {"replica": spec.replica, "steps": 0, "samples": 0, "worker": worker,
                "attempt": attempt, "pushes_lost": 0, "loss": float("nan"), "staleness_mean": 0.0,
                "orphaned": True}


def _train(model, spec: ReplicaSpec, blocks, lease: LeaseWatch, attempt: int, done: int,
           progress, worker: str) -> dict:
    """The replica's loop: steps, progress reports, the warm-start signal, stopping."""
    stop = Event(spec.name("stop"))
    store = open_store(spec.url, split=spec.split)
    if blocks is not None:
        stepper = _PartitionedStepper(blocks, spec, done, lease)
    else:
        stepper = _plain_stepper(model, spec, done, lease)
    tally = _Tally(spec, worker, done)
    batches = _batches(store, spec, done)
    # only a model-parallel replica reads a batch ahead: it sends the inputs to its blocks early
    paired = _with_next(batches) if blocks is not None else ((batch, None) for batch in batches)
    reporter = _Reporter(progress, stop, attempt)
    try:
        for (X, y), ahead in paired:
            if lease.expired():
                raise DriverGone(f"replica {spec.replica}: the driver's lease expired")
            loss = stepper.step(tally.step, X, y, ahead)
            if loss is None:
                continue
            report = tally.add(loss, len(X), stepper)
            if tally.step == spec.warmstart_steps:
                Event(spec.name("warm")).set()
            if report:
                reporter.report(tally.step)
                if reporter.stopping:
                    break
        stepper.finish()
        if spec.warmstart_steps:
            Event(spec.name("warm")).set()  # never leave the others waiting, however short the shard
    finally:
        reporter.close()
    reporter.report_now(tally.step)
    return tally.outcome(stepper, attempt)


class _Reporter:
    """The replica's progress (the step a rerun resumes after) sent to the scheduler, and the
    driver's stop signal read back, on a thread of their own: each is a round trip to the
    scheduler, a millisecond or more on a busy host, that the training steps need not wait for.

    ``report(done)`` hands over the latest count (a count not yet sent is replaced by a newer
    one); ``stopping`` turns true once the driver said stop; ``close`` waits for the thread (what
    it was sending lands, ``CALL_TIMEOUT`` at most), and ``report_now`` then sends the final count
    itself, so that it lands last. An error of the thread is raised by the next ``report`` (the
    final ``report_now`` meets its cause itself). ``progress`` None: the stop event only (an
    elastic replica, whose progress the ledger keeps).
    """

    def __init__(self, progress, stop, attempt: int):
        self.progress, self.stop, self.attempt = progress, stop, attempt
        self.due, self.closing, self.stopping, self.error = None, False, False, None
        self.wake = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="daskbelief-progress", daemon=True)
        self.thread.start()

    def report(self, done: int) -> None:
        if self.error is not None:
            raise self.error
        with self.wake:
            self.due = done
            self.wake.notify()

    def report_now(self, done: int) -> None:
        self.progress.set({"done": done, "attempt": self.attempt})

    def _run(self) -> None:
        while True:
            with self.wake:
                self.wake.wait_for(lambda: self.due is not None or self.closing)
                done, self.due = self.due, None
            if done is None:
                return
            try:
                if self.progress is not None:
                    self.report_now(done)
                self.stopping = self.stopping or self.stop.is_set()
            except Exception as e:  # noqa: BLE001 -- handed to the training thread
                self.error = e
                return

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout=CALL_TIMEOUT)


class _Tally:
    """A replica's counters (steps, samples, recent losses), its progress events every
    ``report_every`` steps, and its outcome."""

    def __init__(self, spec: ReplicaSpec, worker: str, step: int):
        self.spec, self.worker, self.first, self.step, self.samples = spec, worker, step, step, 0
        self.losses: deque = deque(maxlen=spec.report_every)
        self.tick = time.time()

    def add(self, loss: float, rows: int, stepper) -> bool:
        """Count one step (emitting the progress event when one is due); True when it was."""
        self.losses.append(float(loss))
        self.samples += rows
        self.step += 1
        if self.step % self.spec.report_every:
            return False
        now, spec = time.time(), self.spec
        events.emit(events.REPLICA, run=spec.run, replica=spec.replica, step=self.step,
                    batch_size=spec.batch_size, loss=float(np.mean(self.losses)), worker=self.worker,
                    samples_per_s=spec.report_every * spec.batch_size / max(now - self.tick, 1e-9),
                    staleness=float(np.mean(stepper.staleness[-20:])) if stepper.staleness else 0.0)
        self.tick = now
        return True

    def outcome(self, stepper, attempt: int, **more) -> dict:
        return {"replica": self.spec.replica, "steps": self.step - self.first, "samples": self.samples,
                "worker": self.worker, "attempt": attempt, "pushes_lost": stepper.pushes_lost,
                "bound_waits": stepper.bound_waits, "shards_shared": stepper.shards_shared,
                "loss": float(np.mean(self.losses)) if self.losses else float("nan"),
                "staleness_mean": float(np.mean(stepper.staleness)) if stepper.staleness else 0.0,
                **more}


def _plain_stepper(model, spec: ReplicaSpec, done: int, lease: LeaseWatch) -> _Stepper:
    return (_Stepper if spec.device is None else _DeviceStepper)(model, spec, done, lease)


def run_elastic_replica(model, spec: ReplicaSpec, units: list[tuple[int, int]]) -> dict:
    """An elastic Downpour replica (``replicas="auto"``): train on data units taken from the run's
    ledger (``elastic.Ledger``; ``units``: their row ranges) until none is left, the driver stops
    it, or its worker closes; its outcome is left in the ledger, whatever ends it.

    A closing worker (retired, scaled down) sets the ``leave`` flag through ``elastic.Retirement``:
    the replica pushes what it holds, hands back the batches of its unit it did not read, and
    returns, status "retired". The task is pinned to its worker, so it is not run again elsewhere.
    """
    leave_thread_pool()
    worker = get_worker().address
    ledger = elastic.Units(spec.run)
    with elastic.running_replica(worker, spec.name(f"replica-{spec.replica}")) as leave:
        try:
            outcome, piece, at = _train_elastic(model, spec, units, ledger, leave, worker)
        except DriverGone:
            outcome, piece, at = {"replica": spec.replica, "status": "orphaned", "worker": worker}, None, None
        ledger("leave", spec.replica, piece, at, outcome)
        return outcome


def _train_elastic(model, spec: ReplicaSpec, units, ledger, leave, worker: str) -> tuple:
    """The elastic replica's loop; returns its outcome, the piece it was reading and the batch
    of it where it stopped (for the ledger's ``leave``)."""
    stop, lease = Event(spec.name("stop")), LeaseWatch(spec.name("lease"))
    stepper = _plain_stepper(model, spec, 0, lease)
    tally = _Tally(spec, worker, 0)

    def quitting() -> bool:
        if lease.expired():
            raise DriverGone(f"replica {spec.replica}: the driver's lease expired")
        return leave.is_set()

    supply = _Supply(spec, units, ledger, tally, lambda: quitting() or stop.is_set())
    watch = _Reporter(None, stop, 0)  # the stop event, read off the training thread
    status, piece, at = None, None, None
    try:
        while status is None:
            piece, data = supply.next()
            if piece in ("done", "stop"):
                status, piece = piece, None
                continue
            supply.read_ahead()
            for at, (X, y) in enumerate(elastic.unit_batches(data, spec.batch_size, piece[2]),
                                        start=piece[2]):
                if quitting() or watch.stopping:
                    status = "stop"
                    break
                loss = stepper.step(tally.step, X, y)
                if loss is not None and tally.add(loss, len(X), stepper):
                    watch.report(tally.step)
            else:
                at += 1  # read to its end: said so by the next take, or by the leave
                supply.finished += 1
    finally:
        watch.close()
        supply.close()
    stepper.finish()
    status = "done" if status == "done" else "retired" if leave.is_set() else "stopped"
    return tally.outcome(stepper, 0, status=status), piece, at


class _Supply:
    """An elastic replica's data units: the next one is taken from the ledger and read in the
    background while the replica trains on the current one, hiding both (a scheduler round trip
    and a read) behind its steps."""

    def __init__(self, spec: ReplicaSpec, units, ledger, tally, stopping):
        self.spec, self.units, self.ledger, self.tally, self.stopping = spec, units, ledger, tally, stopping
        self.store = open_store(spec.url, split=spec.split)
        self.finished = 0   # pieces read to their end that the ledger has not been told of
        self.ahead = None   # the future of the next (piece, data), taken and read in the background
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="daskbelief-units")

    def _take(self, finished: int):
        piece = self.ledger("take", self.spec.replica,
                            {"steps": self.tally.step, "samples": self.tally.samples}, finished)
        if isinstance(piece, str):
            return piece, None
        epoch, unit, _ = piece
        return piece, elastic.read_unit(self.store, self.units[unit], self.spec.seed, epoch, unit)

    def _told(self) -> int:
        finished, self.finished = self.finished, 0
        return finished

    def read_ahead(self) -> None:
        self.ahead = self.pool.submit(self._take, self._told())

    def next(self):
        """The next piece and its data: the one read ahead, or one taken now; waits while the
        last units are held by others (who may hand some back). ("stop", None) once the
        replica must stop, ("done", None) when every unit was read."""
        if self.ahead is not None:
            piece, data = self._settle()
            if piece not in ("wait", "done"):
                return piece, data

        def now():
            if self.stopping():
                return "stop", None
            piece, data = self._take(self._told())
            return None if piece == "wait" else (piece, data)

        return waits.until(now, timeout=RECOVERY_TIMEOUT, every=0.2,
                           what=f"replica {self.spec.replica}: a data unit or the end of the run")

    def _settle(self):
        ahead, self.ahead = self.ahead, None
        return waits.result(ahead, timeout=CALL_TIMEOUT, what=f"replica {self.spec.replica}: a data unit")

    def close(self) -> None:
        """Let the read-ahead finish, so that the ledger knows every piece this replica holds."""
        if self.ahead is not None:
            self._settle()
        self.pool.shutdown()


def _connect(link: _Link, out):
    """Fetch the parameters, waiting through server recoveries (for ``RECOVERY_TIMEOUT`` in
    all)."""
    def fetched():
        try:
            return link.fetch(out)
        except ServerLost:
            link.recover()
            return None

    return waits.until(fetched, timeout=RECOVERY_TIMEOUT, every=0, give_up=link.lease.give_up,
                       what=f"{link.replica}: the parameter server's parameters")
