"""Speech-like frames: a window of 11 frames x 40 filter-bank features -> one of K states.

The paper's acoustic model maps 11 frames of 40 log-energies to 8,192 HMM states. Here the
features are smooth along time (an AR(1) process over the 11 frames, mixed across the 40 bands)
and the label is the arg-max of a fixed random teacher network, so a student network of the
paper's shape can learn the task. Rows are generated and written one block at a time, each
block from its own seed, so any size fits in bounded memory and the result does not depend on
the block size of the writer.
"""
from __future__ import annotations

import numpy as np

from daskbelief_datasets.common import split_sizes, write_generated

FRAMES, BANDS = 11, 40
FEATURES = FRAMES * BANDS
BLOCK = 16384
HIDDEN = 256


class Teacher:
    """A fixed random 440-256-K tanh network; its arg-max is the label."""

    def __init__(self, classes: int, seed: int):
        rng = np.random.default_rng([seed, 1])
        self.mix = (rng.standard_normal((BANDS, BANDS)) / np.sqrt(BANDS)).astype(np.float32)
        self.W1 = (rng.standard_normal((FEATURES, HIDDEN)) * 2.0 / np.sqrt(FEATURES)).astype(np.float32)
        self.W2 = (rng.standard_normal((HIDDEN, classes)) * 3.0 / np.sqrt(HIDDEN)).astype(np.float32)

    def features(self, rng, n: int) -> np.ndarray:
        z = rng.standard_normal((n, FRAMES, BANDS), dtype=np.float32)
        for t in range(1, FRAMES):  # along the 11 frames only: smooth in time
            z[:, t] = 0.8 * z[:, t - 1] + 0.6 * z[:, t]
        return (z @ self.mix).reshape(n, FEATURES)

    def labels(self, X) -> np.ndarray:
        return np.argmax(np.tanh(X @ self.W1) @ self.W2, axis=1).astype(np.int32)

    def example_block(self, rng, rows: int):
        """``rows`` labelled examples drawn from ``rng``."""
        X = self.features(rng, rows)
        return X, self.labels(X)


def build(path: str, *, size: int | None, seed: int, chunk_rows: int | None, overwrite: bool,
          classes: int = 64, test_fraction: float = 0.1) -> str:
    """``size`` rows in all (default 20,000), ``test_fraction`` of them in the test split."""
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got {classes!r}")
    n_train, n_test = split_sizes(size, 20_000, test_fraction)
    teacher = Teacher(classes, seed)
    return write_generated(path, "speech-frames", teacher.example_block, n_train=n_train,
                           n_test=n_test, seed=seed, stream=2, block_rows=BLOCK,
                           n_classes=classes, chunk_rows=chunk_rows, overwrite=overwrite,
                           options={"classes": classes}, attrs={"frames": FRAMES, "bands": BANDS})
