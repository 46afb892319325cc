"""Layers with forward and backward side by side, written for one flat parameter vector.

The API (model parallelism drives layers through it directly):

* ``build(input_shape) -> output_shape`` checks the layer fits its input (per-example shapes,
  channels last) and fixes its parameter shapes; bad arguments fail here or in the constructor.
* ``param_shapes() -> dict`` name -> shape, in the order the parameters sit in the flat vector.
* ``init(rng, views)`` fills the parameter views in place (He-normal for relu, Glorot-uniform
  otherwise; zero biases).
* ``forward(p, x) -> (out, cache)`` for a batch ``x`` of shape ``(n, *input_shape)``.
* ``backward(p, cache, dout, grads, input_grad=True) -> dx`` writes the parameter gradients into
  the ``grads`` views in place (so a model fills one flat gradient vector without copies) and
  returns the gradient w.r.t. x, or None when ``input_grad`` is False (the first layer of a model
  needs none). ``dout`` is consumed: it may be overwritten.
* Both take an optional ``scratch`` (a ``Scratch``): big temporaries then come from buffers reused
  across calls instead of fresh memory. Arrays a call returns (out, cache, dx) may live there:
  they stay valid until the next call with the same scratch.

Locally connected layers (DistBelief's image models) have untied weights: every output position
owns its own filter bank, ``W`` of shape ``(*out_spatial, kh*kw*C, filters)`` and ``b`` of shape
``(*out_spatial, filters)``, position-major so that a block of output positions is a slice of the
parameters. A block of outputs reads only the input window given by ``receptive_field`` along each
axis, and ``patches`` extracts receptive fields from any such window. Padding is "valid" (none).

The hot path of a locally connected layer is a batched matmul with positions as the batch axis,
taken a block of positions at a time (``block_positions``: a few MB of patches, in cache): copy
the block's patches, multiply, add the bias, activate; backward copies the patches again (cheaper
than keeping tens of MB of them from the forward pass), multiplies for the weight and patch
gradients and adds the latter onto the input gradient. Activations are stored batch-last,
``(*spatial, C, n)`` in memory (the arrays it returns are ``(n, *spatial, C)`` views of that):
patches then copy in long contiguous runs, and a block of rows is one contiguous buffer to send
to a neighbouring partition.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from numbers import Integral

import numpy as np

from daskbelief.backend import namespace
from daskbelief.nn.activations import get_activation


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _int_tuple(value, ndim: int, what: str) -> tuple[int, ...]:
    """An int (repeated ndim times) or a sequence of ndim positive ints."""
    try:
        values = (value,) * ndim if isinstance(value, Integral) else tuple(value)
    except TypeError:
        values = ()
    if len(values) != ndim:
        raise ValueError(f"{what} must be an int or {ndim} ints, got {value!r}")
    return tuple(_positive_int(v, what) for v in values)


def patches(x, kernel: tuple[int, ...], strides: tuple[int, ...]):
    """Read-only view ``(n, *out_spatial, *kernel, C)`` of the receptive fields of ``x``.

    ``x`` is ``(n, *spatial, C)`` with ``len(kernel)`` spatial axes; no data is copied.
    """
    xp = namespace(x)
    d = len(kernel)
    spatial = x.shape[1:1 + d]
    out = tuple((s - k) // st + 1 for s, k, st in zip(spatial, kernel, strides))
    if len(spatial) != d or x.ndim != d + 2 or min(out, default=0) < 1:
        raise ValueError(f"cannot take {kernel} patches with strides {strides} of an input of "
                         f"shape {tuple(x.shape)}")
    sx = x.strides
    shape = (x.shape[0], *out, *kernel, x.shape[-1])
    steps = (sx[0], *(sx[1 + i] * strides[i] for i in range(d)), *sx[1:1 + d], sx[-1])
    if xp is np:
        return np.lib.stride_tricks.as_strided(x, shape, steps, writeable=False)
    return xp.lib.stride_tricks.as_strided(x, shape, steps)


def receptive_field(start: int, stop: int, kernel: int, stride: int) -> tuple[int, int]:
    """Input range ``[in_start, in_stop)`` that output positions ``[start, stop)`` read on one axis.

    The halo a horizontal model partition must receive to compute its block of outputs.
    """
    return start * stride, (stop - 1) * stride + kernel


class Scratch:
    """Work buffers reused from one call to the next, by key.

    A training step's big temporaries (patch matrices, activations) have the same sizes every
    step; fresh ones cost page faults and zeroing, since the C allocator hands blocks over 32 MB
    straight back to the OS (measured: 20% of a locally connected step). A buffer handed out for a
    key stays valid until the next request for that key.
    """

    def __init__(self):
        self._buffers: dict = {}

    def empty(self, key: str, shape: tuple[int, ...], dtype, xp):
        size = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.size < size or buf.dtype != dtype or namespace(buf) is not xp:
            buf = self._buffers[key] = xp.empty(size, dtype=dtype)
        return buf[:size].reshape(shape)


def _empty(xp, shape, dtype, scratch: Scratch | None, key: str):
    return xp.empty(shape, dtype=dtype) if scratch is None else scratch.empty(key, shape, dtype, xp)


def _batch_last(xp, x, scratch: Scratch | None):
    """A batch-last, C-contiguous copy ``(*shape, n)`` of ``x`` (``(n, *shape)``), in tiles of
    8 examples by 1024 values: one pass of numpy's transposing copy strides over the whole array
    on one side and is 3x slower (measured on a 256x32x32x3 batch)."""
    dst = _empty(xp, (*x.shape[1:], len(x)), x.dtype, scratch, "x")
    if xp is not np or not x.flags.c_contiguous:
        dst[...] = xp.moveaxis(x, 0, -1)
        return dst
    src, out = x.reshape(len(x), -1), dst.reshape(-1, len(x))
    for i in range(0, src.shape[1], 1024):
        for j in range(0, len(x), 8):
            out[i:i + 1024, j:j + 8] = src[j:j + 8, i:i + 1024].T
    return dst


CACHE_BYTES = 4 << 20  # the working set a locally connected block aims to keep near the core


def block_positions(patch_size: int, filters: int, n: int, itemsize: int,
                    cache_bytes: int | None = None) -> int:
    """How many output positions a locally connected layer computes at a time: as many as fit
    their patches, patch gradients and pre-activations (``n`` examples each) in ``cache_bytes``
    (default ``CACHE_BYTES``), at least one."""
    per_position = (2 * patch_size + filters) * n * itemsize
    return max(1, (CACHE_BYTES if cache_bytes is None else cache_bytes) // per_position)


class Layer:
    """Common parts: the activation, weight init, shape bookkeeping and serialisation."""

    type = ""
    decayed = ("W",)  # parameters that L2 weight decay applies to (never biases)
    # How model parallelism cuts the layer into pieces (train.partition, train.pieces):
    # "inputs" (by input rows, as Dense) or "positions" (by output positions, as locally
    # connected layers: needs kernel_size, strides and position-major W and b).
    partition_cut = ""

    def __init__(self, activation: str):
        self._act = get_activation(activation)
        self.activation = self._act.name
        self.input_shape: tuple[int, ...] | None = None
        self.output_shape: tuple[int, ...] | None = None

    def draw(self, name: str, rng: np.random.Generator, out) -> None:
        """Fill ``out``, consecutive values of parameter ``name``, with fresh ones: weights from
        ``rng`` (He normal for ReLU, Glorot uniform otherwise), biases zero. Value by value, so
        any run of a weight matrix can be drawn on its own (``Sequential.init_range``)."""
        if name != "W":
            out[...] = 0
            return
        fan_in, fan_out = self._fans()
        if self.activation == "relu":
            rng.standard_normal(dtype=out.dtype, out=out)
            out *= math.sqrt(2.0 / fan_in)
        else:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            rng.random(dtype=out.dtype, out=out)
            out *= 2 * limit
            out -= limit

    def _built(self) -> None:
        if self.output_shape is None:
            raise RuntimeError(f"{self!r} is not built: call build(input_shape) first")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    def to_dict(self) -> dict:
        """JSON-able description; ``layer_from_dict`` inverts it."""
        return {"type": self.type, **{k: list(v) if isinstance(v, tuple) else v
                                      for k, v in self._config().items()}}


class Dense(Layer):
    """Fully connected: ``act(x @ W + b)``, x flattened per example."""

    type = "dense"
    partition_cut = "inputs"

    def __init__(self, units: int, activation: str = "linear"):
        super().__init__(activation)
        self.units = _positive_int(units, "Dense units")

    def _config(self) -> dict:
        return {"units": self.units, "activation": self.activation}

    def build(self, input_shape) -> tuple[int, ...]:
        input_shape = tuple(int(s) for s in input_shape)
        if not input_shape or min(input_shape) < 1:
            raise ValueError(f"Dense needs a non-empty input shape, got {input_shape}")
        self.input_shape, self.n_in = input_shape, math.prod(input_shape)
        self.output_shape = (self.units,)
        return self.output_shape

    def param_shapes(self) -> dict:
        self._built()
        return {"W": (self.n_in, self.units), "b": (self.units,)}

    def _fans(self) -> tuple[int, int]:
        return self.n_in, self.units

    # Dense's arithmetic, once. ``batch`` is the axis the examples run along: 0 for the layer's
    # own (n, features) arrays, 1 for a model-parallel piece's batch-last (features, n) arrays
    # (train.pieces), where the same products are taken the transposed way round.
    @staticmethod
    def linear(xp, W, x, out, batch: int = 0):
        """The pre-activations ``x @ W`` (batch 1: ``W.T @ x``) into ``out``."""
        return xp.matmul(x, W, out=out) if batch == 0 else xp.matmul(W.T, x, out=out)

    def activate(self, xp, z, b, batch: int = 0):
        """``act(z + b)``, in place of ``z`` where the activation allows."""
        z += b if batch == 0 else b[:, None]
        return self._act.forward(xp, z)

    def delta(self, xp, y, dout, gb, batch: int = 0):
        """The pre-activations' gradient from the outputs' ``dout``; the bias gradient into ``gb``."""
        dz = self._act.backward(xp, y, dout)
        dz.sum(axis=batch, out=gb)
        return dz

    @staticmethod
    def weight_grad(xp, x, dz, out, batch: int = 0):
        """``W``'s gradient ``x.T @ dz`` (batch 1: ``x @ dz.T``) into ``out``."""
        return xp.matmul(x.T, dz, out=out) if batch == 0 else xp.matmul(x, dz.T, out=out)

    @staticmethod
    def input_grad(xp, W, dz, out, batch: int = 0):
        """The inputs' gradient ``dz @ W.T`` (batch 1: ``W @ dz``) into ``out``."""
        return xp.matmul(dz, W.T, out=out) if batch == 0 else xp.matmul(W, dz, out=out)

    def forward(self, p, x, scratch: Scratch | None = None):
        W = p["W"]
        xp = namespace(W)
        x2 = x.reshape(len(x), self.n_in)
        z = self.linear(xp, W, x2, _empty(xp, (len(x), self.units), W.dtype, scratch, "z"))
        y = self.activate(xp, z, p["b"])
        return y, (x2, y)

    def backward(self, p, cache, dout, grads, input_grad: bool = True,
                 scratch: Scratch | None = None):
        x2, y = cache
        W = p["W"]
        xp = namespace(y)
        dz = self.delta(xp, y, dout.reshape(y.shape), grads["b"])
        self.weight_grad(xp, x2, dz, grads["W"])
        if not input_grad:
            return None
        # dx in the memory layout x came in: a preceding locally connected layer stores x
        # batch-last and gets its gradient so (measured: 2% of that model's step).
        if x2.flags.c_contiguous:
            dx = self.input_grad(xp, W, dz, _empty(xp, x2.shape, W.dtype, scratch, "dx"))
        else:
            dx = self.input_grad(xp, W, dz.T, _empty(xp, x2.shape[::-1], W.dtype, scratch, "dx"),
                                 batch=1).T
        return dx.reshape(len(y), *self.input_shape)

    def flops_per_example(self) -> int:
        """Forward multiply-adds times 2."""
        self._built()
        return 2 * self.n_in * self.units


