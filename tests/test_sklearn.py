"""daskbelief.sklearn: scikit-learn's estimator checks, Dask arrays and dataframes in and out,
partial_fit, to_local, Pipeline and GridSearchCV, on the session's LocalCluster of worker
processes. Oracles: scikit-learn's own checks, least squares (LinearRegression) for a linear
network trained to convergence, and the in-process predictor for the Dask predictions."""
from __future__ import annotations

import pickle

import dask.array as da
import numpy as np
import pytest
from distributed import Client, get_worker
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MinMaxScaler
from sklearn.utils import estimator_checks
from sklearn.utils.estimator_checks import parametrize_with_checks

from daskbelief.data import open_store
from daskbelief.sklearn import (EXPECTED_FAILED_CHECKS, DownpourClassifier, DownpourRegressor,
                                SandblasterClassifier, SandblasterRegressor,
                                expected_failed_checks)

# Small networks and short fits: scikit-learn's checks fit each estimator about 50 times, on
# at most a few hundred rows (so Sandblaster's batches are cut into a few portions of 100 rows).
CHECKED = [DownpourClassifier(hidden_layer_sizes=(16,), max_iter=6, random_state=0),
           DownpourRegressor(hidden_layer_sizes=(16,), max_iter=6, random_state=0),
           SandblasterClassifier(hidden_layer_sizes=(8,), max_iter=3, portion_size=100,
                                 random_state=0),
           SandblasterRegressor(hidden_layer_sizes=(8,), max_iter=3, portion_size=100,
                                random_state=0)]


@pytest.fixture(scope="module", autouse=True)
def current_client(cluster):
    """One client of the session's cluster, current for every test here (the ~230 checks
    would otherwise each connect anew)."""
    with Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


@parametrize_with_checks(CHECKED, expected_failed_checks=expected_failed_checks)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


SYNCHRONOUS = [(cls, name) for cls in (DownpourClassifier, DownpourRegressor)
               for name in expected_failed_checks(cls())]


def test_every_expected_failure_is_checked_synchronously():
    assert {name for _, name in SYNCHRONOUS} == set(EXPECTED_FAILED_CHECKS)
    assert expected_failed_checks(SandblasterClassifier()) == {}


@pytest.mark.parametrize("cls, name", SYNCHRONOUS)
def test_expected_failures_pass_once_downpour_is_synchronous(cls, name):
    """The checks excused for asynchrony pass with one replica and blocking communication."""
    estimator = cls(hidden_layer_sizes=(16,), max_iter=10, replicas=1, overlap=False,
                    random_state=0)
    assert expected_failed_checks(estimator) == {}
    getattr(estimator_checks, name)(cls.__name__, estimator)


def on_a_worker(block):
    """Identity that fails outside a Dask worker: a collection built with it cannot be
    computed on the client."""
    get_worker()
    return block


def test_dask_array_in_dask_array_out(digits, tmp_path):
    """The workers write the store, its data shards following the Dask chunks; predictions
    are lazy Dask arrays equal to the in-process predictor's; score is a lazy Dask scalar."""
    X, y = digits
    dX = da.from_array(X, chunks=(300, 64)).map_blocks(on_a_worker, dtype=X.dtype)
    dy = da.from_array(y, chunks=300).map_blocks(on_a_worker, dtype=y.dtype)
    est = DownpourClassifier(hidden_layer_sizes=(32,), max_iter=15, replicas=2, shards=2,
                             directory=str(tmp_path), random_state=0).fit(dX, dy)
    assert open_store(str(tmp_path / "train.zarr")).chunk_rows == 300
    assert est.n_features_in_ == 64 and list(est.classes_) == list(range(10))
    labels, probs, score = est.predict(dX), est.predict_proba(dX), est.score(dX, dy)
    assert isinstance(labels, da.Array) and isinstance(probs, da.Array) and isinstance(score, da.Array)
    local = pickle.loads(pickle.dumps(est.to_local()))
    np.testing.assert_array_equal(labels.compute(), local.predict(X))
    np.testing.assert_allclose(probs.compute(), local.predict_proba(X), rtol=1e-6)
    assert float(score.compute()) == pytest.approx(est.score(X, y))
    assert est.score(X, y) > 0.9
    assert len(est.evals_result_["train"]["loss"]) > 2


def test_dask_dataframe_regression_matches_least_squares():
    """A linear network trained by Sandblaster L-BFGS to convergence is least squares."""
    import dask.dataframe as dd
    import pandas as pd

    rng = np.random.default_rng(3)
    X = rng.normal(size=(400, 5)) * [1, 10, 0.1, 3, 1] + [0, 5, -2, 0, 100]
    y = X @ [1.5, -0.2, 4.0, 0.0, 0.3] + rng.normal(scale=0.5, size=400) + 7
    dX = dd.from_pandas(pd.DataFrame(X, columns=list("abcde")), npartitions=4)
    dy = dd.from_pandas(pd.Series(y), npartitions=4)
    est = SandblasterRegressor(hidden_layer_sizes=(), l2=0.0, max_iter=60, tol=1e-7,
                               portion_size=100, random_state=0).fit(dX, dy)
    oracle = LinearRegression().fit(X, y)
    got = est.predict(dX)
    assert isinstance(got, da.Array)
    np.testing.assert_allclose(got.compute(), oracle.predict(X), rtol=1e-3, atol=2e-3)
    assert float(est.score(dX, dy).compute()) == pytest.approx(oracle.score(X, y), abs=1e-4)
    assert est.n_iter_ == est.summary_["iterations"] < 60  # the iterations made, not max_iter


