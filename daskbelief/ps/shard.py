"""ParameterShard: one Dask actor owning a contiguous slice of the flat parameter vector.

The shard applies the update rule to its own slice, on its own, as DistBelief's parameter-server
shards do: Adagrad's per-parameter learning rates need nothing from other shards, and the rule
state is the same length as the parameters, so slicing the vector is sharding the optimiser.

For Sandblaster the shard also holds named vectors (gradient, search direction, L-BFGS history),
each its own slice, and executes vector operations on them locally, returning only scalars.
"""
from __future__ import annotations

import time

import numpy as np

from daskbelief.backend import get_backend, namespace, to_numpy
from daskbelief.optim.rules import make_rule
from daskbelief.optim.vectors import LocalVectors

STALENESS_BINS = 64  # staleness >= this lands in the last histogram bin


class ParameterShard:
    """Holds ``params[start:stop]``, the update rule's state for it, and Sandblaster's vectors.

    Methods run one at a time on the worker's actor thread, so no locking is needed; ``fetch``
    returns a copy because the reply is serialised after the method returns, while later pushes
    may already be changing the slice in place.
    """

    def __init__(self, index: int, start: int, stop: int, values, rule: dict | str = "adagrad",
                 backend: str = "numpy"):
        if len(values) != stop - start:
            raise ValueError(f"shard {index}: got {len(values)} values for range [{start}, {stop})")
        xp = get_backend(backend)
        self.index, self.start, self.stop = index, start, stop
        self.params = xp.array(values, dtype=np.float32, copy=True)
        self.rule = make_rule(rule)
        self.state = self.rule.init(self.params)
        self.version = 0
        self.applied = 0
        self.rejected = 0
        self.per_replica: dict[str, int] = {}
        self.staleness_hist = np.zeros(STALENESS_BINS, dtype=np.int64)
        self.staleness_sum = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.fetches = 0
        self.started = time.time()
        self.vectors = LocalVectors(stop - start, dtype=np.float32)
        self.vectors.set("params", self.params)
        self._accepting: dict[str, object] = {}

    # -- Downpour -------------------------------------------------------------------------------
    def push(self, grad, base_version: int, replica: str = "", offset: int = 0) -> int:
        """Apply one update from a gradient computed on parameters of version ``base_version``.

        ``grad`` covers ``[offset, offset + len(grad))`` of this shard's slice (a model-parallel
        block pushes only its own ranges); updating a sub-slice is exact because every rule is
        elementwise. Non-finite gradients are counted and dropped: one bad replica must never
        poison the shared parameters.
        """
        xp = namespace(self.params)
        grad = xp.asarray(grad)
        self.bytes_in += grad.nbytes
        if not bool(xp.isfinite(grad).all()):
            self.rejected += 1
            return self.version
        end = offset + len(grad)
        if not 0 <= offset < end <= len(self.params):
            raise ValueError(f"shard {self.index}: push of {len(grad)} values at offset {offset} "
                             f"does not fit its {len(self.params)} parameters")
        part = slice(offset, end)
        self.rule.apply(self.params[part], grad, {k: v[part] for k, v in self.state.items()})
        staleness = max(self.version - int(base_version), 0)
        self.staleness_hist[min(staleness, STALENESS_BINS - 1)] += 1
        self.staleness_sum += staleness
        self.version += 1
        self.applied += 1
        self.per_replica[replica] = self.per_replica.get(replica, 0) + 1
        return self.version

    def fetch(self, offset: int = 0, length: int | None = None):
        """A copy of ``params[offset:offset+length]`` of this slice and the shard's version."""
        stop = len(self.params) if length is None else offset + length
        values = self.params[offset:stop].copy()
        self.bytes_out += values.nbytes
        self.fetches += 1
        return values, self.version

    def stats(self) -> dict:
        """Counters for monitoring and tests: updates applied/rejected, staleness, traffic."""
        return {
            "shard": self.index, "start": self.start, "stop": self.stop, "version": self.version,
            "applied": self.applied, "rejected": self.rejected, "fetches": self.fetches,
            "per_replica": dict(self.per_replica),
            "staleness_hist": self.staleness_hist.tolist(),
            "staleness_mean": self.staleness_sum / self.applied if self.applied else 0.0,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "uptime": time.time() - self.started,
            "params_finite": bool(namespace(self.params).isfinite(self.params).all()),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Parameters, rule state and version as host arrays, for a checkpoint of this shard."""
        return {"params": to_numpy(self.params).copy(),
                "state": {k: to_numpy(v).copy() for k, v in self.state.items()},
                "version": self.version, "applied": self.applied}

    def write_checkpoint(self, path: str) -> dict:
        """Write this shard's slice and rule state into the checkpoint group at ``path``.

        The driver created the arrays; each shard fills only its own, so a checkpoint costs one
        parallel write and no parameter ever passes through the driver. Returns the version and
        the per-replica update counts saved with it (consistent: the actor thread runs one method
        at a time), from which a resumed run knows how far each replica had got.
        """
        import zarr

        group = zarr.open_group(path, mode="r+")
        group[f"shard-{self.index}/params"][:] = to_numpy(self.params)
        for name, values in self.state.items():
            group[f"shard-{self.index}/state/{name}"][:] = to_numpy(values)
        return {"version": self.version, "applied": self.applied,
                "per_replica": dict(self.per_replica)}

    def state_names(self) -> list[str]:
        """Names of the update rule's state arrays (what a checkpoint must hold besides params)."""
        return sorted(self.state)

    def load_state(self, snapshot: dict) -> int:
        """Restore what ``state_dict`` saved (a recreated shard resumes from a checkpoint)."""
        xp = namespace(self.params)
        if len(snapshot["params"]) != len(self.params):
            raise ValueError(f"shard {self.index}: checkpoint slice has {len(snapshot['params'])} "
                             f"values, shard has {len(self.params)}")
        self.params[...] = xp.asarray(snapshot["params"])
        for k, v in snapshot["state"].items():
            self.state[k][...] = xp.asarray(v)
        self.version = int(snapshot["version"])
        self.applied = int(snapshot.get("applied", 0))
        return self.version

    # -- Sandblaster: vectors held on the shard ---------------------------------------------------
    def run_ops(self, ops: list[tuple]) -> list:
        """Execute vector operations in order and return the result of each (None or a scalar).

        Ops arrive in batches so that the coordinator pays one round trip for several of them;
        a dot returns this shard's float64 partial sum, which the coordinator adds up.
        """
        return [getattr(self.vectors, name)(*args) for name, *args in ops]

    def open_accumulator(self, name: str, tag) -> None:
        """Zero vector ``name`` and accept only contributions tagged ``tag`` from now on.

        A new tag per gradient evaluation means a contribution from an abandoned evaluation (a
        worker that was presumed lost, a restarted evaluation) can never leak into this one.
        """
        self.vectors.zeros(name)
        self._accepting[name] = tag

    def accumulate(self, name: str, tag, grad, offset: int = 0) -> bool:
        """Add ``grad`` into vector ``name`` when ``tag`` is the one it accepts; True if added."""
        xp = namespace(self.params)
        grad = xp.asarray(grad)
        self.bytes_in += grad.nbytes
        if self._accepting.get(name) != tag or not bool(xp.isfinite(grad).all()):
            self.rejected += 1
            return False
        target = self.vectors.get(name)
        target[offset:offset + len(grad)] += grad
        return True
