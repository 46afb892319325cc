"""What the generated recipes share: sizing the splits, generating rows block by block, and
writing both splits with a record of how they were made."""
from __future__ import annotations

import numpy as np

from daskbelief.data import write_dataset


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


def write_generated(path: str, recipe: str, make, *, n_train: int, n_test: int, seed: int,
                    stream: int, block_rows: int, n_classes: int, chunk_rows: int | None,
                    overwrite: bool, options: dict, attrs: dict | None = None) -> str:
    """Write ``n_train`` / ``n_test`` rows from ``make(rng, rows)`` (``seeded_blocks``: the two
    splits draw from distinct generators of the recipe's ``stream``), recording the recipe, its
    size, seed and ``options`` in the store's attributes so it can be rebuilt."""
    record = {"recipe": recipe,
              "recipe_options": {"size": n_train + n_test, "seed": seed, **options}}
    return write_dataset(path, seeded_blocks(n_train, block_rows, seed, stream, 0, make),
                         seeded_blocks(n_test, block_rows, seed, stream, 1, make),
                         chunk_rows=chunk_rows, n_classes=n_classes, overwrite=overwrite,
                         attrs={**record, **(attrs or {})})
