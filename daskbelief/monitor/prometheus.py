"""daskbelief's live figures on the scheduler's Prometheus endpoint (``/metrics``).

The Dask scheduler serves ``prometheus_client``'s default registry at ``/metrics`` (where
``prometheus_client`` is installed). The scheduler-side hook that puts the DistBelief page on the
dashboard (``daskbelief.monitor.dashboard.dask_setup``, run by ``--preload
daskbelief.monitor.dashboard`` and on the clusters daskbelief starts) also registers the
collector below. At each scrape it takes the daskbelief events the scheduler logged since the
last scrape, as the page does, folds them into the latest figures per run (``Figures``, plain
data, no Prometheus types) and reports them:

====================================================  =======  =============================
metric (all labelled with ``run``)                    type     from
====================================================  =======  =============================
``daskbelief_replica_samples_per_second{replica}``    gauge    replica reports (Downpour)
``daskbelief_replica_loss{replica}``                  gauge    replica reports
``daskbelief_replica_staleness{replica}``             gauge    replica reports
``daskbelief_replica_step{replica}``                  gauge    replica reports
``daskbelief_test_loss``, ``daskbelief_test_accuracy``  gauge  evaluations, the final one
``daskbelief_iteration_loss``, ``daskbelief_iteration``  gauge  Sandblaster's L-BFGS iterations
``daskbelief_shard_pushes_applied_total{shard}``      counter  shard counters
``daskbelief_shard_pushes_rejected_total{shard}``     counter  shard counters
``daskbelief_shard_fetches_total{shard}``             counter  shard counters
``daskbelief_shard_staleness_mean{shard}``            gauge    shard counters
``daskbelief_recoveries_total{what}``                 counter  shard recoveries as they
                                                               happen; replica restarts and
                                                               evaluation reruns at the end
``daskbelief_portions_total{worker,counted}``         counter  Sandblaster portions
``daskbelief_backups_launched_total``                 counter  Sandblaster backup launches
``daskbelief_run_ended{algorithm}``                   gauge    0 while a run is going, then 1
====================================================  =======  =============================

A process serves one registry, so one collector follows the newest scheduler set up in it (as
distributed's own collectors do when tests start several schedulers one after another).
"""
from __future__ import annotations

from collections import Counter, defaultdict

from daskbelief.monitor import shaping
from daskbelief.monitor.events import PORTION, REPLICA, RUN, SHARD, TOPICS

REPLICA_GAUGES = {"samples_per_s": ("replica_samples_per_second", "samples per second of a replica"),
                  "loss": ("replica_loss", "training loss of a replica's recent steps"),
                  "staleness": ("replica_staleness", "versions its recent pushes were behind"),
                  "step": ("replica_step", "steps the replica has made")}
SHARD_COUNTERS = {"applied": ("shard_pushes_applied", "pushes a parameter shard applied"),
                  "rejected": ("shard_pushes_rejected", "pushes refused (non-finite gradients)"),
                  "fetches": ("shard_fetches", "fetches served by a parameter shard")}
RUN_GAUGES = {"test_loss": "test loss of the latest evaluation",
              "test_accuracy": "test accuracy of the latest evaluation",
              "iteration_loss": "loss of Sandblaster's latest L-BFGS iteration",
              "iteration": "Sandblaster's latest L-BFGS iteration"}
END_RECOVERIES = {"replica_restarts": "replica", "evaluations_restarted": "evaluation"}


class Figures:
    """The latest figures per run, folded from event records (``add``); no Prometheus here."""

    def __init__(self):
        self.replicas: dict = defaultdict(dict)   # (run, replica) -> latest report's fields
        self.shards: dict = defaultdict(dict)     # (run, shard) -> latest counters
        self.runs: dict = defaultdict(dict)       # run -> RUN_GAUGES values, algorithm, ended
        self.recoveries = Counter()               # (run, what)
        self.portions = Counter()                 # (run, worker, counted)
        self.backups = Counter()                  # run

    def add(self, topic: str, records: list[dict]) -> None:
        for e in records:
            run = e["run"]
            if topic == REPLICA:
                self.replicas[(run, e.get("replica"))].update(
                    {k: e[k] for k in REPLICA_GAUGES if isinstance(e.get(k), (int, float))})
            elif topic == SHARD:
                self.shards[(run, e.get("shard"))].update(e)
            elif topic == PORTION:
                self._portion(run, e)
            elif topic == RUN:
                self._run(run, e)

    def _portion(self, run, e: dict) -> None:
        if e.get("kind") == "backup-launched":
            self.backups[run] += 1
        elif "worker" in e:
            self.portions[(run, e["worker"], bool(e.get("counted")))] += 1

    def _run(self, run, e: dict) -> None:
        kind, info = e.get("kind"), self.runs[run]
        if kind == "start":
            info.update(algorithm=e.get("algorithm", ""), ended=False)
        elif kind in ("eval", "end"):
            info.update({k: e[k] for k in ("test_loss", "test_accuracy")
                         if isinstance(e.get(k), (int, float))})
        elif kind == "iteration":
            info.update(iteration=e.get("iteration"), iteration_loss=e.get("loss"))
        elif kind == "shard-recovered":
            self.recoveries[(run, "shard")] += 1
        if kind == "end":
            info["ended"] = True
            info.setdefault("algorithm", e.get("algorithm", ""))
            for field, what in END_RECOVERIES.items():
                if isinstance(e.get(field), int):
                    self.recoveries[(run, what)] = e[field]


