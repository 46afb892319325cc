"""daskbelief's figures on the scheduler's /metrics, scraped over HTTP during and after real runs
on a cluster daskbelief starts; the oracle is each run's own summary (from the shards' final
counters and the coordinator's tallies)."""
from __future__ import annotations

import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daskbelief.cluster import client_or_local
from daskbelief.monitor.prometheus import Figures, families
from daskbelief.nn import Dense, Sequential
from daskbelief.train.downpour import downpour
from daskbelief.train.sandblaster import sandblaster


def scrape(url: str) -> dict:
    """``{metric name: [(labels, value), ...]}`` of one scrape, parsed by prometheus_client."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def of_run(metrics: dict, name: str, run: str) -> list[tuple[dict, float]]:
    return [(labels, v) for labels, v in metrics.get(name, []) if labels.get("run") == run]


def runs_of(metrics: dict, algorithm: str) -> dict:
    """run id -> ended (0/1) for the runs of ``algorithm``."""
    return {labels["run"]: v for labels, v in metrics.get("daskbelief_run_ended", [])
            if labels["algorithm"] == algorithm}


class Scraper(threading.Thread):
    """Scrapes ``url`` every 0.2 s until stopped, keeping every scrape."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.scrapes, self.errors, self.done = url, [], [], threading.Event()

    def run(self):
        while not self.done.wait(0.2):
            try:
                self.scrapes.append(scrape(self.url))
            except Exception as e:  # noqa: BLE001 -- reported by the test
                self.errors.append(repr(e))


def test_metrics_endpoint_reports_live_and_final_figures(digits_path):
    model = Sequential(input_shape=(64,), layers=[Dense(32, activation="relu"), Dense(10)],
                       loss="softmax_cross_entropy", l2=1e-4)
    with client_or_local(None, n_workers=2) as client:
        url = client.dashboard_link.removesuffix("/status").rstrip("/") + "/metrics"
        scraper = Scraper(url)
        scraper.start()
        try:
            down = downpour(model, digits_path, test=digits_path, client=client, replicas=2,
                            shards=2, steps=600, batch_size=16, report_every=10, eval_every=0.3,
                            seed=0)
        finally:
            scraper.done.set()
            scraper.join(timeout=30)
        assert not scraper.errors, scraper.errors[:3]
        # During the run: a scrape that shows it going, with replicas' throughput in it.
        live = [m for m in scraper.scrapes if 0.0 in runs_of(m, "downpour").values()]
        assert live, f"no scrape of {len(scraper.scrapes)} saw the Downpour run going"
        run = next(r for r, ended in runs_of(live[-1], "downpour").items() if ended == 0.0)
        rates = [v for m in live for _, v in of_run(m, "daskbelief_replica_samples_per_second", run)]
        assert rates and max(rates) > 0
        assert {labels["replica"] for m in live
                for labels, _ in of_run(m, "daskbelief_replica_loss", run)} == {"0", "1"}

        sand = sandblaster(model, digits_path, test=digits_path, client=client, iterations=4,
                           seed=0)
        final = scrape(url)

    assert runs_of(final, "downpour")[run] == 1.0
    applied = sum(v for _, v in of_run(final, "daskbelief_shard_pushes_applied_total", run))
    assert applied == down.summary["updates_applied"] > 0
    rejected = sum(v for _, v in of_run(final, "daskbelief_shard_pushes_rejected_total", run))
    assert rejected == down.summary["updates_rejected"]
    [(_, accuracy)] = of_run(final, "daskbelief_test_accuracy", run)
    assert accuracy == pytest.approx(down.summary["test_accuracy"])
    assert {labels["what"]: v for labels, v in of_run(final, "daskbelief_recoveries_total", run)
            } == {"replica": 0.0}

    [sand_run] = runs_of(final, "sandblaster")
    [(_, iteration)] = of_run(final, "daskbelief_iteration", sand_run)
    assert iteration == sand.summary["iterations"]
    portions = of_run(final, "daskbelief_portions_total", sand_run)
    assert sum(v for _, v in portions) == sand.summary["portion_runs"]
    counted = {labels["worker"]: v for labels, v in portions if labels["counted"] == "true"}
    assert counted == sand.summary["portions_per_worker"]
    backups = [v for _, v in of_run(final, "daskbelief_backups_launched_total", sand_run)]
    assert sum(backups) == sand.summary["backups_launched"]


def test_figures_fold_events_in_order():
    """The pure part: later reports replace earlier ones, counts add up, the end closes a run."""
    f = Figures()
    f.add("daskbelief-run", [{"run": "a", "kind": "start", "algorithm": "downpour"}])
    f.add("daskbelief-replica", [{"run": "a", "replica": 0, "samples_per_s": 10.0, "loss": 2.0},
                                 {"run": "a", "replica": 0, "samples_per_s": 30.0, "loss": 1.0}])
    f.add("daskbelief-run", [{"run": "a", "kind": "shard-recovered", "shard": 1},
                             {"run": "a", "kind": "eval", "test_accuracy": 0.5},
                             {"run": "a", "kind": "end", "test_accuracy": 0.9,
                              "replica_restarts": 2}])
    f.add("daskbelief-portion", [{"run": "b", "worker": "w1", "counted": True},
                                 {"run": "b", "worker": "w1", "counted": False},
                                 {"run": "b", "kind": "backup-launched", "portion": 3}])
    got = {fam.name: {tuple(sorted(s.labels.items())): s.value for s in fam.samples}
           for fam in families(f)}
    assert got["daskbelief_replica_samples_per_second"] == {(("replica", "0"), ("run", "a")): 30.0}
    assert got["daskbelief_test_accuracy"] == {(("run", "a"),): 0.9}
    assert got["daskbelief_run_ended"] == {(("algorithm", "downpour"), ("run", "a")): 1.0}
    assert got["daskbelief_recoveries"] == {(("run", "a"), ("what", "shard")): 1,
                                            (("run", "a"), ("what", "replica")): 2}
    assert got["daskbelief_portions"][(("counted", "true"), ("run", "b"), ("worker", "w1"))] == 1
    assert got["daskbelief_backups_launched"] == {(("run", "b"),): 1}
