"""What the data integrity checks cost a reader: a checked store against one written as before.

The same features (float32, 256 per row, chunks of 1 MiB) are written twice: by ``write_dataset``
(zstd then crc32c, every chunk written, reads through ``StrictStore``, labels checked on read)
and as stores were written before the checks (zarr's default codecs, no checksum, absent chunks
read as zeros). Each round reads and standardises the whole split in blocks of 8192 rows from
both, alternating, on one thread; the figure is the ratio of the best rounds (the median beside).
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import zarr
from threadpoolctl import threadpool_limits

from benchmarks.core import interleaved
from daskbelief.data import open_store, write_dataset
from daskbelief.data.integrity import EVERY_CHUNK


def unchecked_copy(src: str, dest: Path, X, y, chunk_rows: int) -> str:
    """``X, y`` as a store written before the integrity checks (same attributes, default codecs)."""
    group = zarr.open_group(str(dest), mode="w")
    group.create_array("train/X", data=X, chunks=(chunk_rows, X.shape[1]))
    group.create_array("train/y", data=y, chunks=(chunk_rows,))
    attrs = dict(zarr.open_group(src, mode="r").attrs)
    del attrs[EVERY_CHUNK]
    group.attrs.update(attrs)
    return str(dest)


def whole_split(store, block: int = 8192):
    def step():
        for a in range(0, store.n, block):
            store.read(a, min(a + block, store.n))
    return step


def run(quick: bool) -> dict:
    rows, rounds = (16384, 4) if quick else (131072, 8)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 256)).astype(np.float32)
    y = rng.integers(0, 10, rows).astype(np.int32)
    tmp = Path(tempfile.mkdtemp(prefix="daskbelief-reads-"))
    try:
        checked = write_dataset(tmp / "checked.zarr", (X, y), chunk_rows=1024)
        before = unchecked_copy(checked, tmp / "before.zarr", X, y, 1024)
        steps = {"checked": whole_split(open_store(checked)),
                 "before": whole_split(open_store(before))}
        with threadpool_limits(1):
            times = interleaved(steps, rounds, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    median = {k: statistics.median(v) for k, v in times.items()}
    mb = X.nbytes / 2**20
    for k in times:
        print(f"{k:<8} {mb / best[k]:8.0f} MiB/s best of {rounds}   {mb / median[k]:8.0f} median")
    ratio = best["checked"] / best["before"]
    print(f"checked / before, seconds per read of {mb:.0f} MiB: {ratio:.3f} best, "
          f"{median['checked'] / median['before']:.3f} median")
    return {"mib": mb, "rounds": rounds, "checked_mib_per_s": mb / best["checked"],
            "before_mib_per_s": mb / best["before"], "time_ratio_best": ratio,
            "time_ratio_median": median["checked"] / median["before"]}