def families(figures: Figures, prefix: str = "daskbelief"):
    """The Prometheus metric families of ``figures``."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def name(short):
        return f"{prefix}_{short}"

    for field, (short, doc) in REPLICA_GAUGES.items():
        g = GaugeMetricFamily(name(short), doc, labels=["run", "replica"])
        for (run, replica), values in figures.replicas.items():
            if field in values:
                g.add_metric([str(run), str(replica)], values[field])
        yield g
    for field, (short, doc) in SHARD_COUNTERS.items():
        c = CounterMetricFamily(name(short), doc, labels=["run", "shard"])
        for (run, shard), values in figures.shards.items():
            if isinstance(values.get(field), (int, float)):
                c.add_metric([str(run), str(shard)], values[field])
        yield c
    g = GaugeMetricFamily(name("shard_staleness_mean"), "mean staleness of a shard's pushes",
                          labels=["run", "shard"])
    for (run, shard), values in figures.shards.items():
        if isinstance(values.get("staleness_mean"), (int, float)):
            g.add_metric([str(run), str(shard)], values["staleness_mean"])
    yield g
    for field, doc in RUN_GAUGES.items():
        g = GaugeMetricFamily(name(field), doc, labels=["run"])
        for run, info in figures.runs.items():
            if isinstance(info.get(field), (int, float)):
                g.add_metric([str(run)], info[field])
        yield g
    ended = GaugeMetricFamily(name("run_ended"), "0 while a run is going, 1 once it ended",
                              labels=["run", "algorithm"])
    for run, info in figures.runs.items():
        ended.add_metric([str(run), str(info.get("algorithm", ""))], float(info.get("ended", False)))
    yield ended
    yield _counter(name("recoveries"), "shard recoveries, replica restarts, evaluation reruns",
                   ["run", "what"], figures.recoveries)
    yield _counter(name("portions"), "Sandblaster portions finished, counted or discarded",
                   ["run", "worker", "counted"], figures.portions)
    yield _counter(name("backups_launched"), "Sandblaster backup copies launched", ["run"],
                   Counter({(run,): n for run, n in figures.backups.items()}))


def _counter(full_name: str, doc: str, labels: list[str], counts: Counter):
    from prometheus_client.core import CounterMetricFamily

    c = CounterMetricFamily(full_name, doc, labels=labels)
    for key, n in counts.items():
        c.add_metric([str(k).lower() if isinstance(k, bool) else str(k) for k in key], n)
    return c


class DaskbeliefCollector:
    """A ``prometheus_client`` collector reading one scheduler's daskbelief events."""

    def __init__(self, scheduler):
        self.follow(scheduler)

    def follow(self, scheduler) -> None:
        """Report from ``scheduler`` from now on, starting from its whole event log."""
        self.scheduler = scheduler
        self.cursors = {topic: shaping.NO_CURSOR for topic in TOPICS}
        self.figures = Figures()

    def collect(self):
        for topic in TOPICS:
            logged, self.cursors[topic] = shaping.take_new(self.scheduler.get_events(topic),
                                                           self.cursors[topic])
            self.figures.add(topic, shaping.records(topic, logged))
        yield from families(self.figures)


_collector: DaskbeliefCollector | None = None


def install(scheduler) -> bool:
    """Report ``scheduler``'s daskbelief figures on ``/metrics``; False without
    ``prometheus_client`` (the scheduler then serves no metrics at all)."""
    global _collector
    try:
        from prometheus_client import REGISTRY
    except ImportError:
        return False
    if _collector is None:
        _collector = DaskbeliefCollector(scheduler)
        REGISTRY.register(_collector)
    else:
        _collector.follow(scheduler)
    return True
