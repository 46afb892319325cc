"""The batch objective of L-BFGS, cut into portions: shared by the reference and Sandblaster
(its elementwise finish, ``optim.vectors.finish_gradient``, is run by the parameter shards too).

The objective over a batch of N rows is ``f(x) = (1/N) sum_p L_p(x) + 0.5 * l2 * x' M x`` where
``L_p`` is the summed, unregularised loss of portion p and M masks the weights (not biases). Each
portion's gradient is computed in float32 and added into a float64 accumulator; the result is
finished elementwise (``finish_gradient``), so a shard finishing its slice does exactly what the
reference does to the same elements. The only difference left between the two is the order in
which float64 partial sums are added: a relative 1e-16 effect, far below the 1e-5 tolerance the
tests use.
"""
from __future__ import annotations

import numpy as np

from daskbelief.checks import check_integer


def portions(n_rows: int, portion_size: int) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` row ranges of at most ``portion_size`` covering ``n_rows``."""
    check_integer("portion_size", portion_size, 1)
    if portion_size > n_rows:
        raise ValueError(f"portion_size={portion_size} is larger than the batch ({n_rows} rows): "
                         "a portion is a small part of a batch")
    return [(a, min(a + portion_size, n_rows)) for a in range(0, n_rows, portion_size)]


def portion_gradient(model, params, X, y) -> tuple[float, np.ndarray]:
    """Summed unregularised loss and gradient of one portion (float32, like training)."""
    return model.loss_and_grad(params, X, y, reduction="sum", regularize=False)
