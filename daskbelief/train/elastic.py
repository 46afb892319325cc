"""Elastic Downpour (``replicas="auto"``): replicas come and go with the cluster's worker threads.

* ``Ledger``: the run's shared queue of data units (``unit_chunks`` contiguous store chunks each),
  every epoch in a seeded order. A replica takes a unit, reads it (its rows in a seeded order, in
  minibatches), and takes the next; a replica leaving (retired, stopped) hands back the batches of
  its unit it did not read, a replica lost (its worker killed) has its whole unit put back. The
  ledger records which batches of which unit each replica read, so no unit is skipped or read
  twice per epoch however the replicas' number changes (a lost replica's part-read unit is read
  again: what it pushed of it counts twice). It lives on the scheduler, the one process every
  replica reaches and no scaling removes; ``ledger_call`` runs its methods there, one at a time on
  the scheduler's event loop, which makes every take and hand-back atomic.
* ``Retirement``: a worker plugin whose teardown, run early in ``Worker.close`` (before the worker's
  client and connections close), tells the replicas of the closing worker to push what they hold,
  hand back the rest of their unit and stop, and waits for them (``RETIRE_DEADLINE``). This is how
  a worker retired gracefully (``client.retire_workers``, ``cluster.scale`` down, ``adapt``) lets
  its replicas go: an outcome "retired", not a failure.
* ``ElasticDriver``: the ``Driver`` that starts a replica on every free worker thread (up to
  ``max_replicas``; ``ps.policy.threads_to_fill``), collects the outcomes replicas leave in the
  ledger, and declares lost the replicas whose worker left without one.
"""
from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from contextlib import contextmanager

import numpy as np
from distributed import get_client
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin
from distributed.scheduler import KilledWorker

from daskbelief import waits
from daskbelief.checks import check_integer
from daskbelief.monitor import events
from daskbelief.ps.policy import threads_to_fill
from daskbelief.train.driver import CALL_TIMEOUT, Driver, recovery_timeout
from daskbelief.train.errors import RunLost
from daskbelief.train.run import Every
from daskbelief.workarounds import worker_info

RETIRE_DEADLINE = 30.0  # seconds a retiring worker waits for its replicas to push and hand back
ELASTIC_EVERY = 0.25    # seconds between the driver's looks at the workers and the ledger
PLUGIN = "daskbelief-elastic"


def validate(*, max_replicas, unit_chunks, steps, warmstart_steps, partition, resume_from) -> None:
    """Reject what elastic mode cannot do, one clear line each, before anything starts."""
    if max_replicas is not None:
        check_integer("max_replicas", max_replicas, 1)
    check_integer("unit_chunks", unit_chunks, 1)
    if steps is not None:
        raise ValueError("replicas='auto' cannot be combined with steps=: elastic replicas share a "
                         "queue of data units, give epochs= (passes over the whole store) instead")
    for name, given in [("warmstart_steps", warmstart_steps), ("partition", partition is not None),
                        ("resume_from", resume_from is not None)]:
        if given:
            raise ValueError(f"replicas='auto' cannot be combined with {name}=")


def unit_ranges(store, unit_chunks: int) -> list[tuple[int, int]]:
    """The row range of every data unit: ``unit_chunks`` contiguous chunks (the last may be fewer)."""
    step = unit_chunks * store.chunk_rows
    return [(a, min(a + step, store.n)) for a in range(0, store.n, step)]


def read_unit(store, rows: tuple[int, int], seed: int, epoch: int, unit: int):
    """One unit's rows, read at once, and the order they are trained in: a pure function of
    (seed, epoch, unit), so a unit handed back is resumed where it stopped."""
    X, y = store.read(*rows)
    return X, y, np.random.default_rng([seed, epoch, unit]).permutation(len(X))


def unit_batches(data, batch_size: int, first: int):
    """The minibatches of a unit read by ``read_unit``, from batch ``first`` on."""
    X, y, order = data
    for a in range(first * batch_size, len(X), batch_size):
        take = order[a:a + batch_size]
        yield X[take], y[take]


