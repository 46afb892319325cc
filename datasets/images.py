"""Synthetic colour images with local structure, for locally connected models.

Each class is three Gaussian blobs at class-specific places; an example jitters them by up to
an eighth of the side (4 pixels at 32), gives every blob a random colour (so only the spatial arrangement tells the classes
apart), adds two distractor blobs at random places and pixel noise. What tells the
classes apart is local and position dependent: the setting untied (locally connected) filters are
made for, and one that partitions well by image region.
"""
from __future__ import annotations

import numpy as np

from daskbelief_datasets.common import split_sizes, write_generated

CLASSES, BLOBS, DISTRACTORS, CHANNELS = 10, 3, 2, 3
BLOCK = 4096


class Prototypes:
    """Blob centres and widths per class (fixed by the seed)."""

    def __init__(self, side: int, seed: int):
        rng = np.random.default_rng([seed, 3])
        self.side = side
        self.centres = rng.uniform(0.15 * side, 0.85 * side, (CLASSES, BLOBS, 2))
        self.widths = rng.uniform(0.06 * side, 0.12 * side, (CLASSES, BLOBS))

    def render(self, rng, labels: np.ndarray) -> np.ndarray:
        n, side = len(labels), self.side
        jitter = rng.uniform(-side / 8, side / 8, (n, 1, 2))
        centres = np.concatenate([self.centres[labels] + jitter,
                                  rng.uniform(0, side, (n, DISTRACTORS, 2))], axis=1)
        widths = np.concatenate([self.widths[labels],
                                 rng.uniform(0.06, 0.12, (n, DISTRACTORS)) * side], axis=1)
        colours = rng.uniform(0.3, 1.0, (n, BLOBS + DISTRACTORS, CHANNELS))
        grid = np.arange(side, dtype=np.float64)
        gy = np.exp(-((grid - centres[..., :1]) ** 2) / (2 * widths[..., None] ** 2))
        gx = np.exp(-((grid - centres[..., 1:]) ** 2) / (2 * widths[..., None] ** 2))
        img = np.einsum("nbh,nbw,nbc->nhwc", gy, gx, colours)
        img += rng.normal(0.0, 0.25, img.shape)
        return np.clip(img * 200, 0, 255).astype(np.uint8)

    def example_block(self, rng, rows: int):
        """``rows`` labelled examples drawn from ``rng``."""
        y = rng.integers(0, CLASSES, rows).astype(np.int32)
        return self.render(rng, y), y


def build(path: str, *, size: int | None, seed: int, chunk_rows: int | None, overwrite: bool,
          side: int = 32, test_fraction: float = 0.2) -> str:
    """``size`` images in all (default 10,000) of ``side`` x ``side`` x 3 uint8 pixels."""
    if isinstance(side, bool) or not isinstance(side, int) or side < 8:
        raise ValueError(f"side must be an integer >= 8 (pixels), got {side!r}")
    n_train, n_test = split_sizes(size, 10_000, test_fraction)
    protos = Prototypes(side, seed)
    return write_generated(path, "images", protos.example_block, n_train=n_train, n_test=n_test,
                           seed=seed, stream=4, block_rows=BLOCK, n_classes=CLASSES,
                           chunk_rows=chunk_rows, overwrite=overwrite, options={"side": side})
