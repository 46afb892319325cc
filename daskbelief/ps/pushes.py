"""The pushes a parameter-server client keeps in flight: one schedule for every client.

A plain replica (``train.replica``'s link, waiting in its thread) and a model-parallel block
(``train.block_actor.BlockActor``, awaiting on its worker's event loop) push the same way, so
they share this window:

* up to ``limit`` pushes travel while the client computes on (``limit`` is ``max_in_flight``
  when it overlaps, 0 when it does not: each push is waited for at once);
* a gradient buffer is reused only after the shards acknowledged the push that carried it, so
  at most ``limit + 1`` model-sized buffers ever exist, made as they are first needed;
* each acknowledgement tells the push's staleness: the shard's updates between the version the
  gradient was computed on and the push's own;
* a recovered server (a lost shard recreated) makes whatever travelled to the old one lost:
  ``drop`` forgets it and gives its buffers back.

How a reply is awaited (in a thread or in a coroutine, with which deadline) is the client's;
what is awaited, and when, is the window's.
"""
from __future__ import annotations

from collections import deque

import numpy as np


class PushWindow:
    """The pushes in flight of one client, oldest first, and the buffers they hold."""

    def __init__(self, size: int, max_in_flight: int, overlap: bool, dtype=np.float32,
                 allocate=np.empty):
        self.size, self.dtype, self.allocate = size, dtype, allocate
        self.limit = max_in_flight if overlap else 0
        self.free: list[np.ndarray] = []
        self.made = 0
        self.flight: deque = deque()  # (replies, buffer, versions computed on)
        self.staleness: list[int] = []  # one entry per acknowledged push and shard

    def must_settle(self) -> bool:
        """True when every buffer travels: the oldest push must be settled before ``buffer``."""
        return not self.free and self.made > self.limit and bool(self.flight)

    def buffer(self) -> np.ndarray:
        """A buffer to accumulate the next push into (contents undefined); call ``must_settle``
        first."""
        if self.free:
            return self.free.pop()
        self.made += 1
        return self.allocate(self.size, self.dtype)

    def release(self, buf: np.ndarray) -> None:
        """Give back a buffer that will not be pushed (its gradient was lost with a shard)."""
        self.free.append(buf)

    def launch(self, replies, buf: np.ndarray, versions) -> None:
        """A push of ``buf`` sent: ``replies`` are what the client awaits to settle it,
        ``versions`` what its gradient was computed on (the client's form: ``oldest`` gives it
        back)."""
        self.flight.append((replies, buf, versions))

    def over(self, now: bool = False) -> bool:
        """True while more pushes travel than the schedule allows (``now``: any at all)."""
        return len(self.flight) > (0 if now else self.limit)

    def oldest(self) -> tuple:
        """``(replies, versions)`` of the oldest push in flight."""
        replies, _, versions = self.flight[0]
        return replies, versions

    def settled(self, versions) -> None:
        """The oldest push acknowledged: ``versions`` pairs each shard's new version with the
        one its gradient was computed on; its buffer is free again."""
        _, buf, _ = self.flight.popleft()
        self.staleness.extend(new - 1 - base for new, base in versions)
        self.free.append(buf)

    def drop(self) -> int:
        """Forget the pushes in flight to a server that was replaced; how many there were."""
        dropped = len(self.flight)
        self.free.extend(buf for _, buf, _ in self.flight)
        self.flight.clear()
        return dropped


def fetch_due(step: int, n_fetch: int) -> bool:
    """Whether a replica fetches before step ``step``: every ``n_fetch`` steps (the paper's
    n_fetch); step 0 computes on the parameters it fetched when it connected."""
    return step > 0 and step % n_fetch == 0


def push_due(accumulated: int, n_push: int) -> bool:
    """Whether a replica pushes after a step: once it holds ``n_push`` steps' gradients since its
    last push (the paper's n_push), counted afresh when a lost shard took what it held."""
    return accumulated >= n_push
