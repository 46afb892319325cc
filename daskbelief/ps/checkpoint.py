"""Checkpoints of the parameter server as zarr groups: each shard writes its own arrays.

Layout of one checkpoint (``RUN_DIR/checkpoints/ckpt-000003``)::

    attrs: complete, model, config, ranges, versions, shards (each one's counters: version,
           applied, state_updates, per-replica counts), counters, time, normaliser (the features'
           standardisation the model was trained with), and lbfgs (Sandblaster's)
    shard-0/params, shard-0/state/<name>, shard-0/vectors/<name>, shard-1/params, ...

Downpour saves the parameters and the update rule's state; Sandblaster saves its iterate as the
parameters, the L-BFGS vectors in use (gradient, s/y pairs) under ``vectors/`` and the L-BFGS
scalars (``LbfgsState``) in the ``lbfgs`` attribute.

The driver creates the group and empty arrays, each shard actor fills its own (in parallel, with
no data through the driver), and the driver marks the group ``complete`` last: a checkpoint that
was interrupted half-way is never taken for the latest.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from daskbelief.data.normalise import Normaliser
from daskbelief.nn.model import model_difference
from daskbelief.ps.policy import overlaps

PREFIX = "ckpt-"


@dataclass
class Checkpoint:
    """A complete checkpoint, read back: full vectors reassembled from the shards' pieces."""

    path: Path
    params: np.ndarray
    state: dict[str, np.ndarray]
    versions: list[int]
    model: dict
    config: dict
    counters: dict
    shards: list[dict]
    vectors: dict[str, np.ndarray]
    lbfgs: dict | None
    normaliser: Normaliser | None = None  # None in checkpoints written before it was saved
    ranges: list[tuple[int, int]] | None = None  # each shard's, as saved

    def state_lag(self, start: int = 0, stop: int | None = None) -> int:
        """Updates the saved rule state of ``[start, stop)`` lacks against its parameters, the most
        over the shards there: a shard that had adopted a replica's copy saved a state younger
        than its parameters (``ParameterShard.adopt``); 0 otherwise, and in checkpoints written
        before this was saved."""
        if self.ranges is None or not self.shards:
            return 0
        stop = self.ranges[-1][1] if stop is None else stop
        saved = [self.shards[i] for i, _, _ in overlaps(self.ranges, start, stop)]
        return max((s["version"] - s.get("state_updates", s["version"]) for s in saved), default=0)

    def replica_steps(self) -> dict[str, int]:
        """Steps each replica had pushed into the saved state: the fewest over the shards it
        pushed to (a model-parallel block pushes only to the shards holding its ranges)."""
        names = set().union(*(s["replica_steps"] for s in self.shards))
        return {r: min(s["replica_steps"][r] for s in self.shards if r in s["replica_steps"])
                for r in names}


def _create(path: Path, ranges, arrays: list[str], attrs: dict) -> None:
    root = zarr.open_group(str(path), mode="w")
    for i, (a, b) in enumerate(ranges):
        n = b - a
        for name in arrays:
            root.create_array(f"shard-{i}/{name}", shape=(n,), chunks=(max(n, 1),),
                              dtype="float32")
    root.attrs.update({**attrs, "complete": False})


def save(root, ps, *, model: dict, config: dict | None = None, counters: dict | None = None,
         keep: int = 3, timeout: float = 300.0, vectors=(), lbfgs: dict | None = None,
         algorithm: str | None = None, give_up=None, normaliser: dict | None = None) -> Path:
    """Write a checkpoint of every shard under ``root`` and return its path.

    Keeps the newest ``keep`` complete checkpoints and deletes older ones (and what an interrupted
    write left), so a long run does not fill the disk and only complete checkpoints remain.
    ``timeout``: seconds to wait for the shards (a lost shard never answers);
    ``give_up()``: asked while waiting, returns an exception to stop waiting (``waits.result``).
    ``vectors``: names of Sandblaster vectors the shards save too; ``lbfgs``: the L-BFGS state;
    ``algorithm``: the engine's registered name (which engine may resume it); ``normaliser``:
    ``Normaliser.to_dict()`` of the training data, so that the checkpoint alone predicts from raw
    features.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    existing = _numbers(root)
    number = max(existing) + 1 if existing else 0
    path = root / f"{PREFIX}{number:06d}"
    vectors = list(vectors)
    arrays = ["params", *(f"state/{n}" for n in sorted(ps.state_names())),
              *(f"vectors/{n}" for n in vectors)]
    attrs = {"model": model, "config": config or {}, "ranges": [list(r) for r in ps.ranges],
             "counters": counters or {}, "time": time.time(), "normaliser": normaliser,
             **({"algorithm": algorithm} if algorithm else {})}
    _create(path, ps.ranges, arrays, attrs if lbfgs is None else {**attrs, "lbfgs": lbfgs})
    try:
        shards = ps.write_checkpoint(str(path), timeout, vectors, give_up)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # incomplete: it would never count anyway
        raise
    group = zarr.open_group(str(path), mode="r+")
    group.attrs.update({"versions": [s["version"] for s in shards], "shards": shards,
                        "complete": True})
    kept = set(complete(root)[-keep:])
    for n in _numbers(root):  # older ones, and leftovers of an interrupted write: a shard that
        old = root / f"{PREFIX}{n:06d}"  # outlived the failure may have written after its rmtree
        if old not in kept and n < number:
            shutil.rmtree(old, ignore_errors=True)
    return path


def _numbers(root: Path) -> list[int]:
    return [int(p.name[len(PREFIX):]) for p in root.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit()]


def complete(root) -> list[Path]:
    """The complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.exists():
        return []
    found = []
    for n in sorted(_numbers(root)):
        path = root / f"{PREFIX}{n:06d}"
        try:
            if zarr.open_group(str(path), mode="r").attrs.get("complete"):
                found.append(path)
        except (FileNotFoundError, ValueError, KeyError):
            continue
    return found


