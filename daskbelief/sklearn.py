"""scikit-learn estimators over Downpour SGD and Sandblaster L-BFGS, for data held as Dask
collections (or NumPy arrays).

``DownpourClassifier``, ``DownpourRegressor``, ``SandblasterClassifier`` and
``SandblasterRegressor`` follow scikit-learn's estimator API, in the manner of
``xgboost.dask.DaskXGBClassifier`` and ``lightgbm.DaskLGBMClassifier``:

* ``fit(X, y)`` takes NumPy arrays, Dask arrays or Dask dataframes. The data is written to a zarr
  training store (in ``directory``, or a temporary directory the estimator removes after the fit)
  whose chunks follow a Dask collection's chunks, by the workers, without passing through the
  client; the store's data shards are what the replicas train on.
* ``predict`` / ``predict_proba`` / ``score`` answer NumPy for NumPy input and lazy Dask arrays
  for Dask input (block by block, on the workers).
* ``partial_fit`` continues from the fitted parameters, with the feature scaling of the first fit.
* ``to_local()`` returns the fitted model as a plain in-process predictor; ``history_`` holds the
  training run's history rows and ``evals_result_`` the loss (and accuracy) curves.
* The Dask client is ``client=`` or the current one (else a local cluster for the call).

The estimators scale the features (and, for regressors, the targets) with the first fit's
statistics, so ``predict`` takes raw features.
"""
from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone, is_classifier
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from daskbelief.cluster import client_or_local
from daskbelief.data import open_store, write_dataset
from daskbelief.data.write import default_chunk_rows
from daskbelief.nn import Dense, Sequential
from daskbelief.optim.rules import make_rule

_ASYNC = ("Downpour's replicas push asynchronously: the order in which their updates interleave "
          "depends on timing, so two fits on the same data with the same random_state differ "
          "(a deterministic setting, replicas=1 and overlap=False, passes this check)")

# The scikit-learn checks that do not hold for an asynchronous Downpour estimator, check name ->
# reason (the form ``check_estimator(expected_failed_checks=...)`` takes). Each compares two fits
# on the same data; Sandblaster's fits are deterministic and pass every check.
_CLASSIFIER_CHECKS = ("check_fit_idempotent", "check_classifier_data_not_an_array",
                      "check_supervised_y_2d")
_REGRESSOR_CHECKS = ("check_fit_idempotent", "check_regressor_data_not_an_array",
                     "check_regressors_int", "check_supervised_y_2d")
EXPECTED_FAILED_CHECKS: dict[str, str] = dict.fromkeys(_CLASSIFIER_CHECKS + _REGRESSOR_CHECKS,
                                                      _ASYNC)


def expected_failed_checks(estimator) -> dict[str, str]:
    """The checks ``estimator`` is expected to fail: those of ``EXPECTED_FAILED_CHECKS`` that
    scikit-learn runs for its kind, for a Downpour estimator whose fits are asynchronous
    (several replicas, or communication overlapped with computation); none otherwise."""
    asynchronous = getattr(estimator, "replicas", 1) > 1 or getattr(estimator, "overlap", False)
    if not asynchronous:
        return {}
    names = _CLASSIFIER_CHECKS if is_classifier(estimator) else _REGRESSOR_CHECKS
    return {name: EXPECTED_FAILED_CHECKS[name] for name in names}


CLASSIFICATION, REGRESSION = "softmax_cross_entropy", "mse"


def _is_dask(a) -> bool:
    return hasattr(a, "dask") and hasattr(a, "__dask_graph__")


def _dask_array(a):
    """A Dask array from a Dask array, dataframe or series (row counts computed when unknown)."""
    if hasattr(a, "to_dask_array"):
        return a.to_dask_array(lengths=True)
    return a


