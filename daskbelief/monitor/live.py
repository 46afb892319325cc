"""A live training plot for Jupyter, with a link to the DistBelief page of the Dask dashboard.

    with LivePlot(client):
        result = downpour(model, store, client=client, ...)

While the block runs, a background thread polls the scheduler's event log every ``interval``
seconds and redraws loss and test accuracy (the report's drawing functions) into one output of
the cell, through an IPython display handle. It polls (``Client.get_events``) rather than
subscribing: a client holds one handler per topic, and a run's ``EventLog`` may own it.
"""
from __future__ import annotations

import html
import io
import logging
import threading

from IPython.display import HTML, Image, display
from matplotlib.figure import Figure

from daskbelief.monitor import dashboard, shaping
from daskbelief.monitor.events import REPLICA, RUN
from daskbelief.monitor.report import RunEvents, draw_accuracy, draw_loss

logger = logging.getLogger(__name__)


class LivePlot:
    """Loss and test accuracy of the runs that start while this context is open, redrawn live."""

    def __init__(self, client, interval: float = 1.0, figsize=(10, 3.5)):
        self.client, self.interval, self.figsize = client, interval, figsize
        self.handle = None
        self.before: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="daskbelief-live-plot", daemon=True)

    def link_html(self) -> str:
        """A link to the dashboard page (or a note that the cluster has no dashboard)."""
        url = dashboard.page_url(self.client.dashboard_link)
        if url is None:
            return "<i>this cluster has no dashboard</i>"
        url = html.escape(url, quote=True)
        return f"Dask dashboard, DistBelief page: <a href='{url}' target='_blank'>{url}</a>"

    def __enter__(self) -> LivePlot:
        self.before = {e["run"] for e in self._events()}  # runs already there are not ours
        display(HTML(self.link_html()))
        self.handle = display(HTML("<i>waiting for the first training events…</i>"),
                              display_id=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.refresh()  # the last events, whatever the thread last drew

    def _events(self) -> list[dict]:
        return [e for topic in (REPLICA, RUN)
                for e in shaping.records(topic, self.client.get_events(topic))]

    def runs(self) -> list[RunEvents]:
        """The runs that started after this plot opened, as the drawing functions take them."""
        groups = {run: events for run, events in shaping.by_run(self._events()).items()
                  if run not in self.before}
        table = shaping.run_table([e for events in groups.values() for e in events])
        return [RunEvents(run, f"{run} ({table[run]['algorithm']})", events)
                for run, events in groups.items()]

    def refresh(self) -> None:
        """Redraw from the events logged so far (nothing to draw: leave the output as it is)."""
        runs = self.runs()
        if runs:
            self.handle.update(Image(data=render_png(runs, self.figsize)))

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 -- a plot must never take the training down
                logger.exception("daskbelief live plot: redraw failed")


def render_png(runs: list[RunEvents], figsize) -> bytes:
    """Loss and test accuracy side by side, as PNG bytes."""
    fig = Figure(figsize=figsize, layout="constrained")
    loss, accuracy = fig.subplots(1, 2)
    draw_loss(loss, runs)
    draw_accuracy(accuracy, runs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()
