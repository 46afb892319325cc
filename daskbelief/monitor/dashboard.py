"""The DistBelief page of the Dask dashboard, at ``/individual-daskbelief``.

A bokeh app on the scheduler: every second it takes the daskbelief events the scheduler logged
since the last look (``Scheduler.get_events``) and streams them into the page's plots: loss and
test accuracy vs time, samples/s per replica, per-shard push/fetch rates, the latest staleness
histogram, and Sandblaster's portions per worker with the backups launched. A route starting with
``/individual-`` is listed in ``/individual-plots.json``, so JupyterLab's dask extension offers it.

How it gets onto a scheduler: the scheduler builds its dashboard from
``distributed.dashboard.scheduler.applications`` when it starts, and imports its preload modules
just before that; importing this module registers the page. So:

* clusters daskbelief starts (``daskbelief.cluster.client_or_local``) call ``register()``;
* for a scheduler you start: ``dask scheduler --preload daskbelief.monitor.dashboard`` (or
  ``LocalCluster(scheduler_kwargs={"preload": ["daskbelief.monitor.dashboard"]})``).

The same preload hook (``dask_setup``) puts daskbelief's figures on the scheduler's Prometheus
endpoint, ``/metrics`` (``daskbelief.monitor.prometheus``).
"""
from __future__ import annotations

import html
import logging
import time
from collections import Counter

from bokeh.layouts import column, layout
from bokeh.models import ColumnDataSource, DatetimeTickFormatter, Div, FactorRange, Legend
from bokeh.palettes import Category10_10
from bokeh.plotting import figure
from distributed.comm import get_address_host
from distributed.dashboard import scheduler as dashboard_scheduler
from distributed.dashboard.components.scheduler import BOKEH_THEME
from distributed.utils import format_dashboard_link

from daskbelief.monitor import prometheus, shaping
from daskbelief.monitor.events import PORTION, REPLICA, RUN, SHARD, TOPICS

ROUTE = "/individual-daskbelief"
INTERVAL_MS = 1000   # how often an open page looks for new events
ROLLOVER = 5000      # points kept per line: an open page's memory stays bounded on long runs
EMPTY_NOTE = ("<b>No daskbelief runs yet.</b> Plots fill in as soon as a Downpour or Sandblaster "
              "run on this cluster reports its first events.")


class Lines:
    """Lines of one figure, one per key (a run, a replica, a shard), added as keys first appear.

    ``ys`` lists ``(column, dash, suffix)``: each key gets one line per y column, all fed from
    one ``ColumnDataSource`` named ``daskbelief:<name>:<key parts>`` (how the browser test finds
    them).
    """

    def __init__(self, fig, name: str, ys, label, markers: bool = False):
        self.fig, self.name, self.ys, self.label, self.markers = fig, name, ys, label, markers
        self.sources: dict = {}

    def stream(self, series: dict) -> None:
        """Append new points; ``series`` maps key -> columns with ``time`` in seconds."""
        for key, columns in series.items():
            source = self.sources[key] if key in self.sources else self._add(key, columns)
            source.stream({**columns, "time": [t * 1000 for t in columns["time"]]},
                          rollover=ROLLOVER)

    def _add(self, key, columns) -> ColumnDataSource:
        color = Category10_10[len(self.sources) % len(Category10_10)]
        source = ColumnDataSource({name: [] for name in columns},
                                  name=":".join(map(str, ("daskbelief", self.name, *_parts(key)))))
        for y, dash, suffix in self.ys:
            legend = f"{self.label(key)}{suffix}"
            self.fig.line("time", y, source=source, color=color, line_dash=dash,
                          legend_label=legend)
            if self.markers:
                self.fig.scatter("time", y, source=source, color=color, size=5,
                                 legend_label=legend)
        self.sources[key] = source
        return source


def _parts(key) -> tuple:
    return key if isinstance(key, tuple) else (key,)


def _legend_beside(fig) -> None:
    """A legend beside the plot, so that it never hides data. It exists before any glyph does:
    glyphs added later with a ``legend_label`` join it (and an empty figure renders cleanly)."""
    fig.add_layout(Legend(click_policy="hide", label_text_font_size="8pt"), "right")


