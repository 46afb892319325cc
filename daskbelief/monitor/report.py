"""PNG reports of finished runs from their ``metrics.jsonl``: ``daskbelief report RUN_DIR ...``.

Each figure overlays every run given (one colour per run), with time measured from each run's
start, so Downpour and Sandblaster runs of the same model compare at a glance. The drawing
functions take matplotlib axes and are shared with the live notebook plot (``live.py``).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

# Figures are made without pyplot: no GUI backend is involved, and importing this module in a
# notebook (the live plot does) leaves the notebook's own matplotlib backend alone.
from matplotlib.figure import Figure

from daskbelief.monitor import shaping
from daskbelief.monitor.events import PORTION, SHARD

FIGSIZE = (8, 4.5)


@dataclass
class RunEvents:
    """One run's events, with the label it gets in legends and its summary (possibly empty)."""

    run: str | None
    label: str
    events: list[dict]
    summary: dict = field(default_factory=dict)

    @property
    def start(self) -> float:
        """The run's start, which times are measured from: its ``start`` event, else its first."""
        starts = [e["time"] for e in self.events if e.get("kind") == "start"]
        return min(starts or [e["time"] for e in self.events] or [0.0])

    def elapsed(self, times) -> list[float]:
        """Seconds since the run's start."""
        return [t - self.start for t in times]


def read_metrics(path: Path) -> list[dict]:
    """The usable records of a ``metrics.jsonl``; a line that is not JSON is an error naming it."""
    events = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON event ({e.msg})") from None
    return shaping.usable(events)


def load_run_dir(run_dir) -> list[RunEvents]:
    """The runs recorded in one run directory (usually one), labelled by directory and algorithm."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.jsonl: not a daskbelief run directory "
                                "(`daskbelief train` writes one)")
    summary = _read_summary(run_dir / "summary.json")
    groups = shaping.by_run(read_metrics(metrics)) or {None: []}
    runs = []
    for run, events in groups.items():
        own = summary if len(groups) == 1 or summary.get("run") == run else {}
        algorithm = shaping.run_table(events).get(run, {}).get("algorithm", "?")
        if algorithm == "?":
            algorithm = own.get("algorithm", "?")
        name = run_dir.name if len(groups) == 1 else f"{run_dir.name}/{run}"
        runs.append(RunEvents(run, f"{name} ({algorithm})", events, own))
    return runs


def _read_summary(path: Path) -> dict:
    """A run's ``summary.json`` ({} when the run did not finish)."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg})") from None


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in these runs", transform=ax.transAxes, ha="center",
            va="center", color="grey")


def _finish(ax, ylabel: str, what: str) -> None:
    """Label the axes; a legend when something was drawn, else a 'no data' note."""
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    else:
        _no_data(ax, what)


def _plot_series(ax, run: RunEvents, series: dict, column: str, label, *fmt, **style):
    """Plot ``column`` vs time for each of a run's ``series`` (one per replica, say); only the
    first line carries ``label``, so a run has one legend entry however many replicas it had.
    Returns the label still unused (None once a line took it)."""
    for columns in series.values():
        ax.plot(run.elapsed(columns["time"]), columns[column], *fmt, label=label, **style)
        label = None
    return label


def draw_loss(ax, runs: list[RunEvents]) -> None:
    """Training loss vs time: Downpour replicas (thin lines), Sandblaster iterations (markers)."""
    for i, run in enumerate(runs):
        color, label = f"C{i % 10}", run.label
        label = _plot_series(ax, run, shaping.replica_series(run.events), "loss", label,
                             color=color, lw=1, alpha=0.8)
        _plot_series(ax, run, shaping.iteration_series(run.events), "loss", label, "o-",
                     color=color, ms=3)
    ax.set_title("Training loss")
    _finish(ax, "loss", "training loss")


