"""TOML pipeline configs: parsed with tomllib, checked against a schema before any work starts.

A pipeline names a dataset recipe (built when missing), a model, a training algorithm and its
settings. Every key is checked: an unknown key or a value of the wrong type is an error that names
the key and what was expected, so a typo never silently falls back to a default. The keys of
``[train]`` are the algorithm's own settings, declared once by its entry point's signature
(``train.engines``).
"""
from __future__ import annotations

import tomllib
from pathlib import Path

NUMBER = (int, float)

SCHEMA: dict[str, dict[str, object]] = {
    "dataset": {"recipe": str, "path": str, "size": int, "seed": int, "chunk_rows": int,
                "options": dict},
    "model": {"input_shape": list, "layers": list, "loss": str, "l2": NUMBER},
    "cluster": {"local_workers": int, "scheduler": str, "scheduler_file": str},
    "checkpoint": {"every_seconds": NUMBER, "keep": int},
}



class ConfigError(ValueError):
    """A pipeline config that cannot be run, with the key at fault in the message."""


def _type_name(expected) -> str:
    if expected == NUMBER:
        return "a number"
    if isinstance(expected, tuple):
        return " or ".join(_type_name(e) for e in expected)
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
        ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool)
                                              or (isinstance(expected, tuple) and bool in expected))
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
    from daskbelief.train import engines  # here: it reads the entry points' signatures

    train = config["train"]
    try:
        engine = engines.get(train.get("algorithm"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_section("train", train, {"algorithm": str} | engine.settings())
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
