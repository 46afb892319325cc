"""Partitioned model replicas: one Dask actor per block of a ``partition.Plan``.

Each block holds its parameter ranges (one local vector: the ranges concatenated) and computes its
pieces of the network. A minibatch step is data-driven: the replica hands every block the step at
once (the input blocks their slice of X, the head block the labels) and each block runs forward
and backward on its own, awaiting the activations, partial sums and deltas its neighbours send it
*directly*, actor to actor, one message per transfer of the plan. Blocks that do not wait on each
other (the horizontal pieces of a layer) therefore compute at the same time.

Inside an actor the step is an ``async`` method on the worker's event loop, so a block keeps
receiving while it computes: the arithmetic runs on the worker's actor thread (all actors of one
worker share that thread, so two blocks placed on one worker take turns). Activations are kept
batch-last, ``(*box, n)`` as the locally connected layers store them, so a band of rows is one
contiguous buffer that travels without a copy; the one copy per message is where a receiver
assembles its input halo or adds up deltas.

The same ``Block`` code also runs in one process (``loss_and_grad``) with its messages handed over
in memory: the float64 oracle for the protocol, without Dask.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import deque

import numpy as np
from distributed import get_client, get_worker

from daskbelief import waits
from daskbelief.backend import namespace
from daskbelief.workarounds import start_actors, worker_info
from daskbelief.monitor import events
from daskbelief.nn.activations import get_activation
from daskbelief.nn.layers import Dense, Scratch, layer_from_dict
from daskbelief.nn.losses import get_loss
from daskbelief.ps.policy import overlaps, place_shards
from daskbelief.ps.server import CALL_TIMEOUT, RECOVERY_TIMEOUT, WAIT_SLICE, ServerLost
from daskbelief.train.partition import Plan, box_shape, box_size, intersect, relative


def _views(vector, slots) -> dict:
    return {name: vector[a:a + int(np.prod(shape))].reshape(shape) for name, a, shape in slots}


class _LocallyConnectedOp:
    """A locally connected piece: the layer rebuilt on the piece's input halo, so its output is
    exactly the piece's block of positions, and its weights are the piece's ranges in order."""

    def __init__(self, piece, layer, offset: int):
        self.piece = piece
        self.layer = layer_from_dict(layer.to_dict())
        self.layer.build(box_shape(piece.in_box))
        shapes = self.layer.param_shapes()
        self.slots = [("W", offset, shapes["W"]), ("b", offset + piece.w_size, shapes["b"])]
        self.scratch = Scratch()

    def forward(self, p, x):
        out, cache = self.layer.forward(p, np.moveaxis(x, -1, 0), scratch=self.scratch)
        return np.moveaxis(out, 0, -1), cache

    def dout(self, xp, dtype, n):
        return self.scratch.empty("dout", (*box_shape(self.piece.out_box), n), dtype, xp)

    def backward(self, p, g, cache, dout, input_grad: bool):
        dx = self.layer.backward(p, cache, np.moveaxis(dout, -1, 0), g, input_grad,
                                 scratch=self.scratch)
        return None if dx is None else np.moveaxis(dx, 0, -1)


class _DenseOp:
    """A dense piece cut by input rows: ``W[rows]`` times the block's own inputs gives a partial
    pre-activation of every unit; the partials of the piece's own units, summed over the blocks,
    plus its bias slice, make its activations. Backward is the transpose: the deltas of every
    unit (the piece's own and the ones other blocks send) give ``W[rows]``'s gradient and the
    deltas of the block's inputs."""

    def __init__(self, piece, layer, offset: int):
        self.piece = piece
        self.units = layer.units
        self.n_in = box_size(piece.in_box)
        self.own = None if piece.out_box is None else slice(*piece.out_box[0])
        self.slots = [("W", offset, (self.n_in, self.units))]
        if self.own is not None:
            self.slots.append(("b", offset + piece.w_size, (self.own.stop - self.own.start,)))
        self.act = get_activation(layer.activation)
        self.scratch = Scratch()

    def partial(self, p, x):
        W = p["W"]
        xp = namespace(W)
        n = x.shape[-1]
        out = self.scratch.empty("partial", (self.units, n), W.dtype, xp)
        return xp.matmul(W.T, x.reshape(self.n_in, n), out=out)

    def activate(self, p, partial, received):
        xp = namespace(partial)
        z = partial[self.own]
        for r in received:
            z += r
        z += p["b"][:, None]
        return self.act.forward(xp, z)

    def delta_buffer(self, xp, dtype, n):
        """All units' deltas, ``(units, n)``; this piece's own rows are where its dout gathers."""
        return self.scratch.empty("delta", (self.units, n), dtype, xp)

    def dout(self, xp, dtype, n):
        return self.delta_buffer(xp, dtype, n)[self.own]

    def local_delta(self, g, y, dout):
        dz = self.act.backward(namespace(y), y, dout)
        dz.sum(axis=1, out=g["b"])
        return dz

    def backward(self, p, g, x, delta, input_grad: bool):
        W = p["W"]
        xp = namespace(W)
        n = x.shape[-1]
        xp.matmul(x.reshape(self.n_in, n), delta.T, out=g["W"])
        if not input_grad:
            return None
        dx = xp.matmul(W, delta, out=self.scratch.empty("dx", (self.n_in, n), W.dtype, xp))
        return dx.reshape(*box_shape(self.piece.in_box), n)


def _rows(box):
    return slice(*box[0])


class Block:
    """One block's pieces, parameters and gradient, and the step protocol over messages.

    Subclasses say how messages travel and where arithmetic runs (``_send``, ``_compute``);
    messages arrive through ``_deliver`` and are awaited with ``_recv``. A message key is
    ``(tag, kind, layer, sender)``: a step's tag keeps steps apart, and anything a block waits for
    is named exactly, so arrival order does not matter.
    """

    def __init__(self, plan: Plan, index: int, values):
        self.plan, self.index = plan, index
        self.model = plan.model
        self.ranges = plan.block_ranges(index)
        self.size = sum(b - a for a, b in self.ranges)
        if len(values) != self.size:
            raise ValueError(f"block {index} owns {self.size} parameters, got {len(values)} values")
        self.params = np.array(values, copy=True)
        self.grad = np.zeros_like(self.params)
        self.ops, offset = [], 0
        for piece in plan.block_pieces(index):
            layer = self.model.layers[piece.layer]
            cls = _DenseOp if isinstance(layer, Dense) else _LocallyConnectedOp
            op = cls(piece, layer, offset)
            op.p, op.g = _views(self.params, op.slots), _views(self.grad, op.slots)
            self._route(op)
            self.ops.append(op)
            offset += piece.n_params
        self.layers = {op.piece.layer: op for op in self.ops}
        self._inbox: dict = {}
        self._sending: list = []

    def _route(self, op) -> None:
        """Precompute who sends this piece what and whom it sends to."""
        me, layer = self.index, op.piece.layer
        ts = self.plan.transfers
        op.act_from = [(t.src, t.box) for t in ts if t.kind == "activation" and t.layer == layer and t.dst == me]
        op.act_to = [(t.dst, t.box) for t in ts if t.kind == "activation" and t.layer == layer + 1 and t.src == me]
        op.partial_to = [(t.dst, t.box) for t in ts if t.kind == "partial" and t.layer == layer and t.src == me]
        op.partial_from = [t.src for t in ts if t.kind == "partial" and t.layer == layer and t.dst == me]
        prev = [p for p in self.plan.pieces[layer - 1] if p.block == me] if layer > 0 else []
        op.local_in = intersect(prev[0].out_box, op.piece.in_box) if prev else None

    # -- transport ------------------------------------------------------------------------
    def _send(self, dst: int, key: tuple, array) -> None:
        raise NotImplementedError

    async def _compute(self, fn, *args):
        return fn(*args)

    def _slot(self, key):
        fut = self._inbox.get(key)
        if fut is None:
            fut = self._inbox[key] = asyncio.get_running_loop().create_future()
        return fut

    def _deliver(self, key: tuple, array) -> None:
        self._slot(tuple(key)).set_result(array)

    async def _recv(self, key: tuple):
        value = await self._slot(key)
        del self._inbox[key]
        return value

    # -- one minibatch ----------------------------------------------------------------------
    async def run_step(self, tag, x, y, n: int, reduction: str = "mean", regularize: bool = True) -> float:
        """Forward and backward through this block's pieces; fills ``self.grad`` and returns this
        block's share of the loss (the data loss on the head block, its weights' L2 term)."""
        xp, dtype = namespace(self.params), self.params.dtype
        acts, inputs, caches = {}, {}, {}
        for op in self.ops:
            layer = op.piece.layer
            if layer == 0:
                xin = np.moveaxis(xp.asarray(x, dtype=dtype), 0, -1)
            else:
                xin = await self._gather_input(op, acts, tag, n, xp, dtype)
            if isinstance(op, _DenseOp):
                inputs[layer] = xin
                partial = await self._compute(op.partial, op.p, xin)
                for dst, box in op.partial_to:
                    self._send(dst, (tag, "partial", layer, self.index), partial[_rows(box)])
                if op.own is not None:
                    received = [await self._recv((tag, "partial", layer, s)) for s in op.partial_from]
                    acts[layer] = await self._compute(op.activate, op.p, partial, received)
            else:
                acts[layer], caches[layer] = await self._compute(op.forward, op.p, xin)
            for dst, box in op.act_to:
                self._send(dst, (tag, "act", layer + 1, self.index),
                           acts[layer][relative(box, op.piece.out_box)])
        last = len(self.model.layers) - 1
        loss = 0.0
        if self.index == self.plan.head:
            scale = 1.0 / n if reduction == "mean" else 1.0
            loss = await self._compute(self._loss, self.layers[last], acts[last], y, n, scale)
        dxs = {}
        for op in reversed(self.ops):
            layer = op.piece.layer
            if op.piece.out_box is not None and layer != last:
                dout = await self._gather_dout(op, dxs, tag, n, xp, dtype)
            elif op.piece.out_box is not None:
                dout = op.dout(xp, dtype, n)  # the loss gradient is already there
            if isinstance(op, _DenseOp):
                dx = await self._dense_backward(op, acts, inputs[layer], dout if op.own is not None else None,
                                                tag, n)
            else:
                dx = await self._compute(op.backward, op.p, op.g, caches[layer], dout, layer > 0)
            if dx is None:
                continue
            dxs[layer] = dx
            for src, box in op.act_from:
                self._send(src, (tag, "delta", layer, self.index), dx[relative(box, op.piece.in_box)])
        if regularize and self.model.l2:
            loss += await self._compute(self._l2)
        await self._flush()
        return loss

    async def _gather_input(self, op, acts, tag, n, xp, dtype):
        """The piece's input box, batch-last: its own previous output and its neighbours'."""
        parts = []
        if op.local_in is not None:
            mine = self.layers[op.piece.layer - 1]
            parts.append((op.local_in, acts[mine.piece.layer][relative(op.local_in, mine.piece.out_box)]))
        for src, box in op.act_from:
            parts.append((box, await self._recv((tag, "act", op.piece.layer, src))))
        if len(parts) == 1 and parts[0][0] == op.piece.in_box:
            return parts[0][1]
        return await self._compute(self._assemble, op, parts, n, xp, dtype)

    @staticmethod
    def _assemble(op, parts, n, xp, dtype):
        buf = op.scratch.empty("in", (*box_shape(op.piece.in_box), n), dtype, xp)
        for box, values in parts:
            buf[relative(box, op.piece.in_box)] = values
        return buf

    async def _gather_dout(self, op, dxs, tag, n, xp, dtype):
        """The deltas of the piece's outputs: summed over every piece that read them."""
        local, parts = None, []
        nxt = self.layers.get(op.piece.layer + 1)
        if nxt is not None and nxt.piece.layer in dxs:
            box = intersect(op.piece.out_box, nxt.piece.in_box)
            if box is not None:
                local = (box, dxs[nxt.piece.layer][relative(box, nxt.piece.in_box)])
        for dst, box in op.act_to:
            parts.append((box, await self._recv((tag, "delta", op.piece.layer + 1, dst))))
        return await self._compute(self._accumulate, op, local, parts, n, xp, dtype)

    @staticmethod
    def _accumulate(op, local, parts, n, xp, dtype):
        """Sum the delta parts over the piece's output box. When this block's own next piece read
        the whole box, its input delta (a buffer of ours, not needed again this step, and whose
        rows we send are outside the box) is summed into in place instead of copied."""
        box = op.piece.out_box
        if local is not None and local[0] == box and isinstance(op, _LocallyConnectedOp):
            out = local[1]
        else:
            out = op.dout(xp, dtype, n)
            if local is not None and local[0] == box:
                out[...] = local[1]
            else:
                out.fill(0)
                parts = parts + ([local] if local is not None else [])
        for part, values in parts:
            out[relative(part, box)] += values
        return out

    async def _dense_backward(self, op, acts, x, dout, tag, n):
        layer = op.piece.layer
        delta = op.delta_buffer(namespace(x), self.params.dtype, n)
        if op.own is not None:
            dz = await self._compute(op.local_delta, op.g, acts[layer], dout)
            for src in op.partial_from:
                self._send(src, (tag, "delta-units", layer, self.index), dz)
        for dst, box in op.partial_to:
            delta[_rows(box)] = await self._recv((tag, "delta-units", layer, dst))
        return await self._compute(op.backward, op.p, op.g, x, delta, layer > 0)

    def _loss(self, op, out, y, n, scale):
        loss = get_loss(self.model.loss)
        xp = namespace(out)
        logits = out.reshape(self.model.n_outputs, n).T
        y = loss.check_targets(xp.asarray(y), n, self.model.n_outputs, out.dtype, True)
        total, d = loss.loss_and_grad(xp, logits, y, scale)
        op.dout(xp, out.dtype, n).reshape(self.model.n_outputs, n)[...] = d.T
        return total * scale

    def _l2(self) -> float:
        l2, total = self.model.l2, 0.0
        for op in self.ops:
            W, gW = op.p["W"], op.g["W"]
            total += 0.5 * l2 * float(namespace(W).vdot(W, W))
            gW += l2 * W
        return total

    async def _flush(self) -> None:
        sending, self._sending = self._sending, []
        if sending:
            await asyncio.gather(*sending)


# -- one process -----------------------------------------------------------------------------

class _LocalBlock(Block):
    """Messages handed over in memory; arithmetic inline (one thread, deterministic)."""

    def _send(self, dst, key, array):
        self.peers[dst]._deliver(key, array)


def split_inputs(plan: Plan, X) -> dict[int, np.ndarray]:
    """Per input block, the contiguous slice of X (``(n, *input_shape)``) its layer-0 piece reads."""
    X = X.reshape(len(X), *plan.model.input_shape)
    out = {}
    for piece in plan.pieces[0]:
        sl = (slice(None), *relative(piece.in_box, tuple((0, s) for s in X.shape[1:])))
        out[piece.block] = np.ascontiguousarray(X[sl])
    return out


def gather_ranges(plan: Plan, pieces: list, size: int, dtype) -> np.ndarray:
    """The full vector put together from each block's local vector (``pieces[block]``)."""
    out = np.empty(size, dtype=dtype)
    for k, local in enumerate(pieces):
        offset = 0
        for a, b in plan.block_ranges(k):
            out[a:b] = local[offset:offset + b - a]
            offset += b - a
    return out


def block_values(plan: Plan, params, block: int) -> np.ndarray:
    """Block ``block``'s local vector: its ranges of ``params``, concatenated."""
    return np.concatenate([params[a:b] for a, b in plan.block_ranges(block)])


def loss_and_grad(plan: Plan, params, X, y, *, reduction: str = "mean", regularize: bool = True):
    """(loss, gradient) of the partitioned network in this process: every block's step runs as a
    coroutine and messages are handed over in memory. Must equal ``model.loss_and_grad``."""
    params = np.asarray(params)
    blocks = [_LocalBlock(plan, k, block_values(plan, params, k)) for k in range(plan.n_blocks)]
    for b in blocks:
        b.peers = blocks
    xs = split_inputs(plan, np.asarray(X))

    async def run():
        return await asyncio.gather(*(b.run_step(0, xs.get(b.index), y, len(X), reduction, regularize)
                                      for b in blocks))

    losses = asyncio.run(run())
    return float(sum(losses)), gather_ranges(plan, [b.grad for b in blocks], len(params), params.dtype)


# -- Dask actors -----------------------------------------------------------------------------

class BlockActor(Block):
    """A block as a Dask actor: neighbours' handles to send to, the parameter server's handle to
    fetch and push its own ranges, an accumulator for the gradient between pushes."""

    def __init__(self, plan: Plan, index: int, values, ps=None, replica: str = "",
                 overlap: bool = False, max_in_flight: int = 1):
        super().__init__(plan, index, values)
        self.ps, self.replica, self.overlap = ps, replica, overlap
        self.versions = [{} for _ in self.ranges]
        self.max_in_flight = max_in_flight
        self._free: list = []  # gradient buffers not travelling; at most max_in_flight + 1 exist
        self._buffers = 0
        self._flight: deque = deque()
        self.generation = 0  # bumped by ``set_server`` when the driver recovers a shard
        self._evaluation, self._sums, self._pending, self._applied = None, None, [], []
        self._acc = None
        self.staleness: list[int] = []
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

    def get_grad(self):
        return self.grad

    def get_params(self):
        return self.params

    # -- Downpour: this block's ranges only -----------------------------------------------
    def _issue_fetch(self) -> list:
        """Ask the shards for every piece of this block's ranges at once (``fetch_range``'s
        protocol, issued for all ranges before waiting on any)."""
        calls, offset = [], 0
        for r, (a, b) in enumerate(self.ranges):
            for i, lo, hi in overlaps(self.ps.ranges, a, b):
                start = self.ps.ranges[i][0]
                calls.append((r, i, offset + lo - a, hi - lo,
                              self.ps.shards[i].fetch(lo - start, hi - lo)))
            offset += b - a
        return calls

    async def _replies(self, futures) -> list:
        """The shards' replies, awaited in slices: a shard whose worker died may never answer, so
        once this block was handed a recovered server (``set_server``) the wait ends with
        ``ServerLost``, as does a call that failed outright; the replica then retries the step
        against the recovered server."""
        generation = self.generation

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
        dropped = len(self._flight)
        self._free.extend(acc for _, acc in self._flight)
        self._flight.clear()
        if self._acc is not None:
            self._free.append(self._acc)
            self._acc = None
        self.versions = [{} for _ in self.ranges]
        return dropped

    async def _finish_fetch(self, calls) -> None:
        replies = await self._replies([c[-1] for c in calls])
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
        if not self._free and self._buffers <= self.max_in_flight:
            self._buffers += 1
            return np.zeros_like(self.params)
        if not self._free:
            await self._settle_oldest()
        buf = self._free.pop()
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
        self._flight.append((replies, acc))
        while len(self._flight) > (self.max_in_flight if self.overlap else 0):
            await self._settle_oldest()

    async def _settle_oldest(self) -> None:
        replies, acc = self._flight[0]
        for a, b, versions, futures in replies:
            new = await self._replies(futures)
            for (shard, _, _), version in zip(overlaps(self.ps.ranges, a, b), new):
                self.staleness.append(version - 1 - versions.get(shard, 0))
        self._flight.popleft()
        self._free.append(acc)

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
        the shards' open evaluation (the portion is a leftover of an abandoned one)."""
        if self._evaluation == tag:
            return True
        pieces = self._pieces()
        replies = await self._replies([self.ps.shards[i].read_evaluated(tag, off, n)
                                       for _, i, off, n in pieces])
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
                                        for at, i, off, n in self._pieces()])
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
        while self._flight:
            await self._settle_oldest()
        return self.staleness[seen:]


