"""Damaged stores, made by editing the zarr files on disk: every case is an error naming the store,
the array and the chunk -- through the API, from a worker's task, and ``daskbelief info --verify``
-- never zeros and never an IndexError from inside a step."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from daskbelief.data import DataError, open_store, write_dataset
from daskbelief.data.verify import verify


def damage_truncate(path):
    chunk = Path(path, "train/X/c/3/0")
    chunk.write_bytes(chunk.read_bytes()[:-20])


def damage_flip(path):
    chunk = Path(path, "train/X/c/3/0")
    data = bytearray(chunk.read_bytes())
    data[8:16] = bytes(b ^ 0xFF for b in data[8:16])  # 8 flipped bytes, the length unchanged
    chunk.write_bytes(bytes(data))


def damage_delete(path):
    os.remove(Path(path, "train/X/c/3/0"))


def damage_shorten_y(path):
    meta = Path(path, "train/y/zarr.json")
    doc = json.loads(meta.read_text())
    doc["shape"][0] -= 10
    meta.write_text(json.dumps(doc))


def damage_y_dtype(path):
    meta = Path(path, "train/y/zarr.json")
    doc = json.loads(meta.read_text())
    doc["data_type"] = "int64"  # what the chunks hold no longer matches what the metadata says
    meta.write_text(json.dumps(doc))


def damage_label(path):
    zarr.open_array(str(Path(path, "train/y")), mode="r+")[200] = 99  # a valid chunk, a bad label


CHUNK_3 = r"train/X chunk 3 \(rows 192-255\)"
DAMAGE = {
    "truncated": (damage_truncate, CHUNK_3 + " fails its crc32c checksum"),
    "flipped": (damage_flip, CHUNK_3 + " fails its crc32c checksum"),
    "deleted": (damage_delete, CHUNK_3 + r" is missing \(no train/X/c/3/0"),
    "y-short": (damage_shorten_y, "train/y has 1427 rows but train/X and the store's metadata have 1437"),
    "y-int64": (damage_y_dtype, r"train/y is int64 of shape \(1437,\); a classification store "
                                r"holds int32 labels"),
    "label-99": (damage_label, r"train/y chunk 3 \(rows 192-255\) holds the label 99 at row 200, "
                               r"outside \[0, 10\)"),
}


def damaged(digits_path, tmp_path, case):
    path = shutil.copytree(digits_path, tmp_path / f"{case}.zarr")
    DAMAGE[case][0](path)
    return str(path), DAMAGE[case][1]


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_store_is_an_error_naming_the_chunk_through_the_api(digits_path, tmp_path, case):
    path, message = damaged(digits_path, tmp_path, case)
    with pytest.raises(DataError, match=f"dataset store {path}: {message}"):
        store = open_store(path)  # the length case is found here, before any read
        for shard in store.row_ranges(3):
            list(store.minibatches(shard, 32))
    with pytest.raises(DataError, match=message):
        open_store(path).read()
    with pytest.raises(DataError, match=f"{path} failed verification, 1 problem\\(s\\): {message}"):
        verify(path)


def test_undamaged_rows_still_read_and_test_split_is_untouched(digits_path, tmp_path):
    path, _ = damaged(digits_path, tmp_path, "deleted")
    store = open_store(path)
    X, _ = store.read(0, 192)  # chunks 0-2 only
    np.testing.assert_array_equal(X, open_store(digits_path).read(0, 192)[0])
    assert open_store(path, "test").read()[0].shape == (360, 64)


def test_verify_reads_every_chunk_and_lists_every_problem(digits_path, tmp_path):
    summary = verify(digits_path)
    assert summary["train"] == {"n": 1437, "chunks": 23, "checksums": True, "labels": [0, 9]}
    assert summary["test"]["n"] == 360 and summary["warnings"] == []
    path = shutil.copytree(digits_path, tmp_path / "many.zarr")
    for i in (2, 7, 9, 11):
        os.remove(Path(path, f"train/X/c/{i}/0"))
    damage_label(path)
    with pytest.raises(DataError, match=r"5 problem\(s\): train/X chunk 2 .* is missing.*; and 2 more"):
        verify(path)


def test_errors_in_worker_tasks_reach_the_client_intact(digits_path, tmp_path, client):
    from daskbelief.nn import Dense, Sequential
    from daskbelief.train.evaluate import evaluate

    path = shutil.copytree(digits_path, tmp_path / "t.zarr")
    os.remove(Path(path, "test/X/c/4/0"))
    model = Sequential(input_shape=(64,), layers=[Dense(10)])
    with pytest.raises(DataError, match=fr"{path}: test/X chunk 4 \(rows 256-319\) is missing"):
        evaluate(model, model.init(0), str(path), client=client)


def test_every_chunk_is_written_even_all_zero_ones(tmp_path):
    """zarr leaves out chunks equal to the fill value unless told: a store must not, or a lost
    chunk could not be told from an empty one. Each writer: arrays, blocks, dask arrays."""
    X = np.zeros((100, 3), np.float32)
    X[50:] = 1.0  # chunks 0-1 all zeros, like their labels
    y = (np.arange(100) >= 50).astype(np.int32)
    sources = {"arrays": (X, y), "blocks": iter([(X[:30], y[:30]), (X[30:], y[30:])]),
               "dask": (da.from_array(X, chunks=40), da.from_array(y, chunks=40))}
    for name, source in sources.items():
        path = write_dataset(tmp_path / f"{name}.zarr", source, chunk_rows=25)
        assert sorted(os.listdir(Path(path, "train/X/c"))) == ["0", "1", "2", "3"], name
        assert sorted(os.listdir(Path(path, "train/y/c"))) == ["0", "1", "2", "3"], name
        assert verify(path)["train"]["checksums"]


def old_store(tmp_path, X, y):
    """A store as written before chunks were checksummed and all written (zarr's defaults)."""
    new = open_store(write_dataset(tmp_path / "new.zarr", (X, y), chunk_rows=25))
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="w")
    group.create_array("train/X", data=X, chunks=(25, X.shape[1]))
    group.create_array("train/y", data=y.astype(np.int32), chunks=(25,))
    attrs = dict(zarr.open_group(new.url, mode="r").attrs)
    del attrs["every_chunk_written"]
    group.attrs.update(attrs)
    return str(tmp_path / "old.zarr")