def _time_figure(title: str, y_label: str):
    fig = figure(title=title, x_axis_type="datetime", height=260, sizing_mode="stretch_width",
                 tools="pan,wheel_zoom,box_zoom,reset,save")
    fig.yaxis.axis_label = y_label
    # clock times at every zoom (bokeh's default labels sub-second ticks "0ms", "500ms", ...)
    fig.xaxis.formatter = DatetimeTickFormatter(milliseconds="%H:%M:%S.%3N", seconds="%H:%M:%S",
                                                minsec="%H:%M:%S")
    _legend_beside(fig)
    return fig


class DaskbeliefPage:
    """The page's figures and data sources, fed from one scheduler's event log by ``update``."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.cursors = {topic: shaping.NO_CURSOR for topic in TOPICS}
        self.runs: dict = {}
        self.last_shard: dict = {}
        self.portions = Counter()
        self.backups = Counter()

        loss = _time_figure("Training loss", "loss")
        accuracy = _time_figure("Test accuracy", "accuracy")
        throughput = _time_figure("Samples/s per replica", "samples/s")
        traffic = _time_figure("Parameter-shard traffic (solid: pushes/s, dashed: fetches/s)",
                               "per second")
        self.replica_loss = Lines(loss, "loss", [("loss", "solid", "")],
                                  lambda k: f"r{k[1]} {k[0]}")
        self.iteration_loss = Lines(loss, "iteration-loss", [("loss", "dotdash", " L-BFGS")],
                                    str, markers=True)
        self.accuracy = Lines(accuracy, "accuracy", [("test_accuracy", "solid", "")], str,
                              markers=True)
        self.throughput = Lines(throughput, "samples", [("samples_per_s", "solid", "")],
                                lambda k: f"r{k[1]} {k[0]}")
        self.traffic = Lines(traffic, "traffic", [("push_per_s", "solid", " push"),
                                                  ("fetch_per_s", "dashed", " fetch")],
                             lambda k: f"s{k[1]} {k[0]}")

        self.staleness = ColumnDataSource({"bin": [], "count": [], "label": []},
                                          name="daskbelief:staleness")
        self.staleness_fig = figure(title="Staleness of pushes (latest run)", height=260,
                                    sizing_mode="stretch_width", tools="save")
        self.staleness_fig.vbar(x="bin", top="count", width=0.8, source=self.staleness)
        self.staleness_fig.xaxis.axis_label = "versions behind"
        self.staleness_fig.yaxis.axis_label = "pushes"

        self.portion_source = ColumnDataSource({"worker": [], "counted": [], "discarded": []},
                                               name="daskbelief:portions")
        self.portion_fig = figure(title="Sandblaster portions per worker", height=260,
                                  x_range=FactorRange(), sizing_mode="stretch_width", tools="save")
        _legend_beside(self.portion_fig)
        self.portion_fig.vbar_stack(["counted", "discarded"], x="worker", width=0.8,
                                    source=self.portion_source, color=Category10_10[:2],
                                    legend_label=["counted", "discarded (a copy won)"])
        self.portion_fig.xaxis.major_label_orientation = 0.4

        self.header = Div(text=EMPTY_NOTE, sizing_mode="stretch_width", name="daskbelief:header")
        self.root = column(self.header,
                           layout([[loss, accuracy], [throughput, traffic],
                                   [self.staleness_fig, self.portion_fig]],
                                  sizing_mode="stretch_width"),
                           sizing_mode="stretch_width")

    def _take(self, topic: str) -> list[dict]:
        logged, self.cursors[topic] = shaping.take_new(self.scheduler.get_events(topic),
                                                       self.cursors[topic])
        return shaping.records(topic, logged)

    def update(self) -> None:
        """Stream the events logged since the last update into the plots."""
        new = {topic: self._take(topic) for topic in TOPICS}
        if any(new.values()):
            self._stream(new)
        if self.runs:  # refreshed every time: "last event ... ago" keeps counting
            self.header.text = self._run_summary()

    def _stream(self, new: dict) -> None:
        self.runs = shaping.run_table([e for events in new.values() for e in events], self.runs)
        replicas = shaping.replica_series(new[REPLICA])
        self.replica_loss.stream(replicas)
        self.throughput.stream(replicas)
        self.iteration_loss.stream(shaping.iteration_series(new[RUN]))
        self.accuracy.stream(shaping.eval_series(new[RUN]))
        rates, self.last_shard = shaping.shard_rates(new[SHARD], self.last_shard)
        self.traffic.stream(rates)
        self._update_staleness(shaping.latest_run(new[SHARD], SHARD))
        self._update_portions(new[PORTION])

    def _update_staleness(self, run) -> None:
        if run is None:
            return
        hist = shaping.staleness_histogram(self.last_shard, run)
        self.staleness.data = hist
        self.staleness_fig.xaxis.major_label_overrides = dict(zip(hist["bin"], hist["label"]))
        self.staleness_fig.title.text = f"Staleness of pushes ({run})"

    def _update_portions(self, events: list[dict]) -> None:
        if not events:
            return
        self.portions.update(shaping.portion_keys(events))
        self.backups.update(shaping.backups_launched(events))
        run = shaping.latest_run(events, PORTION)
        bars = shaping.portion_bars(self.portions, run)
        bars["worker"] = [w.removeprefix("tcp://") for w in bars["worker"]]
        self.portion_fig.x_range.factors = bars["worker"]
        self.portion_source.data = bars
        self.portion_fig.title.text = (f"Sandblaster portions per worker ({run}: "
                                       f"{self.backups[run]} backups launched)")

    def _run_summary(self) -> str:
        now = time.time()
        rows = []
        for run, info in sorted(self.runs.items(), key=lambda kv: kv[1]["first"]):
            state = "ended" if info["ended"] else f"last event {now - info['last']:.0f}s ago"
            started = time.strftime("%H:%M:%S", time.localtime(info["first"]))
            rows.append(f"<tr><td>{html.escape(str(run))}</td>"
                        f"<td>{html.escape(str(info['algorithm']))}</td>"
                        f"<td>{started}</td><td>{state}</td>"
                        f"<td>{_recoveries(info, now)}</td></tr>")
        return ("<b>daskbelief runs on this cluster</b><table style='font-size:90%'>"
                "<tr><th>run</th><th>algorithm</th><th>started</th><th>state</th>"
                f"<th>recoveries</th></tr>{''.join(rows)}</table>")


def _recoveries(info: dict, now: float) -> str:
    """A run's recovery cell: how many, and the latest (e.g. "2, last shard-recovered 5s ago")."""
    last = info.get("last_recovery")
    if last is None:
        return "0"
    kind, at = last
    return f"{info['recoveries']}, last {html.escape(kind)} {now - at:.0f}s ago"


