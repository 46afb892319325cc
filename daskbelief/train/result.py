"""What a training run returns: the model, its trained parameters, and what happened on the way."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TrainResult:
    """A trained model (``predict``) with its history and the run's summary figures.

    ``history`` holds one dict per report: ``time`` (seconds since start), ``step``, ``replica``,
    ``loss``, and ``test_loss``/``test_accuracy`` where the test set was evaluated.
    """

    model: object
    params: np.ndarray
    history: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    def predict(self, X):
        """Class probabilities (classification) or outputs (regression) for ``X``."""
        return self.model.predict(self.params, X)

    def curve(self, key: str = "loss") -> tuple[np.ndarray, np.ndarray]:
        """(time, value) arrays of one history column, for plotting."""
        rows = [h for h in self.history if h.get(key) is not None]
        return (np.array([h["time"] for h in rows]), np.array([h[key] for h in rows]))

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><th style='text-align:left'>{k}</th><td>{_fmt(v)}</td></tr>"
                       for k, v in self.summary.items())
        return (f"<div><b>daskbelief TrainResult</b>: {type(self.model).__name__}, "
                f"{len(self.params):,} parameters, {len(self.history)} history rows"
                f"<table>{rows}</table></div>")


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
