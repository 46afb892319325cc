"""The engine registry: every training algorithm a pipeline can name, and what a pipeline needs
to know about it.

An engine is its entry point (``module:function``, imported only when used) plus small pure
functions: how many worker threads it needs at once, how much work a run is (for the progress
bar) and, optionally, its own checks of its settings before any work starts. Its settings are
declared once, by the entry point's keyword-only parameters: their defaults are the API's, and
their annotations are the TOML schema of ``[train]`` (``settings``), so every argument of the
API can be set from a pipeline and the error messages name the key and the type. Arguments the
pipeline itself supplies (``PIPELINE_ARGUMENTS``) are not settings. Checkpoints record the name
of the engine that wrote them.
"""
from __future__ import annotations

import importlib
import inspect
import types
import typing
from dataclasses import dataclass
from typing import Callable

# Supplied by the pipeline from its other sections ([dataset], [checkpoint], --resume), or not a
# TOML value at all (``params``, ``rule_state``: the start point comes from the seed or a
# checkpoint; ``on_snapshot``: a function).
PIPELINE_ARGUMENTS = frozenset({"model", "data", "client", "test", "config", "checkpoint_dir",
                                "checkpoint_every", "checkpoint_keep", "resume_from", "params",
                                "rule_state", "on_snapshot"})
TOML_TYPES = {int: (int,), float: (int, float), bool: (bool,), str: (str,), dict: (dict,),
              list: (list,), tuple: (list,)}


@dataclass(frozen=True)
class Engine:
    """A registered training algorithm; see the module docstring."""

    name: str
    entry: str                                   # "module:function" of its API entry point
    threads: Callable[[dict], int]               # settings -> worker threads needed at once
    work: Callable[[dict, int], tuple[int, str]]  # settings, training rows -> (total, unit)
    # its own checks of its ``[train]`` settings, before any work: ValueError naming the key
    check: Callable[[dict], None] = lambda settings: None

    def function(self) -> Callable:
        module, name = self.entry.split(":")
        return getattr(importlib.import_module(module), name)

    def settings(self) -> dict[str, tuple[type, ...]]:
        """The TOML schema of this engine's ``[train]`` keys: name -> accepted TOML types."""
        hints = typing.get_type_hints(self.function())
        return {name: toml_types(hints.get(name)) for name in self.defaults()}

    def defaults(self) -> dict[str, object]:
        """Every setting (keyword-only, not the pipeline's) and its API default."""
        return {name: p.default for name, p in inspect.signature(self.function()).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and not name.startswith("_")
                and name not in PIPELINE_ARGUMENTS}


def toml_types(hint) -> tuple[type, ...]:
    """The TOML value types an annotation admits (``float | None`` -> int or float)."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else (hint,)
    out: list[type] = []
    for arg in args:
        for kind in TOML_TYPES.get(typing.get_origin(arg) or arg, ()):
            if kind not in out:
                out.append(kind)
    return tuple(out)


ENGINES: dict[str, Engine] = {}


def register(engine: Engine) -> Engine:
    """Make ``engine`` nameable by ``train.algorithm`` in pipelines (and by checkpoints)."""
    ENGINES[engine.name] = engine
    return engine


def get(name) -> Engine:
    """The engine called ``name``; ``ValueError`` listing the known ones otherwise."""
    if name not in ENGINES:
        raise ValueError(f"train.algorithm must be one of {', '.join(sorted(ENGINES))}, got {name!r}")
    return ENGINES[name]


def _downpour_work(settings: dict, rows: int) -> tuple[int, str]:
    """Samples: every replica's steps (or epochs over the store) plus the warm start."""
    batch, replicas = settings["batch_size"], settings["replicas"]
    warm = settings["warmstart_steps"] * batch
    if settings["steps"] is not None:
        return replicas * settings["steps"] * batch + warm, "samples"
    return (settings["epochs"] or 1) * rows + warm, "samples"


def _downpour_check(settings: dict) -> None:
    """Elastic replicas' settings, and the update rule, as ``downpour`` will check them."""
    if settings.get("replicas") == "auto":
        from daskbelief.train import elastic

        try:
            elastic.validate(max_replicas=settings.get("max_replicas"),
                             unit_chunks=settings.get("unit_chunks", 1),
                             steps=settings.get("steps"),
                             warmstart_steps=settings.get("warmstart_steps", 0),
                             partition=settings.get("partition"), resume_from=None)
        except ValueError as e:
            raise ValueError(f"[train]: {e}") from None
    if "rule" in settings:
        from daskbelief.optim.rules import make_rule

        try:
            make_rule(settings["rule"])
        except ValueError as e:
            raise ValueError(f"train.rule: {e}") from None


register(Engine("downpour", "daskbelief.train.downpour:downpour",
                threads=lambda s: 1 if s["replicas"] == "auto" else s["replicas"],  # elastic: any
                work=_downpour_work, check=_downpour_check))
register(Engine("sandblaster", "daskbelief.train.sandblaster:sandblaster",
                threads=lambda s: 1, work=lambda s, rows: (s["iterations"], "iterations")))
