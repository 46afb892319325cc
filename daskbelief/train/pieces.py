"""Piece operations: the arithmetic one block runs for its piece of one layer.

How a layer is cut (``Layer.partition_cut``) picks its operation: a locally connected piece is the
layer itself rebuilt on the piece's input halo; a dense piece, cut by input rows, computes partial
pre-activations of every unit and finishes those of its own units (``train.partition`` explains
the cuts). Activations are batch-last, ``(*box, n)``.
"""
from __future__ import annotations

import numpy as np

from daskbelief.backend import namespace
from daskbelief.nn.layers import Scratch, layer_from_dict
from daskbelief.train.partition import box_shape, box_size, relative


def views(vector, slots) -> dict:
    """Named array views into ``vector``: ``slots`` are ``(name, offset, shape)``."""
    return {name: vector[a:a + int(np.prod(shape))].reshape(shape) for name, a, shape in slots}


def runs(mask) -> list[tuple[int, int]]:
    """The runs ``(start, stop)`` of True in ``mask`` read in C order."""
    flat = np.concatenate([[False], np.ravel(mask), [False]])
    edges = np.flatnonzero(flat[1:] != flat[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def reading(lo: int, hi: int, kernel: int, stride: int, n_out: int) -> slice:
    """The output positions along one axis whose receptive fields meet inputs ``[lo, hi)``
    (valid padding: output ``i`` reads ``[i * stride, i * stride + kernel)``)."""
    return slice(max(0, -(-(lo - kernel + 1) // stride)), min(n_out, (hi - 1) // stride + 1))


def parts(mask) -> list[list[tuple[int, int]]]:
    """The positions in two parts, the runs ``mask`` marks first and the rest after, or one
    part when either is empty."""
    first, rest = runs(mask), runs(~mask)
    return [first, rest] if first and rest else [first or rest]


class LocallyConnectedPiece:
    """A locally connected piece: the layer rebuilt on the piece's input halo, so its output is
    exactly the piece's block of positions, and its weights are the piece's ranges in order.

    Forward computes first the positions whose outputs a neighbour reads, backward first those
    that read inputs a neighbour sent (``order``): the block sends those while it computes the
    rest, so a boundary's transfer overlaps the piece's own arithmetic instead of following it."""

    def __init__(self, piece, layer, offset: int):
        self.piece = piece
        self.layer = layer_from_dict(layer.to_dict())
        self.layer.build(box_shape(piece.in_box))
        shapes = self.layer.param_shapes()
        self.slots = [("W", offset, shapes["W"]), ("b", offset + piece.w_size, shapes["b"])]
        self.scratch = Scratch()
        self.order([], [])

    def order(self, sent: list, received: list) -> None:
        """Split the positions into the parts forward and backward compute in turn: ``sent``,
        the boxes of outputs neighbours read; ``received``, the boxes of inputs they sent."""
        ndim, layer = self.layer.ndim, self.layer
        first = np.zeros(layer.out_spatial, dtype=bool)
        for box in sent:
            first[relative(box, self.piece.out_box)[:ndim]] = True
        self.forward_parts = parts(first)
        first = np.zeros(layer.out_spatial, dtype=bool)
        for box in received:
            local = relative(box, self.piece.in_box)[:ndim]
            first[tuple(reading(s.start, s.stop, k, st, n) for s, k, st, n in
                        zip(local, layer.kernel_size, layer.strides, layer.out_spatial))] = True
        self.backward_parts = parts(first)

    def forward(self, p, x, positions=None):
        out, cache = self.layer.forward(p, np.moveaxis(x, -1, 0), scratch=self.scratch,
                                        positions=positions)
        return np.moveaxis(out, 0, -1), cache

    def dout(self, xp, dtype, n):
        return self.scratch.empty("dout", (*box_shape(self.piece.out_box), n), dtype, xp)

    def backward(self, p, g, cache, dout, input_grad: bool, positions=None, add: bool = False):
        dx = self.layer.backward(p, cache, np.moveaxis(dout, -1, 0), g, input_grad,
                                 scratch=self.scratch, positions=positions, add=add)
        return None if dx is None else np.moveaxis(dx, 0, -1)


class DensePiece:
    """A dense piece cut by input rows: ``W[rows]`` times the block's own inputs gives a partial
    pre-activation of every unit; the partials of the piece's own units, summed over the blocks,
    plus its bias slice, make its activations. Backward is the transpose: the deltas of every
    unit (the piece's own and the ones other blocks send) give ``W[rows]``'s gradient and the
    deltas of the block's inputs. The arithmetic is the layer's own (``Dense.linear`` and the
    rest, batch-last), only cut and summed across blocks here."""

    def __init__(self, piece, layer, offset: int):
        self.piece, self.layer = piece, layer
        self.units = layer.units
        self.n_in = box_size(piece.in_box)
        self.own = None if piece.out_box is None else slice(*piece.out_box[0])
        self.slots = [("W", offset, (self.n_in, self.units))]
        if self.own is not None:
            self.slots.append(("b", offset + piece.w_size, (self.own.stop - self.own.start,)))
        self.scratch = Scratch()

    def partial(self, p, x):
        W = p["W"]
        xp = namespace(W)
        n = x.shape[-1]
        out = self.scratch.empty("partial", (self.units, n), W.dtype, xp)
        return self.layer.linear(xp, W, x.reshape(self.n_in, n), out, batch=1)

    def activate(self, p, partial, received):
        z = partial[self.own]
        for r in received:
            z += r
        return self.layer.activate(namespace(partial), z, p["b"], batch=1)

    def delta_buffer(self, xp, dtype, n):
        """All units' deltas, ``(units, n)``; this piece's own rows are where its dout gathers."""
        return self.scratch.empty("delta", (self.units, n), dtype, xp)

    def dout(self, xp, dtype, n):
        return self.delta_buffer(xp, dtype, n)[self.own]

    def local_delta(self, g, y, dout):
        return self.layer.delta(namespace(y), y, dout, g["b"], batch=1)

    def backward(self, p, g, x, delta, input_grad: bool):
        W = p["W"]
        xp = namespace(W)
        n = x.shape[-1]
        self.layer.weight_grad(xp, x.reshape(self.n_in, n), delta, g["W"], batch=1)
        if not input_grad:
            return None
        dx = self.layer.input_grad(xp, W, delta, self.scratch.empty("dx", (self.n_in, n), W.dtype, xp),
                                   batch=1)
        return dx.reshape(*box_shape(self.piece.in_box), n)


PIECES = {"inputs": DensePiece, "positions": LocallyConnectedPiece}  # by the layer's partition_cut


def piece_op(piece, layer, offset: int):
    """The operation computing ``piece`` of ``layer``, its parameters at ``offset`` of the block's
    vector: chosen by how the layer says it is cut (``layer.partition_cut``)."""
    return PIECES[layer.partition_cut](piece, layer, offset)
