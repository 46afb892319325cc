"""``ShardedVectors``: the L-BFGS vector space of ``daskbelief.optim.vectors``, sliced over shards.

Every named vector (parameters, gradient, direction, the L-BFGS s/y history) exists as one slice
per ``ParameterShard``; each operation runs on every shard's slice, and only scalars come back,
so the coordinator running L-BFGS never holds a whole vector.

Round trips are the cost that matters (an actor call is about a millisecond), so:

* operations that return nothing (``zeros``, ``copy``, ``swap``, ``axpy``, ``scale``, ``mul``)
  are only *queued* on the coordinator;
* the next operation that returns something (``dots``/``dot``, or an evaluation step through
  ``execute``) is appended to the queue and the whole batch goes to the shards as ONE
  ``run_ops`` call per shard, issued to all shards before waiting on any.

A two-loop recursion with history m therefore costs about 2m + 2 round trips, whatever the number
of shards, and the vector updates of an L-BFGS step ride along with the next dot product. Dots
are float64 partial sums per shard, added here in shard order: they differ from a local dot only
in summation order (a relative 1e-16 effect).

A shard's worker can die. An actor call to it then fails, or stays pending forever (distributed
2026.8 waits for the actor's key, which can never run again), so the coordinator waits through
a ``Watch``: replies in short slices, checking between slices that the shards' workers are still
in the cluster, and raising ``ShardLost`` naming them when one is not. Sandblaster recovers from
that (``daskbelief.train.sandblaster``).
"""
from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np
from distributed import Actor

from daskbelief import waits
from daskbelief.train.recovery import lost_workers

WAIT_SLICE = 0.5  # seconds between liveness checks while a reply is awaited
PATIENCE = 300.0  # seconds without a reply from live workers before giving up
LEAVE_GRACE = 10.0  # seconds a failed call waits for the scheduler to see its worker gone


# Errors a lost worker never causes: bad data or a bug, reported without waiting for the scheduler
NOT_A_LOSS = (ValueError, TypeError, IndexError, ArithmeticError)


class ShardLost(RuntimeError):
    """Workers holding parameter shards (or Sandblaster's ledger) left the cluster."""

    def __init__(self, workers):
        self.workers = sorted(workers)
        super().__init__(f"lost the worker(s) holding parameter shards: {', '.join(self.workers)}")


class Watch:
    """Waits on replies from actors held by ``addresses`` without ever waiting on a dead one.

    ``client`` None: plain waits (a space built in tests, without a cluster to ask)."""

    def __init__(self, client, addresses):
        self.client, self.addresses = client, sorted(set(addresses))

    def give_up(self) -> ShardLost | None:
        """For ``daskbelief.waits``: ``ShardLost`` once a watched worker left the cluster."""
        if self.client is None:
            return None
        lost = lost_workers(self.client, self.addresses)
        return ShardLost(lost) if lost else None

    def check(self) -> None:
        """Raise ``ShardLost`` when a watched worker is no longer in the cluster."""
        lost = self.give_up()
        if lost is not None:
            raise lost

    def wait(self, reply, what: str, patience: float = PATIENCE):
        """``reply.result()`` (an actor's or a task's future), in slices with liveness checks;
        a failed call from a lost worker raises ``ShardLost``, other errors pass through."""
        if self.client is None:
            return reply.result()
        try:
            return waits.result(reply, timeout=patience, what=what, every=WAIT_SLICE,
                                give_up=self.give_up)
        except (OSError, RuntimeError) as e:  # "Unable to contact Actor's worker", "... was lost"
            lost = self.lost_soon()
            if lost is None:
                raise
            raise lost from e

    def lost_after(self, error: BaseException) -> ShardLost | None:
        """``ShardLost`` if a watched worker left, for a task that failed with ``error``: an
        error of the data or the code (``NOT_A_LOSS``: a damaged store's ``DataError`` is a
        ValueError) is answered at once, any other after ``lost_soon``'s grace."""
        return self.give_up() if isinstance(error, NOT_A_LOSS) else self.lost_soon()

    def lost_soon(self, grace: float = LEAVE_GRACE) -> ShardLost | None:
        """``ShardLost`` once the scheduler reports a watched worker gone, waiting up to
        ``grace`` seconds for it: a call to a worker that just died can fail (its connection
        reset) before the scheduler has noticed the death. None if all stay."""
        try:
            return waits.until(self.give_up, timeout=grace, every=0.1,
                               what="the scheduler to see a shard's worker leave")
        except waits.WaitTimeout:
            return None


