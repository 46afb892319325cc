"""Predictions for a whole store: a Dask graph over its chunks, written to zarr chunk by chunk.

Each block of the store's features (one zarr chunk) becomes one block of predictions on the worker
that reads it; the parameters are scattered once to every worker. The output store has the same
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

FORMAT = "daskbelief-predictions/1"


def _predict_block(X, store, model, params):
    return model.predict(params, store.standardise(X)).astype(np.float32)


def predict_store(model, params, data, out, *, split: str = "test", client=None,
                  overwrite: bool = False) -> dict:
    """Write ``predictions`` (n, outputs) float32 and, for classification, ``labels`` (n,) int32
    to a zarr store at ``out``; returns its path, the row count and the accuracy when the store
    has labels."""
    store = open_store(data, split=split)
    model.check_data(store.feature_shape, store.n_classes)
    dest = local_path(str(out))
    if dest is None:
        raise ValueError(f"predictions are written to a local path, got the URL {out}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass --overwrite to replace it)")
    X = da.from_zarr(store.url, component=f"{split}/X")
    c = store.chunk_rows
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with client_or_local(client) as cl:
            shared = cl.scatter(to_numpy(params), broadcast=True, hash=False)
            P = X.map_blocks(_predict_block, store, model, shared, dtype=np.float32,
                             chunks=(X.chunks[0], (model.n_outputs,)),
                             drop_axis=list(range(2, X.ndim)))
            group = zarr.open_group(str(tmp), mode="w")
            group.attrs.update({"format": FORMAT, "complete": False, "source": store.url,
                                "split": split, "model": model.to_dict()})
            targets = [P]
            arrays = [group.create_array("predictions", shape=P.shape, chunks=(c, model.n_outputs),
                                         dtype=np.float32)]
            if store.task == "classification":
                labels = P.argmax(axis=1).astype(np.int32)
                targets.append(labels)
                arrays.append(group.create_array("labels", shape=labels.shape, chunks=(c,),
                                                 dtype=np.int32))
            da.store(targets, arrays, lock=False)
            result = {"predictions": str(dest), "n": int(P.shape[0])}
            if store.task == "classification":
                y = da.from_zarr(store.url, component=f"{split}/y")
                result["accuracy"] = float((da.from_zarr(arrays[1]) == y).mean().compute())
        group.attrs["complete"] = True
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, Path(dest))
    return result