def test_partial_fit_continues_from_the_fitted_parameters(digits):
    X, y = digits
    est = SandblasterClassifier(hidden_layer_sizes=(16,), max_iter=5, portion_size=300,
                                random_state=0)
    first = est.partial_fit(X[:900], y[:900], classes=np.arange(10)).summary_["loss"]
    mean, params = est.normaliser_.mean.copy(), est.params_.copy()
    second = est.partial_fit(X[:900], y[:900]).summary_
    assert second["loss"] < first  # started where the first call ended, went further down
    np.testing.assert_array_equal(est.normaliser_.mean, mean)  # the first fit's feature scaling stays
    assert not np.array_equal(est.params_, params)
    with pytest.raises(ValueError, match="not among the classes"):
        est.partial_fit(X[:10], y[:10] + 10)
    refit = SandblasterClassifier(hidden_layer_sizes=(16,), max_iter=5, portion_size=300,
                                  random_state=0).fit(X[:900], y[:900])
    assert refit.summary_["loss"] == pytest.approx(first)  # fit starts afresh, partial_fit did not


def test_downpour_regressor_partial_fit_and_named_client(current_client):
    client = current_client
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 4)).astype(np.float32)
    y = np.stack([np.sin(X[:, 0]) + X[:, 1], X[:, 2] * X[:, 3]], axis=1) * 50 + 10
    # One replica without overlap: each partial_fit is then the same computation every run (two
    # asynchronous replicas pushing 5 steps at a time on 600 rows swing R^2 from one call to the
    # next, by up to 0.6 under load), so the scores can be asked to climb call after call.
    est = DownpourRegressor(hidden_layer_sizes=(32,), max_iter=1, client=client, random_state=0,
                            replicas=1, overlap=False)
    assert clone(est).client is client and pickle.loads(pickle.dumps(est)).client is None
    scores = [est.partial_fit(X, y).score(X, y) for _ in range(6)]
    assert est.predict(X).shape == (600, 2)
    assert scores == sorted(scores) and scores[-1] > 0.8, scores  # each call went on from the last
    assert sorted(est.rule_state_) == ["sum_sq"]  # the next partial_fit continues Adagrad
    est.set_params(rule="sgd", learning_rate=1e-4).partial_fit(X, y)  # a rule keeping no state
    assert est.rule_state_ == {}


def test_pipeline_and_grid_search(digits):
    X, y = digits
    pipe = Pipeline([("scale", MinMaxScaler()),
                     ("net", DownpourClassifier(max_iter=8, replicas=2, random_state=0))])
    search = GridSearchCV(pipe, {"net__hidden_layer_sizes": [(4,), (64,)]}, cv=2).fit(X, y)
    assert search.best_params_ == {"net__hidden_layer_sizes": (64,)}
    assert search.best_score_ > 0.85
    assert search.score(X, y) > 0.9


def test_bad_input_is_refused_before_training(digits):
    X, y = digits
    est = DownpourClassifier(max_iter=1)
    with pytest.raises(ValueError, match="at least 2 classes"):
        est.fit(X[:50], np.zeros(50))
    with pytest.raises(ValueError, match="NaN"):
        est.fit(np.where(np.arange(64) == 3, np.nan, X[:50]), y[:50])
    dX = da.from_array(np.where(np.arange(64) == 3, np.nan, X), chunks=(500, 64))
    with pytest.raises(ValueError, match="NaN"):
        est.fit(dX, da.from_array(y, chunks=500))
    est.fit(X[:200], y[:200])
    with pytest.raises(ValueError, match="X has 10 features, but DownpourClassifier is expecting 64"):
        est.predict(da.from_array(X[:, :10], chunks=(100, 10)))


def test_eval_set_curves_match_score_after_fit_and_partial_fit(digits):
    """The last validation point is the final evaluation of the held-out set, written with the
    training scaling: it equals score() on the raw held-out rows, also after partial_fit
    (whose stores hold rows scaled with the first fit's statistics)."""
    X, y = digits
    held = (X[1400:], y[1400:])
    est = DownpourClassifier(hidden_layer_sizes=(32,), max_iter=5, random_state=0)
    for step in (est.fit, est.partial_fit):
        step(X[:1400], y[:1400], eval_set=held)
        valid = est.evals_result_["valid"]
        assert valid["accuracy"][-1] == pytest.approx(est.score(*held), abs=1e-9)
        assert len(valid["loss"]) == len(valid["accuracy"])
    assert est.n_iter_ == 1 and est.score(*held) > 0.85
