"""Running a validated pipeline config: dataset, model, cluster, algorithm, run directory.

A run directory holds what a later reader needs: the config, ``metrics.jsonl`` (one event per
line), ``summary.json`` and the final parameters (``params.npy``) with the model description.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from daskbelief.cluster import client_or_local
from daskbelief.data import open_store
from daskbelief.monitor.events import EventLog
from daskbelief.nn import Sequential


def prepare_run_dir(out, name: str, overwrite: bool, config: dict) -> Path:
    """Create the run directory; refuse to reuse an existing one unless ``overwrite``."""
    run_dir = Path(out) if out else Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run directory {run_dir} already exists and is not empty "
                                  "(pass --overwrite to replace it, or choose another --out)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    return run_dir


def ensure_dataset(spec: dict) -> str:
    """The dataset's store path, building it from its recipe when it does not exist yet."""
    import daskbelief_datasets as recipes

    path = spec["path"]
    if not Path(path).exists():
        recipes.build(spec["recipe"], path, size=spec.get("size"), seed=spec.get("seed", 0),
                      chunk_rows=spec.get("chunk_rows"), **spec.get("options", {}))
    open_store(path, split="train")  # refuses an incomplete or foreign store with a clear error
    return path


def _train(config: dict, model, path: str, client):
    train = dict(config["train"])
    algorithm = train.pop("algorithm")
    if algorithm == "downpour":
        from daskbelief.train.downpour import downpour

        return downpour(model, path, test=path, client=client, **train)
    if algorithm == "sandblaster":
        from daskbelief.train.sandblaster import sandblaster

        return sandblaster(model, path, test=path, client=client, **train)
    raise ValueError(f"train.algorithm {algorithm!r} cannot run as a pipeline")


def _threads_needed(config: dict, n_workers) -> int:
    """Threads per local worker so that every Downpour replica runs at once."""
    from daskbelief.cluster import default_local_workers

    replicas = config["train"].get("replicas", 1)
    workers = n_workers or default_local_workers()
    return max(1, -(-replicas // workers))


def run(config: dict, run_dir: Path, *, n_workers=None, scheduler=None, scheduler_file=None) -> dict:
    """Build the data if missing, train, evaluate, and write the run directory; return the summary."""
    path = ensure_dataset(config["dataset"])
    model = Sequential.from_dict(config["model"])
    with client_or_local(None, n_workers, scheduler, scheduler_file,
                         threads_per_worker=_threads_needed(config, n_workers)) as client:
        log = EventLog(client, path=run_dir / "metrics.jsonl")
        try:
            result = _train(config, model, path, client)
        finally:
            log.close()
    np.save(run_dir / "params.npy", result.params)
    (run_dir / "model.json").write_text(json.dumps(model.to_dict(), indent=2))
    summary = {**result.summary, "run_dir": str(run_dir), "dataset": path}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def load_run(run_dir: Path):
    """(model, params, config) of a finished run directory."""
    for name in ("model.json", "params.npy", "config.json"):
        if not (run_dir / name).exists():
            raise FileNotFoundError(f"{run_dir} is not a finished run directory (no {name})")
    model = Sequential.from_dict(json.loads((run_dir / "model.json").read_text()))
    params = np.load(run_dir / "params.npy")
    return model, params, json.loads((run_dir / "config.json").read_text())


def evaluate_run(run_dir: Path, data, split: str, **cluster) -> dict:
    """Loss and accuracy of a run's final parameters on a store."""
    from daskbelief.train.evaluate import evaluate

    model, params, config = load_run(run_dir)
    url = data or config["dataset"]["path"]
    with client_or_local(None, **cluster) as client:
        return evaluate(model, params, url, split=split, client=client)


def describe(path: Path) -> dict:
    """What a path holds: a run directory's summary, or a dataset store's splits."""
    if (path / "summary.json").exists():
        return json.loads((path / "summary.json").read_text())
    out = {"store": str(path)}
    for split in ("train", "test"):
        s = open_store(str(path), split=split)
        out[split] = {"n": s.n, "feature_shape": list(s.feature_shape), "n_classes": s.n_classes,
                      "chunk_rows": s.chunk_rows, "n_chunks": s.n_chunks}
    return out