class Ledger:
    """The queue of data units of one run and the record of who read what; see the module docstring.

    A *piece* is ``(epoch, unit, first_batch)``: a unit from one of its batches to its end. A
    replica holds the pieces it took, oldest first: the one it reads, perhaps one it finished
    and has not yet said so, and the next one it reads ahead.
    """

    def __init__(self, batches: list[int], epochs: int, seed: int):
        self.batches, self.epochs, self.seed = batches, epochs, seed
        self.epoch = -1
        self.pending: deque = deque()
        self.held: dict[int, list] = {}      # replica -> the pieces it took, oldest first
        self.read: dict[int, list] = {}      # replica -> [(epoch, unit, first, stop)]
        self.progress: dict[int, dict] = {}  # replica -> its last reported counters
        self.ended: dict[int, dict] = {}     # replica -> its outcome

    def _refill(self) -> None:
        if not self.pending and self.epoch + 1 < self.epochs:
            self.epoch += 1
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.batches))
            self.pending.extend((self.epoch, int(u), 0) for u in order)

    def take(self, replica: int, progress: dict, finished: int = 0):
        """Replica ``replica`` read its ``finished`` oldest pieces to their end: record them, and
        give it the next piece, or "wait" (nothing queued, but pieces held may come back), or
        "done"."""
        self.progress[replica] = progress
        if replica in self.ended:  # declared gone by the driver: it gets nothing more
            return "done"
        held = self.held.setdefault(replica, [])
        for epoch, unit, first in held[:finished]:
            self._record(replica, epoch, unit, first, self.batches[unit])
        del held[:finished]
        self._refill()
        if self.pending:
            held.append(self.pending.popleft())
            return held[-1]
        return "wait" if any(self.held.values()) else "done"

    def leave(self, replica: int, piece, at: int, outcome: dict) -> None:
        """Replica ``replica`` ends with ``outcome``, having read the pieces it holds before
        ``piece`` to their end and ``piece`` up to batch ``at`` (None: it read none of them):
        the rest of ``piece`` and the pieces after it go back to the front of the queue."""
        held = self.held.pop(replica, [])
        current = held.index(piece) if piece in held else 0
        for epoch, unit, first in held[:current]:
            self._record(replica, epoch, unit, first, self.batches[unit])
        back = held[current:]
        if piece in held:
            epoch, unit, first = back[0]
            if at > first:
                self._record(replica, epoch, unit, first, at)
            back[0] = (epoch, unit, at)
        self.pending.extendleft(p for p in reversed(back) if p[2] < self.batches[p[1]])
        # a replica the driver declared gone meanwhile keeps the outcome the driver reported
        self.ended.setdefault(replica, {**outcome, "units": self.read.get(replica, [])})

    def lose(self, replica: int, worker: str, status: str = "lost") -> dict:
        """Replica ``replica`` left with its worker without a word (``status``: "lost" when the
        worker died, "retired" when it held no unit anyway): its pieces go back to the queue
        whole, and it is given nothing more."""
        if replica in self.ended:
            return self.ended[replica]
        self.pending.extendleft(reversed(self.held.pop(replica, [])))
        self.ended[replica] = {"replica": replica, "status": status, "worker": worker,
                               "attempt": int(status == "lost"), "pushes_lost": 0, "loss": float("nan"),
                               "staleness_mean": 0.0, "steps": 0, "samples": 0,
                               **self.progress.get(replica, {}),
                               "units": self.read.get(replica, [])}
        return self.ended[replica]

    def _record(self, replica: int, epoch: int, unit: int, first: int, stop: int) -> None:
        self.read.setdefault(replica, []).append((epoch, unit, first, stop))

    def finished(self) -> bool:
        """Every unit of every epoch read."""
        return not self.pending and not any(self.held.values()) and self.epoch + 1 >= self.epochs

    def state(self, replicas: list[int]) -> dict:
        """What the driver needs to know of ``replicas`` (the outcomes of those that ended, which
        hold pieces) and whether the run is over."""
        return {"ended": {r: self.ended[r] for r in replicas if r in self.ended},
                "finished": self.finished(), "held": [r for r, h in self.held.items() if h]}