def draw_accuracy(ax, runs: list[RunEvents]) -> None:
    """Test accuracy vs time; a star at the end for the final evaluation of the summary."""
    for i, run in enumerate(runs):
        color, label = f"C{i % 10}", run.label
        label = _plot_series(ax, run, shaping.eval_series(run.events), "test_accuracy", label,
                             "o-", color=color, ms=3)
        if run.summary.get("test_accuracy") is not None and "seconds" in run.summary:
            ax.plot([run.summary["seconds"]], [run.summary["test_accuracy"]], "*", color=color,
                    ms=12, label=label)
            ax.set_title("Test accuracy (star: final)")
    if not ax.get_title():
        ax.set_title("Test accuracy")
    _finish(ax, "accuracy", "test evaluations")


def draw_throughput(ax, runs: list[RunEvents]) -> None:
    """Samples/s of each replica vs time; dashed: the whole run's samples/s from its summary."""
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        _plot_series(ax, run, shaping.replica_series(run.events), "samples_per_s", run.label,
                     color=color, lw=1)
        if run.summary.get("samples_per_second"):
            ax.axhline(run.summary["samples_per_second"], color=color, ls="--", lw=1,
                       label=f"{run.label}: whole run")
    ax.set_title("Throughput (samples/s per replica)")
    _finish(ax, "samples/s", "throughput figures")


def draw_staleness(ax, runs: list[RunEvents]) -> None:
    """Each run's final staleness histogram as fractions of its pushes, bars side by side."""
    hists = [(i, run, shaping.staleness_histogram(shaping.shard_rates(run.events)[1],
                                                  shaping.latest_run(run.events, SHARD)))
             for i, run in enumerate(runs)]
    hists = [(i, run, h) for i, run, h in hists if sum(h["count"])]
    width = 0.8 / max(len(hists), 1)
    for k, (i, run, hist) in enumerate(hists):
        total = sum(hist["count"])
        ax.bar([b + k * width for b in hist["bin"]], [c / total for c in hist["count"]],
               width=width, color=f"C{i % 10}", label=run.label)
    longest = max(hists, key=lambda h: len(h[2]["bin"]), default=None)
    if longest:
        ax.set_xticks([b + 0.4 - width / 2 for b in longest[2]["bin"]], longest[2]["label"])
    ax.set_title("Staleness of pushes (versions behind)")
    _finish(ax, "fraction of pushes", "parameter-shard counters")
    ax.set_xlabel("versions behind")


def draw_portions(fig: Figure, runs: list[RunEvents]) -> None:
    """Sandblaster portions per worker (counted / discarded), one panel per run that has them."""
    tallies = [(run, Counter(shaping.portion_keys(run.events)),
                shaping.backups_launched(run.events)) for run in runs]
    tallies = [t for t in tallies if t[1]]
    for k, (run, counts, backups) in enumerate(tallies):
        ax = fig.add_subplot(1, len(tallies), k + 1)
        bars = shaping.portion_bars(counts, run.run)
        workers = [w.removeprefix("tcp://") for w in bars["worker"]]
        ax.bar(workers, bars["counted"], label="counted")
        ax.bar(workers, bars["discarded"], bottom=bars["counted"], label="discarded (a copy won)")
        ax.set_title(f"{run.label}: {backups[run.run]} backups launched", fontsize="small")
        ax.set_ylabel("portions")
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        ax.legend(fontsize="small")


FIGURES = {"loss.png": draw_loss, "accuracy.png": draw_accuracy,
           "throughput.png": draw_throughput, "staleness.png": draw_staleness}


def render(run_dirs, out=None) -> list[Path]:
    """Write the report PNGs for ``run_dirs`` into ``out``; return the paths written.

    ``out`` defaults to ``RUN_DIR/report`` for one run and ``./report`` for a comparison. Every
    run directory is read before anything is written, so a bad one leaves no partial report.
    ``portions.png`` is written only when a run has Sandblaster portions.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [run for run_dir in run_dirs for run in load_run_dir(run_dir)]
    out = Path(out) if out else (Path(run_dirs[0]) / "report" if len(run_dirs) == 1
                                 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, draw in FIGURES.items():
        fig = Figure(figsize=FIGSIZE, layout="constrained")
        draw(fig.add_subplot(), runs)
        written.append(_save(fig, out / name))
    if any(e["topic"] == PORTION for run in runs for e in run.events):
        fig = Figure(figsize=FIGSIZE, layout="constrained")
        draw_portions(fig, runs)
        written.append(_save(fig, out / "portions.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    return path
