"""The ``daskbelief`` command: build datasets, run TOML pipelines, evaluate, predict and inspect.

Errors a user can fix (bad config, missing store, existing run directory) print one clear line on
stderr and exit with status 2; nothing is written before the inputs have been checked. Ctrl-C and
SIGTERM stop training cleanly: the replicas stop, a final checkpoint is written, the cluster the
command started is shut down, and the exit status is 130 (143 for SIGTERM). A run that cannot go
on (the scheduler or every worker lost) prints one line naming what was lost, the last complete
checkpoint and the command that resumes, and exits with status 3; the run directory stays.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import sys
import time
from pathlib import Path

from daskbelief.config import ConfigError
from daskbelief.train.errors import RunLost


class UsageError(Exception):
    """A problem with what the user asked for (not a bug): reported without a traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def _option(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE read as an int, a float, or else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, value


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
    build.add_argument("--chunk-rows", type=int, help="rows per zarr chunk (recipe default if omitted)")
    build.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="a recipe option, e.g. classes=2048 (speech-frames) or side=64 (images)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing store")
    ds_sub.add_parser("list", help="list the recipes")

    train = sub.add_parser("train", help="run a TOML pipeline: build data, train, evaluate")
    train.add_argument("config", help="pipeline TOML file")
    _cluster_args(train)
    train.add_argument("--out", metavar="RUN_DIR", help="run directory (default runs/NAME-TIME)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--resume", action="store_true",
                       help="continue the run in --out RUN_DIR from its latest complete checkpoint")

    ev = sub.add_parser("evaluate", help="loss and accuracy of a run's parameters on a store")
    ev.add_argument("run_dir", help="a run directory written by `daskbelief train`")
    ev.add_argument("--data", help="store URL (default: the run's dataset)")
    ev.add_argument("--split", default="test")
    _cluster_args(ev)

    pr = sub.add_parser("predict", help="write a run's predictions for a store to zarr (through Dask)")
    pr.add_argument("run_dir", help="a run directory written by `daskbelief train`")
    pr.add_argument("--out", required=True, help="zarr store to write (predictions, labels)")
    pr.add_argument("--data", help="store URL (default: the run's dataset)")
    pr.add_argument("--split", default="test")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _cluster_args(pr)

    info = sub.add_parser("info", help="describe a store, a checkpoint or a run directory")
    info.add_argument("path")
    info.add_argument("--verify", action="store_true",
                      help="read every chunk of a dataset store and check it (checksums, "
                           "missing chunks, lengths, dtypes, label range)")

    rep = sub.add_parser("report", help="plot runs' metrics as PNGs (several runs: compared)")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories to plot")
    rep.add_argument("--out", metavar="DIR",
                     help="where to write the PNGs (default RUN_DIR/report, or ./report for several)")
    return parser


def _datasets(args) -> dict | None:
    import daskbelief_datasets as recipes

    if args.datasets_command == "list":
        for name in sorted(recipes.RECIPES):
            print(name)
        return None
    path = recipes.build(args.name, args.out, size=args.size, seed=args.seed,
                         chunk_rows=args.chunk_rows, overwrite=args.overwrite, **dict(args.option))
    return {"store": str(path)}


def _client_options(args, config: dict | None = None) -> dict:
    cluster = (config or {}).get("cluster", {})
    chosen = args.local_workers or args.scheduler or args.scheduler_file  # the command line wins
    return {"jobqueue": None if chosen else {k: cluster[k] for k in ("slurm",) if k in cluster},
            "n_workers": args.local_workers or cluster.get("local_workers"),
            "scheduler": args.scheduler or cluster.get("scheduler"),
            "scheduler_file": args.scheduler_file or cluster.get("scheduler_file")}


def _train(args) -> dict:
    config = _load_config(args.config)  # a bad config is refused before Dask is even imported
    _quiet_distributed()
    from daskbelief import pipeline

    return pipeline.run(config, args.out, name=Path(args.config).stem, overwrite=args.overwrite,
                        resume=args.resume, **_client_options(args, config))


def _load_config(path) -> dict:
    from daskbelief import config

    try:
        return config.load(path)
    except ConfigError as e:
        raise UsageError(str(e)) from None


def _evaluate(args) -> dict:
    _quiet_distributed()
    from daskbelief import pipeline

    return pipeline.evaluate_run(Path(args.run_dir), args.data, args.split, **_client_options(args))


def _predict(args) -> dict:
    _quiet_distributed()
    from daskbelief import pipeline

    return pipeline.predict_run(Path(args.run_dir), args.data, args.split, args.out, args.overwrite,
                                **_client_options(args))


def _info(args) -> dict:
    from daskbelief import pipeline

    if args.verify:
        from daskbelief.data.verify import verify

        return verify(args.path)
    return pipeline.describe(Path(args.path))


def _report(args) -> dict:
    from daskbelief.monitor import report

    return {"figures": [str(p) for p in report.render(args.run_dirs, args.out)]}


def _quiet_distributed() -> None:
    """Keep distributed's harmless tracebacks (``workarounds``: an interrupt racing a call, the
    scheduler gone) off a command's stderr, which then ends with one line of ours."""
    from daskbelief.workarounds import InterruptRace, SchedulerGone

    logging.getLogger("tornado.application").addFilter(InterruptRace())
    for name in SchedulerGone.LOGGERS:
        logging.getLogger(name).addFilter(SchedulerGone())


def _resume_command(args, lost) -> str:
    """The exact command that continues a lost run from its last complete checkpoint."""
    words = ["daskbelief", "train", args.config, "--out", str(getattr(lost, "run_dir", args.out)),
             "--resume"]
    for flag in ("local_workers", "scheduler", "scheduler_file"):
        if getattr(args, flag, None):
            words += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return shlex.join(words)


METRICS_INCOMPLETE = ("the scheduler was lost as the run ended: its outputs are complete, its "
                      "metrics.jsonl may lack the last events")
COMMANDS = {"datasets": _datasets, "train": _train, "evaluate": _evaluate, "predict": _predict,
            "info": _info, "report": _report}


def main(argv: list[str] | None = None) -> int:
    """Run the command; print its JSON summary as the last stdout line."""
    args = _parser().parse_args(argv)
    start = time.time()
    # Ctrl-C stops training even where the shell started us with SIGINT ignored (a background
    # job of a script, some CI runners): Python then leaves SIGINT ignored unless told.
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _terminate),
                signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler)}
    try:
        out = COMMANDS[args.command](args)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"daskbelief {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunLost as e:
        print(f"daskbelief {args.command}: {e}; resume with: {_resume_command(args, e)}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        print(f"daskbelief {args.command}: {'terminated' if isinstance(e, Terminated) else 'interrupted'} "
              f"after {time.time() - start:.1f}s", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if out is not None:
        if out.get("metrics_complete") is False:
            print(f"daskbelief {args.command}: {METRICS_INCOMPLETE}", file=sys.stderr)
        print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
