"""Observability: event shaping, the dashboard page on real schedulers, reports and their CLI.

The page is built in-process against the shared LocalCluster's real scheduler (with processes the
scheduler lives in this process) and updated on the scheduler's event loop, exactly as the
dashboard's periodic callback would; its data come from real Downpour runs.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import matplotlib.image
import pytest
from distributed import Client, LocalCluster
from distributed.utils import sync
from matplotlib.figure import Figure

from daskbelief.cli import main
from daskbelief.monitor import dashboard, report, shaping
from daskbelief.monitor.events import PORTION, REPLICA, RUN, SHARD, EventLog
from daskbelief.nn import Dense, Sequential
from daskbelief.train.downpour import downpour
from daskbelief.train.sandblaster import sandblaster


def event(topic, t, run="run-a", **fields):
    return {"topic": topic, "run": run, "time": t, **fields}


def shard_event(t, shard=0, applied=0, fetches=0, rejected=0, hist=(), run="run-a"):
    return event(SHARD, t, run=run, shard=shard, applied=applied, rejected=rejected,
                 fetches=fetches, bytes_in=applied * 1e6, bytes_out=fetches * 2e6,
                 staleness_hist=list(hist))


# -- pure shaping -------------------------------------------------------------------------------

def test_take_new_takes_each_event_once_across_equal_timestamps_and_eviction():
    a, b, c, d, e = ({"i": i} for i in range(5))
    log = ((1.0, a), (2.0, b), (2.0, c))
    new, cursor = shaping.take_new(log)
    assert [m for _, m in new] == [a, b, c] and cursor == (2.0, 2)
    assert shaping.take_new(log, cursor) == ([], cursor)
    grown = log + ((2.0, d), (3.0, e))
    new, cursor = shaping.take_new(grown, cursor)
    assert [m for _, m in new] == [d, e] and cursor == (3.0, 1)
    evicted = grown[3:] + ((4.0, a),)  # the bounded log dropped its oldest events
    assert [m for _, m in shaping.take_new(evicted, cursor)[0]] == [a]
    assert shaping.take_new((), shaping.NO_CURSOR) == ([], shaping.NO_CURSOR)


def test_records_drop_events_without_run_or_time():
    logged = [(0.0, {"run": "r", "time": 1.0, "loss": 1}), (0.0, {"time": 2.0}), (0.0, "text"),
              (0.0, {"run": "r", "time": "soon"})]
    assert shaping.records(REPLICA, logged) == [
        {"topic": REPLICA, "run": "r", "time": 1.0, "loss": 1}]


def test_shard_rates_are_counter_deltas_and_a_recreated_shard_restarts_them():
    events = [shard_event(10.0, applied=0, fetches=0), shard_event(12.0, applied=20, fetches=4),
              shard_event(13.0, applied=5, fetches=1),   # recreated from a checkpoint: no rate
              shard_event(14.0, applied=15, fetches=3), shard_event(14.0, shard=1, applied=9)]
    series, last = shaping.shard_rates(events[:2])
    assert series == {("run-a", 0): {"time": [12.0], "push_per_s": [10.0], "fetch_per_s": [2.0],
                                     "mb_in_per_s": [10.0], "mb_out_per_s": [4.0]}}
    more, last = shaping.shard_rates(events[2:], last)  # incremental: continues from `last`
    assert more[("run-a", 0)]["time"] == [14.0] and more[("run-a", 0)]["push_per_s"] == [10.0]
    assert ("run-a", 1) not in more and last[("run-a", 1)]["applied"] == 9


def test_a_shards_first_event_has_a_rate_from_its_start():
    first = {**shard_event(12.0, applied=20, fetches=4), "uptime": 4.0}  # started at 8.0
    series, _ = shaping.shard_rates([first])
    assert series[("run-a", 0)]["push_per_s"] == [5.0] and series[("run-a", 0)]["time"] == [12.0]


def test_staleness_histogram_adds_shards_of_one_run_and_trims_empty_bins():
    last = {("run-a", 0): shard_event(1, hist=[5, 2, 0, 0]),
            ("run-a", 1): shard_event(1, shard=1, hist=[1, 1, 1, 0]),
            ("run-b", 0): shard_event(1, run="run-b", hist=[100, 0, 0, 7])}
    assert shaping.staleness_histogram(last, "run-a") == {
        "bin": [0, 1, 2], "count": [6, 3, 1], "label": ["0", "1", "2"]}
    assert shaping.staleness_histogram(last, "run-b")["label"] == ["0", "1", "2", "≥3"]
    assert shaping.staleness_histogram({}, "run-a") == {"bin": [], "count": [], "label": []}


def test_portions_per_worker_and_backups_launched():
    events = [event(PORTION, 1, evaluation=0, portion=p, worker=w, seconds=0.1, backup=b,
                    counted=c)
              for p, w, b, c in [(0, "tcp://w1", False, True), (1, "tcp://w2", False, True),
                                 (2, "tcp://w1", False, True), (2, "tcp://w2", True, False)]]
    events.append(event(PORTION, 1, kind="backup-launched", portion=2))
    counts = Counter(shaping.portion_keys(events))
    assert shaping.portion_bars(counts, "run-a") == {
        "worker": ["tcp://w1", "tcp://w2"], "counted": [2, 1], "discarded": [0, 1]}
    assert shaping.backups_launched(events) == Counter({"run-a": 1})


def test_series_and_run_table_from_mixed_events():
    events = [event(RUN, 5.0, kind="start", algorithm="downpour"),
              event(REPLICA, 6.0, replica=1, step=10, loss=2.0, samples_per_s=100.0, staleness=0.5),
              event(RUN, 7.0, kind="eval", elapsed=2.0, test_loss=1.0, test_accuracy=0.7),
              event(RUN, 8.0, run="run-b", kind="iteration", iteration=1, loss=3.0, grad_norm=1.5,
                    evaluations=2, elapsed=1.0),
              event(RUN, 9.0, kind="end")]
    assert shaping.replica_series(events)[("run-a", 1)]["samples_per_s"] == [100.0]
    assert shaping.eval_series(events) == {"run-a": {"time": [7.0], "test_loss": [1.0],
                                                     "test_accuracy": [0.7]}}
    assert shaping.iteration_series(events)["run-b"]["loss"] == [3.0]
    table = shaping.run_table(events)
    assert table["run-a"] == {"algorithm": "downpour", "first": 5.0, "last": 9.0, "ended": True,
                              "recoveries": 0, "last_recovery": None}
    assert table["run-b"]["algorithm"] == "?" and not table["run-b"]["ended"]
    assert shaping.latest_run(events, RUN) == "run-a" and shaping.latest_run(events, SHARD) is None


def test_recoveries_are_counted_per_run_and_shown_on_the_page():
    """Every recovery the engines announce (a shard restored, blocks recreated, a replica
    resubmitted, Sandblaster's replay) counts; a failed attempt is shown but not counted."""
    events = [event(RUN, 1.0, kind="start", algorithm="downpour"),
              event(RUN, 2.0, kind="shard-recovered", shard=0, worker="tcp://w2"),
              event(RUN, 3.0, kind="recovery-failed", shard=1),
              event(RUN, 4.0, kind="blocks-recovered", replica="replica-1"),
              event(RUN, 5.0, run="run-b", kind="recovery", iteration=3),
              event(RUN, 6.0, kind="replica-restarted", replica="replica-0")]
    table = shaping.run_table(events[:3])
    assert (table["run-a"]["recoveries"], table["run-a"]["last_recovery"]) == (1, ("recovery-failed", 3.0))
    table = shaping.run_table(events[3:], table)  # incrementally, as the page updates
    assert table["run-a"]["recoveries"] == 3 and table["run-b"]["recoveries"] == 1
    assert dashboard._recoveries(table["run-a"], now=16.0) == "3, last replica-restarted 10s ago"
    assert dashboard._recoveries(shaping.run_table(events[:1])["run-a"], now=2.0) == "0"


# -- the page on real schedulers ----------------------------------------------------------------

def refresh(page) -> None:
    """Run the page's periodic update on the scheduler's event loop, as the dashboard does."""
    async def update():
        page.update()

    sync(page.scheduler.loop, update)


def points(lines, run) -> dict:
    return {key: len(src.data["time"]) for key, src in lines.sources.items() if key == run
            or (isinstance(key, tuple) and key[0] == run)}


def tiny_model():
    return Sequential(input_shape=(64,), layers=[Dense(32, activation="relu"), Dense(10)],
                      loss="softmax_cross_entropy", l2=1e-4)


def train_two_replicas(path, client):
    return downpour(tiny_model(), path, test=path, client=client, replicas=2, shards=2, steps=900,
                    batch_size=16, report_every=10, eval_every=0.3, seed=1)


def train_one_replica(path, client):
    return downpour(tiny_model(), path, test=path, client=client, replicas=1, shards=2, steps=700,
                    batch_size=16, report_every=10, eval_every=0.3, seed=1)


def train_sandblaster(path, client):
    """Test evaluations after every iteration (each takes longer than 1 ms), however fast
    the iterations run: the accuracy curve has points whatever the machine."""
    return sandblaster(tiny_model(), path, test=path, client=client, shards=2, iterations=5,
                       eval_every=0.001, seed=1)


@pytest.fixture(scope="module")
def watched(cluster, digits_path, tmp_path_factory):
    """Three short real runs -- Downpour with 2 replicas, with 1, then Sandblaster -- recorded as
    run directories the way pipelines write them (``EventLog`` -> metrics.jsonl, summary.json),
    watched by a page built before they started and updated after each."""
    page = dashboard.DaskbeliefPage(cluster.scheduler)
    refresh(page)  # whatever earlier tests logged on this cluster
    runs = {}
    with Client(cluster) as client:
        for train in (train_two_replicas, train_one_replica, train_sandblaster):
            name = train.__name__.removeprefix("train_")
            run_dir = tmp_path_factory.mktemp(name)
            log = EventLog(client, path=run_dir / "metrics.jsonl")
            try:
                result = train(digits_path, client)
                run = next(e["run"] for e in log.of(RUN) if e["kind"] == "start")
            finally:
                log.close()
            (run_dir / "summary.json").write_text(json.dumps(result.summary))
            runs[name] = {"dir": run_dir, "run": run, "result": result}
            refresh(page)
    return page, runs


def logged(run: dict, topic: str) -> list[dict]:
    """The run's own events of one topic as its metrics.jsonl recorded them (backup launches
    left out: they are not finished portions)."""
    return [e for e in report.read_metrics(run["dir"] / "metrics.jsonl")
            if e["topic"] == topic and e["run"] == run["run"]
            and e.get("kind") != "backup-launched"]


def test_page_fills_from_real_downpour_events(watched):
    page, runs = watched
    run = runs["two_replicas"]["run"]
    reports = Counter(e["replica"] for e in logged(runs["two_replicas"], REPLICA))
    # every replica event of the run streamed exactly once, across several incremental updates
    assert points(page.replica_loss, run) == {(run, r): n for r, n in reports.items()}
    assert sorted(reports) == [0, 1]
    assert points(page.throughput, run) == points(page.replica_loss, run)
    assert points(page.accuracy, run)[run] >= 1
    assert sorted(points(page.traffic, run)) == [(run, 0), (run, 1)]
    # Every shard's series shows pushes (a rate after the replicas finished is truthfully 0).
    assert all(max(src.data["push_per_s"]) > 0
               for key, src in page.traffic.sources.items() if key[0] == run)
    assert sum(page.staleness.data["count"]) > 0     # the newest Downpour run's histogram
    assert runs["one_replica"]["run"] in page.staleness_fig.title.text
    assert run in page.header.text and "downpour" in page.header.text
    counts = len(page.replica_loss.sources[(run, 0)].data["time"])
    refresh(page)   # nothing new: nothing added twice
    assert len(page.replica_loss.sources[(run, 0)].data["time"]) == counts


def test_page_fills_from_a_real_sandblaster_run(watched):
    page, runs = watched
    sandblaster_run = runs["sandblaster"]
    run = sandblaster_run["run"]
    portions = logged(sandblaster_run, PORTION)
    bars = page.portion_source.data
    assert sum(bars["counted"]) + sum(bars["discarded"]) == len(portions) > 0
    assert sum(bars["discarded"]) == sum(not e["counted"] for e in portions)
    assert sorted(bars["worker"]) == sorted({e["worker"].removeprefix("tcp://") for e in portions})
    launched = sandblaster_run["result"].summary["backups_launched"]
    assert f"{run}: {launched} backups launched" in page.portion_fig.title.text
    iterations = [e["loss"] for e in logged(sandblaster_run, RUN) if e.get("kind") == "iteration"]
    assert page.iteration_loss.sources[run].data["loss"] == iterations and len(iterations) == 5
    assert f"<td>{run}</td><td>sandblaster</td>" in page.header.text and "ended" in page.header.text


def test_page_without_events_is_empty_not_an_error():
    with LocalCluster(n_workers=0, processes=False, dashboard_address="127.0.0.1:0") as cluster:
        page = dashboard.DaskbeliefPage(cluster.scheduler)
        refresh(page)
        assert page.header.text == dashboard.EMPTY_NOTE
        lines = (page.replica_loss, page.iteration_loss, page.accuracy, page.throughput,
                 page.traffic)
        assert all(not each.sources for each in lines)
        assert page.staleness.data["count"] == [] and page.portion_source.data["worker"] == []
        # the real dashboard serves it too (the route was registered before this scheduler started)
        url = f"http://127.0.0.1:{cluster.scheduler.http_server.port}{dashboard.ROUTE}"
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and b"bokeh" in response.read().lower()


def test_preloaded_scheduler_serves_the_page(tmp_path):
    """``dask scheduler --preload daskbelief.monitor.dashboard``: listed and served, no events."""
    scheduler_file = tmp_path / "scheduler.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", "0",
         "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file),
         "--preload", "daskbelief.monitor.dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists():
            assert proc.poll() is None and time.time() < deadline, "the scheduler did not start"
            time.sleep(0.1)
        time.sleep(0.2)  # the file is written whole, but give the HTTP server its first tick
        port = json.loads(scheduler_file.read_text())["services"]["dashboard"]
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/individual-plots.json", timeout=30) as response:
            assert dashboard.ROUTE in json.load(response).values()
        with urllib.request.urlopen(base + dashboard.ROUTE, timeout=30) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=60)
    assert f"daskbelief dashboard page at http://127.0.0.1:{port}{dashboard.ROUTE}" in stderr


