"""Writing dataset stores: numpy arrays, dask arrays, or an iterator of blocks larger than memory.

Layout (zarr v3)::

    attrs: format, complete, task, n_classes, feature_shape, normalize, mean, std, chunk_rows,
           every_chunk_written, ...
    train/X  (n, *feature_shape) float32 or uint8, chunked along samples only, every chunk
             written and checksummed (zstd, then crc32c: see ``integrity``)
    train/y  (n,) int32 labels, or (n,) / (n, k) float32 targets, same chunking
    test/X, test/y  (optional)

``mean`` and ``std`` are per-feature statistics of the train split (flattened feature order);
readers standardise with them. ``complete`` is set last. A store at a local path is written into a
hidden sibling directory and renamed into place when complete, so the destination never holds a
half-written store and an existing store is replaced only by a finished one; at a remote URL
(s3://, gs://, ...) it is written in place and readers refuse it until ``complete`` is set.
"""
from __future__ import annotations

import math
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from daskbelief.data.checks import (check_block, check_features, check_label_range,
                                    check_targets)
from daskbelief.data.integrity import ARRAY_OPTIONS, EVERY_CHUNK

FORMAT = "daskbelief-dataset/1"
TARGET_CHUNK_BYTES = 1 << 20


def default_chunk_rows(row_bytes: int) -> int:
    """Rows per chunk: a power of two giving chunks of about 1 MB, within [16, 65536].

    Big enough that reading a chunk costs far more than the call, small enough that a store of a
    few thousand examples still splits into many data shards.
    """
    rows = max(1, TARGET_CHUNK_BYTES // max(1, row_bytes))
    return int(min(65536, max(16, 2 ** int(math.log2(rows)))))


def local_path(url: str) -> Path | None:
    """The filesystem path behind ``url``, or None for a remote fsspec URL."""
    url = str(url)
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url:
        return None
    return Path(url)


class Moments:
    """Per-feature mean and standard deviation accumulated block by block, in float64.

    Sums are taken around the first block's mean, so the variance keeps its precision when the
    features sit far from zero (raw pixel values, say).
    """

    def __init__(self):
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, X) -> None:
        # always a copy of its own (a float64 block would otherwise be the caller's array), then
        # centred in place: one copy whatever the block's dtype
        flat = np.array(X, dtype=np.float64).reshape(len(X), -1)
        if self.shift is None:
            self.shift = flat.mean(axis=0)
            self.s1 = np.zeros_like(self.shift)
            self.s2 = np.zeros_like(self.shift)
        flat -= self.shift
        self.n += len(flat)
        self.s1 += flat.sum(axis=0)
        self.s2 += np.einsum("ij,ij->j", flat, flat)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        d = self.s1 / self.n
        var = np.maximum(self.s2 / self.n - d * d, 0.0)
        return self.shift + d, np.sqrt(var)


def _is_dask(a) -> bool:
    return type(a).__module__.startswith("dask")


def _pair(source, what: str):
    """``source`` as ``("arrays", X, y)``, ``("dask", X, y)`` or ``("blocks", iterator)``."""
    if isinstance(source, tuple) and len(source) == 2:
        X, y = source
        if _is_dask(X) or _is_dask(y):
            return ("dask", X, y)
        return ("arrays", np.asarray(X), np.asarray(y))
    if hasattr(source, "__iter__") and not isinstance(source, (str, bytes, np.ndarray)):
        return ("blocks", iter(source))
    raise ValueError(f"{what} must be an (X, y) pair of arrays or an iterable of (X, y) blocks, "
                     f"got {type(source).__name__}")


