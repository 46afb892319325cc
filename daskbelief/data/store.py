"""Reading dataset stores: lazily, from a path or any fsspec URL, by data shard and minibatch.

A ``DataStore`` is one split of a store. It is cheap to pickle (the URL and the metadata, never the
data), so it travels to workers inside tasks, and every worker opens the arrays itself. A *data
shard* is a run of consecutive chunks; ``shards(k)`` cuts the split into k of them.
"""
from __future__ import annotations

import copy
import math
from functools import cached_property

import numpy as np
import zarr

from daskbelief.data.batches import minibatches, steps_per_epoch
from daskbelief.data.integrity import (EVERY_CHUNK, bad_label, check_arrays, damaged_chunk,
                                       label_error, open_arrays)
from daskbelief.data.normalise import Normaliser
from daskbelief.data.write import FORMAT, local_path
from daskbelief.ranges import split


def _open_group(url: str):
    try:
        return zarr.open_group(url, mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        raise FileNotFoundError(f"no dataset store at {url} (build one with `daskbelief datasets "
                                "build NAME --out PATH`)") from None


def _resolved(url) -> str:
    """Local paths made absolute: workers may run in another directory."""
    path = local_path(str(url))
    if path is not None and not str(url).startswith("file://"):
        return str(path.resolve())
    return str(url)


class DataStore:
    """One split (``train`` or ``test``) of a complete dataset store."""

    def __init__(self, url: str, split: str, attrs: dict):
        self.url, self.split = url, split
        self.task = attrs["task"]
        self.n_classes = int(attrs["n_classes"])
        self.feature_shape = tuple(attrs["feature_shape"])
        self.chunk_rows = int(attrs["chunk_rows"])
        self.n = int(attrs["splits"][split])
        self.n_chunks = math.ceil(self.n / self.chunk_rows)
        self.n_features = math.prod(self.feature_shape)
        self.normaliser = Normaliser(attrs.get("mean"), attrs.get("std"))
        self.strict = bool(attrs.get(EVERY_CHUNK))  # absent chunks are errors, not zeros
        self.attrs = {k: v for k, v in attrs.items() if k not in ("mean", "std")}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_arrays"}

    def __repr__(self) -> str:
        return (f"DataStore({self.url!r}, split={self.split!r}: {self.n:,} examples of "
                f"{self.feature_shape}, {self.task} with {self.n_classes} "
                f"{'classes' if self.task == 'classification' else 'targets'}, "
                f"{self.n_chunks} chunks of {self.chunk_rows} rows)")

    @cached_property
    def _arrays(self):
        """The split's ``(X, y)`` zarr arrays, checked against the store's metadata."""
        X, y = open_arrays(self.url, self.split, self.strict)
        check_arrays(self.url, self.split, X, y, n=self.n, feature_shape=self.feature_shape,
                     task=self.task, chunk_rows=self.chunk_rows, n_features=self.n_features,
                     mean=self.normaliser.mean)
        return X, y

    def check(self) -> None:
        """Open the arrays now, so that one disagreeing with the metadata is found before work
        starts rather than in the middle of a step."""
        self._arrays

    def with_normaliser(self, normaliser: Normaliser) -> "DataStore":
        """This split read with another standardisation (a model's, trained on another store)."""
        other = copy.copy(self)
        other.normaliser = normaliser
        return other

    # -- row ranges (a replica's data; "shards" are the parameter server's) -------------------
    def row_ranges(self, k: int) -> list[tuple[int, int]]:
        """``k`` row ranges (the paper's data shards): runs of whole chunks, as
        ``(start_row, stop_row)``, their chunk counts differing by at most one."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"the number of row ranges must be a positive integer, got {k!r}")
        if k > self.n_chunks:
            raise ValueError(f"cannot cut {self.url} ({self.split}: {self.n_chunks} chunks of "
                             f"{self.chunk_rows} rows) into {k} row ranges: a range is at least "
                             "one chunk; rewrite the store with smaller chunk_rows")
        return [(a * self.chunk_rows, min(b * self.chunk_rows, self.n))
                for a, b in split(self.n_chunks, k)]

    def chunk_ranges(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The chunks of rows ``[start, stop)`` (chunk-aligned) as ``(start_row, stop_row)``."""
        c = self.chunk_rows
        return [(a, min(a + c, stop)) for a in range(start, stop, c)]

    # -- reading ----------------------------------------------------------------------------
    def standardise(self, X) -> np.ndarray:
        """Raw stored rows, just read, as float32 features standardised (in place when they are
        float32 already) with the store's normaliser."""
        return self.normaliser(X, in_place=True)

    def read_raw(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """Stored values of ``rows`` (a slice or sorted row indices), as stored; a damaged or
        missing chunk, or a label outside the class range, is a ``DataError`` naming it."""
        X, y = self._arrays
        at = range(self.n)[rows] if isinstance(rows, slice) else np.asarray(rows)
        try:
            if isinstance(rows, slice):
                Xr, yr = X[rows], y[rows]
            else:
                Xr, yr = X.get_orthogonal_selection((rows,)), y.get_orthogonal_selection((rows,))
        except Exception as e:
            span = range(int(at[0]), int(at[-1]) + 1) if len(at) else range(0)
            raise (damaged_chunk(self.url, self.split, {"X": X, "y": y}, span, self.chunk_rows,
                                 self.n) or e) from None
        if self.task == "classification":
            bad = bad_label(yr, self.n_classes)
            if bad is not None:
                raise label_error(self.url, self.split, int(at[bad]), int(yr[bad]), self.n_classes,
                                  self.chunk_rows, self.n)
        return Xr, yr

    def read(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` of rows ``[start, stop)``: X float32 standardised, y labels or targets."""
        stop = self.n if stop is None else stop
        if not 0 <= start < stop <= self.n:
            raise ValueError(f"rows [{start}, {stop}) are outside {self.split} of {self.url} "
                             f"({self.n} rows)")
        X, y = self.read_raw(slice(start, stop))
        return self.standardise(X), y

    def steps_per_epoch(self, rows: tuple[int, int], batch_size: int) -> int:
        return steps_per_epoch(rows, batch_size)

    def minibatches(self, rows: tuple[int, int], batch_size: int, seed: int = 0, epoch: int = 0):
        """One epoch over ``rows`` in minibatches, shuffled as a pure function of
        (rows, batch_size, seed, epoch), the next window of chunks read in the background.

        The reference trainer and a Downpour replica given the same arguments see exactly the
        same batches; the last batch of an epoch may be smaller.
        """
        return minibatches(self, rows, batch_size, seed, epoch)

    def stream(self, rows: tuple[int, int], batch_size: int, seed: int = 0, start_epoch: int = 0):
        """Minibatches over epochs ``start_epoch``, ``start_epoch + 1``, ... without end (the same
        batches as ``minibatches`` epoch by epoch, read ahead across epochs)."""
        return minibatches(self, rows, batch_size, seed, start_epoch, epochs=None)


def store_attrs(url) -> tuple[str, dict]:
    """The resolved URL and root attributes of a complete dataset store; a clear error for
    anything else (nothing there, a foreign group, a store interrupted while being written)."""
    url = _resolved(url)
    attrs = dict(_open_group(url).attrs)
    if attrs.get("format") != FORMAT:
        raise ValueError(f"{url} is not a daskbelief dataset store (no '{FORMAT}' format marker)")
    if not attrs.get("complete"):
        raise ValueError(f"the dataset store {url} is incomplete: it was interrupted while being "
                         "written; build it again")
    return url, attrs


def open_store(url, split: str = "train") -> DataStore:
    """Open one split of a complete store, its arrays checked against its metadata; a clear error
    for anything else.

    ``url``: a path or an fsspec URL (``file://``, ``s3://``, ...), or a ``DataStore`` (returned
    as is when it is of the requested split).
    """
    if isinstance(url, DataStore):
        return url if url.split == split else open_store(url.url, split)
    url, attrs = store_attrs(url)
    if split not in attrs.get("splits", {}):
        raise ValueError(f"the dataset store {url} has no {split!r} split (it has: "
                         f"{', '.join(attrs.get('splits', {})) or 'none'})")
    store = DataStore(url, split, attrs)
    store.check()
    return store
