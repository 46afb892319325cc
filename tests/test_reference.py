"""Reference trainers on digits and the dataset recipes: the oracles must be right themselves."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

import daskbelief_datasets as recipes
from daskbelief.data import open_store
from daskbelief.nn import Dense, LocallyConnected2D, Sequential
from daskbelief.train.evaluate import evaluate_rows
from daskbelief.train.reference import schedule, train_lbfgs, train_sgd


def accuracy(model, params, path) -> float:
    store = open_store(path, "test")
    m = evaluate_rows(model, params, store, 0, store.n)
    return m["correct"] / m["n"]


def test_reference_adagrad_reaches_95_percent_on_digits(digits_path):
    model = Sequential((64,), [Dense(64, "relu"), Dense(10)], l2=1e-4)
    with threadpool_limits(1):
        params, history = train_sgd(model, digits_path, {"name": "adagrad", "lr": 0.05},
                                    batch_size=32, epochs=15, seed=0)
    assert accuracy(model, params, digits_path) >= 0.95
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]


@pytest.mark.parametrize("rule", [{"name": "sgd", "lr": 0.1}, {"name": "momentum", "lr": 0.02, "mu": 0.9}])
def test_reference_sgd_and_momentum_learn_digits(digits_path, rule):
    model = Sequential((64,), [Dense(32, "relu"), Dense(10)])
    params, _ = train_sgd(model, digits_path, rule, batch_size=32, epochs=8, seed=1)
    assert accuracy(model, params, digits_path) >= 0.9


def test_schedule_reads_whole_epochs_in_order(digits_path):
    store = open_store(digits_path)
    per_epoch = store.steps_per_epoch(store.row_ranges(1)[0], 100)
    batches = list(schedule(store, 100, seed=0, epochs=2))
    assert len(batches) == 2 * per_epoch
    first = np.concatenate([y for _, y in batches[:per_epoch]])
    assert sorted(first) == sorted(store.read()[1])
    assert len(list(schedule(store, 100, seed=0, steps=per_epoch + 3))) == per_epoch + 3


def test_reference_lbfgs_final_loss_within_1_percent_of_scipy(digits_path):
    model = Sequential((64,), [Dense(16, "tanh"), Dense(10)], l2=1e-3)
    iterations = 60
    with threadpool_limits(1):
        params, res = train_lbfgs(model, digits_path, iterations=iterations, history=10, seed=0,
                                  portion_size=200, gtol=0)
    assert res.iterations == iterations and np.isfinite(params).all()

    store = open_store(digits_path)
    X, y = store.read()
    X64 = X.astype(np.float64)

    def fun(p):  # the same objective in float64, through the same model code
        loss, g = model.loss_and_grad(p, X64, y)
        return loss, g

    ref = minimize(fun, model.init(0).astype(np.float64), jac=True, method="L-BFGS-B",
                   options={"maxiter": iterations, "maxcor": 10, "gtol": 0, "ftol": 0})
    assert ref.nit == iterations
    ours = fun(params.astype(np.float64))[0]
    assert ours == pytest.approx(res.loss, rel=1e-4)  # the reported loss is the true loss
    assert abs(ours - ref.fun) <= 0.01 * ref.fun, (ours, ref.fun)


def test_reference_trainers_refuse_a_model_that_does_not_fit(digits_path):
    with pytest.raises(ValueError, match="input size does not fit"):
        train_sgd(Sequential((32,), [Dense(10)]), digits_path, steps=1)
    with pytest.raises(ValueError, match="class count mismatch"):
        train_lbfgs(Sequential((64,), [Dense(7)]), digits_path, iterations=1)
    with pytest.raises(ValueError, match="portion_size=5000 is larger than the batch"):
        train_lbfgs(Sequential((64,), [Dense(10)]), digits_path, iterations=1, portion_size=5000)


# -- recipes --------------------------------------------------------------------------------

def test_digits_recipe_is_stratified_and_sized(tmp_path):
    path = recipes.build("digits", tmp_path / "d.zarr", size=500, seed=2)
    train, test = open_store(path), open_store(path, "test")
    assert (train.n, test.n, train.n_classes, train.feature_shape) == (400, 100, 10, (64,))
    assert np.bincount(test.read()[1], minlength=10).min() >= 9  # every class, about equally


def test_speech_frames_recipe_is_deterministic_and_learnable(tmp_path):
    a = recipes.build("speech-frames", tmp_path / "a.zarr", size=3000, classes=8, chunk_rows=256)
    b = recipes.build("speech-frames", tmp_path / "b.zarr", size=3000, classes=8, chunk_rows=1000)
    sa, sb = open_store(a), open_store(b)
    assert sa.feature_shape == (440,) and sa.n_classes == 8 and (sa.n, open_store(a, "test").n) == (2700, 300)
    np.testing.assert_array_equal(sa.read()[1], sb.read()[1])  # independent of chunking
    assert np.bincount(sa.read()[1], minlength=8).min() > 50
    model = Sequential((440,), [Dense(64, "relu"), Dense(8)])
    params, _ = train_sgd(model, a, {"name": "adagrad", "lr": 0.05}, batch_size=64, epochs=6)
    assert accuracy(model, params, a) > 0.5  # chance is about 1/8


def test_images_recipe_suits_a_locally_connected_model(tmp_path):
    path = recipes.build("images", tmp_path / "i.zarr", size=2000, side=16)
    store = open_store(path)
    assert store.feature_shape == (16, 16, 3) and store.read_raw(slice(0, 2))[0].dtype == np.uint8
    got = {}
    for name, model in [("lc", Sequential((16, 16, 3), [LocallyConnected2D(4, 5, 2, "relu"), Dense(10)])),
                        ("linear", Sequential((16, 16, 3), [Dense(10)]))]:
        params, _ = train_sgd(model, path, {"name": "adagrad", "lr": 0.05}, batch_size=32, epochs=4)
        got[name] = accuracy(model, params, path)
    # Learnable (chance is 0.1), and local filters beat a linear read-out of the pixels.
    assert got["lc"] > 0.65 and got["lc"] > got["linear"] + 0.05, got


@pytest.mark.parametrize("name,kw,message", [
    ("mnist", {}, "unknown dataset recipe 'mnist'"),
    ("digits", {"size": 5000}, "1797"),
    ("speech-frames", {"classes": 1}, "classes"),
    ("images", {"colour": 1}, "colour"),
    ("images", {"size": 0}, "size"),
])
def test_recipe_bad_options(tmp_path, name, kw, message):
    with pytest.raises(ValueError, match=message):
        recipes.build(name, tmp_path / "x.zarr", **kw)
    assert not (tmp_path / "x.zarr").exists()


def test_train_sgd_callback_sees_every_report_with_the_live_parameters(digits_path):
    model = Sequential((64,), [Dense(10)])
    seen = []
    final, history = train_sgd(model, digits_path, steps=100, report_every=10,
                               callback=lambda row, params: seen.append((row, params.copy())))
    assert [row["step"] for row, _ in seen] == list(range(10, 101, 10))
    assert [row for row, _ in seen] == history
    assert len({float(p.sum()) for _, p in seen}) == len(seen)  # parameters as they trained
    np.testing.assert_array_equal(seen[-1][1], final)


def test_train_sgd_callback_can_stop_training(digits_path):
    model = Sequential((64,), [Dense(10)])
    _, history = train_sgd(model, digits_path, steps=1000, report_every=10,
                           callback=lambda row, params: row["step"] >= 30)
    assert [h["step"] for h in history] == [10, 20, 30]