def daskbelief_doc(scheduler, extra, doc) -> None:
    """Build the page for one browser session (the signature distributed's dashboard calls)."""
    page = DaskbeliefPage(scheduler)
    page.update()
    doc.add_root(page.root)
    doc.add_periodic_callback(page.update, INTERVAL_MS)
    doc.title = "Dask: DistBelief"
    doc.theme = BOKEH_THEME


def register() -> None:
    """Add the page to the dashboards of schedulers started from now on in this process."""
    dashboard_scheduler.applications.setdefault(ROUTE, daskbelief_doc)


def page_url(dashboard_link: str | None) -> str | None:
    """The page's address from a dashboard link such as ``Client.dashboard_link``."""
    if not dashboard_link:
        return None
    return dashboard_link.removesuffix("/status").rstrip("/") + ROUTE


def _served_paths(scheduler) -> set[str]:
    """The bokeh pages a scheduler's dashboard serves (none without a dashboard)."""
    http = getattr(scheduler, "http_application", None)
    return {path for app in (http.applications if http else ())
            for path in getattr(app, "app_paths", ())}


def dask_setup(scheduler) -> None:
    """Scheduler preload hook: put daskbelief's figures on ``/metrics``
    (``daskbelief.monitor.prometheus``) and say where the page is, or why it is missing.

    The page was registered when this module was imported, before the scheduler built its
    dashboard; a scheduler started without a dashboard, or before the import, has no page. The
    message goes to the preloading logger, which ``dask scheduler`` shows.
    """
    log = logging.getLogger("distributed.preloading")
    if prometheus.install(scheduler):
        log.info("daskbelief figures on the scheduler's /metrics (Prometheus)")
    if ROUTE in _served_paths(scheduler):
        host, port = get_address_host(scheduler.address), scheduler.http_server.port
        log.info("daskbelief dashboard page at %s", page_url(format_dashboard_link(host, port)))
    else:
        log.warning("daskbelief: the scheduler serves no %s page (dashboard disabled, or "
                    "daskbelief.monitor.dashboard imported after the scheduler started)", ROUTE)


register()  # preloads are imported before the scheduler builds its dashboard: register now
