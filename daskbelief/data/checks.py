"""Checks on features and labels before they are written: every message names the problem.

A store is only as good as what went in, so bad data is refused at the door: mismatched lengths,
an unsupported dtype or rank, labels outside the class range, NaN or infinite features, nothing at
all. The checks run on one block at a time, so an out-of-core writer applies them as it goes.
"""
from __future__ import annotations

import numpy as np


def check_features(X, what: str) -> None:
    """``X`` is ``(n, *feature_shape)`` of real floats or uint8 with n >= 1 (no value check)."""
    dtype = np.dtype(X.dtype)
    if X.ndim < 2:
        raise ValueError(f"{what}: X must have shape (n_examples, *feature_shape) with at least 2 "
                         f"dimensions, got shape {tuple(X.shape)}")
    if dtype.kind != "f" and dtype != np.uint8:
        raise ValueError(f"{what}: X must be floating point (stored as float32) or uint8, got "
                         f"dtype {dtype}")
    if X.shape[0] == 0:
        raise ValueError(f"{what}: X is empty (0 examples)")
    if min(X.shape[1:]) < 1:
        raise ValueError(f"{what}: X has an empty feature axis, shape {tuple(X.shape)}")


def check_targets(y, n: int, what: str) -> str:
    """``y`` matches ``n`` examples; returns the task: "classification" (int labels) or
    "regression" (float targets, ``(n,)`` or ``(n, k)``)."""
    dtype = np.dtype(y.dtype)
    if y.shape[:1] != (n,):
        raise ValueError(f"{what}: X has {n} examples but y has {y.shape[0] if y.ndim else 0} "
                         f"(shape {tuple(y.shape)}): they must have the same length")
    if dtype.kind in "iu":
        if y.ndim != 1:
            raise ValueError(f"{what}: integer class labels must be 1-D, got shape {tuple(y.shape)}")
        return "classification"
    if dtype.kind == "f":
        if y.ndim > 2:
            raise ValueError(f"{what}: float targets must be (n,) or (n, k), got shape {tuple(y.shape)}")
        return "regression"
    raise ValueError(f"{what}: y must hold integer class labels or float targets, got dtype {dtype}")


def check_finite(values, what: str, name: str = "X") -> None:
    """No NaN or infinity in a float block (uint8 is always finite)."""
    if np.dtype(values.dtype).kind == "f" and not np.isfinite(values).all():
        bad = int(np.size(values) - np.count_nonzero(np.isfinite(values)))
        raise ValueError(f"{what}: {name} contains {bad} NaN or infinite value(s); clean the data "
                         "before writing it")


def check_label_range(lo: int, hi: int, n_classes: int, what: str) -> None:
    """Labels lie in ``[0, n_classes)``."""
    if lo < 0 or hi >= n_classes:
        raise ValueError(f"{what}: labels must lie in [0, {n_classes}) for {n_classes} classes, "
                         f"got values in [{lo}, {hi}]")


def check_block(X, y, what: str, n_classes: int | None) -> str:
    """All checks on one (X, y) block of numpy arrays; returns its task."""
    check_features(X, what)
    task = check_targets(y, X.shape[0], what)
    check_finite(X, what)
    if task == "regression":
        check_finite(y, what, "y")
    elif n_classes is not None:
        check_label_range(int(y.min()), int(y.max()), n_classes, what)
    return task
