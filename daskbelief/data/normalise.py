"""The standardisation a store applies on read, as a value that travels with a trained model.

A store keeps its raw features and the train split's per-feature mean and std; readers
standardise with them, so a model learns on standardised features. A ``Normaliser`` is that
transformation on its own: the training run hands it to its result, run directory and
checkpoints, so that predictions on the raw features a user wrote get the same transformation
(and one store's model applied to another store uses the statistics it was trained with).
"""
from __future__ import annotations

import numpy as np


class Normaliser:
    """``(X - mean) / std`` per flattened feature, in float32; the identity when ``mean`` is None
    (a store written with ``normalize=False``). A constant feature (std 0) is only centred."""

    def __init__(self, mean=None, std=None):
        if (mean is None) != (std is None):
            raise ValueError("a normaliser needs both mean and std, or neither")
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float32)
        self.std = None if std is None else np.asarray(std, dtype=np.float32)
        if self.mean is not None and self.mean.shape != self.std.shape:
            raise ValueError(f"normaliser mean and std differ in length: {self.mean.shape} vs "
                             f"{self.std.shape}")
        self.inv_std = (None if self.std is None else
                        np.where(self.std > 0, 1.0 / np.where(self.std > 0, self.std, 1.0), 1.0)
                        .astype(np.float32))

    def __call__(self, X, *, in_place: bool = False, dtype=np.float32) -> np.ndarray:
        """Raw features ``(n, *feature_shape)`` or ``(n, n_features)`` standardised, as ``dtype``
        (float32 for training; float64 where a prediction must not depend on its batch): a new
        array, or with ``in_place`` (for rows just read) ``X`` itself when it is a writeable
        array of that dtype."""
        X = np.asarray(X)
        out = X.astype(dtype, copy=not (in_place and X.dtype == dtype and X.flags.writeable))
        if self.mean is not None:
            flat = out.reshape(len(out), -1)
            if flat.shape[1] != len(self.mean):
                raise ValueError(f"features of shape {tuple(X.shape[1:])} ({flat.shape[1]} values "
                                 f"per example) do not match the normaliser's {len(self.mean)}")
            flat -= self.mean
            flat *= self.inv_std
        return out

    def __repr__(self) -> str:
        return ("Normaliser(identity)" if self.mean is None
                else f"Normaliser({len(self.mean)} features)")

    def to_dict(self) -> dict:
        """JSON-able: ``{"mean": [...], "std": [...]}`` (None for the identity)."""
        return {"mean": None if self.mean is None else self.mean.tolist(),
                "std": None if self.std is None else self.std.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "Normaliser":
        return cls(d.get("mean"), d.get("std"))
