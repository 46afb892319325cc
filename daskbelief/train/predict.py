"""Predictions for a whole store: a Dask graph over its chunks, written to zarr chunk by chunk.

Each chunk of the store's rows becomes one block of predictions on the worker that reads it
(through the store, so a damaged chunk is a ``DataError`` naming it); the parameters are scattered once to every worker. The output store has the same
chunking along samples, so every task writes exactly its own chunk, and it is written like a
dataset store: into a hidden sibling directory, renamed into place only when complete.
"""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dask.array as da
import numpy as np
import zarr

from daskbelief.backend import to_numpy
from daskbelief.cluster import client_or_local
from daskbelief.data import open_store
from daskbelief.data.write import local_path, move_into_place
from daskbelief.train.partitioned import Blocks

FORMAT = "daskbelief-predictions/1"


def _predict_rows(rows, store, model, params):
    X, _ = store.read(int(rows[0]), int(rows[-1]) + 1)
    return model.predict(params, X).astype(np.float32)


def _labels_rows(rows, store):
    return store.read_raw(slice(int(rows[0]), int(rows[-1]) + 1))[1]


def predict_store(model, params, data, out, *, split: str = "test", client=None,
                  overwrite: bool = False, normaliser=None, plan=None) -> dict:
    """Write ``predictions`` (n, outputs) float32 and, for classification, ``labels`` (n,) int32
    to a zarr store at ``out``; returns its path, the row count and the accuracy when the store
    has labels. ``normaliser``: the standardisation the model was trained with, when it is not
    the store's own (a store of new raw features). ``plan``: predict through that partition's
    blocks, each making or reading its own ranges of ``params`` (a ``sources.Ranged``, e.g. a
    checkpoint: no process holds the model), a chunk of rows at a time from here."""
    store = open_store(data, split=split)
    if normaliser is not None:
        store = store.with_normaliser(normaliser)
    model.check_data(store.feature_shape, store.n_classes)
    dest = local_path(str(out))
    if dest is None:
        raise ValueError(f"predictions are written to a local path, got the URL {out}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass --overwrite to replace it)")
    rows = da.arange(store.n, chunks=store.chunk_rows)
    c = store.chunk_rows
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with client_or_local(client) as cl:
            group = zarr.open_group(str(tmp), mode="w")
            group.attrs.update({"format": FORMAT, "complete": False, "source": store.url,
                                "split": split, "model": model.to_dict()})
            arrays = [group.create_array("predictions", shape=(store.n, model.n_outputs),
                                         chunks=(c, model.n_outputs), dtype=np.float32)]
            if store.task == "classification":
                arrays.append(group.create_array("labels", shape=(store.n,), chunks=(c,),
                                                 dtype=np.int32))
            if plan is None:
                _fill_by_tasks(cl, model, params, store, rows, arrays)
            else:
                _fill_by_blocks(cl, plan, params, store, arrays)
            result = {"predictions": str(dest), "n": store.n}
            if store.task == "classification":
                y = rows.map_blocks(_labels_rows, store, dtype=np.int32)
                result["accuracy"] = float((da.from_zarr(arrays[1]) == y).mean().compute())
        group.attrs["complete"] = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, Path(dest))
    return result


def _fill_by_tasks(client, model, params, store, rows, arrays) -> None:
    """One task per chunk of rows on the worker that reads it, the parameters scattered once to
    every worker."""
    shared = client.scatter(to_numpy(params), broadcast=True, hash=False)
    P = rows.map_blocks(_predict_rows, store, model, shared, dtype=np.float32,
                        chunks=(rows.chunks[0], (model.n_outputs,)), new_axis=1)
    da.store([P, P.argmax(axis=1).astype(np.int32)][:len(arrays)], arrays, lock=False)


def _fill_by_blocks(client, plan, params, store, arrays) -> None:
    """A chunk of rows at a time through the blocks of ``plan`` (``Blocks.predict``)."""
    blocks = Blocks.start(client, plan, params)
    try:
        for lo in range(0, store.n, store.chunk_rows):
            X, _ = store.read(lo, min(lo + store.chunk_rows, store.n))
            P = blocks.predict(X).astype(np.float32, copy=False)
            for array, values in zip(arrays, [P, P.argmax(axis=1).astype(np.int32)]):
                array[lo:lo + len(P)] = values
    finally:
        blocks.close()
