"""The ``daskbelief`` command: build datasets, run TOML pipelines, evaluate and inspect.

Errors a user can fix (bad config, missing store, existing run directory) print one clear line on
stderr and exit with status 2; nothing is written before the inputs have been checked.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from daskbelief.config import ConfigError


class UsageError(Exception):
    """A problem with what the user asked for (not a bug): reported without a traceback."""


def _cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--local-workers", type=int, metavar="N",
                   help="start a local cluster of N single-threaded worker processes")
    g.add_argument("--scheduler", metavar="ADDRESS", help="connect to a running scheduler")
    g.add_argument("--scheduler-file", metavar="FILE", help="connect via a scheduler file")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daskbelief", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ds = sub.add_parser("datasets", help="build or list dataset recipes")
    ds_sub = ds.add_subparsers(dest="datasets_command", required=True)
    build = ds_sub.add_parser("build", help="build a dataset store from a recipe")
    build.add_argument("name", help="recipe name (see `daskbelief datasets list`)")
    build.add_argument("--out", required=True, help="where to write the zarr store")
    build.add_argument("--size", type=int, help="number of examples (recipe default if omitted)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ds_sub.add_parser("list", help="list the recipes")

    train = sub.add_parser("train", help="run a TOML pipeline: build data, train, evaluate")
    train.add_argument("config", help="pipeline TOML file")
    _cluster_args(train)
    train.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/NAME-TIME)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")

    ev = sub.add_parser("evaluate", help="loss and accuracy of a run's parameters on a store")
    ev.add_argument("run_dir", help="a run directory written by `daskbelief train`")
    ev.add_argument("--data", help="store URL (default: the run's dataset)")
    ev.add_argument("--split", default="test")
    _cluster_args(ev)

    info = sub.add_parser("info", help="describe a store or a run directory")
    info.add_argument("path")
    return parser


def _datasets(args) -> dict | None:
    import daskbelief_datasets as recipes

    if args.datasets_command == "list":
        for name in sorted(recipes.RECIPES):
            print(name)
        return None
    path = recipes.build(args.name, args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    return {"store": str(path)}


def _client_options(args, config: dict | None = None) -> dict:
    cluster = (config or {}).get("cluster", {})
    return {"n_workers": args.local_workers or cluster.get("local_workers"),
            "scheduler": args.scheduler or cluster.get("scheduler"),
            "scheduler_file": args.scheduler_file or cluster.get("scheduler_file")}


def _train(args) -> dict:
    from daskbelief import pipeline

    config = _load_config(args.config)
    run_dir = pipeline.prepare_run_dir(args.out, Path(args.config).stem, args.overwrite, config)
    return pipeline.run(config, run_dir, **_client_options(args, config))


def _load_config(path) -> dict:
    from daskbelief import config

    try:
        return config.load(path)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _evaluate(args) -> dict:
    from daskbelief import pipeline

    return pipeline.evaluate_run(Path(args.run_dir), args.data, args.split, **_client_options(args))


def _info(args) -> dict:
    from daskbelief import pipeline

    return pipeline.describe(Path(args.path))


COMMANDS = {"datasets": _datasets, "train": _train, "evaluate": _evaluate, "info": _info}


def main(argv: list[str] | None = None) -> int:
    """Run the command; print its JSON summary as the last stdout line."""
    args = _parser().parse_args(argv)
    start = time.time()
    try:
        out = COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"daskbelief {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"daskbelief {args.command}: interrupted after {time.time() - start:.1f}s",
              file=sys.stderr)
        return 130
    if out is not None:
        print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
