"""Dataset recipes: each builds a zarr dataset store from nothing downloaded.

Installed as the package ``daskbelief_datasets`` (never ``datasets``, which would shadow Hugging
Face's). ``build(name, path, size=..., seed=..., chunk_rows=..., **options)`` writes the store and
returns its path; ``daskbelief datasets build NAME --out PATH [--size N]`` does the same.

* ``digits``: scikit-learn's bundled 8x8 digits (1,797 examples, 64 features, 10 classes),
  stratified train/test split.
* ``speech-frames``: a stand-in for the paper's acoustic task: 11 frames x 40 features -> K
  classes (option ``classes``), labels from a fixed random teacher network; any number of rows,
  written block by block in bounded memory.
* ``images``: synthetic colour images with local structure (class-specific blobs at
  class-specific places, jittered, plus a distractor and noise), for locally connected models;
  option ``side`` (default 32).
"""
from __future__ import annotations

from daskbelief_datasets import digits, images, speech_frames

RECIPES = {"digits": digits.build, "speech-frames": speech_frames.build, "images": images.build}


def build(name: str, path, *, size: int | None = None, seed: int = 0, chunk_rows: int | None = None,
          overwrite: bool = False, **options) -> str:
    """Build the dataset ``name`` at ``path``; unknown names and options are errors naming them."""
    if name not in RECIPES:
        raise ValueError(f"unknown dataset recipe {name!r}: expected one of {', '.join(sorted(RECIPES))}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be a positive integer, got {size!r}")
    try:
        return RECIPES[name](str(path), size=size, seed=seed, chunk_rows=chunk_rows,
                             overwrite=overwrite, **options)
    except TypeError as e:
        raise ValueError(f"bad options for the {name!r} recipe: {e}") from None
