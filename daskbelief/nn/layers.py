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

The hot path of a locally connected layer is one copy of the patches and one batched matmul with
positions as the batch axis. Its activations are stored batch-last, ``(*spatial, C, n)`` in memory
(the arrays it returns are ``(n, *spatial, C)`` views of that): patches then copy in long
contiguous runs, and a block of rows is one contiguous buffer to send to a neighbouring partition.
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


def _copy(xp, src, scratch: Scratch | None, key: str):
    """A C-contiguous copy of ``src`` (in a scratch buffer when given)."""
    dst = _empty(xp, src.shape, src.dtype, scratch, key)
    dst[...] = src
    return dst


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

    def init(self, rng: np.random.Generator, views: dict) -> None:
        W, b = views["W"], views["b"]
        fan_in, fan_out = self._fans()
        if self.activation == "relu":
            rng.standard_normal(dtype=W.dtype, out=W)
            W *= math.sqrt(2.0 / fan_in)
        else:
            limit = math.sqrt(6.0 / (fan_in + fan_out))
            rng.random(dtype=W.dtype, out=W)
            W *= 2 * limit
            W -= limit
        b[...] = 0

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

    def forward(self, p, x, scratch: Scratch | None = None):
        W = p["W"]
        xp = namespace(W)
        x2 = x.reshape(len(x), self.n_in)
        z = xp.matmul(x2, W, out=_empty(xp, (len(x), self.units), W.dtype, scratch, "z"))
        z += p["b"]
        y = self._act.forward(xp, z)
        return y, (x2, y)

    def backward(self, p, cache, dout, grads, input_grad: bool = True,
                 scratch: Scratch | None = None):
        x2, y = cache
        W = p["W"]
        xp = namespace(y)
        dz = self._act.backward(xp, y, dout.reshape(y.shape))
        xp.matmul(x2.T, dz, out=grads["W"])
        dz.sum(axis=0, out=grads["b"])
        if not input_grad:
            return None
        # dx in the memory layout x came in: a preceding locally connected layer stores x
        # batch-last and gets its gradient so (measured: 2% of that model's step).
        if x2.flags.c_contiguous:
            dx = xp.matmul(dz, W.T, out=_empty(xp, x2.shape, W.dtype, scratch, "dx"))
        else:
            dx = xp.matmul(W, dz.T, out=_empty(xp, x2.shape[::-1], W.dtype, scratch, "dx")).T
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

    def forward(self, p, x, scratch: Scratch | None = None):
        W, b = self._by_position(p)
        xp = namespace(W)
        n, P, K, F = len(x), self.positions, self.patch_size, self.filters
        # Activations are stored batch-last, (*spatial, C, n): a block of positions is one
        # contiguous run, and the patch copy moves runs of kw*C*n values instead of kw*C.
        xb = xp.moveaxis(x, 0, -1)
        if not xb.flags.c_contiguous:  # only a model's input; layer outputs already are
            xb = _copy(xp, xb, scratch, "x")
        fields = xp.moveaxis(patches(xp.moveaxis(xb, -1, 0), self.kernel_size, self.strides), 0, -1)
        cols = _copy(xp, fields, scratch, "cols").reshape(P, K, n)
        z = xp.matmul(W.transpose(0, 2, 1), cols, out=_empty(xp, (P, F, n), W.dtype, scratch, "z"))
        z += b
        y = self._act.forward(xp, z)
        return xp.moveaxis(y.reshape(*self.out_spatial, F, n), -1, 0), (cols, y)

    def backward(self, p, cache, dout, grads, input_grad: bool = True,
                 scratch: Scratch | None = None):
        cols, y = cache
        xp = namespace(y)
        W, _ = self._by_position(p)
        dz = self._act.backward(xp, y, xp.moveaxis(dout, 0, -1).reshape(y.shape))
        xp.matmul(cols, dz.transpose(0, 2, 1), out=grads["W"].reshape(W.shape))
        dz.sum(axis=2, out=grads["b"].reshape(self.positions, self.filters))
        if not input_grad:
            return None
        dcols = xp.matmul(W, dz, out=_empty(xp, cols.shape, W.dtype, scratch, "dcols"))
        return self._col2im(xp, dcols, y.shape[2], scratch)

    def _col2im(self, xp, dcols, n: int, scratch: Scratch | None):
        """Scatter-add patch gradients ``(P, K, n)`` onto the input: one pass per kernel offset."""
        d, spatial, C = self.ndim, self.input_shape[:-1], self.input_shape[-1]
        dx = _empty(xp, (*spatial, C, n), dcols.dtype, scratch, "dx")
        dx.fill(0)
        blocks = dcols.reshape(*self.out_spatial, *self.kernel_size, C, n)
        every = (slice(None),) * d
        for offset in itertools.product(*(range(k) for k in self.kernel_size)):
            window = tuple(slice(o, o + st * (m - 1) + 1, st)
                           for o, st, m in zip(offset, self.strides, self.out_spatial))
            dx[window] += blocks[every + offset]
        return xp.moveaxis(dx, -1, 0)

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
