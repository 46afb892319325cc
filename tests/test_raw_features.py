"""Raw features in, right answers out: the standardisation a store applies on read travels with
the model (result, checkpoint, run directory), so predictions on the features the user wrote
score exactly what the run's own test evaluation scored."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.model_selection import train_test_split

from daskbelief.data import Normaliser, open_store, write_dataset
from daskbelief.nn import Dense, Sequential
from daskbelief.ps import checkpoint


def split(load):
    X, y = load(return_X_y=True)
    return train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)


def accuracy(probabilities, y) -> float:
    return float((probabilities.argmax(axis=1) == y).mean())


def test_normaliser_round_trips_and_leaves_its_input_alone():
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((50, 2, 3)) * 5 + 100).astype(np.float32)
    flat = X.reshape(50, -1)
    norm = Normaliser(flat.mean(axis=0), np.r_[flat.std(axis=0)[:5], 0.0])
    again = Normaliser.from_dict(json.loads(json.dumps(norm.to_dict())))
    before = X.copy()
    out = again(X)
    np.testing.assert_array_equal(X, before)  # a user's array is never standardised in place
    np.testing.assert_array_equal(out, norm(X))
    np.testing.assert_allclose(out.reshape(50, -1)[:, :5].std(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(out.reshape(50, -1)[:, 5], flat[:, 5] - flat[:, 5].mean(), atol=1e-4)
    assert Normaliser()(X).dtype == np.float32 and np.array_equal(Normaliser()(X), X)
    with pytest.raises(ValueError, match=r"\(1, 3\) \(3 values per example\) do not match the normaliser.s 6"):
        norm(X[:, :1])


@pytest.mark.parametrize("algorithm,load", [("downpour", load_wine),
                                            ("sandblaster", load_breast_cancer)])
def test_predict_on_raw_features_scores_the_runs_test_accuracy(tmp_path, client, algorithm, load):
    Xtr, Xte, ytr, yte = split(load)
    path = write_dataset(tmp_path / "s.zarr", (Xtr, ytr), (Xte, yte), chunk_rows=16)
    model = Sequential(input_shape=(Xtr.shape[1],), layers=[Dense(16, activation="tanh"),
                                                            Dense(int(ytr.max()) + 1)])
    ckpts = tmp_path / "checkpoints"
    if algorithm == "downpour":
        from daskbelief.train.downpour import downpour
        result = downpour(model, path, test=path, client=client, replicas=2, shards=2, epochs=20,
                          batch_size=8, rule={"name": "adagrad", "lr": 0.05}, checkpoint_dir=ckpts)
    else:
        from daskbelief.train.sandblaster import sandblaster
        result = sandblaster(model, path, test=path, client=client, shards=2, iterations=30,
                             checkpoint_dir=ckpts)
    test_accuracy = result.summary["test_accuracy"]
    assert test_accuracy > 0.75  # it learned (well above chance: 0.40 and 0.63)
    assert accuracy(result.predict(Xte), yte) == test_accuracy
    # Without the store's standardisation the same parameters answer wrongly (0.37 and 0.36
    # before the fix): the comparison above can fail.
    assert accuracy(model.predict(result.params, Xte.astype(np.float32)), yte) < test_accuracy - 0.2
    saved = checkpoint.load(checkpoint.latest(ckpts))
    assert accuracy(model.predict(saved.params, saved.normaliser(Xte)), yte) == pytest.approx(
        test_accuracy, abs=0.03)  # Sandblaster's last checkpoint may be an iterate behind


def cli(*args) -> dict:
    done = subprocess.run([sys.executable, "-m", "daskbelief.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_evaluate_and_predict_commands_take_a_store_of_new_raw_features(tmp_path, cluster,
                                                                        digits_path):
    """A store written from the raw test features alone has statistics of its own: a run's
    `evaluate` and `predict` must use the run's, and score what the run's test evaluation did."""
    from daskbelief import config, pipeline

    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[dataset]
recipe = "digits"
path = "{digits_path}"
[model]
input_shape = [64]
layers = [{{ type = "dense", units = 32, activation = "relu" }}, {{ type = "dense", units = 10 }}]
[train]
algorithm = "downpour"
replicas = 2
shards = 2
epochs = 5
rule = {{ name = "adagrad", lr = 0.05 }}
""")
    run_dir = tmp_path / "run"
    summary = pipeline.run(config.load(toml), run_dir, scheduler=cluster.scheduler_address)
    test = open_store(digits_path, "test")
    raw = write_dataset(tmp_path / "raw.zarr", test.read_raw(slice(0, test.n)), chunk_rows=50)
    assert not np.allclose(open_store(raw).normaliser.mean, open_store(digits_path).normaliser.mean)
    where = ("--scheduler", cluster.scheduler_address)
    assert cli("evaluate", run_dir, "--data", raw, "--split", "train", *where)["accuracy"] == \
        summary["test_accuracy"]
    out = cli("predict", run_dir, "--data", raw, "--split", "train", "--out", tmp_path / "p.zarr", *where)
    assert out["accuracy"] == summary["test_accuracy"]
    # A run directory written before the normaliser was saved: its dataset's statistics are used.
    (run_dir / "normaliser.json").unlink()
    assert cli("evaluate", run_dir, "--data", raw, "--split", "train", *where)["accuracy"] == \
        summary["test_accuracy"]
