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
"""
from __future__ import annotations

import numpy as np


def call_all(shards, method: str, *args) -> list:
    """Call ``method`` on every shard, all issued before any reply is awaited; the replies."""
    pending = [getattr(shard, method)(*args) for shard in shards]
    return [p.result() for p in pending]


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
    """

    def __init__(self, shards, ranges):
        self.shards, self.ranges = list(shards), [tuple(r) for r in ranges]
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
        ops = self._queue + ([op] if op is not None else [])
        self._queue = []
        if not ops:
            return []
        self.flushes += 1
        results = call_all(self.shards, "run_ops", ops)
        return [r[-1] for r in results] if op is not None else []

    def dots(self, pairs) -> list[float]:
        """Several dot products in one round trip: per-shard float64 partial sums, added here."""
        partials = self.execute(("dots", [tuple(p) for p in pairs]))
        return [sum(column) for column in zip(*partials)]

    def dot(self, a: str, b: str) -> float:
        return self.dots([(a, b)])[0]

    def gather(self, name: str) -> np.ndarray:
        """The whole vector ``name`` on this machine: for the final result and for tests only."""
        self.execute()
        return assemble(call_all(self.shards, "read", name), self.ranges)
