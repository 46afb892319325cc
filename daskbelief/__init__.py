"""daskbelief: DistBelief (Dean et al., NIPS 2012) on Dask.

Downpour SGD, Sandblaster L-BFGS and model parallelism over a sharded parameter server of Dask
actors, with data shards in zarr. Names are imported lazily so that worker processes and the CLI
pay only for what they use.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Sequential": "daskbelief.nn", "Dense": "daskbelief.nn",
    "LocallyConnected1D": "daskbelief.nn", "LocallyConnected2D": "daskbelief.nn",
    "write_dataset": "daskbelief.data", "open_store": "daskbelief.data",
    "downpour": "daskbelief.train.downpour", "evaluate": "daskbelief.train.evaluate",
    "sandblaster": "daskbelief.train.sandblaster", "ParameterServer": "daskbelief.ps.server",
    "TrainResult": "daskbelief.train.result",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'daskbelief' has no attribute {name!r}")