_LEDGERS: dict[str, Ledger] = {}  # on the scheduler: run -> its ledger


def ledger_call(run: str, method: str, *args, dask_scheduler=None):
    """Run ``Ledger.method(*args)`` of ``run``'s ledger on the scheduler (``run_on_scheduler``);
    ``method="create"`` makes the ledger, ``"drop"`` deletes it."""
    if method == "create":
        _LEDGERS[run] = Ledger(*args)
        return None
    if method == "drop":
        _LEDGERS.pop(run, None)
        return None
    return getattr(_LEDGERS[run], method)(*args)


class Units:
    """A replica's (or the driver's) side of the ledger: each call one scheduler round trip."""

    def __init__(self, run: str, client=None):
        self.run, self.client = run, client

    def __call__(self, method: str, *args):
        client = self.client or get_client()
        return client.run_on_scheduler(ledger_call, self.run, method, *args)


# -- retirement: in each worker process ----------------------------------------------------------

_RUNNING: dict[str, dict[str, threading.Event]] = {}  # worker -> replica -> its "leave" flag
_CLOSING: set[str] = set()                            # workers whose teardown has begun
_LOCK = threading.Lock()


@contextmanager
def running_replica(worker: str, key: str):
    """Register a replica thread with its worker while it runs; yields the Event set when the
    worker is closing (already set if it is: the replica then pushes, hands back, returns)."""
    leave = threading.Event()
    with _LOCK:
        _RUNNING.setdefault(worker, {})[key] = leave
        if worker in _CLOSING:
            leave.set()
    try:
        yield leave
    finally:
        with _LOCK:
            _RUNNING[worker].pop(key, None)


def _replicas_on(worker: str) -> list[threading.Event]:
    with _LOCK:
        return list(_RUNNING.get(worker, {}).values())


class Retirement(WorkerPlugin):
    """Lets a closing worker's replicas leave cleanly (see the module docstring)."""

    name = PLUGIN

    async def teardown(self, worker) -> None:
        # also called when the plugin is registered again: only a closing worker lets go
        if worker.status not in (Status.closing, Status.closing_gracefully):
            return
        with _LOCK:
            _CLOSING.add(worker.address)
        for leave in _replicas_on(worker.address):
            leave.set()
        try:
            await waits.result_async(_until_gone(worker.address), timeout=RETIRE_DEADLINE,
                                     what=f"the replicas of {worker.address} to push and hand back")
        except waits.WaitTimeout:
            pass  # the worker closes anyway; the driver finds those replicas lost


async def _until_gone(worker: str) -> None:
    while _replicas_on(worker):
        await asyncio.sleep(0.02)


# -- the driver ----------------------------------------------------------------------------------

