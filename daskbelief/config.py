"""TOML pipeline configs: parsed with tomllib, checked against a schema before any work starts.

A pipeline names a dataset recipe (built when missing), a model, a training algorithm and its
settings. Every key is checked: an unknown key or a value of the wrong type is an error that names
the key and what was expected, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

NUMBER = (int, float)

SCHEMA: dict[str, dict[str, object]] = {
    "dataset": {"recipe": str, "path": str, "size": int, "seed": int, "chunk_rows": int,
                "options": dict},
    "model": {"input_shape": list, "layers": list, "loss": str, "l2": NUMBER},
    "cluster": {"local_workers": int, "scheduler": str, "scheduler_file": str,
                "slurm": dict},  # [cluster.slurm]: checked by daskbelief.jobqueue
    "checkpoint": {"every_seconds": NUMBER, "keep": int},
}

TRAIN_COMMON = {"algorithm": str, "seed": int, "eval_every": NUMBER}

ALGORITHMS: dict[str, dict[str, object]] = {
    "downpour": {"replicas": int, "shards": int, "n_fetch": int, "n_push": int, "rule": dict,
                 "batch_size": int, "epochs": int, "steps": int, "warmstart_steps": int,
                 "overlap": bool, "max_in_flight": int, "report_every": int, "eval_rows": int,
                 "partition": dict},
    "sandblaster": {"partition": dict,
                    "shards": int, "iterations": int, "history": int, "portion_size": int,
                    "backups": bool, "tolerance": NUMBER, "ftol": NUMBER, "batch_rows": int,
                    "push_every": int, "eval_rows": int},
    "reference": {"rule": dict, "batch_size": int, "epochs": int, "steps": int},
}


class ConfigError(ValueError):
    """A pipeline config that cannot be run, with the key at fault in the message."""


def _type_name(expected) -> str:
    if expected is NUMBER:
        return "a number"
    return {str: "a string", int: "an integer", bool: "true or false", list: "an array",
            dict: "a table"}[expected]


def _check_section(name: str, table, schema: dict) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table, got {type(table).__name__}")
    for key, value in table.items():
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise ConfigError(f"unknown key {name}.{key} (known keys of [{name}]: {known})")
        expected = schema[key]
        ok = isinstance(value, expected) and not (expected in (int, NUMBER) and isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{name}.{key} must be {_type_name(expected)}, "
                              f"got {value!r} ({type(value).__name__})")


def validate(config: dict) -> dict:
    """Check ``config`` against the schema and return it; raise ``ConfigError`` naming the key."""
    sections = set(SCHEMA) | {"train"}
    for name in config:
        if name not in sections:
            raise ConfigError(f"unknown section [{name}] (known: {', '.join(sorted(sections))})")
    for required in ("dataset", "model", "train"):
        if required not in config:
            raise ConfigError(f"missing section [{required}]")
    for name, schema in SCHEMA.items():
        if name in config:
            _check_section(name, config[name], schema)
    train = config["train"]
    algorithm = train.get("algorithm")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"train.algorithm must be one of {', '.join(sorted(ALGORITHMS))}, "
                          f"got {algorithm!r}")
    _check_section("train", train, TRAIN_COMMON | ALGORITHMS[algorithm])
    if "slurm" in config.get("cluster", {}):  # the batch system's keywords, before any work
        from daskbelief.jobqueue import check

        try:
            check(config["cluster"])
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if "recipe" not in config["dataset"] or "path" not in config["dataset"]:
        raise ConfigError("[dataset] needs both recipe (e.g. \"digits\") and path (where the store lives)")
    return config


def load(path) -> dict:
    """Read and validate a pipeline TOML file; errors name the file and the problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read pipeline {path}: {e.strerror}") from None
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None
    try:
        return validate(config)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