class _LocallyConnected(Layer):
    """Untied-weight convolution over ``ndim`` spatial axes, valid padding, channels last."""

    ndim = 0
    partition_cut = "positions"

    def __init__(self, filters: int, kernel_size, strides=1, activation: str = "linear"):
        super().__init__(activation)
        name = type(self).__name__
        self.filters = _positive_int(filters, f"{name} filters")
        self.kernel_size = _int_tuple(kernel_size, self.ndim, f"{name} kernel_size")
        self.strides = _int_tuple(strides, self.ndim, f"{name} strides")

    def _config(self) -> dict:
        return {"filters": self.filters, "kernel_size": self.kernel_size, "strides": self.strides,
                "activation": self.activation}

    def build(self, input_shape) -> tuple[int, ...]:
        name = type(self).__name__
        input_shape = tuple(int(s) for s in input_shape)
        if len(input_shape) != self.ndim + 1 or min(input_shape) < 1:
            axes = ("L", "C") if self.ndim == 1 else ("H", "W", "C")
            raise ValueError(f"{name} needs an input of shape ({', '.join(axes)}), got {input_shape}")
        spatial = input_shape[:-1]
        if any(k > s for k, s in zip(self.kernel_size, spatial)):
            raise ValueError(f"{name} kernel_size {self.kernel_size} is larger than its input "
                             f"{spatial} (input shape {input_shape})")
        self.input_shape = input_shape
        self.out_spatial = tuple((s - k) // st + 1
                                 for s, k, st in zip(spatial, self.kernel_size, self.strides))
        self.positions = math.prod(self.out_spatial)
        self.patch_size = math.prod(self.kernel_size) * input_shape[-1]
        self.output_shape = (*self.out_spatial, self.filters)
        return self.output_shape

    def param_shapes(self) -> dict:
        self._built()
        return {"W": (*self.out_spatial, self.patch_size, self.filters),
                "b": (*self.out_spatial, self.filters)}

    def _fans(self) -> tuple[int, int]:
        return self.patch_size, self.filters

    def _by_position(self, p):
        """W as (P, K, F) and b as (P, F, 1): positions become the matmul batch axis."""
        P, K, F = self.positions, self.patch_size, self.filters
        return p["W"].reshape(P, K, F), p["b"].reshape(P, F, 1)

    def _fields(self, xp, xb):
        """Strided view ``(*out_spatial, *kernel, C, n)`` of a batch-last input: no copy."""
        return xp.moveaxis(patches(xp.moveaxis(xb, -1, 0), self.kernel_size, self.strides), 0, -1)

    def _rows(self, start: int, stop: int):
        """The pieces of positions ``[start, stop)`` that lie in one row of the last spatial
        axis, as (index of the leading axes, first, last on that axis, offset in the range)."""
        width = self.out_spatial[-1]
        while start < stop:
            row, first = divmod(start, width)
            last = min(width, first + stop - start)
            yield np.unravel_index(row, self.out_spatial[:-1]), first, last, start
            start += last - first

    def _gather(self, xp, fields, start: int, stop: int, scratch):
        """The patches of positions ``[start, stop)`` as one contiguous (positions, K, n) matrix
        stack, copied row piece by row piece from the strided view."""
        n = fields.shape[-1]
        cols = _empty(xp, (stop - start, self.patch_size, n), fields.dtype, scratch, "cols")
        blocks = cols.reshape(stop - start, *fields.shape[self.ndim:])
        for lead, first, last, at in self._rows(start, stop):
            blocks[at - start:at - start + last - first] = fields[(*lead, slice(first, last))]
        return cols

    def _scatter(self, dx, dcols, start: int, stop: int):
        """Add patch gradients (positions, K, n) of positions ``[start, stop)`` onto the input
        gradient ``dx`` (batch-last). Per row piece and kernel offset on the leading axes, the
        last axis's offsets go ``stride`` at a time: those never land on the same input, so each
        group is one add into the input row seen as (positions, stride, C, n) -- a reshape, not
        a strided view (numpy's ``as_strided`` costs 7x as much per call)."""
        blocks = dcols.reshape(stop - start, *self.kernel_size, *dx.shape[-2:])
        lead_strides, stride, k = self.strides[:-1], self.strides[-1], self.kernel_size[-1]
        for lead, first, last, at in self._rows(start, stop):
            piece = blocks[at - start:at - start + last - first]
            for offset in itertools.product(*(range(kk) for kk in self.kernel_size[:-1])):
                row = dx[tuple(i * s + o for i, s, o in zip(lead, lead_strides, offset))]
                for b0 in range(0, k, stride):
                    g, c0 = min(stride, k - b0), first * stride + b0
                    src = piece[(slice(None), *offset, slice(b0, b0 + g))]
                    # the positions whose stride-wide window fits in the row: all, or all but
                    # the last one
                    fit = min(last - first, (row.shape[0] - c0) // stride)
                    if fit:
                        windows = row[c0:c0 + fit * stride].reshape(fit, stride, *row.shape[1:])
                        windows[:, :g] += src[:fit]
                    if fit < last - first:
                        row[c0 + fit * stride:c0 + fit * stride + g] += src[fit]

    def _blocks(self, xp, n: int, itemsize: int, positions=None):
        """Position ranges each small enough that its patches, pre-activations and patch
        gradients stay in cache (policy: ``block_positions``); one range per run off the CPU.
        ``positions``: the runs ``(start, stop)`` to cover (default: every position)."""
        runs = [(0, self.positions)] if positions is None else positions
        step = (block_positions(self.patch_size, self.filters, n, itemsize) if xp is np
                else self.positions)
        return [(a, min(a + step, stop)) for start, stop in runs for a in range(start, stop, step)]

    def forward(self, p, x, scratch: Scratch | None = None, positions=None):
        """``positions``: compute only these runs ``(start, stop)`` of output positions, into the
        output buffer of ``scratch`` where an earlier call wrote the others (a model-parallel
        block computes first what its neighbours read, and sends it while computing the rest)."""
        W, b = self._by_position(p)
        xp = namespace(W)
        n, F = len(x), self.filters
        # Activations are stored batch-last, (*spatial, C, n): a block of positions is one
        # contiguous run, and the patch copy moves runs of kw*C*n values instead of kw*C.
        xb = xp.moveaxis(x, 0, -1)
        if not xb.flags.c_contiguous:  # only a model's input; layer outputs already are
            xb = _batch_last(xp, x, scratch)
        fields = self._fields(xp, xb)
        y = _empty(xp, (self.positions, F, n), W.dtype, scratch, "z")
        # Block by block, so the bias and the activation read what the matmul left in cache
        # and the patch matrix is never tens of MB (measured: 1.16x the benchmark's LC step).
        for start, stop in self._blocks(xp, n, W.dtype.itemsize, positions):
            z = xp.matmul(W[start:stop].transpose(0, 2, 1),
                          self._gather(xp, fields, start, stop, scratch), out=y[start:stop])
            z += b[start:stop]
            self._act.forward(xp, z)
        return xp.moveaxis(y.reshape(*self.out_spatial, F, n), -1, 0), (xb, y)

    def backward(self, p, cache, dout, grads, input_grad: bool = True,
                 scratch: Scratch | None = None, positions=None, add: bool = False):
        """``positions``: as in ``forward``, the runs to compute; ``add``: add onto the input
        gradient an earlier call of the same pass left in ``scratch`` instead of starting it."""
        xb, y = cache
        xp = namespace(y)
        W, _ = self._by_position(p)
        n = y.shape[2]
        dz = xp.moveaxis(dout, 0, -1).reshape(y.shape)
        gW = grads["W"].reshape(W.shape)
        gb = grads["b"].reshape(self.positions, self.filters)
        fields = self._fields(xp, xb)
        ones = xp.ones(n, dtype=y.dtype)  # the bias gradient as a matrix-vector product: 2x a sum
        dx = None
        if input_grad:
            dx = _empty(xp, xb.shape, y.dtype, scratch, "dx")
            if not add:
                dx.fill(0)
        for start, stop in self._blocks(xp, n, y.dtype.itemsize, positions):
            d = self._act.backward(xp, y[start:stop], dz[start:stop])
            cols = self._gather(xp, fields, start, stop, scratch)  # again: cheaper than keeping
            xp.matmul(cols, d.transpose(0, 2, 1), out=gW[start:stop])
            xp.matmul(d, ones, out=gb[start:stop])
            if input_grad:
                dcols = xp.matmul(W[start:stop], d,
                                  out=_empty(xp, cols.shape, y.dtype, scratch, "dcols"))
                self._scatter(dx, dcols, start, stop)
        return None if dx is None else xp.moveaxis(dx, -1, 0)

    def flops_per_example(self) -> int:
        """Forward multiply-adds times 2."""
        self._built()
        return 2 * self.positions * self.patch_size * self.filters


class LocallyConnected1D(_LocallyConnected):
    """Locally connected over sequences ``(L, C)``: output ``(out_L, filters)``."""

    type = "locally_connected_1d"
    ndim = 1


class LocallyConnected2D(_LocallyConnected):
    """Locally connected over images ``(H, W, C)``: output ``(out_H, out_W, filters)``."""

    type = "locally_connected_2d"
    ndim = 2


LAYER_TYPES = {cls.type: cls for cls in (Dense, LocallyConnected1D, LocallyConnected2D)}


def layer_from_dict(d: Mapping) -> Layer:
    """A new, unbuilt layer from ``{"type": ..., **constructor arguments}``."""
    if not isinstance(d, Mapping) or "type" not in d:
        raise ValueError(f"a layer is described by a dict with a 'type' key, got {d!r}")
    cls = LAYER_TYPES.get(d["type"])
    if cls is None:
        raise ValueError(f"unknown layer type {d['type']!r}: expected one of {sorted(LAYER_TYPES)}")
    try:
        return cls(**{k: v for k, v in d.items() if k != "type"})
    except TypeError as e:
        raise ValueError(f"bad arguments for a {d['type']!r} layer: {e}") from None
