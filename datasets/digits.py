"""scikit-learn's bundled 8x8 handwritten digits, split into train and test by class."""
from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from daskbelief.data import write_dataset

TOTAL = 1797


def build(path: str, *, size: int | None, seed: int, chunk_rows: int | None, overwrite: bool,
          test_fraction: float = 0.2) -> str:
    """``size`` examples (default: all 1,797) as uint8 pixel values 0..16, 64 features; 20% test,
    stratified. Chunks of 64 rows by default, so even this small set splits into 20+ data shards."""
    X, y = load_digits(return_X_y=True)
    if size is not None and not 20 <= size <= TOTAL:
        raise ValueError(f"digits has {TOTAL} examples: size must lie in [20, {TOTAL}], got {size}")
    if size is not None and size < TOTAL:
        X, _, y, _ = train_test_split(X, y, train_size=size, stratify=y, random_state=seed)
    Xtr, Xte, ytr, yte = train_test_split(X.astype(np.uint8), y.astype(np.int32),
                                          test_size=test_fraction, stratify=y, random_state=seed)
    return write_dataset(path, (Xtr, ytr), (Xte, yte), chunk_rows=chunk_rows or 64, n_classes=10,
                         overwrite=overwrite,
                         attrs={"recipe": "digits", "recipe_options": {"size": len(X), "seed": seed}})
