"""Training events -> plot data: small pure functions shared by every view of a run.

The dashboard page (events read incrementally from the scheduler's log), the live notebook plot
(events polled by a client) and the reports (events read back from ``metrics.jsonl``) all draw
the same quantities; computing them here once keeps the three views consistent and lets the
shaping be tested without a browser, a cluster or a figure.

An event *record* is one event as ``EventLog`` writes it: ``{"topic": topic, **fields}`` with the
fields of ``daskbelief.monitor.events`` (every record has ``run`` and ``time``). A *series* is a
dict column name -> list, ready for ``ColumnDataSource.stream`` or for matplotlib.
"""
from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict

from daskbelief.monitor.events import PORTION, REPLICA, RUN, SHARD

NO_CURSOR = (float("-inf"), 0)


def records(topic: str, logged) -> list[dict]:
    """Records from the scheduler's ``(timestamp, msg)`` pairs of one topic."""
    return usable({"topic": topic, **msg} for _, msg in logged if isinstance(msg, dict))


def usable(events) -> list[dict]:
    """The records that carry a run and a time: a stray event on a topic must not break a view."""
    return [e for e in events if "run" in e and isinstance(e.get("time"), (int, float))]


def take_new(logged, cursor=NO_CURSOR):
    """The pairs of a topic's event log not seen yet, and the cursor to pass next time.

    The scheduler keeps a bounded, time-ordered deque per topic; old events fall off the front, so
    an index would drift. The cursor is ``(timestamp of the last pair taken, how many pairs carry
    that timestamp)``: pairs sharing one timestamp are neither lost nor taken twice.
    """
    last, taken_at_last = cursor
    times = [ts for ts, _ in logged]
    lo, hi = bisect_left(times, last), bisect_right(times, last)
    new = list(logged[lo + min(taken_at_last, hi - lo):hi]) + list(logged[hi:])
    if not new:
        return [], cursor
    newest = new[-1][0]
    return new, (newest, bisect_right(times, newest) - bisect_left(times, newest))


def _append(series: dict, key, row: dict) -> None:
    columns = series.setdefault(key, {name: [] for name in row})
    for name, value in row.items():
        columns[name].append(value)


def replica_series(events) -> dict:
    """Per ``(run, replica)``: time, step, loss, samples_per_s, staleness (Downpour replicas)."""
    series: dict = {}
    for e in events:
        if e["topic"] == REPLICA:
            _append(series, (e["run"], e["replica"]),
                    {"time": e["time"], "step": e["step"], "loss": e["loss"],
                     "samples_per_s": e.get("samples_per_s", float("nan")),
                     "staleness": e.get("staleness", float("nan"))})
    return series


def eval_series(events) -> dict:
    """Per run: time, test_loss, test_accuracy of the evaluations during training."""
    series: dict = {}
    for e in events:
        if e["topic"] == RUN and e.get("kind") == "eval" and e.get("test_accuracy") is not None:
            _append(series, e["run"], {"time": e["time"], "test_loss": e["test_loss"],
                                       "test_accuracy": e["test_accuracy"]})
    return series


def iteration_series(events) -> dict:
    """Per run: time, iteration, loss, grad_norm of Sandblaster's L-BFGS iterations."""
    series: dict = {}
    for e in events:
        if e["topic"] == RUN and e.get("kind") == "iteration":
            _append(series, e["run"], {"time": e["time"], "iteration": e["iteration"],
                                       "loss": e["loss"], "grad_norm": e.get("grad_norm")})
    return series


def _started(e: dict) -> dict | None:
    """A shard's counters when it started, from an event that says how long ago that was."""
    if "uptime" not in e:
        return None
    return {"time": e["time"] - e["uptime"], "applied": 0, "rejected": 0, "fetches": 0,
            "bytes_in": 0, "bytes_out": 0}


