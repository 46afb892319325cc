"""Data integrity: a damaged, missing or inconsistent chunk is an error naming it, never zeros.

Stores are written with zarr's ``crc32c`` codec after compression, so a chunk file that was
truncated or changed fails its checksum on read, and with every chunk written (zarr leaves out
chunks equal to the fill value unless told otherwise), so a chunk file that is absent can only
have been lost: reads through ``StrictStore`` refuse it instead of filling in zeros. The arrays'
shapes, dtypes and chunking are checked against the store's metadata when they are opened, and
every label read is checked against the class range, so none of these reaches a training step as
an ``IndexError``. Stores written before these checks (no ``every_chunk_written`` attribute, no
checksum) still open; their absent chunks read as zeros, as zarr wrote them.
"""
from __future__ import annotations

import logging
import re

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec
from zarr.storage import FsspecStore, LocalStore, WrapperStore

# What the writer passes to ``create_array``: compress, then checksum; write all-zero chunks too.
ARRAY_OPTIONS = {"compressors": (ZstdCodec(level=0), Crc32cCodec()),
                 "config": {"write_empty_chunks": True}}
EVERY_CHUNK = "every_chunk_written"  # root attribute of stores written with ARRAY_OPTIONS
_CHUNK_KEY = re.compile(r"^(?P<array>.+)/c/(?P<index>\d+)(/\d+)*$")


class DataError(ValueError):
    """A dataset store disagrees with itself: a chunk damaged or missing, an array whose length,
    dtype or chunking is not what the store's metadata says, a label outside the class range.

    A ``ValueError``, so the command line reports it as one line with exit status 2; its single
    string argument keeps it intact on the way from a worker's task to the driver.
    """


class _ReportedByTheDriver(logging.Filter):
    """Drops a worker's "Compute Failed" record (with its traceback) of a task that raised a
    ``DataError``: the error travels to the client, which reports it as one line, and a local
    cluster's workers share the command's stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed") and len(args) > 3
                    and str(args[3]).startswith("DataError("))


# Every process that reads a store imports this module first: workers included.
logging.getLogger("distributed.worker").addFilter(_ReportedByTheDriver())


class MissingChunk(Exception):
    """Raised by ``StrictStore`` for an absent chunk file (turned into a ``DataError`` by the
    reader, which knows which rows the chunk holds)."""


class StrictStore(WrapperStore):
    """A read-only store in which an absent chunk key is an error instead of the fill value."""

    async def get(self, key, prototype, byte_range=None):
        buf = await super().get(key, prototype, byte_range)
        if buf is None and _CHUNK_KEY.match(key):
            raise MissingChunk(key)
        return buf


def open_arrays(url: str, split: str, strict: bool):
    """``(X, y)`` zarr arrays of one split; ``strict``: absent chunks raise ``MissingChunk``."""
    if strict:
        from daskbelief.data.write import local_path  # write.py imports this module

        path = local_path(url)
        base = (FsspecStore.from_url(url, read_only=True) if path is None
                else LocalStore(path, read_only=True))
        group = zarr.open_group(store=StrictStore(base), mode="r")
    else:
        group = zarr.open_group(url, mode="r")
    try:
        return group[f"{split}/X"], group[f"{split}/y"]
    except KeyError as e:
        raise DataError(f"dataset store {url}: the array {e.args[0]} is missing") from None


def check_arrays(url: str, split: str, X, y, *, n: int, feature_shape: tuple, task: str,
                 chunk_rows: int, n_features: int, mean) -> None:
    """The arrays' shapes, dtypes and chunking agree with the store's metadata."""
    where = f"dataset store {url}: {split}"
    if tuple(X.shape) != (n, *feature_shape):
        raise DataError(f"{where}/X has shape {tuple(X.shape)} but the store's metadata says "
                        f"{(n, *feature_shape)} ({n} rows of {feature_shape})")
    if y.shape[:1] != (n,):
        raise DataError(f"{where}/y has {y.shape[0] if y.ndim else 0} rows but {split}/X and the "
                        f"store's metadata have {n}")
    if X.dtype not in (np.float32, np.uint8):
        raise DataError(f"{where}/X has dtype {X.dtype}; a store holds float32 or uint8 features")
    want = np.int32 if task == "classification" else np.float32
    if y.dtype != want or (task == "classification" and y.ndim != 1):
        raise DataError(f"{where}/y is {y.dtype} of shape {tuple(y.shape)}; a {task} store holds "
                        f"{np.dtype(want)} {'labels (n,)' if task == 'classification' else 'targets'}")
    for name, a in (("X", X), ("y", y)):
        if a.chunks[0] != chunk_rows or tuple(a.chunks[1:]) != tuple(a.shape[1:]):
            raise DataError(f"{where}/{name} is chunked {a.chunks}; the store's metadata says "
                            f"{chunk_rows} rows per chunk along samples only")
    if mean is not None and len(mean) != n_features:
        raise DataError(f"dataset store {url}: its normalisation statistics have {len(mean)} "
                        f"features, its arrays {n_features}")


def chunk_name(split: str, name: str, i: int, chunk_rows: int, n: int) -> str:
    """``train/X chunk 3 (rows 192-255)``: how every message names a chunk."""
    a = i * chunk_rows
    return f"{split}/{name} chunk {i} (rows {a}-{min(a + chunk_rows, n) - 1})"


def read_chunk(array, i: int, chunk_rows: int):
    """``(values, None)`` of chunk ``i`` of ``array``, or ``(None, (kind, words))`` saying why it
    cannot be read, kind "missing" or "damaged"."""
    try:
        return array[i * chunk_rows:(i + 1) * chunk_rows], None
    except MissingChunk as e:
        return None, ("missing", f"is missing (no {e.args[0]} in the store)")
    except Exception as e:  # whatever the codecs make of damaged bytes
        if "checksum" in str(e):
            return None, ("damaged", "fails its crc32c checksum: it was truncated or changed after "
                                     "writing")
        return None, ("damaged", f"cannot be decoded ({type(e).__name__}: {e})")


def damaged_chunk(url: str, split: str, arrays: dict, rows: range, chunk_rows: int, n: int) -> DataError | None:
    """After a read of ``rows`` failed: the first chunk of ``arrays`` (name -> array) there that
    cannot be read, as a ``DataError``; None when every chunk reads now."""
    for i in range(rows.start // chunk_rows, (rows.stop - 1) // chunk_rows + 1):
        for name, array in arrays.items():
            problem = read_chunk(array, i, chunk_rows)[1]
            if problem:
                return DataError(f"dataset store {url}: {chunk_name(split, name, i, chunk_rows, n)} "
                                 f"{problem[1]}; rebuild the store")
    return None


def bad_label(y, n_classes: int) -> int | None:
    """Index of the first label of ``y`` outside ``[0, n_classes)``, or None."""
    if len(y) and (y.min() < 0 or y.max() >= n_classes):
        return int(np.flatnonzero((y < 0) | (y >= n_classes))[0])
    return None


def label_words(row: int, label: int, n_classes: int) -> str:
    return (f"holds the label {label} at row {row}, outside [0, {n_classes}) for the store's "
            f"{n_classes} classes")


def label_error(url: str, split: str, row: int, label: int, n_classes: int, chunk_rows: int,
                n: int) -> DataError:
    return DataError(f"dataset store {url}: {chunk_name(split, 'y', row // chunk_rows, chunk_rows, n)} "
                     f"{label_words(row, label, n_classes)}")
