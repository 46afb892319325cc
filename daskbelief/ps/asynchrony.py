"""What a parameter shard keeps for two answers to stale gradients (``optim.staleness``): the
parameters each replica fetched (delay compensation) and each replica's push clock (a
staleness bound).

Both are per-replica bookkeeping on the shard's actor thread, so they need no locks. The fetched
copies exist only with the rule's ``delay_compensation`` (a slice copy per fetch and replica).
The clocks are always kept, because the shard does not know whether a replica runs under
``staleness_bound``; they cost two dict updates and a scan over the replicas per push, and
their ``max_lead`` is a monitoring figure for free runs too.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

FETCHED_KEPT = 4  # fetched copies kept per replica: its pushes in flight may be based on any
STALL_SECONDS = 5.0  # a replica that has not pushed for this long holds no other back


class FetchedCopies:
    """The last ``FETCHED_KEPT`` parameter slices each replica fetched, by version.

    DC-ASGD corrects a gradient with ``w_now - w_fetched``, the parameters it was computed on
    (Zheng et al. keep one backup per worker, set when it pulls). A replica that overlaps its
    fetches and keeps pushes in flight bases a push on one of its last few fetches, so they are
    kept by the version the replica reports with the push. A fetch arrives as frames (offset 0
    first, in order on the actor thread): the copy is tagged with the version its first frame
    was served at, which is the base version the replica reports (the oldest of its frames).
    """

    def __init__(self, size: int):
        self.size = size
        self.copies: dict[str, OrderedDict] = {}
        self._current: dict[str, np.ndarray] = {}

    def record(self, replica: str, version: int, offset: int, values) -> None:
        """Keep ``values`` (host float32), served to ``replica`` at ``version`` from ``offset``."""
        ring = self.copies.setdefault(replica, OrderedDict())
        if offset == 0 or replica not in self._current:
            copy = ring.pop(version, None)
            ring[version] = copy if copy is not None else np.empty(self.size, dtype=np.float32)
            while len(ring) > FETCHED_KEPT:
                ring.popitem(last=False)
            self._current[replica] = ring[version]
        self._current[replica][offset:offset + len(values)] = values

    def get(self, replica: str, version: int):
        """The slice ``replica`` fetched at ``version``, or None when no longer kept."""
        return self.copies.get(replica, {}).get(version)


class Clocks:
    """Each replica's complete pushes, for a staleness bound (stale-synchronous parallel).

    A replica's clock starts at the slowest active clock when its first push arrives, so a
    replica that starts after the warm start, or joins later, is not behind by everything it
    missed. A replica that has not pushed for ``STALL_SECONDS`` (lost, or waiting on a recovery)
    holds nobody back, and when it pushes again it starts over at the slowest active clock; a
    replica that finished leaves (``leave``).
    """

    def __init__(self):
        self.clock: dict[str, int] = {}
        self.last: dict[str, float] = {}
        self.max_lead = 0  # the largest lead a push ever made (what a bound keeps small)

    def _slowest(self, now: float, besides: str | None = None) -> int | None:
        active = [c for r, c in self.clock.items()
                  if r != besides and now - self.last[r] <= STALL_SECONDS]
        return min(active, default=None)

    def tick(self, replica: str, now: float) -> None:
        if replica not in self.clock or now - self.last[replica] > STALL_SECONDS:
            slowest = self._slowest(now, besides=replica)
            self.clock[replica] = max(self.clock.get(replica, 0), slowest or 0)
        self.clock[replica] += 1
        self.last[replica] = now
        self.max_lead = max(self.max_lead, self.lead(replica, now))

    def leave(self, replica: str) -> None:
        self.clock.pop(replica, None)
        self.last.pop(replica, None)

    def lead(self, replica: str, now: float) -> int:
        """How many pushes ``replica`` is ahead of the slowest active replica (0 if it has none)."""
        if replica not in self.clock:
            return 0
        slowest = self._slowest(now, besides=replica)
        return 0 if slowest is None else max(self.clock[replica] - slowest, 0)
