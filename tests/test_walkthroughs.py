"""The walkthroughs of docs/architecture.md, run: a toy update rule through the parameter
server, a toy layer through model parallelism, a toy engine through a pipeline. If a walkthrough
stops being true, this fails."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from daskbelief import pipeline
from daskbelief.config import ConfigError, validate
from daskbelief.data import open_store
from daskbelief.nn import Dense, LocallyConnected1D, Sequential
from daskbelief.nn.layers import LAYER_TYPES
from daskbelief.optim import rules
from daskbelief.optim.rules import UpdateRule
from daskbelief.train import engines, run
from daskbelief.train import partition as P
from daskbelief.train.block import loss_and_grad
from daskbelief.train.downpour import downpour
from daskbelief.train.reference import train_sgd
from daskbelief.train.result import TrainResult


# -- walkthrough 1: an update rule ------------------------------------------------------------

def _no_state(params, **_):
    return {}


def _sign_apply(params, grad, state, lr):
    """signSGD: a step of ``lr`` against the sign of each gradient element, in place."""
    params -= lr * np.sign(grad)


def sign_sgd(lr: float = 0.01) -> UpdateRule:
    return UpdateRule("sign_sgd", {"lr": float(lr)}, _no_state, _sign_apply)


def register_sign_sgd(dask_worker=None) -> None:
    rules.RULES["sign_sgd"] = sign_sgd


def test_a_new_update_rule_runs_in_the_shards_exactly_as_in_the_reference(client, digits_path):
    register_sign_sgd()
    client.run(register_sign_sgd)  # every process that makes rules from their names
    model = Sequential((64,), [Dense(16, "relu"), Dense(10)], l2=1e-4)
    store = open_store(digits_path, split="train")
    result = downpour(model, store, client=client, replicas=1, shards=2, n_fetch=1, n_push=1,
                      rule={"name": "sign_sgd", "lr": 0.002}, batch_size=16, steps=30,
                      overlap=False, seed=1)
    with threadpool_limits(1):
        expect, _ = train_sgd(model, store, sign_sgd(0.002), batch_size=16, steps=30, seed=1)
    assert not np.array_equal(expect, model.init(1))
    np.testing.assert_allclose(result.params, expect, rtol=0, atol=1e-6)


# -- walkthrough 2: a layer ---------------------------------------------------------------------

class Doubled1D(LocallyConnected1D):
    """A toy layer: a locally connected layer whose output is doubled. It is cut by output
    positions like its parent (``partition_cut``); its pieces run its own forward/backward."""

    type = "toy_doubled_1d"

    def forward(self, p, x, scratch=None, positions=None):
        out, cache = super().forward(p, x, scratch=scratch, positions=positions)
        return 2 * out, cache

    def backward(self, p, cache, dout, grads, input_grad: bool = True, scratch=None,
                 positions=None, add: bool = False):
        return super().backward(p, cache, 2 * dout, grads, input_grad, scratch=scratch,
                                positions=positions, add=add)


@pytest.fixture
def doubled_layer():
    LAYER_TYPES[Doubled1D.type] = Doubled1D  # pieces rebuild their layer from its description
    yield Doubled1D
    del LAYER_TYPES[Doubled1D.type]


def test_a_new_layer_goes_through_model_parallelism(doubled_layer):
    model = Sequential((12, 3), [doubled_layer(4, 3, activation="tanh"), Dense(5)],
                       loss="softmax_cross_entropy", l2=1e-3)
    rng = np.random.default_rng(0)
    params = model.init(0).astype(np.float64)
    X, y = rng.normal(size=(7, 12, 3)), rng.integers(0, 5, 7)
    loss, grad = model.loss_and_grad(params, X, y)
    i = int(np.argmax(np.abs(grad[:model.layer_ranges[0][1]])))  # the toy layer's own backward
    step = np.zeros_like(params)
    step[i] = 1e-6
    numeric = (model.loss_and_grad(params + step, X, y)[0]
               - model.loss_and_grad(params - step, X, y)[0]) / 2e-6
    assert numeric == pytest.approx(grad[i], rel=1e-5)
    for plan in (P.horizontal(model, 2), P.vertical(model, 2)):
        part_loss, part_grad = loss_and_grad(plan, params, X, y)
        assert part_loss == pytest.approx(loss, rel=1e-12)
        np.testing.assert_allclose(part_grad, grad, rtol=1e-10, atol=1e-13)


# -- walkthrough 3: an engine -------------------------------------------------------------------

def toy_sgd(model, data, *, client=None, test=None, config=None, checkpoint_dir=None,
            checkpoint_every=None, checkpoint_keep: int = 3, resume_from=None,
            rule: str | dict = "sgd", batch_size: int = 32, steps: int = 50,
            seed: int = 0) -> TrainResult:
    """A toy engine: the single-process reference trainer inside the run skeleton
    (``train.run``), which evaluates it on the cluster and emits its events."""
    store, test_store = run.open_data(model, data, test)
    with run.cluster(client, "daskbelief.train.reference") as c:
        name = run.run_id("toy-sgd")
        run.announce(name, "toy-sgd", {"steps": steps, "batch_size": batch_size})
        started = time.time()
        params, history = train_sgd(model, store, rule, batch_size=batch_size, steps=steps,
                                    seed=seed)
        seconds = time.time() - started
        summary = run.summary(name, "toy-sgd", seconds=seconds, samples=steps * batch_size,
                              steps=steps)
        return run.finish_run(model, params, run=name, client=c, test_store=test_store,
                              seconds=seconds, step=steps, summary=summary, history=history,
                              normaliser=store.normaliser)


@pytest.fixture
def toy_engine():
    engine = engines.register(engines.Engine(
        "toy-sgd", f"{__name__}:toy_sgd", threads=lambda s: 1,
        work=lambda s, rows: (s["steps"], "steps")))
    yield engine
    del engines.ENGINES[engine.name]


def toy_config(digits_path: str, **train) -> dict:
    return {"dataset": {"recipe": "digits", "path": digits_path},
            "model": {"input_shape": [64], "layers": [{"type": "dense", "units": 10}]},
            "train": {"algorithm": "toy-sgd", **train}}


def test_a_new_engine_runs_as_a_pipeline_with_its_signature_as_schema(toy_engine, digits_path,
                                                                      tmp_path):
    assert toy_engine.settings() == {"rule": (str, dict), "batch_size": (int,), "steps": (int,),
                                     "seed": (int,)}
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        validate(toy_config(digits_path, steps="many"))
    with pytest.raises(ConfigError, match=r"unknown key train.epochs \(known keys of \[train\]: "
                                          "algorithm, batch_size, rule, seed, steps\\)"):
        validate(toy_config(digits_path, epochs=3))
    config = validate(toy_config(digits_path, rule={"name": "adagrad", "lr": 0.05}, steps=200))
    summary = pipeline.run(config, tmp_path / "run", n_workers=1)
    assert summary["algorithm"] == "toy-sgd" and summary["steps"] == 200
    assert summary["run"].startswith("toy-sgd-") and summary["samples"] == 200 * 32  # skeleton's
    assert summary["test_accuracy"] >= 0.9, summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 200
    assert np.load(tmp_path / "run" / "params.npy").shape == (650,)
    kinds = [e.get("kind") for e in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))
             if str(e.get("run", "")).startswith("toy-sgd-")]
    assert kinds[0] == "start" and kinds[-1] == "end", kinds  # the skeleton's events, as any engine's
