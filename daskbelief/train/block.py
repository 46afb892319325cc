"""The block protocol: one block's pieces, parameters and gradient, and a minibatch step as
messages between blocks, whatever carries them.

A step is data-driven: every block gets the step at once (the input blocks their slice of X, the
head block the labels) and runs forward and backward on its own, awaiting the activations,
partial sums and deltas its neighbours send it, one message per transfer of the plan. The same
code runs in one process (``loss_and_grad``, messages handed over in memory: the float64 oracle
of the protocol, without Dask) and as Dask actors (``block_actor.BlockActor``).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from daskbelief.backend import aligned, namespace
from daskbelief.nn.losses import get_loss
from daskbelief.ps.sources import Given, Ranged
from daskbelief.train.partition import Plan, box_shape, intersect, relative
from daskbelief.train.pieces import DensePiece, LocallyConnectedPiece, piece_op, views


def _rows(box):
    return slice(*box[0])


@dataclass(frozen=True)
class Staged:
    """In place of a block's input: it was sent ahead, while the previous step computed
    (``partitioned.Blocks.step``'s ``ahead``), by the handle ``sender`` as its ``number``-th."""

    sender: str
    number: int

    @property
    def key(self) -> tuple:
        return ("input", self.sender, self.number)

    def supersedes(self, key: tuple) -> bool:
        """Whether inbox ``key`` is an input sent ahead that can no longer be asked for: an
        earlier one of the same sender, or one of another sender."""
        return (len(key) == 3 and key[0] == "input"
                and (key[1] != self.sender or key[2] < self.number))


class Block:
    """One block's pieces, parameters and gradient, and the step protocol over messages.

    Subclasses say how messages travel and where arithmetic runs (``_send``, ``_compute``);
    messages arrive through ``_deliver`` and are awaited with ``_recv``. A message key is
    ``(tag, kind, layer, sender)``: a step's tag keeps steps apart, and anything a block waits for
    is named exactly, so arrival order does not matter.
    """

    def __init__(self, plan: Plan, index: int, values):
        """``values``: the block's ranges concatenated, or None for zeros (to be fetched)."""
        self.plan, self.index = plan, index
        self.model = plan.model
        self.ranges = plan.block_ranges(index)
        self.size = sum(b - a for a, b in self.ranges)
        if values is None:
            values = np.zeros(self.size, dtype=np.float32)
        if len(values) != self.size:
            raise ValueError(f"block {index} owns {self.size} parameters, got {len(values)} values")
        self.params = np.array(values, copy=True)
        self.grad = np.zeros_like(self.params)
        self.ops, offset = [], 0
        for piece in plan.block_pieces(index):
            op = piece_op(piece, self.model.layers[piece.layer], offset)
            op.p, op.g = views(self.params, op.slots), views(self.grad, op.slots)
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
        if isinstance(op, LocallyConnectedPiece):
            op.order([box for _, box in op.act_to], [box for _, box in op.act_from])

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

    async def _input(self, x):
        """The block's input: ``x``, or the one sent ahead as ``x`` says (``Staged``). Inputs
        sent ahead earlier and never asked for (their step failed) are dropped."""
        if not isinstance(x, Staged):
            return x
        value = await self._recv(x.key)
        for key in [k for k in self._inbox if x.supersedes(k)]:
            del self._inbox[key]
        return value

    # -- one minibatch ----------------------------------------------------------------------
    async def run_step(self, tag, x, y, n: int, reduction: str = "mean", regularize: bool = True) -> float:
        """Forward and backward through this block's pieces; fills ``self.grad`` and returns this
        block's share of the loss (the data loss on the head block, its weights' L2 term)."""
        xp, dtype = namespace(self.params), self.params.dtype
        acts, inputs, caches = await self._forward(tag, x, n, xp, dtype)
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
            if isinstance(op, DensePiece):
                dx = await self._dense_backward(op, acts, inputs[layer], dout if op.own is not None else None,
                                                tag, n)
                if dx is not None:
                    self._send_deltas(op, dx, tag)
            else:
                dx = await self._lc_backward(op, caches[layer], dout, layer > 0, tag)
            if dx is not None:
                dxs[layer] = dx
        if regularize and self.model.l2:
            loss += await self._compute(self._l2)
        await self._flush()
        return loss

    async def _forward(self, tag, x, n: int, xp, dtype):
        """The forward pass through this block's pieces, sending neighbours what they need:
        (activations, dense inputs, locally connected caches), by layer."""
        acts, inputs, caches = {}, {}, {}
        x = await self._input(x)
        for op in self.ops:
            layer = op.piece.layer
            if layer == 0:
                xin = np.moveaxis(aligned(xp.asarray(x, dtype=dtype)), 0, -1)
            else:
                xin = await self._gather_input(op, acts, tag, n, xp, dtype)
            if isinstance(op, DensePiece):
                inputs[layer] = xin
                partial = await self._compute(op.partial, op.p, xin)
                for dst, box in op.partial_to:
                    self._send(dst, (tag, "partial", layer, self.index), partial[_rows(box)])
                if op.own is not None:
                    received = [await self._recv((tag, "partial", layer, s)) for s in op.partial_from]
                    acts[layer] = await self._compute(op.activate, op.p, partial, received)
                    self._send_acts(op, acts[layer], tag)
            else:
                acts[layer], caches[layer] = await self._lc_forward(op, xin, tag)
        return acts, inputs, caches

    async def _lc_forward(self, op, xin, tag):
        """A locally connected piece's forward: the outputs neighbours read first, sent while
        the rest computes (``LocallyConnectedPiece.order``)."""
        for i, positions in enumerate(op.forward_parts):
            out = await self._compute(op.forward, op.p, xin, positions)
            if i == 0:
                self._send_acts(op, out[0], tag)
        return out

    async def _lc_backward(self, op, cache, dout, input_grad: bool, tag):
        """A locally connected piece's backward: the input deltas neighbours wait for first,
        sent while the rest computes."""
        for i, positions in enumerate(op.backward_parts):
            dx = await self._compute(op.backward, op.p, op.g, cache, dout, input_grad, positions, i > 0)
            if i == 0 and dx is not None:
                self._send_deltas(op, dx, tag)
        return dx

    def _send_acts(self, op, act, tag) -> None:
        """The piece's outputs to the blocks whose next piece reads them."""
        for dst, box in op.act_to:
            self._send(dst, (tag, "act", op.piece.layer + 1, self.index), act[relative(box, op.piece.out_box)])

    def _send_deltas(self, op, dx, tag) -> None:
        """The deltas of the piece's inputs back to the blocks that sent those inputs."""
        for src, box in op.act_from:
            self._send(src, (tag, "delta", op.piece.layer, self.index), dx[relative(box, op.piece.in_box)])

    async def run_forward(self, tag, x, n: int):
        """The forward pass alone: on the head block the model's outputs ``(n, n_outputs)``
        (class probabilities, as ``Sequential.predict``), None on the others."""
        xp, dtype = namespace(self.params), self.params.dtype
        acts, _, _ = await self._forward(tag, x, n, xp, dtype)
        await self._flush()
        if self.index != self.plan.head:
            return None
        last = acts[len(self.model.layers) - 1]
        out = last.reshape(self.model.n_outputs, n).T.copy()  # off the scratch buffer
        return await self._compute(get_loss(self.model.loss).predict, xp, out)

    async def _gather_input(self, op, acts, tag, n, xp, dtype):
        """The piece's input box, batch-last: its own previous output and its neighbours'."""
        parts = []
        if op.local_in is not None:
            mine = self.layers[op.piece.layer - 1]
            parts.append((op.local_in, acts[mine.piece.layer][relative(op.local_in, mine.piece.out_box)]))
        for src, box in op.act_from:
            parts.append((box, await self._recv((tag, "act", op.piece.layer, src))))
        if len(parts) == 1 and parts[0][0] == op.piece.in_box:
            return aligned(parts[0][1])
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
        if local is not None and local[0] == box and isinstance(op, LocallyConnectedPiece):
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
    """Messages handed over in memory; arithmetic inline (one thread, deterministic). A message
    is copied when sent, as the wire does: a block that went on writing what it had sent would
    make this oracle differ from the model's gradient."""

    def _send(self, dst, key, array):
        self.peers[dst]._deliver(key, array.copy())


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


def block_values(plan: Plan, params: Ranged, block: int) -> np.ndarray:
    """Block ``block``'s local vector: its ranges of ``params`` (``sources``), concatenated."""
    return np.concatenate([params.values(a, b) for a, b in plan.block_ranges(block)])


def loss_and_grad(plan: Plan, params, X, y, *, reduction: str = "mean", regularize: bool = True):
    """(loss, gradient) of the partitioned network in this process: every block's step runs as a
    coroutine and messages are handed over in memory. Must equal ``model.loss_and_grad``."""
    params = np.asarray(params)
    blocks = [_LocalBlock(plan, k, block_values(plan, Given(params), k))
              for k in range(plan.n_blocks)]
    for b in blocks:
        b.peers = blocks
    xs = split_inputs(plan, np.asarray(X))

    async def run():
        return await asyncio.gather(*(b.run_step(0, xs.get(b.index), y, len(X), reduction, regularize)
                                      for b in blocks))

    losses = asyncio.run(run())
    return float(sum(losses)), gather_ranges(plan, [b.grad for b in blocks], len(params), params.dtype)
