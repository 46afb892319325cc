"""What the generated recipes share: sizing the splits and generating rows block by block."""
from __future__ import annotations

import numpy as np


def split_sizes(size: int | None, default: int, test_fraction: float) -> tuple[int, int]:
    """(train rows, test rows) of a recipe asked for ``size`` rows in all (``default`` if None)."""
    size = default if size is None else size
    n_test = max(1, int(size * test_fraction))
    if size - n_test < 1:
        raise ValueError(f"size={size} leaves no training rows")
    return size - n_test, n_test


def seeded_blocks(n: int, block_rows: int, seed: int, stream: int, split: int, make):
    """``make(rng, rows) -> (X, y)`` for consecutive blocks of ``n`` rows, block i drawing from
    its own generator ``(seed, stream, split, i)``: any size in bounded memory, the same rows
    however the writer chunks them."""
    for i, start in enumerate(range(0, n, block_rows)):
        yield make(np.random.default_rng([seed, stream, split, i]), min(block_rows, n - start))
