"""Progress of a training run on the driver: a tqdm bar on a terminal, plain log lines otherwise.

It listens to the run's events (``EventLog`` listeners): Downpour replicas' step reports advance it
by the samples they processed, Sandblaster iterations to the iteration reached. Batch jobs whose stderr is a file
get one line every ``interval`` seconds instead of a bar redrawn in place.
"""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from daskbelief.monitor.events import REPLICA, RUN


class Progress:
    """Advance a bar from events; ``total`` in ``unit`` ("samples" or "iterations")."""

    def __init__(self, total: int, unit: str, *, stream=None, interval: float = 10.0):
        self.stream = sys.stderr if stream is None else stream
        self.unit, self.total, self.interval = unit, total, interval
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, unit=unit[:-1] if unit.endswith("s") else unit,
                        unit_scale=True, file=self.stream, disable=not self.interactive,
                        dynamic_ncols=True)
        self.done = 0
        self.steps: dict = {}       # replica -> last step reported
        self.loss = None
        self.rate = {}              # replica -> samples/s
        self.started = self.last_line = time.time()

    def __call__(self, record: dict) -> None:
        """Take one event (``EventLog`` record: ``topic`` plus the event's fields)."""
        if record["topic"] == REPLICA and self.unit == "samples":
            replica, step = record["replica"], record["step"]
            advance = (step - self.steps.get(replica, 0)) * record.get("batch_size", 0)
            self.steps[replica] = step
            self.rate[replica] = record.get("samples_per_s", 0.0)
            self.loss = record["loss"]
            self._advance(max(advance, 0))
        elif record["topic"] == RUN and record.get("kind") == "iteration" and self.unit == "iterations":
            self.loss = record["loss"]
            self._advance(max(record["iteration"] - self.done, 0))  # a resumed run starts ahead

    def _advance(self, n: int) -> None:
        self.done += n
        postfix = {"loss": f"{self.loss:.4g}"} if self.loss is not None else {}
        if self.rate:
            postfix["samples/s"] = f"{sum(self.rate.values()):,.0f}"
        if self.interactive:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif time.time() - self.last_line >= self.interval:
            self.last_line = time.time()
            print(f"[{time.time() - self.started:7.1f}s] {self.done:,}/{self.total:,} {self.unit} "
                  + " ".join(f"{k}={v}" for k, v in postfix.items()), file=self.stream, flush=True)

    def close(self) -> None:
        self.bar.close()
