"""Running a validated pipeline config: dataset, model, cluster, algorithm, run directory.

Everything that can be checked is checked before any work starts (``prepare``): the model builds,
the update rule and the partition plan parse, the recipe exists, a run to resume has a complete
checkpoint. A run directory then holds what a later reader needs: ``config.json``,
``metrics.jsonl`` (one event per line), ``summary.json``, the final parameters (``params.npy``;
a model-parallel run leaves them in its last checkpoint, which its summary names, and
``evaluate`` / ``predict`` run through the partition's blocks reading it) with ``model.json``
and ``normaliser.json`` (the standardisation of the raw features the model was trained with),
and ``checkpoints/`` from which ``--resume`` continues.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daskbelief.cluster import client_or_local, default_local_workers
from daskbelief.config import ConfigError
from daskbelief.data import Normaliser, open_store
from daskbelief.data.store import store_attrs
from daskbelief.monitor.events import EventLog
from daskbelief.monitor.progress import Progress
from daskbelief.nn import Sequential
from daskbelief.ps import checkpoint
from daskbelief.ps.sources import Saved
from daskbelief.train.partition import as_plan
from daskbelief.train import engines
from daskbelief.train.errors import RunLost
from daskbelief.train.recovery import scheduler_lost

CHECKPOINT_EVERY = 60.0  # seconds, when [checkpoint] does not say


@dataclass
class Pipeline:
    """A config turned into what the run needs."""

    config: dict
    model: Sequential
    algorithm: str
    train: dict          # keyword arguments of the algorithm's entry point


def prepare(config: dict) -> Pipeline:
    """Check what a validated config describes (beyond keys and types), before any work starts."""
    import daskbelief_datasets as recipes

    recipe = config["dataset"]["recipe"]
    if recipe not in recipes.RECIPES:
        raise ConfigError(f"dataset.recipe {recipe!r} is unknown (known: {', '.join(sorted(recipes.RECIPES))})")
    try:
        model = Sequential.from_dict(config["model"])
    except ValueError as e:
        raise ConfigError(f"[model]: {e}") from None
    train = dict(config["train"])
    algorithm = train.pop("algorithm")
    try:
        engine = engines.get(algorithm)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        as_plan(model, train.get("partition"))
    except ValueError as e:
        raise ConfigError(f"train.partition: {e}") from None
    try:
        engine.check(train)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return Pipeline(config, model, algorithm, train)


def check_run_dir(out, name: str, *, overwrite: bool = False, resume: bool = False) -> Path:
    """The run directory to use, checked without touching it: a new one (an existing non-empty
    one only with ``overwrite``), or with ``resume`` one holding a complete checkpoint."""
    if resume and overwrite:
        raise ConfigError("--resume continues a run and --overwrite would delete it: choose one")
    if resume:
        if not out:
            raise ConfigError("--resume needs --out RUN_DIR: the run directory to continue")
        latest_checkpoint(Path(out))  # refuses a directory with nothing to resume
        return Path(out)
    run_dir = Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"run directory {run_dir} already exists and is not empty "
                              "(pass --overwrite to replace it, --resume to continue it, "
                              "or choose another --out)")
    return run_dir


def _open_run_dir(run_dir: Path, config: dict) -> None:
    """Create a new run directory (replacing an old one the user chose to overwrite) and record
    the config in it."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))


def _check_resumable(resume_from: Path, pipe: Pipeline) -> None:
    """Only a checkpoint of this very model, written by the same algorithm, can be resumed."""
    problem = checkpoint.resume_problem(checkpoint.describe(resume_from), pipe.model.to_dict(),
                                        pipe.algorithm, ("checkpoint", "config"))
    if problem:
        raise ConfigError(f"cannot resume from {resume_from}: {problem}")


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run; a clear error when there is none."""
    path = checkpoint.latest(Path(run_dir) / "checkpoints")
    if path is None:
        raise FileNotFoundError(f"nothing to resume in {run_dir}: no complete checkpoint under "
                                f"{Path(run_dir) / 'checkpoints'}")
    return path


def ensure_dataset(spec: dict) -> str:
    """The dataset's store path, building it from its recipe when it does not exist yet."""
    import daskbelief_datasets as recipes

    path = spec["path"]
    if not Path(path).exists():
        recipes.build(spec["recipe"], path, size=spec.get("size"), seed=spec.get("seed", 0),
                      chunk_rows=spec.get("chunk_rows"), **spec.get("options", {}))
    for split in store_attrs(path)[1]["splits"]:  # refuses an incomplete or foreign store, and
        open_store(path, split=split)               # arrays at odds with its metadata, up front
    return path


