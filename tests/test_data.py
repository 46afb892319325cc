"""zarr data stores: every value written reads back, bad input is refused, minibatches are exact."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from itertools import islice

import dask.array as da
import numpy as np
import pytest
import zarr

from daskbelief.data import open_store, write_dataset
from daskbelief.data.batches import window_order


def arrays(n=1000, shape=(5,), classes=3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    X = (rng.standard_normal((n, *shape)) * 3 + 7).astype(dtype)
    return X, rng.integers(0, classes, n).astype(np.int64)


def raw(store):
    """Everything stored in a split, as stored."""
    return store.read_raw(slice(0, store.n))


def standardised(X, ref):
    flat = ref.reshape(len(ref), -1).astype(np.float64)
    mean, std = flat.mean(axis=0), flat.std(axis=0)
    return ((X.reshape(len(X), -1) - mean) / np.where(std > 0, std, 1)).reshape(X.shape)


# -- round trips ----------------------------------------------------------------------------

def test_numpy_round_trip_with_metadata_and_standardisation(tmp_path):
    X, y = arrays()
    Xt, yt = arrays(200, seed=1)
    path = write_dataset(tmp_path / "s.zarr", (X, y), (Xt, yt), chunk_rows=64)
    train, test = open_store(path), open_store(path, "test")
    assert (train.n, test.n, train.n_chunks, train.chunk_rows) == (1000, 200, 16, 64)
    assert train.feature_shape == (5,) and train.n_classes == 3 and train.task == "classification"
    Xr, yr = raw(train)
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, y)
    assert yr.dtype == np.int32 and Xr.dtype == np.float32
    np.testing.assert_array_equal(raw(test)[0], Xt)
    # Readers standardise both splits with the train split's statistics.
    np.testing.assert_allclose(train.read()[0], standardised(X, X), atol=2e-5)
    np.testing.assert_allclose(test.read(10, 20)[0], standardised(Xt, X)[10:20], atol=2e-5)
    assert os.listdir(tmp_path) == ["s.zarr"]  # no temporary left behind


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_writing_a_store_leaves_the_callers_arrays_as_they_were(tmp_path, dtype):
    # A float64 block once had the train mean subtracted from it in place while its moments
    # were summed: a user's array changed under them (scikit-learn's wine data, say).
    X, y = arrays()
    X = (X * 10 + 100).astype(dtype)
    before = X.copy()
    path = write_dataset(tmp_path / "s.zarr", (X, y), chunk_rows=64)
    np.testing.assert_array_equal(X, before)
    np.testing.assert_allclose(open_store(path).read()[0], standardised(X, X), atol=2e-5)


def test_out_of_core_blocks_of_any_size_round_trip(tmp_path):
    X, y = arrays(1003, shape=(4, 3), dtype=np.uint8, classes=7)
    cuts = [0, 1, 50, 51, 300, 777, 1003]

    def blocks():  # blocks of uneven sizes, none aligned with the chunks
        for a, b in zip(cuts, cuts[1:]):
            yield X[a:b], y[a:b]

    path = write_dataset(tmp_path / "b.zarr", blocks(), chunk_rows=100)
    store = open_store(path)
    assert store.n == 1003 and store.n_chunks == 11 and store.feature_shape == (4, 3)
    Xr, yr = raw(store)
    assert Xr.dtype == np.uint8
    np.testing.assert_array_equal(Xr, X)
    np.testing.assert_array_equal(yr, y)
    assert store.n_classes == int(y.max()) + 1
    np.testing.assert_allclose(store.read()[0], standardised(X, X), atol=2e-5)


def test_dask_arrays_round_trip_chunk_aligned(tmp_path):
    X, y = arrays(1000, shape=(6,))
    dX = da.from_array(X, chunks=(137, 6))  # misaligned with the store's chunks on purpose
    dy = da.from_array(y, chunks=91)
    path = write_dataset(tmp_path / "d.zarr", (dX, dy), (dX[:100], dy[:100]), chunk_rows=64)
    store = open_store(path)
    np.testing.assert_array_equal(raw(store)[0], X)
    np.testing.assert_array_equal(raw(store)[1], y)
    np.testing.assert_allclose(store.read()[0], standardised(X, X), atol=2e-5)


def test_regression_targets_round_trip(tmp_path):
    X, _ = arrays(300)
    t = np.random.default_rng(2).standard_normal((300, 2))
    store = open_store(write_dataset(tmp_path / "r.zarr", (X, t)))
    assert store.task == "regression" and store.n_classes == 2
    np.testing.assert_allclose(raw(store)[1], t.astype(np.float32))


def test_fsspec_url_opens_lazily_and_reads(tmp_path):
    X, y = arrays(500)
    write_dataset(tmp_path / "u.zarr", (X, y), chunk_rows=50)
    store = open_store(f"file://{tmp_path}/u.zarr")
    assert store.url.startswith("file://")
    np.testing.assert_array_equal(store.read_raw(slice(120, 180))[0], X[120:180])
    assert [len(xb) for xb, _ in store.minibatches(store.row_ranges(2)[0], 100)] == [100, 100, 50]


def test_store_with_several_shards_reads_back_shard_by_shard(tmp_path):
    X, y = arrays(1000)
    store = open_store(write_dataset(tmp_path / "s.zarr", (X, y), chunk_rows=64))
    shards = store.row_ranges(3)
    assert shards == [(0, 384), (384, 704), (704, 1000)]  # 6 + 5 + 5 chunks
    got = np.concatenate([store.read_raw(slice(a, b))[0] for a, b in shards])
    np.testing.assert_array_equal(got, X)
    with pytest.raises(ValueError, match="16 chunks .* 17 row ranges"):
        store.row_ranges(17)


def test_overwrite_replaces_only_when_asked(tmp_path):
    X, y = arrays(100)
    path = write_dataset(tmp_path / "o.zarr", (X, y))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_dataset(path, (X[:50], y[:50]))
    assert open_store(path).n == 100
    write_dataset(path, (X[:50], y[:50]), overwrite=True)
    assert open_store(path).n == 50


# -- minibatches ----------------------------------------------------------------------------

def test_an_epoch_visits_every_row_of_the_shard_once_in_a_seeded_order(tmp_path):
    n = 1000
    X = np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)
    store = open_store(write_dataset(tmp_path / "m.zarr", (X, np.zeros(n, int)), chunk_rows=64,
                                     normalize=False))
    shard = store.row_ranges(3)[1]
    from daskbelief.data.batches import minibatches

    def rows(seed, epoch, window_rows=128):
        batches = list(minibatches(store, shard, 48, seed, epoch, window_rows=window_rows))
        assert [len(b[0]) for b in batches][:-1] == [48] * (len(batches) - 1)
        assert len(batches) == store.steps_per_epoch(shard, 48)
        return np.concatenate([b[0][:, 0] for b in batches]).astype(int)

    first = rows(0, 0)
    assert sorted(first) == list(range(*shard))
    np.testing.assert_array_equal(first, rows(0, 0))  # a pure function of its arguments
    assert not np.array_equal(first, rows(0, 1))       # reshuffled every epoch
    assert not np.array_equal(first, rows(1, 0))
    assert not np.array_equal(first, np.arange(*shard))
    # The default window (the whole shard here) gives another valid order of the same rows.
    assert sorted(rows(0, 0, window_rows=1 << 20)) == list(range(*shard))


def test_window_order_is_pure_and_covers_the_chunks():
    wins = list(window_order((64, 700), 64, seed=3, epoch=2, window_chunks=3))
    again = list(window_order((64, 700), 64, seed=3, epoch=2, window_chunks=3))
    covered = sorted(r for ranges, _ in wins for r in ranges)
    assert covered[0] == (64, 128) and covered[-1] == (640, 700) and len(covered) == 10
    for (r1, p1), (r2, p2) in zip(wins, again):
        assert r1 == r2 and np.array_equal(p1, p2)
        assert sorted(p1) == list(range(sum(b - a for a, b in r1)))


def test_stream_runs_over_epochs(tmp_path):
    X, y = arrays(100)
    store = open_store(write_dataset(tmp_path / "e.zarr", (X, y), chunk_rows=25))
    it = store.stream((0, 100), 40)
    sizes = [len(next(it)[0]) for _ in range(7)]
    assert sizes == [40, 40, 20, 40, 40, 20, 40]


def test_stream_reads_ahead_across_epochs_and_gives_each_epochs_batches(tmp_path):
    """The stream's batches are exactly each epoch's, windows carried over within an epoch and
    never across one, whatever epoch it starts from."""
    n = 1000
    X = np.arange(n, dtype=np.float32)[:, None].repeat(2, axis=1)
    store = open_store(write_dataset(tmp_path / "s.zarr", (X, np.zeros(n, int)), chunk_rows=64,
                                     normalize=False))
    shard = store.row_ranges(3)[1]   # 320 rows: windows of 128 leave carries, epochs end short
    from daskbelief.data.batches import minibatches

    def rows(batches):
        return [b[0][:, 0].astype(int).tolist() for b in batches]

    epochs = [rows(minibatches(store, shard, 48, 5, e, window_rows=128)) for e in range(2, 6)]
    stream = rows(islice(minibatches(store, shard, 48, 5, 2, window_rows=128, epochs=None),
                         sum(map(len, epochs))))
    assert stream == [b for epoch in epochs for b in epoch]
    assert shard[1] - shard[0] == 320 and [len(b) for b in epochs[0]] == [48] * 6 + [32]


# -- bad input ------------------------------------------------------------------------------

BAD = [
    (lambda X, y: (X, y[:-1]), "same length"),
    (lambda X, y: (X.astype(np.int16), y), "dtype int16"),
    (lambda X, y: (X[:, 0], y), "at least 2 dimensions"),
    (lambda X, y: (X, y.astype(np.complex64)), "dtype complex64"),
    (lambda X, y: (X, np.where(np.arange(len(y)) == 5, 9, y)), r"\[0, 3\)"),
    (lambda X, y: (X, np.where(np.arange(len(y)) == 5, -1, y)), r"\[0, 3\)"),
    (lambda X, y: (np.where(np.arange(len(X))[:, None] == 3, np.nan, X), y), "NaN"),
    (lambda X, y: (np.where(np.arange(len(X))[:, None] == 3, np.inf, X), y), "infinite"),
    (lambda X, y: (X[:0], y[:0]), "empty"),
]


@pytest.mark.parametrize("spoil,message", BAD)
def test_bad_arrays_are_refused_before_anything_is_written(tmp_path, spoil, message):
    X, y = arrays(200)
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "bad.zarr", spoil(X, y), n_classes=3)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("spoil,message", BAD[:3] + BAD[4:8])
def test_bad_dask_arrays_are_refused_before_anything_is_stored(tmp_path, spoil, message):
    X, y = spoil(*arrays(200))
    with pytest.raises(ValueError, match=message):
        write_dataset(tmp_path / "bad.zarr", (da.from_array(X, chunks=50), da.from_array(y, chunks=50)),
                      n_classes=3)
    assert os.listdir(tmp_path) == []


def test_a_bad_block_midway_leaves_nothing_half_written(tmp_path):
    X, y = arrays(300)
    write_dataset(tmp_path / "keep.zarr", (X, y))

    def blocks():
        yield X[:100], y[:100]
        yield X[100:200], y[100:200]
        bad = X[200:].copy()
        bad[7, 1] = np.nan
        yield bad, y[200:]

    with pytest.raises(ValueError, match="block at row 200.*NaN"):
        write_dataset(tmp_path / "keep.zarr", blocks(), overwrite=True, chunk_rows=50)
    assert os.listdir(tmp_path) == ["keep.zarr"]
    assert open_store(tmp_path / "keep.zarr").n == 300  # the old store is untouched


def test_blocks_that_change_shape_are_refused(tmp_path):
    X, y = arrays(100)
    with pytest.raises(ValueError, match="shape or kind changed"):
        write_dataset(tmp_path / "c.zarr", iter([(X, y), (X[:, :3], y)]))
    assert os.listdir(tmp_path) == []


def test_missing_and_foreign_and_incomplete_stores_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset store"):
        open_store(tmp_path / "nothing.zarr")
    zarr.open_group(str(tmp_path / "foreign.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(ValueError, match="not a daskbelief dataset store"):
        open_store(tmp_path / "foreign.zarr")
    X, y = arrays(100)
    path = write_dataset(tmp_path / "half.zarr", (X, y))
    with pytest.raises(ValueError, match="no 'test' split"):
        open_store(path, "test")
    zarr.open_group(path, mode="r+").attrs["complete"] = False  # what a writer killed midway leaves
    with pytest.raises(ValueError, match="incomplete"):
        open_store(path)


def test_a_writer_killed_midway_leaves_no_store(tmp_path):
    """A real process writing out of core is killed: the destination never appears."""
    script = textwrap.dedent(f"""
        import sys, time, numpy as np
        from daskbelief.data import write_dataset
        def blocks():
            for i in range(1000):
                if i == 3:
                    print("writing", flush=True)
                yield np.ones((100, 4), np.float32), np.zeros(100, np.int32)
                time.sleep(0.05)
        write_dataset({str(tmp_path / 'k.zarr')!r}, blocks(), chunk_rows=50)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    assert not (tmp_path / "k.zarr").exists()
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "k.zarr")


def test_bad_reads_are_refused(tmp_path):
    X, y = arrays(100)
    store = open_store(write_dataset(tmp_path / "r.zarr", (X, y), chunk_rows=10))
    with pytest.raises(ValueError, match="outside"):
        store.read(50, 101)
    with pytest.raises(ValueError, match="batch_size"):
        list(store.minibatches((0, 100), 0))
    with pytest.raises(ValueError, match="outside"):
        list(store.minibatches((0, 200), 10))
