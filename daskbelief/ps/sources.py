"""Where a run's parameters come from, range by range, so that no process need hold them whole.

A parameter server is seeded shard by shard (``ParameterServer.create``), and a shard lost
before any checkpoint is remade from its range alone (``train.driver``): each asks its source
for ``values(start, stop)`` on the worker that will hold them. A model larger than any worker
is made that way from a seed (``Fresh``) or from a checkpoint (``Saved``) without the driver
ever holding the vector; a vector the user gave (``Given``) is cut where it is.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from daskbelief.ps import checkpoint


class Ranged:
    """A flat float32 vector of ``size`` values, made a range at a time by ``values``."""

    size: int

    def values(self, start: int, stop: int) -> np.ndarray:
        raise NotImplementedError

    def whole(self) -> np.ndarray:
        """All of it, in this process (for engines whose every worker holds the model)."""
        return self.values(0, self.size)


@dataclass(frozen=True)
class Given(Ranged):
    """A vector the caller holds already."""

    params: np.ndarray

    @property
    def size(self) -> int:
        return len(self.params)

    def values(self, start: int, stop: int) -> np.ndarray:
        return self.params[start:stop]

    def whole(self) -> np.ndarray:
        return self.params


@dataclass(frozen=True)
class Fresh(Ranged):
    """``model.init(seed)``, each range drawn on its own (``Sequential.init_range``)."""

    model: object
    seed: int

    @property
    def size(self) -> int:
        return self.model.size

    def values(self, start: int, stop: int) -> np.ndarray:
        return self.model.init_range(self.seed, start, stop)


@dataclass(frozen=True)
class Saved(Ranged):
    """The parameters of checkpoint ``path`` (of ``size`` values), each range read from disk."""

    path: Path
    size: int

    def values(self, start: int, stop: int) -> np.ndarray:
        return checkpoint.load(self.path, start, stop, arrays=False).params


def placed(client, source: Ranged, start: int, stop: int, worker: str):
    """``source.values(start, stop)`` as an argument for an actor on ``worker``: made there (a
    future), or cut here when the caller holds the vector already."""
    if isinstance(source, Given):
        return np.ascontiguousarray(source.values(start, stop))
    return client.submit(source.values, start, stop, workers=[worker], pure=False)
