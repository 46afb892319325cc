"""``Sequential``: a stack of layers whose parameters live in ONE flat vector.

The flat vector is what the rest of the system moves around: parameter-server shards are slices
of it, a model partition is a set of its ranges, a checkpoint is it. Each layer's arrays are views
into it (``views``), laid out in layer order as named by ``layout`` (``"0.W"``, ``"0.b"``, ...),
and ``loss_and_grad`` fills one gradient vector of the same layout, layer by layer, in place.

Description format (``to_dict`` writes it, ``Sequential.from_dict`` reads it; JSON/TOML-able)::

    {"input_shape": [32, 32, 3],                 # per example, channels last
     "layers": [
        {"type": "locally_connected_2d", "filters": 16, "kernel_size": [5, 5],
         "strides": [1, 1], "activation": "relu"},
        {"type": "locally_connected_1d", ...},   # input (L, C); kernel_size/strides: 1 int
        {"type": "dense", "units": 10, "activation": "linear"}],
     "loss": "softmax_cross_entropy",            # or "mse"
     "l2": 1e-4}                                 # L2 decay on weights, never biases

Only ``input_shape`` and ``layers`` are required. In a layer, ``activation`` defaults to
``"linear"`` (relu, sigmoid, tanh, linear), ``strides`` to 1, and ``kernel_size``/``strides``
may be one int for every spatial axis. Dense layers flatten their input, so no reshape layers exist.

The regularised objective is ``reduce(per-example loss) + 0.5 * l2 * sum(W**2)``; with
``reduction="sum", regularize=False`` the results over disjoint portions of a batch add up to the
unregularised sum over the whole batch (what Sandblaster's portions need).
"""
from __future__ import annotations

import json
import math
import threading
from collections.abc import Mapping, Sequence
from numbers import Integral, Real
from typing import NamedTuple

import numpy as np

from daskbelief.backend import axpy, namespace
from daskbelief.nn.layers import Layer, Scratch, layer_from_dict
from daskbelief.nn.losses import get_loss


INIT_CHUNK = 1 << 20  # weights drawn from one random stream (``Sequential.init_range``)


def _stream(seed: int, layer: int, run: int) -> np.random.Generator:
    """The generator of run ``run`` of layer ``layer``'s weights (``Sequential.init_range``)."""
    key = (layer,) if run == 0 else (layer, run)
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


class ParamSpec(NamedTuple):
    """One named array in the flat vector: ``params[offset:offset + size].reshape(shape)``."""

    name: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


