"""``daskbelief info --verify``: read every chunk of a store and check it against the metadata.

Training reads only what it needs and stops at the first bad chunk; verifying reads everything
and lists every problem: arrays that disagree with the metadata, chunks missing or failing their
checksum, labels outside the class range, NaN or infinite values. A store written before chunks
were checksummed and all written is verified as far as it can be: its absent chunks (which zarr
then left out when they held only zeros) and its lack of checksums are warnings.
"""
from __future__ import annotations

import numpy as np
from zarr.codecs import Crc32cCodec

from daskbelief.data.integrity import (DataError, bad_label, chunk_name, label_words, open_arrays,
                                       read_chunk)
from daskbelief.data.store import DataStore, store_attrs


def _chunk_values(store, name: str, i: int, values) -> str | None:
    """What is wrong with the values of chunk ``i``, or None."""
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        return "holds NaN or infinite values"
    if name == "y" and store.task == "classification":
        bad = bad_label(values, store.n_classes)
        if bad is not None:
            return label_words(i * store.chunk_rows + bad, int(values[bad]), store.n_classes)
    return None


def verify_split(store) -> tuple[dict, list[str], list[str]]:
    """``(summary, problems, warnings)`` of one split, every chunk read."""
    problems, warnings, absent = [], [], 0
    arrays = dict(zip(("X", "y"), open_arrays(store.url, store.split, strict=True)))
    lo = hi = None
    for i in range(store.n_chunks):
        for name, array in arrays.items():
            where = chunk_name(store.split, name, i, store.chunk_rows, store.n)
            values, problem = read_chunk(array, i, store.chunk_rows)
            if problem is not None and problem[0] == "missing" and not store.strict:
                absent += 1  # written before every chunk was: may have held only zeros
                continue
            if problem is not None:
                problems.append(f"{where} {problem[1]}")
                continue
            wrong = _chunk_values(store, name, i, values)
            if wrong:
                problems.append(f"{where} {wrong}")
            elif name == "y" and store.task == "classification":
                lo = int(values.min()) if lo is None else min(lo, int(values.min()))
                hi = int(values.max()) if hi is None else max(hi, int(values.max()))
    if absent:
        warnings.append(f"{store.split}: {absent} chunk file(s) absent, read as zeros (the store "
                        "predates writing every chunk; rebuild it to have them checked)")
    summary = {"n": store.n, "chunks": store.n_chunks,
               "checksums": all(any(isinstance(c, Crc32cCodec) for c in a.metadata.codecs)
                                for a in arrays.values())}
    if lo is not None:
        summary["labels"] = [lo, hi]
    return summary, problems, warnings


def verify(url) -> dict:
    """Every chunk of every split read and checked; the summary, or a ``DataError`` whose one
    line lists the problems found (the first few, and how many in all)."""
    url, attrs = store_attrs(url)
    out = {"store": url, "verified": True}
    problems, warnings = [], []
    for split in attrs["splits"]:
        s = DataStore(url, split, attrs)
        try:
            s.check()
        except DataError as e:
            problems.append(str(e).removeprefix(f"dataset store {url}: "))
            continue
        out[split], found, warned = verify_split(s)
        problems += found
        warnings += warned
        if not out[split]["checksums"]:
            warnings.append(f"{split}: chunks carry no checksum (written before they were "
                            "checksummed): a changed chunk may go unnoticed; rebuild the store")
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(f"dataset store {url} failed verification, {len(problems)} "
                        f"problem(s): {shown}")
    out["warnings"] = warnings
    return out