# -- TrainResult in Jupyter -----------------------------------------------------------------------

def test_train_result_html_has_summary_table_and_curves(watched):
    _, runs = watched
    page = runs["two_replicas"]["result"]._repr_html_()
    assert "daskbelief TrainResult" in page and "test_accuracy" in page
    assert page.count("<svg") == 2 and page.count("<polyline") == 3  # loss: 2 replicas; accuracy
    page = runs["sandblaster"]["result"]._repr_html_()  # loss per iteration, of no replica
    assert page.count("<svg") == 2 and page.count("<polyline") == 2


# -- reports and the CLI -------------------------------------------------------------------------

def assert_png(path):
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 200 and pixels.std() > 0.01  # an image with something drawn on it


def test_report_of_one_run_writes_nonempty_pngs_next_to_it(watched):
    _, runs = watched
    first = runs["two_replicas"]
    written = report.render([first["dir"]])
    assert [p.name for p in written] == ["loss.png", "accuracy.png", "throughput.png",
                                         "staleness.png"]
    for path in written:
        assert path.parent == first["dir"] / "report"
        assert_png(path)


def test_report_compares_runs_on_one_figure_from_the_cli(watched, tmp_path, capsys):
    _, runs = watched
    dirs = [str(r["dir"]) for r in runs.values()]
    assert main(["report", *dirs, "--out", str(tmp_path / "cmp")]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["figures"]
    assert [f.rsplit("/", 1)[-1] for f in figures] == [
        "loss.png", "accuracy.png", "throughput.png", "staleness.png", "portions.png"]
    for path in figures:
        assert_png(tmp_path / "cmp" / path.rsplit("/", 1)[-1])
    loaded = [run for d in dirs for run in report.load_run_dir(d)]
    everyone = [r["dir"].name for r in runs.values()]
    downpours = [runs[k]["dir"].name for k in ("two_replicas", "one_replica")]
    for draw, names in ((report.draw_loss, everyone), (report.draw_accuracy, everyone),
                        (report.draw_throughput, everyone), (report.draw_staleness, downpours)):
        ax = Figure().add_subplot()
        draw(ax, loaded)
        labels = ax.get_legend_handles_labels()[1]
        assert all(any(name in label for label in labels) for name in names), (draw, labels)


def test_report_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text(json.dumps(event(RUN, 1.0, kind="start")) + "\n{oops\n")
    assert main(["report", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:2" in err
    assert not out.exists()


def test_report_of_a_run_without_events_draws_empty_figures(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    for path in report.render([tmp_path], tmp_path / "out"):
        assert_png(path)