def test_stores_written_before_the_checks_open_and_verify_what_they_can(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((100, 3)).astype(np.float32)
    y = np.zeros(100, np.int32)
    y[50:] = rng.integers(0, 3, 50)
    y[-1] = 2
    path = old_store(tmp_path, X, y)
    assert not os.path.exists(Path(path, "train/y/c/0"))  # all zeros: zarr did not write it
    store = open_store(path)
    np.testing.assert_array_equal(store.read_raw(slice(0, 100))[1], y)
    summary = verify(path)
    assert summary["train"]["checksums"] is False and summary["train"]["labels"] == [0, 2]
    assert any("absent, read as zeros" in w for w in summary["warnings"])
    assert any("no checksum" in w for w in summary["warnings"])
    zarr.open_array(str(Path(path, "train/y")), mode="r+")[60] = 7  # labels are checked all the same
    with pytest.raises(DataError, match=r"train/y chunk 2 \(rows 50-74\) holds the label 7 at row 60"):
        open_store(path).read()


# -- through the command line -----------------------------------------------------------------

def cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "daskbelief.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def pipeline_toml(tmp_path, name: str, store: str) -> Path:
    """The shipped pipeline ``name``, reading ``store``."""
    text = (Path(__file__).parents[1] / "pipelines" / f"{name}.toml").read_text()
    assert 'path = "data/digits.zarr"' in text
    path = tmp_path / f"{name}.toml"
    path.write_text(text.replace('path = "data/digits.zarr"', f'path = "{store}"'))
    return path


def test_info_verify_gives_one_line_and_status_2_for_each_damage(digits_path, tmp_path, capsys):
    from daskbelief.cli import main  # in this process: the same command, without its start-up

    assert main(["info", "--verify", digits_path]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["verified"]
    for case in DAMAGE:
        path, message = damaged(digits_path, tmp_path, case)
        assert main(["info", "--verify", path]) == 2, case
        err = capsys.readouterr().err
        assert re.fullmatch(f"daskbelief info: error: dataset store {path} failed verification, "
                            f"1 problem\\(s\\): {message}.*\n", err), (case, err)


# Every case through both pipelines would be 10 training runs; the chunk cases are shared out so
# that each pipeline meets a checksum failure, a missing chunk and a bad label (their read paths
# differ: replicas' prefetched minibatches, Sandblaster's portions), the length case both.
TRAIN_CASES = [("digits-downpour", c) for c in ("truncated", "deleted", "label-99", "y-short")] + \
              [("digits-sandblaster", c) for c in ("flipped", "deleted", "label-99", "y-short")]


@pytest.mark.parametrize("pipeline,case", TRAIN_CASES)
def test_train_on_a_damaged_store_exits_2_with_one_line(digits_path, tmp_path, cluster, pipeline,
                                                        case):
    path, message = damaged(digits_path, tmp_path, case)
    # Downpour on a cluster of its own: a replica failing during the warm start leaves the other
    # replicas' threads blocked on a cluster that outlives the run (see notes/data.md).
    where = (("--local-workers", 1) if pipeline == "digits-downpour"
             else ("--scheduler", cluster.scheduler_address))
    done = cli("train", pipeline_toml(tmp_path, pipeline, path), *where, "--out", tmp_path / "run")
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert re.fullmatch(f"daskbelief train: error: dataset store {path}: {message}.*", last), last
    assert "DataError" not in done.stderr and "Compute Failed" not in done.stderr  # said once
    if pipeline == "digits-sandblaster" or case == "y-short":
        assert done.stderr.count("\n") == 1, done.stderr  # nothing else at all
    if case == "y-short":  # found before any work: nothing written
        assert not (tmp_path / "run").exists()