class _SplitWriter:
    """Appends (X, y) blocks to one split's arrays in whole chunks, checking each block."""

    def __init__(self, group, name: str, chunk_rows: int | None, n_classes: int | None,
                 moments: Moments | None):
        self.group, self.name, self.what = group, name, f"{name} split"
        self.chunk_rows, self.n_classes, self.moments = chunk_rows, n_classes, moments
        self.X = self.y = None
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending = 0
        self.n = 0
        self.task = None
        self.lo, self.hi = None, None

    def _create(self, X, y) -> None:
        self.feature_shape = tuple(X.shape[1:])
        self.x_dtype = np.uint8 if X.dtype == np.uint8 else np.float32
        self.y_dtype = np.int32 if self.task == "classification" else np.float32
        self.y_tail = tuple(y.shape[1:])
        if self.chunk_rows is None:
            self.chunk_rows = default_chunk_rows(math.prod(self.feature_shape) * np.dtype(self.x_dtype).itemsize)
        c = self.chunk_rows
        self.X = self.group.create_array(f"{self.name}/X", shape=(0, *self.feature_shape),
                                         chunks=(c, *self.feature_shape), dtype=self.x_dtype,
                                         **ARRAY_OPTIONS)
        self.y = self.group.create_array(f"{self.name}/y", shape=(0, *self.y_tail),
                                         chunks=(c, *self.y_tail), dtype=self.y_dtype,
                                         **ARRAY_OPTIONS)

    def add(self, X, y, checked: bool = False) -> None:
        X, y = np.asarray(X), np.asarray(y)
        what = f"{self.what}, block at row {self.n + self.n_pending}"
        task = check_block(X, y, what, self.n_classes) if not checked else check_targets(y, len(X), what)
        if self.X is None:
            self.task = task
            self._create(X, y)
        elif (tuple(X.shape[1:]), task, tuple(y.shape[1:])) != (self.feature_shape, self.task, self.y_tail):
            raise ValueError(f"{what}: shape or kind changed: X {tuple(X.shape)} y {tuple(y.shape)} "
                             f"({task}) after blocks of features {self.feature_shape}, targets "
                             f"{self.y_tail} ({self.task})")
        if task == "classification":
            lo, hi = int(y.min()), int(y.max())
            self.lo = lo if self.lo is None else min(self.lo, lo)
            self.hi = hi if self.hi is None else max(self.hi, hi)
        if self.moments is not None:
            self.moments.update(X)
        self.pending.append((X, y))
        self.n_pending += len(X)
        self._flush(final=False)

    def _flush(self, final: bool) -> None:
        """Write as many whole chunks as are pending (everything when ``final``)."""
        rows = self.n_pending if final else (self.n_pending // self.chunk_rows) * self.chunk_rows
        if rows == 0:
            return
        if len(self.pending) == 1:
            X, y = self.pending[0]
        else:
            X = np.concatenate([x for x, _ in self.pending])
            y = np.concatenate([t for _, t in self.pending])
        self.X.append(X[:rows].astype(self.x_dtype, copy=False))
        self.y.append(y[:rows].astype(self.y_dtype, copy=False))
        self.n += rows
        self.pending = [(X[rows:], y[rows:])] if rows < len(X) else []
        self.n_pending = len(X) - rows

    def close(self) -> dict:
        if self.X is None:
            raise ValueError(f"{self.what}: no examples were given")
        self._flush(final=True)
        return {"n": self.n, "task": self.task, "feature_shape": self.feature_shape,
                "targets": self.y_tail, "labels": (self.lo, self.hi)}


def _write_dask(group, name: str, X, y, chunk_rows, n_classes, want_stats: bool):
    """A dask (X, y) pair: checked and summarised in one parallel pass, then stored chunk-aligned
    (each dask block is exactly one zarr chunk, so parallel writers never share a chunk)."""
    import dask
    import dask.array as da

    what = f"{name} split"
    X, y = da.asarray(X), da.asarray(y)
    if math.isnan(X.shape[0]) or math.isnan(y.shape[0]):
        X, y = X.compute_chunk_sizes(), y.compute_chunk_sizes()
    check_features(X, what)
    task = check_targets(y, X.shape[0], what)
    feature_shape = tuple(X.shape[1:])
    x_dtype = np.uint8 if X.dtype == np.uint8 else np.float32
    c = chunk_rows or default_chunk_rows(math.prod(feature_shape) * np.dtype(x_dtype).itemsize)
    flat = X.reshape(X.shape[0], -1).astype(np.float64)
    todo = {"finite": da.isfinite(X).all() if X.dtype.kind == "f" else True}
    if task == "classification":
        todo.update(lo=y.min(), hi=y.max())
    else:
        todo["finite_y"] = da.isfinite(y).all()
    if want_stats:
        todo.update(s1=flat.sum(axis=0), s2=(flat * flat).sum(axis=0))
    got = dict(zip(todo, dask.compute(*todo.values())))
    if not got["finite"]:
        raise ValueError(f"{what}: X contains NaN or infinite values; clean the data before writing it")
    if not got.get("finite_y", True):
        raise ValueError(f"{what}: y contains NaN or infinite values")
    if task == "classification" and n_classes is not None:
        check_label_range(int(got["lo"]), int(got["hi"]), n_classes, what)
    y_dtype = np.int32 if task == "classification" else np.float32
    zX = group.create_array(f"{name}/X", shape=X.shape, chunks=(c, *feature_shape), dtype=x_dtype,
                            **ARRAY_OPTIONS)
    zy = group.create_array(f"{name}/y", shape=y.shape, chunks=(c, *y.shape[1:]), dtype=y_dtype,
                            **ARRAY_OPTIONS)
    da.store([X.astype(x_dtype).rechunk((c, *feature_shape)),
              y.astype(y_dtype).rechunk((c, *y.shape[1:]))], [zX, zy], lock=False)
    meta = {"n": int(X.shape[0]), "task": task, "feature_shape": feature_shape,
            "targets": tuple(y.shape[1:]),
            "labels": (int(got["lo"]), int(got["hi"])) if task == "classification" else (None, None)}
    stats = None
    if want_stats:
        n = X.shape[0]
        mean = got["s1"] / n
        stats = (mean, np.sqrt(np.maximum(got["s2"] / n - mean * mean, 0.0)))
    return meta, c, stats


def _write_splits(group, splits: dict, chunk_rows, n_classes, normalize: bool) -> dict:
    metas, stats = {}, None
    for name, source in splits.items():
        kind, *rest = _pair(source, f"the {name} split")
        want_stats = normalize and name == "train"
        if kind == "dask":
            metas[name], chunk_rows, got = _write_dask(group, name, *rest, chunk_rows, n_classes, want_stats)
            stats = got if want_stats else stats
            continue
        moments = Moments() if want_stats else None
        writer = _SplitWriter(group, name, chunk_rows, n_classes, moments)
        if kind == "arrays":
            writer.add(*rest, checked=True)
        else:
            for block in rest[0]:
                if not (isinstance(block, tuple) and len(block) == 2):
                    raise ValueError(f"the {name} split: blocks must be (X, y) pairs, got "
                                     f"{type(block).__name__}")
                writer.add(*block)
        metas[name] = writer.close()
        chunk_rows = writer.chunk_rows
        if moments is not None:
            stats = moments.result()
    return {"metas": metas, "chunk_rows": chunk_rows, "stats": stats}


def _summary(metas: dict, n_classes) -> dict:
    train = metas["train"]
    for name, m in metas.items():
        if (m["task"], m["feature_shape"], m["targets"]) != (train["task"], train["feature_shape"], train["targets"]):
            raise ValueError(f"the {name} split does not match the train split: {m['task']} with "
                             f"features {m['feature_shape']} vs {train['task']} with "
                             f"{train['feature_shape']}")
    if train["task"] == "classification":
        lo = min(m["labels"][0] for m in metas.values())
        hi = max(m["labels"][1] for m in metas.values())
        if n_classes is None:
            if lo < 0:
                raise ValueError(f"labels must be class ids >= 0, got a minimum of {lo}")
            n_classes = hi + 1
    else:
        n_classes = math.prod(train["targets"]) if train["targets"] else 1
    return {"task": train["task"], "n_classes": int(n_classes),
            "feature_shape": list(train["feature_shape"]),
            "splits": {name: m["n"] for name, m in metas.items()}}


def _check_upfront(splits: dict, n_classes) -> None:
    """In-memory arrays are checked whole before anything is created."""
    if n_classes is not None and (isinstance(n_classes, bool) or int(n_classes) != n_classes
                                  or n_classes < 1):
        raise ValueError(f"n_classes must be a positive integer, got {n_classes!r}")
    for name, source in splits.items():
        kind, *rest = _pair(source, f"the {name} split")
        if kind == "arrays":
            check_block(*rest, f"{name} split", n_classes)


def write_dataset(url, train, test=None, *, chunk_rows: int | None = None,
                  n_classes: int | None = None, normalize: bool = True, overwrite: bool = False,
                  attrs: dict | None = None) -> str:
    """Write a dataset store and return its URL.

    ``train``/``test``: ``(X, y)`` numpy or dask arrays, or an iterable of ``(X, y)`` numpy blocks
    (written as they come, memory bounded by one block plus one chunk). ``n_classes``: for
    classification, the number of classes (default: largest label + 1); labels are checked
    against it. ``normalize``: store the train split's per-feature mean/std for readers to
    standardise with. ``attrs``: extra JSON-able attributes (the recipe, its parameters).
    """
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or int(chunk_rows) < 1):
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    splits = {"train": train} if test is None else {"train": train, "test": test}
    local = local_path(url)
    if local is not None and local.exists() and not overwrite:
        raise FileExistsError(f"{local} already exists (pass overwrite=True / --overwrite to replace it)")
    _check_upfront(splits, n_classes)
    if local is None:
        target = str(url)
    else:
        local.parent.mkdir(parents=True, exist_ok=True)
        target = str(local.parent / f".{local.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(target, mode="w")
        group.attrs.update({"format": FORMAT, "complete": False})
        written = _write_splits(group, splits, chunk_rows, n_classes, normalize)
        info = _summary(written["metas"], n_classes)
        mean, std = written["stats"] if written["stats"] is not None else (None, None)
        group.attrs.update({**(attrs or {}), **info, "chunk_rows": int(written["chunk_rows"]),
                            "normalize": bool(normalize), EVERY_CHUNK: True,
                            "mean": None if mean is None else mean.astype(np.float32).tolist(),
                            "std": None if std is None else std.astype(np.float32).tolist(),
                            "complete": True})
    except BaseException:
        if local is not None:
            shutil.rmtree(target, ignore_errors=True)
        raise
    if local is not None:
        move_into_place(Path(target), local)
        return str(local)
    return str(url)


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename a finished store to ``dest``; an old store there is removed only afterwards."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
        dest.rename(old)
    tmp.rename(dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
