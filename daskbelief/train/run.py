"""The run skeleton: what every engine's run does around its own algorithm, written once.

An engine (``downpour``, ``sandblaster``, or a third one; docs/architecture.md, "Add an engine")
calls these in order, and says only what is its own in between:

* ``initial_params``: the start point from a seed or given parameters (resuming a checkpoint is
  the engine's: what it restores differs);
* ``cluster``: the client (given, current, or a local cluster), its workers required and warmed
  with the engine's task module;
* ``run_id`` and ``announce``: the run's name and its ``start`` event;
* ``Every``: the periodic duties (test evaluations, checkpoints, watches), each due once per
  period;
* ``finish_run``: the final test evaluation (an ``eval`` event, as during training), the ``end``
  event with the summary's figures, and the ``TrainResult``.
"""
from __future__ import annotations

import contextlib
import time
import uuid

import numpy as np

from daskbelief.cluster import client_or_local, require_workers, warm_workers
from daskbelief.monitor import events
from daskbelief.train.evaluate import announce_test, evaluate, test_row
from daskbelief.train.result import TrainResult


def initial_params(model, params, seed: int) -> np.ndarray:
    """``model.init(seed)``, or ``params`` as a float32 copy checked against the model's size."""
    init = model.init(seed) if params is None else np.array(params, dtype=np.float32)
    if init.shape != (model.size,):
        raise ValueError(f"params has shape {init.shape}, the model has {model.size} parameters")
    return init


@contextlib.contextmanager
def cluster(client, module: str, **local):
    """The client to train on, its workers required (one line when there are none) and their
    processes warmed with ``module`` (the engine's task code, imported before the clock starts);
    ``local``: the local cluster's options when there is no client."""
    with client_or_local(client, **local) as c:
        require_workers(c)
        warm_workers(c, module)
        yield c


def run_id(algorithm: str) -> str:
    """A fresh run name, ``ALGORITHM-xxxxxxxx``: its events, Variables and actors carry it."""
    return f"{algorithm}-{uuid.uuid4().hex[:8]}"


def announce(run: str, algorithm: str, settings: dict) -> None:
    """The run's ``start`` event, with its scalar settings."""
    events.emit(events.RUN, run=run, kind="start", algorithm=algorithm, **scalars(settings))


def scalars(figures: dict) -> dict:
    """The entries an event carries: numbers and strings (not tables or lists)."""
    return {k: v for k, v in figures.items() if isinstance(v, (int, float, str))}


class Every:
    """A duty due once every ``period`` seconds (None: never), counted from its creation or its
    last time done; ``now=True``: due at once the first time."""

    def __init__(self, period: float | None, now: bool = False):
        self.period = period
        self.last = -np.inf if now else time.time()

    def due(self) -> bool:
        """True when the period has passed, and then counted as done."""
        if self.period is None or time.time() < self.last + self.period:
            return False
        self.done()
        return True

    def done(self) -> None:
        """Done just now (outside ``due``: written at the end, say): the next period starts."""
        self.last = time.time()


def finish_run(model, params, *, run: str, client, test_store, seconds: float, step, summary: dict,
           history: list[dict], normaliser, **fields) -> TrainResult:
    """Evaluate ``params`` on ``test_store`` (when there is one) into ``summary`` and
    ``history`` (a last row at ``seconds``, ``step``; an ``eval`` event), emit the ``end``
    event, and return the ``TrainResult`` (``fields``: the engine's declared extras)."""
    if test_store is not None:
        metrics = evaluate(model, params, test_store, client=client)
        summary.update({"test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")})
        history.append(test_row(seconds, step, metrics))
        announce_test(run, history[-1])
    events.emit(events.RUN, **{**scalars(summary), "run": run, "kind": "end"})
    history.sort(key=lambda h: h["time"])
    return TrainResult(model, params, history, summary, normaliser=normaliser, **fields)