class Sequential:
    """Layers applied in order, then a loss; see the module docstring for the description format."""

    def __init__(self, input_shape, layers: Sequence[Layer | Mapping],
                 loss: str = "softmax_cross_entropy", l2: float = 0.0):
        self.input_shape = _shape(input_shape)
        self._loss = get_loss(loss)
        self.loss = self._loss.name
        if isinstance(l2, bool) or not isinstance(l2, Real) or not l2 >= 0:
            raise ValueError(f"l2 must be a non-negative number, got {l2!r}")
        self.l2 = float(l2)
        if not layers:
            raise ValueError("a Sequential model needs at least one layer")
        # Rebuilt from descriptions so the model owns its layers: a layer object passed to two
        # models is never built twice with different shapes.
        self.layers = [layer_from_dict(spec if isinstance(spec, Mapping) else spec.to_dict())
                       for spec in layers]
        self.layout: list[ParamSpec] = []
        self.layer_ranges: list[tuple[int, int]] = []
        self._slots: list[list[tuple]] = []  # per layer: (name, start, stop, shape)
        shape, offset = self.input_shape, 0
        for i, layer in enumerate(self.layers):
            try:
                shape = layer.build(shape)
            except ValueError as e:
                raise ValueError(f"layer {i} ({layer!r}): {e}") from None
            start, slots = offset, []
            for name, pshape in layer.param_shapes().items():
                spec = ParamSpec(f"{i}.{name}", offset, tuple(pshape))
                self.layout.append(spec)
                slots.append((name, offset, offset + spec.size, spec.shape))
                offset += spec.size
            self.layer_ranges.append((start, offset))
            self._slots.append(slots)
        self.output_shape = shape
        self.size = offset
        self.n_inputs = math.prod(self.input_shape)
        self.n_outputs = math.prod(self.output_shape)
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _scratch(self) -> list[Scratch]:
        """This thread's work buffers, one ``Scratch`` per layer, reused by every call.

        Per thread because Dask runs tasks in threads that may share one model object; the
        buffers (about the size of one step's temporaries) live as long as the model and thread.
        """
        scratch = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = [Scratch() for _ in self.layers]
        return scratch

    # -- parameters -------------------------------------------------------------------------

    def init(self, seed: int = 0) -> np.ndarray:
        """Fresh float32 parameters, a pure function of ``seed``: ``init_range`` of them all."""
        return self.init_range(seed, 0, self.size)

    def init_range(self, seed: int, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` of ``init(seed)``, made without the rest of the vector: each
        parameter shard of a model no process holds whole makes its own slice.

        Run j of ``INIT_CHUNK`` weights of layer i comes from its own random stream,
        ``SeedSequence(seed, spawn_key=(i, j))`` (run 0 from the layer's, ``spawn_key=(i,)``),
        so a range draws at most one run's worth beyond its ends; layers appended to a model
        leave the earlier layers' values unchanged.
        """
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"range [{start}, {stop}) is not within the model's {self.size} "
                             "parameters")
        out = np.empty(stop - start, dtype=np.float32)
        for i, (layer, slots) in enumerate(zip(self.layers, self._slots)):
            for name, a, b, _ in slots:
                lo, hi = max(a, start) - a, min(b, stop) - a  # within this parameter
                for first in range(lo - lo % INIT_CHUNK, hi if lo < hi else 0, INIT_CHUNK):
                    run = np.empty(min(first + INIT_CHUNK, hi) - first, dtype=np.float32)
                    layer.draw(name, _stream(seed, i, first // INIT_CHUNK), run)
                    skip = max(lo - first, 0)
                    out[a + first + skip - start:a + first + len(run) - start] = run[skip:]
        return out

    def views(self, params) -> list[dict]:
        """Per layer, a dict name -> view into ``params`` (writes go into the vector)."""
        return [{name: params[a:b].reshape(shape) for name, a, b, shape in slots}
                for slots in self._slots]

    def decay_mask(self) -> np.ndarray:
        """float32 vector: 1 where L2 decay applies (weights), 0 elsewhere (biases)."""
        mask = np.zeros(self.size, dtype=np.float32)
        for view, layer in zip(self.views(mask), self.layers):
            for name in layer.decayed:
                view[name][...] = 1
        return mask

    # -- training and inference -------------------------------------------------------------

    def loss_and_grad(self, params, X, y, *, reduction: str = "mean", regularize: bool = True,
                      validate: bool = True, out=None):
        """(loss as a float, gradient vector) of the objective at ``params`` on the batch (X, y).

        ``reduction``: "mean" or "sum" over examples; ``regularize`` adds the L2 term (as is,
        whatever the reduction). ``validate=False`` skips the one data-dependent check (label
        range), for trainers that validated their first batch. ``out``: a vector like ``params``
        to write the gradient into instead of allocating one.
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        xp = self._check_params(params)
        X = self._inputs(xp, params, X)
        n = len(X)
        y = self._loss.check_targets(xp.asarray(y), n, self.n_outputs, params.dtype, validate)
        if out is None:
            out = xp.empty_like(params)
        elif out.shape != params.shape or out.dtype != params.dtype:
            raise ValueError(f"out must have the shape {params.shape} and dtype {params.dtype} of "
                             f"params, got {out.shape} {out.dtype}")
        pviews, gviews, scratch = self.views(params), self.views(out), self._scratch()
        h, caches = X, []
        for layer, p, s in zip(self.layers, pviews, scratch):
            h, cache = layer.forward(p, h, scratch=s)
            caches.append(cache)
        scale = 1.0 / n if reduction == "mean" else 1.0
        total, d = self._loss.loss_and_grad(xp, h.reshape(n, self.n_outputs), y, scale)
        d = d.reshape(h.shape)
        for i in reversed(range(len(self.layers))):
            d = self.layers[i].backward(pviews[i], caches[i], d, gviews[i], input_grad=i > 0,
                                        scratch=scratch[i])
        loss = total * scale
        if regularize and self.l2:
            for layer, p, g in zip(self.layers, pviews, gviews):
                for name in layer.decayed:
                    loss += 0.5 * self.l2 * float(xp.vdot(p[name], p[name]))
                    axpy(self.l2, p[name], g[name])
        return loss, out

    def predict(self, params, X, *, batch_size: int = 256):
        """Outputs ``(n, n_outputs)``: class probabilities (softmax cross-entropy) or raw (mse).

        Computed ``batch_size`` rows at a time, so the temporaries (a locally connected layer's
        patch matrix grows with kh*kw) stay bounded whatever the size of X.
        """
        xp = self._check_params(params)
        X = self._inputs(xp, params, X)
        views, scratch = self.views(params), self._scratch()
        out = xp.empty((len(X), self.n_outputs), dtype=params.dtype)
        for start in range(0, len(X), batch_size):
            h = X[start:start + batch_size]
            for layer, p, s in zip(self.layers, views, scratch):
                h, _ = layer.forward(p, h, scratch=s)
            out[start:start + len(h)] = self._loss.predict(xp, h.reshape(len(h), self.n_outputs))
        return out

    # -- checks -------------------------------------------------------------------------------

    def _fits(self, feature_shape: tuple[int, ...]) -> bool:
        """Examples of this shape can feed the model: the same shape, or the same size where one
        side is flat (reshaping is unambiguous only then)."""
        return feature_shape == self.input_shape or (
            math.prod(feature_shape) == self.n_inputs
            and (len(feature_shape) == 1 or len(self.input_shape) == 1))

    def check_data(self, feature_shape, n_classes: int | None = None) -> None:
        """ValueError naming the mismatch when a data set cannot train this model.

        ``n_classes``: classes (softmax cross-entropy) or targets per example (mse); None skips it.
        """
        feature_shape = _shape(feature_shape)
        if not self._fits(feature_shape):
            raise ValueError(f"input size does not fit: the data has examples of shape "
                             f"{feature_shape} ({math.prod(feature_shape)} values) but the model "
                             f"takes {self.input_shape} ({self.n_inputs} values)")
        if n_classes is not None:
            self._loss.check_outputs(self.n_outputs, int(n_classes))

    def _check_params(self, params):
        xp = namespace(params)
        if getattr(params, "shape", None) != (self.size,) or params.dtype.kind != "f":
            raise ValueError(f"params must be a flat float vector of length {self.size}, got "
                             f"{type(params).__name__} of shape {getattr(params, 'shape', None)} "
                             f"dtype {getattr(params, 'dtype', None)}")
        return xp

    def _inputs(self, xp, params, X):
        """X as ``(n, *input_shape)`` in the parameters' dtype (a view when it already is)."""
        X = xp.asarray(X)
        if X.ndim < 2 or not self._fits(tuple(X.shape[1:])):
            raise ValueError(f"X must have shape (n, {', '.join(map(str, self.input_shape))}) or "
                             f"(n, {self.n_inputs}), got {tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError("X is empty: a batch needs at least one example")
        if X.dtype.kind not in "fiu":
            raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
        return X.astype(params.dtype, copy=False).reshape(len(X), *self.input_shape)

    # -- description ------------------------------------------------------------------------

    def flops_per_example(self) -> int:
        """Floating-point operations of one training example: the forward pass, the weight
        gradients, and the input gradients of every layer but the first (never computed);
        about 3x the forward pass."""
        forward = [layer.flops_per_example() for layer in self.layers]
        return 3 * sum(forward) - forward[0]

    def to_dict(self) -> dict:
        return {"input_shape": list(self.input_shape), "layers": [layer.to_dict() for layer in self.layers],
                "loss": self.loss, "l2": self.l2}

    @classmethod
    def from_dict(cls, d: Mapping) -> Sequential:
        """A model from ``to_dict`` output or a hand-written config (format: module docstring)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a model description must be a dict, got {type(d).__name__}")
        unknown = set(d) - {"input_shape", "layers", "loss", "l2"}
        if unknown:
            raise ValueError(f"unknown model description keys {sorted(unknown)}: expected "
                             "input_shape, layers, loss, l2")
        missing = {"input_shape", "layers"} - set(d)
        if missing:
            raise ValueError(f"model description lacks {sorted(missing)}")
        return cls(d["input_shape"], d["layers"], loss=d.get("loss", "softmax_cross_entropy"),
                   l2=d.get("l2", 0.0))

    def describe(self) -> str:
        """Per-layer summary: output shape, parameter count and forward FLOPs per example."""
        width = max(len(repr(layer)) for layer in self.layers)
        rows = [f"Sequential(input_shape={self.input_shape}, loss={self.loss!r}, l2={self.l2:g})",
                f"  {'#':>2}  {'layer':<{width}}  {'output shape':<16} {'params':>12} {'fwd flops':>12}"]
        for i, (layer, (a, b)) in enumerate(zip(self.layers, self.layer_ranges)):
            rows.append(f"  {i:>2}  {layer!r:<{width}}  {str(layer.output_shape):<16} {b - a:>12,} "
                        f"{layer.flops_per_example():>12,}")
        rows.append(f"  total params {self.size:,}; training flops/example {self.flops_per_example():,}")
        return "\n".join(rows)

    __repr__ = describe


def _shape(value) -> tuple[int, ...]:
    try:
        shape = (value,) if isinstance(value, Integral) else tuple(value)
    except TypeError:
        shape = ()
    if not shape or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in shape):
        raise ValueError(f"a shape must be a non-empty sequence of positive ints, got {value!r}")
    return tuple(int(s) for s in shape)


def model_difference(saved: dict, current: dict, names=("checkpoint", "model")) -> str | None:
    """A sentence naming how two model descriptions differ, or None when they are the same;
    ``names`` say what the two sides are."""
    if saved == current:
        return None
    a_name, b_name = names
    for key in sorted(set(saved) | set(current)):
        if saved.get(key) != current.get(key):
            if key == "layers" and isinstance(saved.get(key), list) and isinstance(current.get(key), list):
                if len(saved[key]) != len(current[key]):
                    return f"the {a_name} has {len(saved[key])} layers, the {b_name} {len(current[key])}"
                for i, (a, b) in enumerate(zip(saved[key], current[key])):
                    if a != b:
                        return f"layer {i} differs: {a_name} {json.dumps(a)} vs {b_name} {json.dumps(b)}"
            return f"{key} differs: {a_name} {saved.get(key)!r} vs {b_name} {current.get(key)!r}"
    return "the descriptions differ"