def shard_rates(events, last=None):
    """Per ``(run, shard)`` traffic rates from successive counters; ``(series, last)``.

    A shard publishes cumulative counters, so a rate needs the shard's previous event: ``last``
    maps ``(run, shard)`` to it (pass the returned one back in to continue incrementally). Before
    a shard's first event the baseline is the shard's start (``uptime`` ago, every counter 0).
    A counter that went down means the shard was recreated from a checkpoint: that interval has
    no rate and the new counters become the baseline.
    """
    last = dict(last or {})
    series: dict = {}
    for e in events:
        if e["topic"] != SHARD:
            continue
        key = (e["run"], e["shard"])
        before, last[key] = last.get(key, _started(e)), e
        if before is None:
            continue
        dt = e["time"] - before["time"]
        pushes = e["applied"] + e["rejected"] - before["applied"] - before["rejected"]
        fetches = e["fetches"] - before["fetches"]
        if dt <= 0 or pushes < 0 or fetches < 0:
            continue
        _append(series, key, {"time": e["time"], "push_per_s": pushes / dt,
                              "fetch_per_s": fetches / dt,
                              "mb_in_per_s": (e["bytes_in"] - before["bytes_in"]) / dt / 1e6,
                              "mb_out_per_s": (e["bytes_out"] - before["bytes_out"]) / dt / 1e6})
    return series, last


def latest_run(events, topic: str):
    """The run of the newest event of ``topic`` (None without one): what 'now' panels show."""
    for e in reversed(events):
        if e["topic"] == topic:
            return e["run"]
    return None


def staleness_histogram(last: dict, run) -> dict:
    """One run's staleness histogram: the newest counts of each of its shards, added up.

    ``last`` maps ``(run, shard)`` to the shard's newest event (as ``shard_rates`` returns it).
    Bin i counts pushes computed on parameters i versions old; the shards' last bin means "that
    or more" and is labelled so. Empty bins past the last used one are dropped: the shards keep
    many bins and a healthy run uses the first few. Returns columns bin, count, label.
    """
    hists = [e.get("staleness_hist") or [] for (r, _), e in sorted(last.items()) if r == run]
    total = [0] * max(map(len, hists), default=0)
    for hist in hists:
        for i, count in enumerate(hist):
            total[i] += count
    used = max((i + 1 for i, count in enumerate(total) if count), default=0)
    labels = [str(i) for i in range(used)]
    if used and used == len(total):
        labels[-1] = f"≥{used - 1}"
    return {"bin": list(range(used)), "count": total[:used], "label": labels}


def portion_keys(events):
    """``(run, worker, counted)`` of every finished Sandblaster portion, to feed a ``Counter``."""
    for e in events:
        if e["topic"] == PORTION and e.get("kind") != "backup-launched":
            yield e["run"], e["worker"], bool(e.get("counted", True))


def backups_launched(events) -> Counter:
    """Backup copies launched per run."""
    return Counter(e["run"] for e in events
                   if e["topic"] == PORTION and e.get("kind") == "backup-launched")


def portion_bars(counts: Counter, run) -> dict:
    """Columns worker, counted, discarded of one run's portions (from ``portion_keys`` counts).

    ``discarded`` are copies that finished after another copy of the same portion had counted:
    the price of the backups.
    """
    workers = sorted({w for r, w, _ in counts if r == run})
    return {"worker": workers,
            "counted": [counts[(run, w, True)] for w in workers],
            "discarded": [counts[(run, w, False)] for w in workers]}


RECOVERY_KINDS = ("shard-recovered", "blocks-recovered", "replica-restarted", "replica-lost",
                  "recovery", "recovery-failed")  # RUN events a fault leaves: a recovery, or one that failed


def run_table(events, runs=None) -> dict:
    """Per run: algorithm, first and last event times, whether it ended, how many recoveries it
    went through and the latest one (``kind`` and when); updated from ``runs``."""
    runs = {k: dict(v) for k, v in (runs or {}).items()}
    for e in events:
        info = runs.setdefault(e["run"], {"algorithm": "?", "first": e["time"], "last": e["time"],
                                          "ended": False, "recoveries": 0, "last_recovery": None})
        info["first"], info["last"] = min(info["first"], e["time"]), max(info["last"], e["time"])
        kind = e.get("kind") if e["topic"] == RUN else None
        if kind == "start":
            info["algorithm"], info["first"] = e.get("algorithm", "?"), e["time"]
        if kind in RECOVERY_KINDS:
            info["recoveries"] += kind != "recovery-failed"
            info["last_recovery"] = (kind, e["time"])
        info["ended"] |= kind == "end"
    return runs


def by_run(events) -> dict:
    """Records grouped by run, in arrival order."""
    groups = defaultdict(list)
    for e in events:
        groups[e["run"]].append(e)
    return dict(groups)
