"""Shuffled minibatches over a data shard, the next window of chunks read in the background.

An epoch visits the shard's chunks in a random order, a *window* of chunks at a time; the rows of
a window are shuffled together, and minibatches are cut from the shuffled rows (a batch may span
two windows; the epoch's last batch may be smaller). Memory stays at about two windows however
large the shard, reads are whole chunks, and the order is a pure function of
(shard, chunk_rows, seed, epoch): any process reading the same store sees the same batches.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from itertools import count

import numpy as np

from daskbelief.checks import check_integer
from daskbelief.ranges import merge

WINDOW_ROWS = 16384  # rows shuffled together: a few MB of features, dozens of minibatches


def steps_per_epoch(shard: tuple[int, int], batch_size: int) -> int:
    """Minibatches in one epoch over ``shard`` (the last may be smaller)."""
    return math.ceil((shard[1] - shard[0]) / batch_size)


def window_order(shard: tuple[int, int], chunk_rows: int, seed: int, epoch: int,
                 window_chunks: int):
    """Yield each window of an epoch: its chunks as sorted ``(start, stop)`` row ranges and the
    permutation of its rows. Pure: no data is touched."""
    start, stop = shard
    chunks = [(a, min(a + chunk_rows, stop)) for a in range(start, stop, chunk_rows)]
    rng = np.random.default_rng([seed, epoch, start, stop])
    order = rng.permutation(len(chunks))
    for i in range(0, len(order), window_chunks):
        ranges = [chunks[j] for j in sorted(order[i:i + window_chunks])]
        yield ranges, rng.permutation(sum(b - a for a, b in ranges))


def read_window(store, ranges, perm) -> tuple[np.ndarray, np.ndarray]:
    """The window's rows, standardised, in shuffled order."""
    parts = [store.read_raw(slice(a, b)) for a, b in merge(ranges)]  # neighbours: one read
    X = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
    y = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
    return store.standardise(X)[perm], y[perm]


def _check(store, shard, batch_size, seed, epoch) -> None:
    for name, value, low in (("batch_size", batch_size, 1), ("seed", seed, 0), ("epoch", epoch, 0)):
        check_integer(name, value, low)
    start, stop = shard
    if not 0 <= start < stop <= store.n:
        raise ValueError(f"data shard [{start}, {stop}) is outside the {store.split} split "
                         f"({store.n} rows)")


def minibatches(store, shard: tuple[int, int], batch_size: int, seed: int = 0, epoch: int = 0,
                window_rows: int = WINDOW_ROWS, epochs: int | None = 1):
    """``(X, y)`` minibatches over ``shard`` of ``store`` (see the module docstring) for ``epochs``
    epochs from ``epoch`` (None: without end). One read runs ahead across epoch boundaries too,
    so a new epoch's first batch does not wait for its first window."""
    _check(store, shard, batch_size, seed, epoch)
    window_chunks = max(1, window_rows // store.chunk_rows)
    numbers = count(epoch) if epochs is None else range(epoch, epoch + epochs)
    windows = ((e, ranges, perm) for e in numbers
               for ranges, perm in window_order(shard, store.chunk_rows, seed, e, window_chunks))
    return _read_ahead(store, batch_size, windows)


def _read_ahead(store, batch_size, windows):
    """The minibatches of ``windows`` (``(epoch, ranges, perm)``), reading the next window while
    the current one is consumed; an epoch's rows left over (fewer than a batch) end it."""
    carry = None  # the epoch's rows left over from the previous window, fewer than a batch
    with ThreadPoolExecutor(1, thread_name_prefix="daskbelief-prefetch") as pool:
        following = next(windows, None)
        pending = None if following is None else pool.submit(read_window, store, *following[1:])
        while pending is not None:
            X, y = pending.result()
            epoch, following = following[0], next(windows, None)
            pending = None if following is None else pool.submit(read_window, store, *following[1:])
            carry = yield from _cut(carry, X, y, batch_size)
            if carry is not None and (following is None or following[0] != epoch):
                yield carry
                carry = None


def _cut(carry, X, y, batch_size):
    """Yield the full minibatches of ``carry`` (rows left from the window before) followed by
    ``(X, y)``; return the rows left over (None when none)."""
    at = 0
    if carry is not None:
        need = batch_size - len(carry[0])
        X0, y0 = np.concatenate([carry[0], X[:need]]), np.concatenate([carry[1], y[:need]])
        if len(X0) < batch_size:
            return X0, y0
        yield X0, y0
        at = need
    full = at + (len(X) - at) // batch_size * batch_size
    for i in range(at, full, batch_size):
        yield X[i:i + batch_size], y[i:i + batch_size]
    return (X[full:], y[full:]) if full < len(X) else None
