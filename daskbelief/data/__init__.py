"""Data shards in zarr: write stores (arrays, dask arrays, blocks out of core), open them lazily,
cut them into data shards and iterate shuffled minibatches with prefetch."""
from daskbelief.data.integrity import DataError
from daskbelief.data.normalise import Normaliser
from daskbelief.data.store import DataStore, open_store
from daskbelief.data.write import write_dataset

__all__ = ["DataError", "DataStore", "Normaliser", "open_store", "write_dataset"]
