"""A block as a Dask actor (``BlockActor``): neighbours' handles to send to, the parameter
server's handle to fetch and push its own ranges (Downpour) or to read the evaluated vector and
add gradient sums (Sandblaster).

Inside an actor the step is an ``async`` method on the worker's event loop, so a block keeps
receiving while it computes: the arithmetic runs on the worker's actor thread (all actors of one
worker share that thread, so two blocks placed on one worker take turns).
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
from distributed import get_worker

from daskbelief import waits
from daskbelief.ps.policy import overlaps
from daskbelief.ps.pushes import PushWindow
from daskbelief.ps.server import RECOVERY_TIMEOUT, WAIT_SLICE, ServerLost
from daskbelief.ps.shard import EARLY, early
from daskbelief.train.block import Block
from daskbelief.train.partition import Plan


class BlockActor(Block):
    """A block as a Dask actor: neighbours' handles to send to, the parameter server's handle to
    fetch and push its own ranges, an accumulator for the gradient between pushes."""

    def __init__(self, plan: Plan, index: int, values, ps=None, replica: str = "",
                 overlap: bool = False, max_in_flight: int = 1):
        super().__init__(plan, index, values)
        self.ps, self.replica, self.overlap = ps, replica, overlap
        self.versions = [{} for _ in self.ranges]
        self._window = PushWindow(self.size, max_in_flight, overlap, self.params.dtype)  # ps.pushes
        self.generation = 0  # bumped by ``set_server`` when the driver recovers a shard
        self._evaluation, self._sums, self._pending, self._applied = None, None, [], []
        self._acc = None
        self.counters = {"messages": 0, "bytes_sent": 0, "compute_seconds": 0.0}

    def connect(self, peers) -> None:
        """Neighbour handles (indexed by block), and the thread to compute on."""
        self.peers = list(peers)
        self._executor = get_worker().executors["actor"]

    def _send(self, dst, key, array):
        self.counters["messages"] += 1
        self.counters["bytes_sent"] += array.nbytes
        self._sending.append(self.peers[dst].deliver(key, array))

    async def _compute(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._timed, fn, args)

    def _timed(self, fn, args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.counters["compute_seconds"] += time.perf_counter() - start

    def stats(self, reset: bool = False) -> dict:
        """Traffic and busy time since the last reset: messages and bytes this block sent to its
        neighbours, seconds its arithmetic ran."""
        out = dict(self.counters)
        if reset:
            self.counters = dict.fromkeys(out, 0)
        return out

    async def deliver(self, key, array) -> None:
        self._deliver(key, array)

    async def abort(self) -> None:
        """Fail whatever this block waits for (a neighbour failed): its step raises instead of
        waiting forever."""
        for fut in self._inbox.values():
            if not fut.done():
                fut.set_exception(RuntimeError(f"block {self.index}: a neighbouring block failed"))
        self._inbox.clear()

    async def step(self, tag, x, y, n: int, reduction: str = "mean", regularize: bool = True) -> float:
        """One forward/backward pass (gradient kept in the block)."""
        return await self.run_step(tag, x, y, n, reduction, regularize)

    async def predict(self, tag, x, n: int):
        """The forward pass alone (``Block.run_forward``): the outputs on the head block."""
        return await self.run_forward(tag, x, n)

    @property
    def staleness(self) -> list[int]:
        return self._window.staleness

    def get_grad(self):
        return self.grad

    def get_params(self):
        return self.params

    # -- Downpour: this block's ranges only -----------------------------------------------
    def _issue_fetch(self) -> tuple[int, list]:
        """Ask the shards for every piece of this block's ranges at once (``fetch_range``'s
        protocol, issued for all ranges before waiting on any); with the generation of the
        server asked, which a ``set_server`` arriving before the replies are awaited replaces."""
        calls, offset = [], 0
        for r, (a, b) in enumerate(self.ranges):
            for i, lo, hi in overlaps(self.ps.ranges, a, b):
                start = self.ps.ranges[i][0]
                calls.append((r, i, offset + lo - a, hi - lo,
                              self.ps.shards[i].fetch(lo - start, hi - lo)))
            offset += b - a
        return self.generation, calls

    async def _replies(self, futures, generation: int) -> list:
        """The shards' replies, awaited in slices: a shard whose worker died may never answer, so
        once this block was handed a recovered server (``set_server``) the wait ends with
        ``ServerLost``, as does a call that failed outright; the replica then retries the step
        against the recovered server. ``generation``: that of the server the calls went to (a
        fetch issued before the pass may be awaited after a ``set_server``)."""

        def replaced():
            if self.generation != generation:
                return ServerLost(f"block {self.index}: a shard did not answer and was replaced")
            return None

        try:
            return await waits.result_async(asyncio.gather(*futures), timeout=RECOVERY_TIMEOUT,
                                            every=WAIT_SLICE, give_up=replaced,
                                            what=f"block {self.index}: the parameter shards' replies")
        except (ServerLost, waits.WaitTimeout):
            raise
        except Exception as e:  # noqa: BLE001 -- the call failed: the shard's worker is gone
            raise ServerLost(f"block {self.index}: {type(e).__name__}: {e}") from e

    async def set_server(self, ps) -> int:
        """Use a recovered parameter server from now on; returns the pushes in flight to the old
        one, which are dropped (their buffers reused), as is the gradient being accumulated."""
        self.ps, self.generation = ps, self.generation + 1
        dropped = self._window.drop()
        if self._acc is not None:
            self._window.release(self._acc)
            self._acc = None
        self.versions = [{} for _ in self.ranges]
        return dropped

    async def _finish_fetch(self, issued) -> None:
        generation, calls = issued
        replies = await self._replies([c[-1] for c in calls], generation)
        for (r, shard, at, length, _), (values, version) in zip(calls, replies):
            self.params[at:at + length] = values
            self.versions[r][shard] = version

    async def fetch(self) -> None:
        await self._finish_fetch(self._issue_fetch())

    async def train_step(self, tag, x, y, n: int, fetch: bool, push: bool,
                         steps_done: int | None = None) -> tuple[float, list[int]]:
        """Downpour's step on this block: fetch (before, or overlapped with, the pass), forward and
        backward, accumulate, push every ``n_push`` steps. Returns the loss share and the
        staleness of the pushes acknowledged meanwhile."""
        pending = self._issue_fetch() if fetch else None
        if pending is not None and not self.overlap:
            await self._finish_fetch(pending)
            pending = None
        loss = await self.run_step(tag, x, y, n)
        if pending is not None:
            await self._finish_fetch(pending)
        if self._acc is None:
            self._acc = await self._buffer()
        await self._compute(np.add, self._acc, self.grad, self._acc)
        seen = len(self.staleness)
        if push:
            await self._push(steps_done)
        return loss, self.staleness[seen:]

    async def _buffer(self):
        if self._window.must_settle():
            await self._settle_oldest()
        buf = self._window.buffer()
        buf.fill(0)
        return buf

    async def _push(self, steps_done: int | None) -> None:
        acc, self._acc = self._acc, None
        offset, replies = 0, []
        for (a, b), versions in zip(self.ranges, self.versions):
            futures = self.ps.push_range_async(a, acc[offset:offset + b - a], versions, self.replica,
                                               steps_done)
            replies.append((a, b, dict(versions), futures))
            offset += b - a
        self._window.launch(replies, acc, None)
        while self._window.over():
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        """Wait for the oldest push's replies and settle it; unless the driver handed over a
        recovered server meanwhile (``set_server`` runs between these awaits), which dropped it
        with the rest of the window."""
        generation = self.generation
        replies, _ = self._window.oldest()
        pairs = []
        for a, b, versions, futures in replies:
            new = await self._replies(futures, generation)
            pairs += [(version, versions.get(shard, 0))
                      for (shard, _, _), version in zip(overlaps(self.ps.ranges, a, b), new)]
        if self.generation == generation:
            self._window.settled(pairs)

    # -- Sandblaster: this block's ranges of the evaluated vector and of the gradient sums ------
    def _pieces(self):
        """``(local offset, shard, offset in the shard, length)`` of every piece of this block's
        ranges, in order."""
        out, at = [], 0
        for a, b in self.ranges:
            for i, lo, hi in overlaps(self.ps.ranges, a, b):
                out.append((at + lo - a, i, lo - self.ps.ranges[i][0], hi - lo))
            at += b - a
        return out

    async def load_evaluated(self, tag) -> bool:
        """Take this block's ranges of the vector Sandblaster evaluates under ``tag`` into its
        parameters (once per tag) and start its gradient sums for it; False when ``tag`` is not
        the shards' open evaluation (the portion is a leftover of an abandoned one); ``EARLY``
        when a shard had not opened it yet (the portion asks again)."""
        if self._evaluation == tag:
            return True
        pieces = self._pieces()
        replies = await self._replies([self.ps.shards[i].read_evaluated(tag, off, n)
                                       for _, i, off, n in pieces], self.generation)
        if early(replies):
            return EARLY
        if any(r is None for r in replies):
            return False
        for (at, _, _, n), values in zip(pieces, replies):
            self.params[at:at + n] = values
        if self._sums is None:
            self._sums = np.zeros(self.size, dtype=np.float64)
        self._sums.fill(0.0)
        self._evaluation, self._pending, self._applied = tag, [], []
        return True

    async def add_portion(self, tag, portion: int, push_every: int) -> None:
        """Add the gradient of the portion just computed (it won its claim) into this block's
        float64 sums; every ``push_every`` portions, add those into the shards' accumulators."""
        if tag != self._evaluation:
            return
        await self._compute(np.add, self._sums, self.grad, self._sums)
        self._pending.append(portion)
        if len(self._pending) >= push_every:
            await self._push_sums(tag)

    async def _push_sums(self, tag) -> None:
        accepted = await self._replies([self.ps.shards[i].accumulate(tag, self._sums[at:at + n], off)
                                        for at, i, off, n in self._pieces()], self.generation)
        if all(accepted):
            self._applied.extend(self._pending)
        self._sums.fill(0.0)
        self._pending = []

    async def flush_evaluation(self, tag) -> list[int]:
        """Push what is still summed for ``tag``; the portions this block has applied."""
        if tag != self._evaluation:
            return []
        if self._pending:
            await self._push_sums(tag)
        return list(self._applied)

    async def flush(self, steps_done: int | None = None) -> list[int]:
        """Push what is accumulated and wait for every push in flight."""
        seen = len(self.staleness)
        if self._acc is not None:
            await self._push(steps_done)
        while self._window.over(now=True):
            await self._settle_oldest()
        return self.staleness[seen:]