class LocalPredictor:
    """A fitted model in this process: raw features in, predictions out (``to_local()``).

    Holds the network, its parameters and the first fit's ``Normaliser``: features are
    standardised with the training statistics; regression outputs are mapped back to the
    targets' units; classification outputs are the probabilities of ``classes``.
    """

    def __init__(self, model, params, normaliser, classes=None, y_mean=None, y_std=None):
        # float64 arithmetic: a prediction must not depend on which other rows share its batch
        # (float32 BLAS rounds differently by batch size; scikit-learn checks 1e-7 agreement)
        self.model, self.params = model, np.asarray(params, dtype=np.float64)
        self.normaliser = normaliser
        self.classes, self.y_mean, self.y_std = classes, y_mean, y_std

    def _outputs(self, X) -> np.ndarray:
        return self.model.predict(self.params, self.normaliser(X, dtype=np.float64))

    def predict_proba(self, X) -> np.ndarray:
        return self._outputs(X)

    def predict(self, X) -> np.ndarray:
        out = self._outputs(X)
        if self.classes is not None:
            return self.classes[out.argmax(axis=1)]
        out = out.astype(np.float64) * self.y_std + self.y_mean
        return out[:, 0] if self.y_mean.ndim == 0 else out


class _DaskbeliefEstimator(BaseEstimator):
    """What the four estimators share: data in, a training store, one training call, predictions.

    Subclasses set ``_loss`` and implement ``_train(model, store_url, test_url, params, client,
    continuing)`` returning a ``TrainResult``.
    """

    _loss: str

    # -- input ------------------------------------------------------------------------------

    def _check_X(self, X, reset: bool):
        """``(X, is_dask)``: NumPy input validated by scikit-learn, Dask input by shape and dtype
        here (its values are checked by ``write_dataset`` as it is written)."""
        if not _is_dask(X):
            X = validate_data(self, X, reset=reset, dtype=[np.float32, np.float64])
            return X.astype(np.float32, copy=False), False
        X = _dask_array(X)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (samples, features), got a Dask array of shape {X.shape}")
        if X.dtype.kind not in "fiub":
            raise ValueError(f"X must hold numbers, got a Dask array of dtype {X.dtype}")
        if reset:
            self.n_features_in_ = int(X.shape[1])
        elif X.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {X.shape[1]} features, but {type(self).__name__} is "
                             f"expecting {self.n_features_in_} features as input")
        return X, True

    def _check_Xy(self, X, y, reset: bool):
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y is None")
        if not _is_dask(X):
            X, y = validate_data(self, X, y, reset=reset, dtype=[np.float32, np.float64],
                                 multi_output=self._loss == REGRESSION, y_numeric=self._loss == REGRESSION)
            return X.astype(np.float32, copy=False), y, False
        X, _ = self._check_X(X, reset)
        y = _dask_array(y)
        if y.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
        return X, y, True

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, X, y, eval_set=None):
        """Train from a fresh start on ``(X, y)``; ``eval_set=(X_val, y_val)`` is evaluated at
        the end of training (and during it, every ``eval_every`` seconds) into ``evals_result_``."""
        for name in ("model_", "params_", "rule_state_"):
            self.__dict__.pop(name, None)
        return self._fit(X, y, eval_set, classes=None, continuing=False)

    def partial_fit(self, X, y, classes=None, eval_set=None):
        """Continue training from the fitted parameters on ``(X, y)`` (the first call fits from a
        fresh start; ``classes`` lists every class there, as scikit-learn's convention has it)."""
        continuing = hasattr(self, "params_")
        return self._fit(X, y, eval_set, classes=classes, continuing=continuing)

    def _fit(self, X, y, eval_set, classes, continuing: bool):
        X, y, dask_input = self._check_Xy(X, y, reset=not continuing)
        if X.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 samples, got "
                             f"{X.shape[0]} sample")
        y = self._encode_y(y, dask_input, classes, continuing)
        test = None
        if eval_set is not None:
            Xv, yv, v_dask = self._check_Xy(*eval_set, reset=False)
            test = (self._scaled_X(Xv) if continuing else Xv, self._encode_y(yv, v_dask, None, True))
        if continuing:
            X = self._scaled_X(X)
        model = self.model_ if continuing else self._model(X.shape[1])
        with self._store_dir() as where, client_or_local(self.client) as client, client.as_current():
            url = str(Path(where) / "train.zarr")
            write_dataset(url, (X, y), test, chunk_rows=self._chunk_rows(X),
                          n_classes=len(self.classes_) if self._loss == CLASSIFICATION else None,
                          normalize=not continuing, overwrite=True)
            if not continuing:
                self.normaliser_ = open_store(url).normaliser
            result = self._train(model, url, url if test is not None else None,
                                 self.params_ if continuing else None, client, continuing)
        self.model_, self.params_ = model, result.params
        self.rule_state_ = result.rule_state  # Downpour: the next partial_fit continues the rule
        self.history_ = (self.history_ if continuing else []) + list(result.history)
        self.summary_ = result.summary
        self.n_iter_ = self._iterations(result, continuing)
        return self

    def _scaled_X(self, X):
        """Features scaled with the first fit's statistics (for stores written afterwards)."""
        if not _is_dask(X):
            return self.normaliser_(X)
        return X.rechunk({1: -1}).map_blocks(self.normaliser_, dtype=np.float32)

    def _chunk_rows(self, X) -> int:
        """Rows per zarr chunk: a Dask array's own chunk size; for NumPy, about 1 MB chunks, but
        small enough that every replica gets a data shard."""
        if _is_dask(X):
            return int(max(X.chunks[0]))
        per_replica = -(-X.shape[0] // self._data_shards())
        return max(1, min(default_chunk_rows(X.shape[1] * 4), per_replica))

    def _data_shards(self) -> int:
        return 1

    def _store_dir(self):
        """The directory for the training store: ``directory`` (the store is replaced at each
        fit), or a temporary one removed when the fit ends (the store is only needed while
        training). Every worker must be able to read it."""
        if self.directory is not None:
            return contextlib.nullcontext(self.directory)
        return tempfile.TemporaryDirectory(prefix="daskbelief-sklearn-")

    def _model(self, n_features: int) -> Sequential:
        layers = [Dense(int(h), activation=self.activation) for h in self.hidden_layer_sizes]
        return Sequential(input_shape=(n_features,), layers=[*layers, Dense(self._n_outputs())],
                          loss=self._loss, l2=self.l2)

    def _seed(self) -> int:
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    # -- prediction -------------------------------------------------------------------------

    def to_local(self) -> LocalPredictor:
        """The fitted model as a plain in-process predictor (NumPy in, NumPy out)."""
        check_is_fitted(self, "params_")
        return LocalPredictor(self.model_, self.params_, self.normaliser_,
                              **self._target_decoding())

    def _apply(self, method: str, X, columns: int | None, dtype):
        """``LocalPredictor.method`` on NumPy input, or block by block on a Dask array."""
        local = self.to_local()
        X, dask_input = self._check_X(X, reset=False)
        if not dask_input:
            return getattr(local, method)(X)
        X = X.rechunk({1: -1})
        if columns is None:
            return X.map_blocks(getattr(local, method), dtype=dtype, drop_axis=1)
        return X.map_blocks(getattr(local, method), dtype=dtype, chunks=(X.chunks[0], (columns,)))

    @property
    def evals_result_(self) -> dict:
        """``{"train": {"loss": [...]}, "valid": {"loss": [...], "accuracy": [...]}}``: the
        training loss reports and the evaluations of ``eval_set``, in time order."""
        check_is_fitted(self, "params_")
        train = [h["loss"] for h in self.history_ if h.get("loss") is not None]
        tests = [h for h in self.history_ if h.get("test_loss") is not None]
        out = {"train": {"loss": train}}
        if tests:
            out["valid"] = {"loss": [h["test_loss"] for h in tests]}
            if self._loss == CLASSIFICATION:
                out["valid"]["accuracy"] = [h["test_accuracy"] for h in tests]
        return out

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        return tags

    def __sklearn_clone__(self):
        """scikit-learn's clone, except that the Dask client is shared, not copied: a
        connection cannot be deep-copied, and the clone should train on the same cluster."""
        return type(self)(**{name: value if name == "client" else clone(value, safe=False)
                             for name, value in self.get_params(deep=False).items()})

    def __getstate__(self):
        """Pickled without the client (a connection does not travel): an unpickled estimator
        trains with the current client of wherever it is."""
        return {**super().__getstate__(), "client": None}


class _ClassifierPart(ClassifierMixin):
    """Labels of any type mapped to class ids; probabilities and labels back."""

    _loss = CLASSIFICATION

    def _encode_y(self, y, dask_input: bool, classes, continuing: bool):
        if not dask_input:
            y = column_or_1d(y, warn=True)
            check_classification_targets(y)
            found = np.unique(y)
        else:
            import dask.array as da

            found = np.unique(da.unique(y).compute())
        if not continuing:
            self.classes_ = np.unique(classes) if classes is not None else found
            if len(self.classes_) < 2:
                raise ValueError(f"{type(self).__name__} needs at least 2 classes in y, got "
                                 f"1 class: {self.classes_[0]!r}")
        unknown = np.setdiff1d(found, self.classes_)
        if len(unknown):
            raise ValueError(f"y has labels {unknown.tolist()} that are not among the classes "
                             f"{self.classes_.tolist()} (pass classes= to the first partial_fit)")
        encode = functools.partial(np.searchsorted, self.classes_)
        if dask_input:
            return y.map_blocks(lambda b: encode(b).astype(np.int32), dtype=np.int32)
        return encode(y).astype(np.int32)

    def _n_outputs(self) -> int:
        return len(self.classes_)

    def _target_decoding(self) -> dict:
        return {"classes": self.classes_}

    def predict(self, X):
        """The most probable class of each row (a Dask array for Dask input)."""
        check_is_fitted(self, "params_")
        return self._apply("predict", X, None, self.classes_.dtype)

    def predict_proba(self, X):
        """Class probabilities, columns in the order of ``classes_``."""
        check_is_fitted(self, "params_")
        return self._apply("predict_proba", X, len(self.classes_), np.float32)

    def score(self, X, y, sample_weight=None):
        """Accuracy; a lazy Dask scalar for Dask input."""
        if not _is_dask(X):
            return super().score(X, y, sample_weight=sample_weight)
        return (self.predict(X) == _dask_array(y)).mean()


class _RegressorPart(RegressorMixin):
    """Targets standardised for training (the network sees unit-scale outputs), mapped back."""

    _loss = REGRESSION

    def _encode_y(self, y, dask_input: bool, classes, continuing: bool):
        if not dask_input:
            y = np.asarray(y, dtype=np.float64)
        if not continuing:
            import dask

            mean, std = dask.compute(y.mean(axis=0), y.std(axis=0))
            self.y_mean_ = np.asarray(mean, dtype=np.float64)
            self.y_std_ = np.where(np.asarray(std) > 0, std, 1.0)
            self.n_outputs_ = 1 if y.ndim == 1 else int(y.shape[1])
        elif (1 if y.ndim == 1 else y.shape[1]) != self.n_outputs_:
            raise ValueError(f"y has {1 if y.ndim == 1 else y.shape[1]} target columns, the "
                             f"fitted {type(self).__name__} has {self.n_outputs_}")
        return ((y - self.y_mean_) / self.y_std_).astype(np.float32)

    def _n_outputs(self) -> int:
        return self.n_outputs_

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def _target_decoding(self) -> dict:
        return {"y_mean": self.y_mean_, "y_std": self.y_std_}

    def predict(self, X):
        """Predicted targets (a Dask array for Dask input)."""
        check_is_fitted(self, "params_")
        single = self.y_mean_.ndim == 0
        return self._apply("predict", X, None if single else self.n_outputs_, np.float64)

    def score(self, X, y, sample_weight=None):
        """R^2 (averaged over targets); a lazy Dask scalar for Dask input."""
        if not _is_dask(X):
            return super().score(X, y, sample_weight=sample_weight)
        y = _dask_array(y).astype(np.float64)
        residual = ((y - self.predict(X)) ** 2).sum(axis=0)
        total = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
        return (1 - residual / total).mean()


class _DownpourPart(_DaskbeliefEstimator):
    def __init__(self, hidden_layer_sizes=(100,), activation="relu", l2=1e-4, *, replicas=2,
                 shards=1, learning_rate=0.05, rule="adagrad", batch_size=32, max_iter=20,
                 n_fetch=5, n_push=5, warmstart_steps=0, overlap=True, eval_every=None,
                 client=None, directory=None, random_state=None):
        self.hidden_layer_sizes, self.activation, self.l2 = hidden_layer_sizes, activation, l2
        self.replicas, self.shards = replicas, shards
        self.learning_rate, self.rule, self.batch_size, self.max_iter = (learning_rate, rule,
                                                                         batch_size, max_iter)
        self.n_fetch, self.n_push, self.warmstart_steps = n_fetch, n_push, warmstart_steps
        self.overlap = overlap
        self.eval_every, self.client, self.directory = eval_every, client, directory
        self.random_state = random_state

    def _data_shards(self) -> int:
        return self.replicas

    def _train(self, model, url, test, params, client, continuing: bool):
        from daskbelief.train.downpour import downpour

        return downpour(model, url, test=test, client=client, replicas=self.replicas,
                        shards=self.shards, n_fetch=self.n_fetch, n_push=self.n_push,
                        rule={"name": self.rule, "lr": self.learning_rate},
                        batch_size=self.batch_size, epochs=1 if continuing else self.max_iter,
                        warmstart_steps=0 if continuing else self.warmstart_steps,
                        overlap=self.overlap, eval_every=self.eval_every, seed=self._seed(),
                        params=params, rule_state=self._rule_state(continuing))

    def _rule_state(self, continuing: bool):
        """The fitted rule state to continue from: None for a fresh fit, or when ``rule`` was
        changed (``set_params``) to one that keeps other state."""
        state = self.rule_state_ if continuing else None
        if state is None or set(state) != set(make_rule(self.rule).init(np.zeros(1, np.float32))):
            return None
        return state

    def _iterations(self, result, continuing: bool) -> int:
        """Epochs each replica made in this call (scikit-learn's ``n_iter_``)."""
        return 1 if continuing else self.max_iter


class _SandblasterPart(_DaskbeliefEstimator):
    def __init__(self, hidden_layer_sizes=(100,), activation="relu", l2=1e-4, *, shards=1,
                 max_iter=50, tol=1e-5, history=10, portion_size=None, backups=True,
                 eval_every=None, client=None, directory=None, random_state=None):
        self.hidden_layer_sizes, self.activation, self.l2 = hidden_layer_sizes, activation, l2
        self.shards, self.max_iter, self.tol, self.history = shards, max_iter, tol, history
        self.portion_size, self.backups = portion_size, backups
        self.eval_every, self.client, self.directory = eval_every, client, directory
        self.random_state = random_state

    def _train(self, model, url, test, params, client, continuing: bool):
        from daskbelief.train.sandblaster import sandblaster

        portion = self.portion_size and min(self.portion_size, open_store(url).n)
        return sandblaster(model, url, test=test, client=client, shards=self.shards,
                           iterations=self.max_iter, tolerance=self.tol, history=self.history,
                           portion_size=portion, backups=self.backups,
                           eval_every=self.eval_every, seed=self._seed(), params=params)

    def _iterations(self, result, continuing: bool) -> int:
        """L-BFGS iterations made in this call (scikit-learn's ``n_iter_``)."""
        return int(result.summary["iterations"])


class DownpourClassifier(_ClassifierPart, _DownpourPart):
    """A neural-network classifier trained with Downpour SGD: ``replicas`` asynchronous model
    replicas, each on its own data shard, around ``shards`` parameter shards applying ``rule``
    (Adagrad by default) with ``learning_rate``. ``max_iter`` epochs per replica; a
    ``partial_fit`` call runs one epoch over its data."""


class DownpourRegressor(_RegressorPart, _DownpourPart):
    """A neural-network regressor (squared error) trained with Downpour SGD; parameters as
    ``DownpourClassifier``'s."""


class SandblasterClassifier(_ClassifierPart, _SandblasterPart):
    """A neural-network classifier trained with Sandblaster L-BFGS over the whole training set:
    at most ``max_iter`` iterations, stopping once the gradient norm is at most ``tol``; the
    batch is cut into portions of ``portion_size`` rows (at most the whole set; default: about
    8 per worker thread) load-balanced over the workers, with backup copies of stragglers
    when ``backups``; each
    ``partial_fit`` call runs up to ``max_iter`` more iterations from the fitted parameters (the
    L-BFGS history starts afresh)."""


class SandblasterRegressor(_RegressorPart, _SandblasterPart):
    """A neural-network regressor (squared error) trained with Sandblaster L-BFGS; parameters
    as ``SandblasterClassifier``'s."""
