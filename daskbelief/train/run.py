"""The run skeleton: what every engine's run does around its own algorithm, written once.

An engine (``downpour``, ``sandblaster``, or a third one; docs/architecture.md, "Add an engine")
calls these in order, and says only what is its own in between:

* ``open_data``: the training and test stores, opened and checked against the model before
  anything starts;
* ``start_point``: the start point from a seed, given parameters, or the checkpoint resumed
  (checked to be this engine's and this model's; what else the engine takes from its
  metadata, the replicas' progress or the L-BFGS scalars, is its own);
* ``parameter_server``: the shards, seeded with the start point; resuming, each shard reads its
  own range of the checkpoint (parameters, rule state, vectors);
* ``cluster``: the client (given, current, or a local cluster), its workers required and warmed
  with the engine's task module;
* ``run_id`` and ``announce``: the run's name and its ``start`` event;
* ``Every``: the periodic duties (test evaluations, checkpoints, watches), each due once per
  period;
* ``summary``: the figures every engine's summary starts with (what ran, for how long, how
  many samples, at what rate), then the engine's own;
* ``finish_run``: the final test evaluation (an ``eval`` event, as during training), the ``end``
  event with the summary's figures, and the ``TrainResult``.
"""
from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import numpy as np

from daskbelief.cluster import client_or_local, require_workers, warm_workers
from daskbelief.data import DataStore, open_store
from daskbelief.monitor import events
from daskbelief.ps import checkpoint
from daskbelief.ps.server import ParameterServer
from daskbelief.ps.sources import Fresh, Given, Ranged, Saved
from daskbelief.train.evaluate import announce_test, evaluate, test_row
from daskbelief.train.recovery import gone
from daskbelief.train.result import TrainResult


def open_data(model, data, test) -> tuple[DataStore, DataStore | None]:
    """The training store (a URL opens its ``train`` split) and the test store (``test`` split;
    None without one), each checked against the model's input and output shapes, so that a
    store of another dataset is refused in one line before a cluster starts."""
    store = open_store(data, split="train")
    test_store = None if test is None else open_store(test, split="test")
    for s in (store, test_store):
        if s is not None:
            model.check_data(s.feature_shape, s.n_classes)
    return store, test_store


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts: its parameters (made range by range where they are needed:
    ``sources``), and the checkpoint they come from when resuming (its metadata)."""

    params: Ranged
    resumed: checkpoint.Checkpoint | None = None


def start_point(model, params, seed: int, resume_from, algorithm: str) -> StartPoint:
    """``model.init(seed)`` (``Fresh``), ``params`` checked (``Given``), or the parameters of
    checkpoint ``resume_from`` (``Saved``), refused in one line unless ``algorithm`` wrote it
    for this model. Nothing model-sized is read or made here: ``parameter_server`` has each
    shard make or read its own range (of the rule's state and vectors too, when resuming)."""
    if resume_from is None:
        return StartPoint(Fresh(model, seed) if params is None
                          else Given(initial_params(model, params, seed)))
    ckpt = checkpoint.load_to_resume(resume_from, model.to_dict(), algorithm)
    return StartPoint(Saved(ckpt.path, model.size), ckpt)


def initial_params(model, params, seed: int) -> np.ndarray:
    """``model.init(seed)``, or ``params`` as a float32 copy checked against the model's size."""
    init = model.init(seed) if params is None else np.array(params, dtype=np.float32)
    if init.shape != (model.size,):
        raise ValueError(f"params has shape {init.shape}, the model has {model.size} parameters")
    return init


def parameter_server(client, params, shards: int, rule, *, restore=None,
                     workers=None) -> ParameterServer:
    """The run's parameter server: ``shards`` shard actors (on ``workers``, default any) seeded
    with ``params`` (an array or a ``sources.Ranged``) and applying ``rule``; ``restore``: a
    checkpoint every shard then loads its own range of (parameters, rule state, vectors), in
    parallel: ``ConnectionError`` when a shard's worker leaves meanwhile. Every engine's server, and every server an engine remakes
    after a loss, starts here."""
    ps = ParameterServer.create(client, params, shards, rule, workers=workers)
    if restore is not None:
        try:
            ps.restore(restore, give_up=gone(client, ps.addresses(), f"restoring from {restore}"))
        except BaseException:
            ps.close()
            raise
    return ps


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


def check_on_snapshot(on_snapshot) -> None:
    """An engine's ``on_snapshot`` is None or callable as ``on_snapshot(seconds, params)``:
    anything else is refused before work starts."""
    if on_snapshot is not None and not callable(on_snapshot):
        raise ValueError(f"on_snapshot must be callable as on_snapshot(seconds, params), got "
                         f"{on_snapshot!r}")


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


def summary(run: str, algorithm: str, *, seconds: float, samples: int, **own) -> dict:
    """Every engine's summary: ``algorithm``, ``run``, ``seconds``, ``samples`` (training rows
    computed on) and ``samples_per_second``, then the engine's ``own`` figures."""
    return {"algorithm": algorithm, "run": run, "seconds": seconds, "samples": samples,
            "samples_per_second": samples / seconds, **own}


def finish_run(model, params, *, run: str, client, test_store, seconds: float, step, summary: dict,
           history: list[dict], normaliser, metrics=None, **fields) -> TrainResult:
    """Evaluate ``params`` on ``test_store`` (when there is one; ``metrics``: the engine
    evaluated them itself, as a model-parallel run's blocks do) into ``summary`` and ``history``
    (a last row at ``seconds``, ``step``; an ``eval`` event), emit the ``end`` event, and return
    the ``TrainResult`` (``fields``: the engine's declared extras)."""
    if test_store is not None:
        if metrics is None:
            metrics = evaluate(model, params, test_store, client=client)
        summary.update({"test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")})
        history.append(test_row(seconds, step, metrics))
        announce_test(run, history[-1])
    events.emit(events.RUN, **{**scalars(summary), "run": run, "kind": "end"})
    history.sort(key=lambda h: h["time"])
    return TrainResult(model, params, history, summary, normaliser=normaliser, **fields)
