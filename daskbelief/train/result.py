"""What a training run returns: the model, its trained parameters, and what happened on the way."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daskbelief.data.normalise import Normaliser
from daskbelief.ps.sources import Saved
from daskbelief.train.partition import Plan
from daskbelief.train.partitioned import predict_by_blocks


@dataclass
class TrainResult:
    """A trained model (``predict``) with its history and the run's summary figures.

    ``history`` holds one dict per report: ``time`` (seconds since start), ``step``, ``replica``,
    ``loss``, and ``test_loss``/``test_accuracy`` where the test set was evaluated. ``normaliser``:
    the standardisation the training store applied to its features (``data.Normaliser``), which
    ``predict`` applies to the raw features it is given.

    ``params`` is None when the run left its model in its last checkpoint only (a model-parallel
    run that kept checkpoints: no process ever held the whole vector); ``checkpoint`` names it
    and ``plan`` is the partition that ``predict`` then runs through, block by block.
    """

    model: object
    params: np.ndarray | None
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    normaliser: Normaliser | None = None
    shard_stats: list[dict] = field(default_factory=list)       # each parameter shard's last counters
    replica_outcomes: list[dict] = field(default_factory=list)  # Downpour: what each replica did
    rule_state: dict | None = None  # Downpour: the update rule's final state (continue with it)
    checkpoint: Path | None = None  # the run's last checkpoint, when it kept them
    plan: Plan | None = None        # model parallelism: the partition the run trained

    def predict(self, X, client=None):
        """Class probabilities (classification) or outputs (regression) for ``X``: raw features as
        written to the store (standardised here as the store did for training). A result without
        ``params`` predicts on the cluster of ``client`` (default: the current one), through
        blocks that each read their own ranges of ``checkpoint``."""
        X = X if self.normaliser is None else self.normaliser(X)
        if self.params is not None:
            return self.model.predict(self.params, X)
        return predict_by_blocks(client, self.plan, Saved(self.checkpoint, self.model.size), X)

    def curve(self, key: str = "loss", replica="any") -> tuple[np.ndarray, np.ndarray]:
        """(time, value) arrays of one history column, for plotting (one replica's rows only when
        ``replica`` is given)."""
        rows = [h for h in self.history if h.get(key) is not None
                and (replica == "any" or h.get("replica") == replica)]
        return (np.array([h["time"] for h in rows]), np.array([h[key] for h in rows]))

    def _repr_html_(self) -> str:
        """Jupyter's view: the summary as a table beside small loss and test-accuracy curves."""
        rows = "".join(f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
                       f"<td style='text-align:left'>{html.escape(_fmt(v))}</td></tr>"
                       for k, v in self.summary.items())
        loss = [self.curve("loss", replica) for replica in self._replicas()]
        charts = sparkline_svg(loss, "training loss") + sparkline_svg(
            [self.curve("test_accuracy")], "test accuracy")
        return (f"<div class='daskbelief-result'><b>daskbelief TrainResult</b>: "
                f"{html.escape(type(self.model).__name__)}, {self.model.size:,} parameters, "
                f"{len(self.history)} history rows"
                f"<div style='display:flex;gap:1.5em;align-items:flex-start'>"
                f"<table>{rows}</table><div>{charts}</div></div></div>")

    def _replicas(self) -> list:
        """The replicas with loss rows (None stands for rows of no replica, e.g. L-BFGS)."""
        return sorted({h.get("replica") for h in self.history if h.get("loss") is not None},
                      key=lambda r: (r is not None, r))


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


SPARK_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")


def sparkline_svg(curves, title: str, width: int = 240, height: int = 64) -> str:
    """Curves ``(x, y)`` drawn as polylines on shared axes in a small inline SVG, titled with
    the first and last values; empty string when there is nothing to draw.

    Plain SVG keeps the notebook view free of plotting libraries and of image files.
    """
    curves = [(x, y) for x, y in curves if len(x) > 1 and np.isfinite(y).all()]
    if not curves:
        return ""
    xs, ys = np.concatenate([x for x, _ in curves]), np.concatenate([y for _, y in curves])
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    pad = 4

    def points(x, y):
        px = pad + (x - x0) / ((x1 - x0) or 1) * (width - 2 * pad)
        py = height - pad - (y - y0) / ((y1 - y0) or 1) * (height - 2 * pad)
        return " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(px, py))

    lines = "".join(f"<polyline fill='none' stroke='{SPARK_COLORS[i % len(SPARK_COLORS)]}' "
                    f"stroke-width='1.2' points='{points(x, y)}'/>"
                    for i, (x, y) in enumerate(curves))
    first, last = ys[np.argmin(xs)], ys[np.argmax(xs)]
    return (f"<div style='font-size:85%'>{html.escape(title)}: {_fmt(float(first))} → "
            f"{_fmt(float(last))} in {_fmt(float(x1 - x0))} s</div>"
            f"<svg width='{width}' height='{height}' style='border:1px solid #ddd'>{lines}</svg>")
