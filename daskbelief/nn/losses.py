"""Losses over a batch of network outputs ``(n, n_outputs)``.

* ``softmax_cross_entropy``: int labels in ``[0, n_outputs)``; per-example loss
  ``-log softmax(out)[label]``; ``predict`` gives class probabilities.
* ``mse``: float targets ``(n, n_outputs)`` (or ``(n,)`` for one output); per-example loss
  ``0.5 * ||out - target||^2`` so that its gradient is plainly ``out - target``;
  ``predict`` gives the raw outputs.

A loss returns the *sum* of the per-example losses and the gradient of ``scale * sum``: the model
picks ``scale = 1/n`` for a mean and 1 for a sum, so the scaling costs no extra pass.
"""
from __future__ import annotations


def flush_subnormal(xp, p) -> None:
    """Set the entries of ``p`` (all >= 0) below ``tiny / eps`` to exactly zero, in place.

    A softmax over many classes gives most of them probabilities that underflow to subnormal
    floats once training sharpens it. On Intel CPUs every arithmetic operation on a subnormal
    takes a slow microcode path: on a Xeon, a 256x1024x1024 float32 matmul ran 200x slower on
    subnormal input, and the backward pass of a 2048-class MLP several times slower. Entries
    this small lie far below the float precision of the O(scale) entries of the same gradient.
    """
    info = xp.finfo(p.dtype)
    p[p < info.tiny / info.eps] = 0


class SoftmaxCrossEntropy:
    """Softmax followed by the negative log-likelihood of integer class labels."""

    name = "softmax_cross_entropy"

    def check_targets(self, y, n: int, n_outputs: int, dtype, validate: bool):
        """``y`` as a 1-D int array of length n; ``validate`` adds one pass for the label range."""
        if y.ndim != 1 or len(y) != n:
            raise ValueError(f"labels must have shape ({n},) to match X, got {tuple(y.shape)}")
        if y.dtype.kind not in "iu":
            raise ValueError(f"labels must be integer class ids, got dtype {y.dtype}")
        if validate:
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= n_outputs:
                raise ValueError(f"labels must lie in [0, {n_outputs}) (the model has {n_outputs} "
                                 f"outputs), got values in [{lo}, {hi}]")
        return y

    def check_outputs(self, n_outputs: int, n_classes: int) -> None:
        if n_classes != n_outputs:
            raise ValueError(f"class count mismatch: the data has {n_classes} classes but the model "
                             f"has {n_outputs} outputs")

    def loss_and_grad(self, xp, out, y, scale: float):
        """(summed loss, gradient of scale * summed loss w.r.t. out); ``out`` is left unchanged."""
        rows = xp.arange(len(y))
        z = out - out.max(axis=1, keepdims=True)  # stable: exp never overflows
        picked = z[rows, y]
        xp.exp(z, out=z)
        total = z.sum(axis=1)
        loss = float((xp.log(total) - picked).sum())
        z *= (scale / total)[:, None]
        flush_subnormal(xp, z)
        z[rows, y] -= scale
        return loss, z

    def predict(self, xp, out):
        z = out - out.max(axis=1, keepdims=True)
        xp.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z


class MeanSquaredError:
    """Half the squared error norm per example, averaged (or summed) over examples."""

    name = "mse"

    def check_targets(self, y, n: int, n_outputs: int, dtype, validate: bool):
        """``y`` as float targets of shape (n, n_outputs), cast to the outputs' ``dtype``."""
        if y.dtype.kind not in "fiu":
            raise ValueError(f"targets must be real numbers, got dtype {y.dtype}")
        if y.ndim == 1 and n_outputs == 1:
            y = y.reshape(-1, 1)
        if y.shape != (n, n_outputs):
            raise ValueError(f"targets must have shape ({n}, {n_outputs}) to match X and the "
                             f"model outputs, got {tuple(y.shape)}")
        return y.astype(dtype, copy=False)

    def check_outputs(self, n_outputs: int, n_targets: int) -> None:
        if n_targets != n_outputs:
            raise ValueError(f"target count mismatch: the data has {n_targets} targets but the "
                             f"model has {n_outputs} outputs")

    def loss_and_grad(self, xp, out, y, scale: float):
        diff = out - y
        loss = 0.5 * float(xp.vdot(diff, diff))
        diff *= scale
        return loss, diff

    def predict(self, xp, out):
        return out


LOSSES = {"softmax_cross_entropy": SoftmaxCrossEntropy(), "mse": MeanSquaredError()}
_ALIASES = {"mean_squared_error": "mse", "cross_entropy": "softmax_cross_entropy"}


def get_loss(name: str):
    """The loss called ``name`` (aliases: mean_squared_error, cross_entropy)."""
    key = _ALIASES.get(name, name) if isinstance(name, str) else name
    try:
        return LOSSES[key]
    except (KeyError, TypeError):
        raise ValueError(f"unknown loss {name!r}: expected one of {sorted(LOSSES)}") from None