# -- driving the blocks ----------------------------------------------------------------------

def _loop():
    """The event loop actor calls are awaited on: this worker's, or the client's."""
    try:
        return get_worker().loop
    except ValueError:
        return get_client().loop


async def _first_error(futures):
    tasks = [asyncio.ensure_future(f) for f in futures]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        if t.exception() is not None:
            for p in pending:
                p.cancel()
            raise t.exception()
    return [t.result() for t in tasks]


class Blocks:
    """Handles to the block actors of one partitioned replica (picklable into a replica task)."""

    def __init__(self, plan: Plan, actors, futures=None):
        self.plan, self.actors = plan, list(actors)
        self._futures = futures  # keeps the actors alive on the driver; not pickled

    def __reduce__(self):
        return (Blocks, (self.plan, self.actors))

    @classmethod
    def start(cls, client, plan: Plan, params, *, ps=None, replica: str = "", overlap: bool = False,
              max_in_flight: int = 1, addresses=None) -> "Blocks":
        """One actor per block, wired to each other; ``addresses``: the worker of each block
        (default: distinct workers while there are enough)."""
        params = np.asarray(params)
        if len(params) != plan.model.size:
            raise ValueError(f"params has {len(params)} values, the model has {plan.model.size}")
        if addresses is None:
            addresses = place_shards(list(worker_info(client)), plan.n_blocks)
        token = uuid.uuid4().hex[:8]
        actors, futures = start_actors(client, [
            (BlockActor, addr, f"partition-block-{k}-{token}",
             (plan, k, block_values(plan, params, k), ps, replica, overlap, max_in_flight))
            for k, addr in enumerate(addresses)])
        waits.results([a.connect(actors) for a in actors], timeout=CALL_TIMEOUT,
                      what=f"{len(actors)} blocks to connect to each other")
        return cls(plan, actors, futures)

    def call(self, method: str, per_block, timeout: float = CALL_TIMEOUT) -> list:
        """Call ``method(*per_block[k])`` on every block at once; the results in block order.

        Waits at most ``timeout`` seconds, and stops waiting once a block's worker has left the
        cluster (``ConnectionError``). If one block fails, the others are told to stop waiting
        for it and the error is raised.
        """
        futures = [getattr(a, method)(*args) for a, args in zip(self.actors, per_block)]
        loop = _loop()
        gathered = asyncio.run_coroutine_threadsafe(_first_error(futures), loop.asyncio_loop)
        try:
            return waits.result(gathered, timeout=timeout, give_up=self._gone,
                                what=f"{method} on {len(self.actors)} blocks")
        except Exception:
            gathered.cancel()
            for r in [a.abort() for a in self.actors]:
                try:
                    waits.result(r, timeout=5.0, what="a block to abort its step")
                except Exception:  # noqa: BLE001 -- that block is gone itself
                    continue
            raise

    def _gone(self):
        """A ``give_up``: ``ConnectionError`` once the worker of a block has left the cluster."""
        live = worker_info(get_client())
        lost = sorted({a._address for a in self.actors} - set(live))
        return ConnectionError(f"the worker(s) {', '.join(lost)} of a block left") if lost else None

    def loss_and_grad(self, X, y, *, tag=0, reduction: str = "mean", regularize: bool = True):
        """(loss, full gradient vector) of one partitioned pass: the block actors compute, then
        their gradients are gathered here (for tests and benchmarks; training never gathers)."""
        losses = self.step(X, y, tag=tag, reduction=reduction, regularize=regularize)
        grads = waits.results([a.get_grad() for a in self.actors], timeout=CALL_TIMEOUT,
                              what="the blocks' gradients")
        return float(sum(losses)), gather_ranges(self.plan, grads, self.plan.model.size, grads[0].dtype)

    def _per_block(self, X, y) -> list[tuple]:
        """Each block's share of a batch: its input slice (input blocks) and the labels (head)."""
        xs = split_inputs(self.plan, np.asarray(X))
        return [(xs.get(k), y if k == self.plan.head else None) for k in range(self.plan.n_blocks)]

    def step(self, X, y, *, tag=0, reduction: str = "mean", regularize: bool = True) -> list[float]:
        """One forward/backward pass on every block; each block's loss share."""
        return self.call("step", [(tag, x, t, len(X), reduction, regularize)
                                  for x, t in self._per_block(X, y)])

    def train_step(self, X, y, *, tag, fetch: bool, push: bool,
                   steps_done: int | None = None) -> list[tuple[float, list[int]]]:
        """One Downpour step on every block (see ``BlockActor.train_step``): per block, its loss
        share and the staleness of the pushes it saw acknowledged."""
        return self.call("train_step", [(tag, x, t, len(X), fetch, push, steps_done)
                                        for x, t in self._per_block(X, y)])

    def close(self) -> None:
        """Release the actors."""
        for f in self._futures or []:
            f.release()
        self._futures = None
