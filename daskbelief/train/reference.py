"""Single-process reference trainers: the oracles and baselines for the distributed algorithms.

``train_sgd`` reads exactly the minibatches a lone Downpour replica reads (``store.row_ranges(1)[0]``,
epochs 0, 1, ... in order) and applies the same update rule code a parameter shard applies, so
Downpour with one replica and ``n_fetch = n_push = 1`` without overlap must reproduce it.
``train_lbfgs`` runs the same L-BFGS code Sandblaster runs, over ``LocalVectors``, with the batch
objective summed portion by portion as Sandblaster's workers do. No Dask anywhere here.
"""
from __future__ import annotations

import time
from itertools import islice

import numpy as np

from daskbelief.data import open_store
from daskbelief.optim.lbfgs import lbfgs
from daskbelief.optim.rules import make_rule
from daskbelief.optim.vectors import LocalVectors, finish_gradient
from daskbelief.train.objective import portion_gradient, portions
from daskbelief.train.run import initial_params


def schedule(store, batch_size: int, seed: int, steps: int | None = None, epochs: int | None = None):
    """The minibatches of one replica owning the whole split: ``steps`` of them, or ``epochs``."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs=")
    rows = store.row_ranges(1)[0]
    total = steps if steps is not None else epochs * store.steps_per_epoch(rows, batch_size)
    return islice(store.stream(rows, batch_size, seed=seed), total)


def train_sgd(model, data, rule="adagrad", *, batch_size: int = 32, steps: int | None = None,
              epochs: int | None = None, seed: int = 0, params=None, report_every: int = 20,
              callback=None):
    """Minibatch training with an update rule (SGD, momentum, Adagrad); returns
    ``(params, history)`` where history rows are ``{time, step, loss}`` every ``report_every``
    steps (loss averaged over them). ``callback(row, params)`` is called with each row (e.g. to
    evaluate a test set); the time it takes is left out of the rows' training ``time``, and a
    true return value stops training there."""
    store = open_store(data, split="train")
    model.check_data(store.feature_shape, store.n_classes)
    rule = make_rule(rule)
    params = initial_params(model, params, seed)
    state = rule.init(params)
    grad = np.empty_like(params)
    history, losses, start = [], [], time.perf_counter()
    for step, (X, y) in enumerate(schedule(store, batch_size, seed, steps, epochs), 1):
        loss, _ = model.loss_and_grad(params, X, y, out=grad, validate=step == 1)
        rule.apply(params, grad, state)
        losses.append(loss)
        if step % report_every == 0:
            history.append({"time": time.perf_counter() - start, "step": step,
                            "loss": float(np.mean(losses))})
            losses = []
            if callback is not None:
                paused = time.perf_counter()
                stop = callback(history[-1], params)
                start += time.perf_counter() - paused
                if stop:
                    break
    return params, history


class LocalBatchObjective:
    """The batch objective over ``LocalVectors``: portions evaluated in order in this process.

    The batch's rows are read once and kept (a reference holds its data, as a Sandblaster worker
    caches its portions).
    """

    def __init__(self, model, store, space: LocalVectors, n_rows: int, portion_size: int):
        self.model, self.space = model, space
        self.ranges = portions(n_rows, portion_size)
        self.n = n_rows
        self.X, self.y = store.read(0, n_rows)
        self.mask = model.decay_mask()
        self.acc = np.empty(model.size, dtype=np.float64)

    def __call__(self, x_name: str, g_name: str) -> float:
        x = self.space.get(x_name)
        self.acc.fill(0.0)
        total = 0.0
        for a, b in self.ranges:
            loss, grad = portion_gradient(self.model, x, self.X[a:b], self.y[a:b])
            self.acc += grad
            total += loss
        reg = finish_gradient(self.acc, x, self.mask, self.n, self.model.l2, self.space.buffer(g_name))
        return total / self.n + reg


def train_lbfgs(model, data, *, iterations: int = 100, history: int = 10,
                portion_size: int | None = None, batch_rows: int | None = None, seed: int = 0,
                params=None, gtol: float = 1e-5, ftol: float = 0.0, callback=None):
    """Full-batch L-BFGS on the first ``batch_rows`` rows of the train split (default: all);
    returns ``(params, LbfgsResult)``. ``portion_size`` only sets the summation order (default:
    the whole batch in one portion)."""
    store = open_store(data, split="train")
    model.check_data(store.feature_shape, store.n_classes)
    n_rows = store.n if batch_rows is None else batch_rows
    if not 1 <= n_rows <= store.n:
        raise ValueError(f"batch_rows must lie in [1, {store.n}], got {batch_rows!r}")
    space = LocalVectors(model.size, np.float32)
    space.set("x", initial_params(model, params, seed))
    objective = LocalBatchObjective(model, store, space, n_rows, portion_size or n_rows)
    result = lbfgs(space, objective, "x", m=history, max_iter=iterations, gtol=gtol, ftol=ftol,
                   callback=callback)
    return space.get("x").copy(), result