class DirectActor(Actor):
    """An actor handle whose calls from the client go straight to the actor's worker.

    distributed 2026.8 sends a client's actor calls through the scheduler (which forwards them)
    unless the whole Client was made with ``direct_to_workers=True``: four network hops a call
    instead of two. The coordinator makes several calls an iteration, so its own handles to the
    shards and the ledger call the worker directly, as ``direct_to_workers`` would, without
    changing the user's client. (Pickled, it is a plain ``Actor`` again.)
    """

    @property
    def _worker_rpc(self):
        if self._worker is None and self._client is not None:
            return self._client.rpc(self._address)
        return super()._worker_rpc

    def __getattr__(self, key):
        """A method of the actor; once distributed has marked the actor lost with its worker
        (the lookup itself raises "Worker holding Actor was lost"), one whose call fails as a
        call to a dead worker does, so that waits on it turn that into ``ShardLost``."""
        try:
            return super().__getattr__(key)
        except RuntimeError as e:
            failed: Future = Future()
            failed.set_exception(OSError(str(e)))
            return lambda *args, **kwargs: failed


def direct(actor: Actor) -> DirectActor:
    """The client-side handle of ``actor`` that skips the scheduler (``DirectActor``)."""
    return DirectActor(actor._cls, actor._address, actor.key)


def in_thread(fn, *args, **kwargs) -> Future:
    """``fn(*args, **kwargs)`` in a thread of its own, for a blocking call that may never return
    (one that waits on a dead shard): the caller waits on the future through a ``Watch``."""
    future: Future = Future()

    def target():
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # handed to whoever waits
            future.set_exception(e)

    threading.Thread(target=target, daemon=True, name=f"daskbelief-{fn.__name__}").start()
    return future


def call_all(shards, method: str, *args, watch: Watch | None = None) -> list:
    """Call ``method`` on every shard, all issued before any reply is awaited; the replies."""
    return await_all([getattr(shard, method)(*args) for shard in shards], method, watch)


def await_all(pending, method: str, watch: Watch | None = None) -> list:
    """The replies of calls of ``method`` made on every shard (shard order), awaited."""
    if watch is None:
        return [p.result() for p in pending]
    return [watch.wait(p, f"{method} on shard {i}") for i, p in enumerate(pending)]


def assemble(slices, ranges, out=None) -> np.ndarray:
    """One float32 vector from per-shard slices (in shard order) covering ``ranges``."""
    out = np.empty(ranges[-1][1], dtype=np.float32) if out is None else out
    for (a, b), values in zip(ranges, slices):
        out[a:b] = values
    return out


class ShardedVectors:
    """Named vectors held sliced on ``ParameterShard`` actors; same interface as ``LocalVectors``.

    ``shards`` and ``ranges`` are a ``ParameterServer``'s: shard i holds elements
    ``ranges[i]`` of every vector. ``flushes`` counts the round trips made (one per shard each).
    ``watch``: how replies are awaited (default: plainly).
    """

    def __init__(self, shards, ranges, watch: Watch | None = None):
        self.shards, self.ranges = [direct(s) for s in shards], [tuple(r) for r in ranges]
        self.watch = watch or Watch(None, ())
        self.size = self.ranges[-1][1]
        self.flushes = 0
        self._queue: list[tuple] = []

    # -- queued: these return nothing --------------------------------------------------------------
    def zeros(self, name: str) -> None:
        self._queue.append(("zeros", name))

    def copy(self, src: str, dst: str) -> None:
        self._queue.append(("copy", src, dst))

    def swap(self, a: str, b: str) -> None:
        self._queue.append(("swap", a, b))

    def axpy(self, alpha: float, x: str, y: str) -> None:
        self._queue.append(("axpy", float(alpha), x, y))

    def scale(self, alpha: float, x: str) -> None:
        self._queue.append(("scale", float(alpha), x))

    def mul(self, a: str, b: str, out: str) -> None:
        self._queue.append(("mul", a, b, out))

    def combine(self, terms, out: str) -> None:
        self._queue.append(("combine", [(name, float(c)) for name, c in terms], out))

    # -- sent: the queue goes along --------------------------------------------------------------
    def execute(self, op: tuple | None = None) -> list:
        """Send the queued operations, then ``op``, to every shard in one call each; return each
        shard's result of ``op`` (shard order). With no ``op``, only the queue is sent (if any)."""
        results = await_all(self.issue(op), "run_ops", self.watch)
        return [r[-1] for r in results] if op is not None else []

    def issue(self, op: tuple | None = None) -> list:
        """``execute``'s calls, sent and not awaited: each shard's pending reply (a list of the
        operations' results; ``await_all`` awaits them), so that other work can start meanwhile."""
        ops = self._queue + ([op] if op is not None else [])
        self._queue = []
        if not ops:
            return []
        self.flushes += 1
        return [shard.run_ops(ops) for shard in self.shards]

    def dots(self, pairs) -> list[float]:
        """Several dot products in one round trip: per-shard float64 partial sums, added here."""
        partials = self.execute(("dots", [tuple(p) for p in pairs]))
        return [sum(column) for column in zip(*partials)]

    def dot(self, a: str, b: str) -> float:
        return self.dots([(a, b)])[0]

    def gather(self, name: str) -> np.ndarray:
        """The whole vector ``name`` on this machine: for the final result and for tests only."""
        self.execute()
        return assemble(call_all(self.shards, "read", name, watch=self.watch), self.ranges)