def _settings(pipe: Pipeline) -> dict:
    """The engine's settings: its API defaults with the pipeline's values over them."""
    return {**engines.get(pipe.algorithm).defaults(), **pipe.train}


def _threads_needed(pipe: Pipeline, n_workers) -> int:
    """Threads per local worker so that everything the engine runs at once has a thread."""
    needed = engines.get(pipe.algorithm).threads(_settings(pipe))
    return max(1, -(-needed // (n_workers or default_local_workers())))


def _work(pipe: Pipeline, path: str) -> tuple[int, str]:
    """How much work the run is, for the progress bar: (total, unit)."""
    return engines.get(pipe.algorithm).work(_settings(pipe), open_store(path).n)


def _train(pipe: Pipeline, path: str, client, run_dir: Path, resume_from):
    every = pipe.config.get("checkpoint", {})
    algorithm = engines.get(pipe.algorithm).function()
    return algorithm(pipe.model, path, test=path, client=client, config=pipe.config,
                     checkpoint_dir=run_dir / "checkpoints",
                     checkpoint_every=every.get("every_seconds", CHECKPOINT_EVERY),
                     checkpoint_keep=every.get("keep", 3), resume_from=resume_from, **pipe.train)


def _close_log(log, client, *, trained: bool, lost) -> bool:
    """Close the run's event log; False when the scheduler was lost after training had ended,
    so the last events may be missing from ``metrics.jsonl`` (the run's outputs are complete).
    A run lost meanwhile (``lost``) is reported by its ``RunLost`` instead."""
    try:
        log.close()
        return True
    except Exception:  # noqa: BLE001 -- the scheduler is gone
        if lost is not None or (trained and scheduler_lost(client)):
            return False
        raise


def run(config: dict, out=None, *, name: str = "run", overwrite: bool = False, resume: bool = False,
        n_workers=None, scheduler=None, scheduler_file=None, jobqueue=None,
        progress_stream=None) -> dict:
    """Check everything, build the data if missing, train (or resume), evaluate, and write the
    run directory (``out``, default ``runs/NAME-TIME``); return the summary.

    Nothing is written into the run directory before the config, the run directory, the
    dataset and the model's fit to it have all been checked; a resumed run keeps its original
    ``config.json`` and appends to its ``metrics.jsonl``.
    """
    pipe = prepare(config)
    run_dir = check_run_dir(out, name, overwrite=overwrite, resume=resume)
    resume_from = latest_checkpoint(run_dir) if resume else None
    if resume_from is not None:
        _check_resumable(resume_from, pipe)
    path = ensure_dataset(config["dataset"])
    store = open_store(path)
    pipe.model.check_data(store.feature_shape, store.n_classes)
    if resume_from is None:
        _open_run_dir(run_dir, config)
    progress = Progress(*_work(pipe, path), stream=progress_stream)
    with client_or_local(None, n_workers, scheduler, scheduler_file,
                         threads_per_worker=_threads_needed(pipe, n_workers),
                         jobqueue=jobqueue) as client:
        log = EventLog(client, path=run_dir / "metrics.jsonl", listeners=[progress])
        lost, result = None, None
        try:
            result = _train(pipe, path, client, run_dir, resume_from)
        except RunLost as e:
            lost, e.run_dir = e, run_dir
            raise
        except Exception as e:
            if not scheduler_lost(client):
                raise
            lost = RunLost(f"the scheduler at {client.scheduler.address}",
                           checkpoint.latest(run_dir / "checkpoints"))
            lost.run_dir = run_dir
            raise lost from e
        finally:
            progress.close()
            metrics_complete = _close_log(log, client, trained=result is not None, lost=lost)
    if result.params is not None:  # else the model is in its last checkpoint only
        np.save(run_dir / "params.npy", result.params)
    (run_dir / "normaliser.json").write_text(json.dumps(result.normaliser.to_dict()))
    (run_dir / "model.json").write_text(json.dumps(pipe.model.to_dict(), indent=2))
    summary = {**result.summary, "run_dir": str(run_dir), "dataset": path,
               "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
               "metrics_complete": metrics_complete}
    if resume_from is not None:
        summary["resumed_from"] = str(resume_from)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def load_run(run_dir: Path):
    """(model, params, config, normaliser, plan) of a finished run directory: its ``params.npy``
    (plan None), or for a model-parallel run that left its model in its last checkpoint only,
    that checkpoint (a ``sources.Saved``, read by blocks of the run's partition ``plan``)."""
    for name in ("model.json", "summary.json", "config.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run directory (no {name})")
    model = Sequential.from_dict(json.loads((run_dir / "model.json").read_text()))
    saved = json.loads((run_dir / "summary.json").read_text()).get("checkpoint")
    config = json.loads((run_dir / "config.json").read_text())
    if (run_dir / "params.npy").exists() or saved is None:
        return model, np.load(run_dir / "params.npy"), config, run_normaliser(run_dir, config), None
    return (model, Saved(Path(saved), model.size), config, run_normaliser(run_dir, config),
            as_plan(model, config["train"]["partition"]))


def run_normaliser(run_dir: Path, config: dict) -> Normaliser:
    """The standardisation a run trained with: saved beside its parameters or, in a run directory
    written before it was, its dataset store's."""
    saved = run_dir / "normaliser.json"
    if saved.exists():
        return Normaliser.from_dict(json.loads(saved.read_text()))
    return open_store(config["dataset"]["path"]).normaliser


def evaluate_run(run_dir: Path, data, split: str, **cluster) -> dict:
    """Loss and accuracy of a run's final parameters on a store."""
    from daskbelief.train.evaluate import evaluate

    model, params, config, normaliser, plan = load_run(run_dir)
    url = data or config["dataset"]["path"]
    with client_or_local(None, **cluster) as client:
        return evaluate(model, params, url, split=split, client=client, normaliser=normaliser,
                        plan=plan)


def predict_run(run_dir: Path, data, split: str, out, overwrite: bool, **cluster) -> dict:
    """Predictions of a run's final parameters for a store's split, written to zarr via Dask."""
    from daskbelief.train.predict import predict_store

    model, params, config, normaliser, plan = load_run(run_dir)
    with client_or_local(None, **cluster) as client:
        return predict_store(model, params, data or config["dataset"]["path"], out, split=split,
                             client=client, overwrite=overwrite, normaliser=normaliser, plan=plan)


def describe(path: Path) -> dict:
    """What a path holds: a run directory's summary, a checkpoint, or a dataset store's splits."""
    if (path / "summary.json").exists():
        return json.loads((path / "summary.json").read_text())
    if (path / "config.json").exists():
        found = checkpoint.complete(path / "checkpoints")
        return {"run_dir": str(path), "finished": False,
                "checkpoints": [str(p) for p in found]}
    if checkpoint.is_checkpoint(path):
        return checkpoint.describe(path)
    out = {"store": str(path)}
    for split in ("train", "test"):
        try:
            s = open_store(str(path), split=split)
        except ValueError as e:
            if "split" in str(e):
                continue
            raise
        out[split] = {"n": s.n, "feature_shape": list(s.feature_shape), "n_classes": s.n_classes,
                      "task": s.task, "chunk_rows": s.chunk_rows, "n_chunks": s.n_chunks}
    return out