class ElasticDriver(Driver):
    """A ``Driver`` whose replicas follow the cluster's threads; see the module docstring.

    ``start(replica, worker)`` submits replica ``replica`` pinned to ``worker``; ``ledger`` holds
    ``(batches per unit, epochs, seed)``.
    """

    def __init__(self, client, run, ps, model, test_store, coordination, *, start, ledger,
                 max_replicas=None, **kwargs):
        super().__init__(client, run, ps, [], model, test_store, coordination, **kwargs)
        self.start_replica, self.max_replicas = start, max_replicas
        self.units = Units(run, client)
        self.units("create", *ledger)
        client.register_plugin(Retirement(), name=PLUGIN)
        self.live: dict[int, tuple] = {}   # replica -> (future, worker)
        self.outcomes: list[dict] = []
        self.joined = self.max_live = 0
        self.over = False
        self._gone: dict[int, float] = {}  # replica -> when its worker was first seen gone
        self._idle_since = time.time()
        self.duties["elastic"] = Every(ELASTIC_EVERY, now=True)

    def _finished(self) -> bool:
        return self.over

    def _outcomes(self) -> list[dict]:
        return sorted(self.outcomes, key=lambda o: o["replica"])

    def _failed(self) -> bool:
        """Collect the replicas that ended, then start replicas on free threads."""
        if not self.duties["elastic"].due():
            return False
        state = self.units("state", list(self.live))
        workers = worker_info(self.client)
        self._collect(state, workers)
        ending = state["finished"] or self._timed_out()
        self.over = ending and not self.live
        if not ending:
            self._grow(workers)
        self.futures = [f for f, _ in self.live.values()]
        return False

    def _timed_out(self) -> bool:
        """``max_seconds`` passed: the replicas are told to stop (``Driver._tick``), none starts."""
        return self.max_seconds is not None and time.time() - self.started > self.max_seconds

    def _collect(self, state: dict, workers: dict) -> None:
        for r, (future, worker) in list(self.live.items()):
            if future.status == "error" and not isinstance(future.exception(timeout=CALL_TIMEOUT),
                                                           KilledWorker):
                raise future.exception(timeout=CALL_TIMEOUT)
            outcome = state["ended"].get(r)
            gone = None if outcome is not None else self._gone_as(r, worker, workers, future,
                                                                   r in state["held"])
            if gone is not None:
                outcome = self.units("lose", r, worker, gone)
            if outcome is None:
                continue
            if outcome["status"] in ("retired", "lost"):
                events.emit(events.RUN, run=self.run, kind=f"replica-{outcome['status']}", replica=r,
                            worker=worker, steps=outcome["steps"])
            self.outcomes.append(outcome)
            self.client.cancel([future])  # a retired replica's task waits, pinned, for its worker
            del self.live[r]
            self._gone.pop(r, None)

    def _gone_as(self, r: int, worker: str, workers: dict, future, holding: bool) -> str | None:
        """How replica ``r`` left without an outcome, once that is sure: "lost" when Dask gave up
        on it, its worker died, or a retired worker gave it ``RETIRE_DEADLINE`` seconds and it
        did not hand back its unit; "retired" when its worker was retired while it held no unit
        (or before it started). None while it may still leave an outcome."""
        if future.status == "error":
            return "lost"
        if worker in workers:
            return None
        since = self._gone.setdefault(r, time.time())
        if not removal_expected(self.client, worker):
            return "lost"
        if not holding:
            return "retired"
        return "lost" if time.time() - since > RETIRE_DEADLINE + 5 else None

    def _grow(self, workers: dict) -> None:
        """A replica on every free thread of a running worker, up to ``max_replicas``."""
        running = {w: info["nthreads"] for w, info in workers.items() if info.get("status") == "running"}
        busy = [w for _, w in self.live.values()]
        for worker in threads_to_fill(running, busy, self.ps.addresses(), self.max_replicas):
            r, self.joined = self.joined, self.joined + 1
            self.live[r] = (self.start_replica(r, worker), worker)
            events.emit(events.RUN, run=self.run, kind="replica-joined", replica=r, worker=worker)
        self.max_live = max(self.max_live, len(self.live))
        if self.live:
            self._idle_since = time.time()
        elif time.time() - self._idle_since > recovery_timeout():
            raise RunLost("every worker thread (no replica could be started)", self.last_checkpoint())

    def counts(self) -> dict:
        """The summary's figures of the replicas' comings and goings."""
        status = [o["status"] for o in self.outcomes]
        return {"replicas_joined": self.joined, "replicas_retired": status.count("retired"),
                "replicas_lost": status.count("lost"), "replicas_max_live": self.max_live}

    def close(self, grace: float = 5.0) -> None:
        try:
            super().close(grace)
        finally:
            if self.client.status == "running":
                self.units("drop")


def removal_expected(client, worker: str) -> bool:
    """False when the scheduler logged ``worker``'s removal as unexpected (it died); True when
    it was expected (a retirement) or is not logged (yet)."""
    removals = [m for _, m in client.get_events(worker) if m.get("action") == "remove-worker"]
    return not removals or bool(removals[-1].get("expected"))


def batches_per_unit(units: list[tuple[int, int]], batch_size: int) -> list[int]:
    return [math.ceil((b - a) / batch_size) for a, b in units]