def latest(root) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    found = complete(root)
    return found[-1] if found else None


def is_checkpoint(path) -> bool:
    """Whether ``path`` is a checkpoint group (complete or not)."""
    try:
        return "ranges" in zarr.open_group(str(path), mode="r").attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
        return False


def describe(path) -> dict:
    """A checkpoint's metadata (no parameters): for ``daskbelief info``."""
    attrs = dict(zarr.open_group(str(path), mode="r").attrs)
    return {"checkpoint": str(path), "complete": bool(attrs.get("complete")),
            "parameters": attrs["ranges"][-1][1], "shards": len(attrs["ranges"]),
            "versions": attrs.get("versions"), "model": attrs.get("model"),
            "counters": attrs.get("counters"), "time": attrs.get("time"),
            "algorithm": attrs.get("algorithm", "sandblaster" if "lbfgs" in attrs else "downpour"),  # older ones by their L-BFGS state
            "lbfgs_iteration": attrs["lbfgs"]["iteration"] if "lbfgs" in attrs else None,
            "replica_steps": {k: v for s in attrs.get("shards", []) for k, v in s.get("replica_steps", {}).items()}}


def load(path, start: int = 0, stop: int | None = None, *, arrays: bool = True) -> Checkpoint:
    """Read a complete checkpoint; ``[start, stop)`` limits it to one range of the vector;
    ``arrays=False`` reads the parameters alone, leaving the update rule's state and
    Sandblaster's vectors on disk (each shard of a resumed run reads its own range of them)."""
    group = zarr.open_group(str(path), mode="r")
    attrs = dict(group.attrs)
    if not attrs.get("complete"):
        raise ValueError(f"checkpoint {path} is incomplete (it was interrupted while being written)")
    ranges = [tuple(r) for r in attrs["ranges"]]
    stop = ranges[-1][1] if stop is None else stop
    kinds = ("state", "vectors") if arrays else ()
    parts = {kind: sorted(group[f"shard-0/{kind}"].array_keys()) if kind in group["shard-0"] else []
             for kind in kinds}
    loaded = {name: np.empty(stop - start, dtype=np.float32)
              for name in ["params", *(f"{k}/{n}" for k, names in parts.items() for n in names)]}
    for i, lo, hi in overlaps(ranges, start, stop):
        a = ranges[i][0]
        for name, out in loaded.items():
            out[lo - start:hi - start] = group[f"shard-{i}/{name}"][lo - a:hi - a]
    state = {n: loaded[f"state/{n}"] for n in parts.get("state", [])}
    saved = {n: loaded[f"vectors/{n}"] for n in parts.get("vectors", [])}
    return Checkpoint(Path(path), loaded["params"], state, list(attrs["versions"]),
                      attrs["model"], attrs.get("config", {}), attrs.get("counters", {}),
                      attrs.get("shards", []), saved, attrs.get("lbfgs"),
                      None if attrs.get("normaliser") is None else Normaliser.from_dict(attrs["normaliser"]),
                      ranges)


def resume_problem(saved: dict, model: dict, resuming: str,
                   names=("checkpoint", "model")) -> str | None:
    """Why a checkpoint (``describe`` of it) cannot resume algorithm ``resuming`` on the model
    described by ``model`` -- written by the other algorithm, or of another model -- or None."""
    if saved["algorithm"] != resuming:
        return f"it was written by {saved['algorithm']}, the run trains with {resuming}"
    difference = model_difference(saved["model"], model, names)
    return f"it holds a different model ({difference})" if difference else None


def load_to_resume(path, model: dict, resuming: str) -> Checkpoint:
    """Checkpoint ``path``'s metadata, to resume algorithm ``resuming`` on the model described
    by ``model``: no arrays (its ``params`` are empty; the shards read their own ranges,
    ``ParameterShard.restore``); ``resume_problem`` refusals raise ``ValueError``."""
    problem = resume_problem(describe(path), model, resuming)
    if problem:
        raise ValueError(f"cannot resume from checkpoint {path}: {problem}")
    return load(path, 0, 0, arrays=False)
