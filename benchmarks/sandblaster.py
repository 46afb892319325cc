"""Sandblaster L-BFGS: its floor per iteration, stragglers with and without backup tasks, load
balance, and the time per iteration against the single-process reference L-BFGS.

``python -m benchmarks sandblaster [--quick]`` on speech-frames (440 features, 64 classes) with a
440-256-256-64 MLP (195k parameters), full-batch L-BFGS cut into portions of the library's
default size (``default_portion_size``: 2,250 rows here, 8 per worker thread), on a LocalCluster
of 3 single-threaded worker processes with 2 parameter shards. Every figure is measured in this
one run, side by side:

(a) time per iteration with no straggler, with one worker slowed 4x (the test-only
    ``_slow_workers`` option: it sleeps 3x its compute time after each portion) and backups on,
    and slowed with backups off;
(b) portions done per worker against its speed (the portions it won, and every copy it ran);
(c) the reference L-BFGS in this process, pinned to one BLAS thread like a nanny-started worker;
(d) the floor: milliseconds per iteration on a problem with next to no compute (digits, a
    64-16-10 MLP, 1,437 rows) on a 2-worker cluster, i.e. what the round trips of one L-BFGS
    iteration cost (``iteration_floor_ms_small``), beside the same L-BFGS in this process.

Every figure is a median over rounds, printed with its rounds and their spread (min-max). The
quick run times the same batch (the overhead of an evaluation depends on its portion count)
with fewer iterations and rounds, so its verdicts are the full run's.

Time per iteration is the steady rate, from the first iteration's end to the last one's, which
leaves out start-up (shards, the first reads of the data). All runs follow the same iterates
(checked), so they make the same number of evaluations.
"""
from __future__ import annotations

import os
import tempfile
import time
from collections import Counter, defaultdict

import numpy as np
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

import daskbelief_datasets as recipes
from daskbelief.cluster import worker_info
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.nn import Dense, Sequential
from daskbelief.train.reference import train_lbfgs
from daskbelief.train.sandblaster import default_portion_size, sandblaster

CLASSES = 64
SLOWDOWN = 4.0
WORKERS = 3


def speech_mlp() -> Sequential:
    return Sequential((440,), [Dense(256, activation="relu"), Dense(256, activation="relu"),
                               Dense(CLASSES)], l2=1e-4)


def steady_per_iteration(times: list[float]) -> float:
    """Seconds per iteration between the first and the last iteration's end."""
    return (times[-1] - times[0]) / (len(times) - 1)


def _reference(model, store, iterations: int,
               portion: int | None) -> tuple[float, np.ndarray, int]:
    times: list[float] = []

    def tick(row):
        times.append(time.perf_counter())

    with threadpool_limits(1):
        params, result = train_lbfgs(model, store, iterations=iterations, portion_size=portion,
                                     gtol=0.0, callback=tick)
    return steady_per_iteration(times), params, result.evaluations


def _sandblaster(client, model, store, iterations: int, portion: int, *, slow=None,
                 backups=True) -> dict:
    workers = sorted(worker_info(client))
    result = sandblaster(model, store, client=client, iterations=iterations, tolerance=0.0,
                         portion_size=portion, shards=2, shard_workers=workers[:2],
                         backups=backups, _slow_workers=slow)
    times = [h["time"] for h in result.history if h["loss"] is not None]
    runs, seconds = Counter(), defaultdict(list)
    for _, m in client.get_events(events.PORTION):
        if m.get("run") == result.summary["run"] and "kind" not in m:
            runs[m["worker"]] += 1
            seconds[m["worker"]].append(m["seconds"])
    return {"per_iteration": steady_per_iteration(times), "params": result.params,
            "summary": result.summary, "runs": runs,
            "compute": {w: float(np.median(s)) for w, s in seconds.items()}}


def _load_table(workers: list[str], slow: str, cases: dict) -> None:
    print("\n(b) load balance (last round): portions won (copies run) per worker, and its median "
          "compute seconds per portion")
    print(f"{'worker':<24} {'speed':>6} " + " ".join(f"{name:>22}" for name in cases))
    for w in workers:
        speed = f"1/{SLOWDOWN:g}" if w == slow else "1"
        cells = []
        for case in cases.values():
            won = case["summary"]["portions_per_worker"].get(w, 0)
            cells.append(f"{won:>5} ({case['runs'].get(w, 0):>4}) {case['compute'].get(w, 0):.3f}s")
        print(f"{w:<24} {speed:>6} " + " ".join(f"{c:>22}" for c in cells))


def _round(client, model, store, iterations: int, portion: int, slow: dict) -> dict:
    """One measurement of every configuration, back to back (the machine's load drifts)."""
    ref_time, ref_params, ref_evaluations = _reference(model, store, iterations, portion)
    cases = {"no straggler": _sandblaster(client, model, store, iterations, portion),
             "slowed, backups": _sandblaster(client, model, store, iterations, portion, slow=slow),
             "slowed, no backups": _sandblaster(client, model, store, iterations, portion,
                                                slow=slow, backups=False)}
    for case in cases.values():
        case["max_diff"] = float(np.abs(case["params"] - ref_params).max())
    return {"reference": ref_time, "reference_evaluations": ref_evaluations, "cases": cases}


def _ratios(rounds: list[dict], name: str, base: str = "no straggler") -> list[float]:
    """Per round, a configuration's time per iteration over the base's in the same round."""
    return [r["cases"][name]["per_iteration"] / r["cases"][base]["per_iteration"]
            for r in rounds]


def _spread(values) -> str:
    """``median (n rounds, min-max)`` of a figure measured once per round."""
    return (f"{np.median(values):.3g} ({len(values)} round(s), "
            f"{min(values):.3g}-{max(values):.3g})")


def _floor_round(client, model, path: str, iterations: int) -> tuple[float, float]:
    """One round of the floor: seconds per iteration, Sandblaster's and the reference's."""
    result = sandblaster(model, path, client=client, iterations=iterations, tolerance=0.0,
                         shards=2)
    ours = steady_per_iteration([h["time"] for h in result.history if h["loss"] is not None])
    ref, _, _ = _reference(model, open_store(path, split="train"), iterations, portion=None)
    return ours, ref


def iteration_floor(tmp: str, iterations: int, n_rounds: int) -> dict:
    """(d): Sandblaster's milliseconds per L-BFGS iteration where compute is next to nothing."""
    path = recipes.build("digits", os.path.join(tmp, "digits.zarr"))
    model = Sequential((64,), [Dense(16, activation="tanh"), Dense(10)], l2=1e-3)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        _floor_round(client, model, path, 3)  # warm: imports, the first reads of the data
        rounds = [_floor_round(client, model, path, iterations) for _ in range(n_rounds)]
    ms = [1000 * ours for ours, _ in rounds]
    local = [1000 * ref for _, ref in rounds]
    print(f"\n(d) floor: digits 64-16-10, {iterations} iterations, 2 single-threaded workers, "
          f"2 shards: sandblaster ms/iteration {_spread(ms)}; reference L-BFGS in this process "
          f"{_spread(local)}")
    return {"iteration_floor_ms_small": float(np.median(ms)),
            "iteration_floor_ms_small_rounds": ms,
            "reference_ms_per_iteration_small": float(np.median(local))}


def _report(rounds: list[dict]) -> None:
    print(f"\n(a) stragglers: one worker slowed {SLOWDOWN:g}x; (c) against the reference "
          f"(best of {len(rounds)} round(s); ratio: median over rounds, to 'no straggler')")
    print(f"{'run':<34} {'s/iteration':>12} {'ratio':>7} {'evaluations':>12} "
          f"{'backups (won)':>14} {'max |dx|':>9}")
    ref = min(r["reference"] for r in rounds)
    ref_ratio = np.median([r["reference"] / r["cases"]["no straggler"]["per_iteration"]
                           for r in rounds])
    print(f"{'reference, 1 process, 1 thread':<34} {ref:>12.3f} {ref_ratio:>7.2f} "
          f"{rounds[-1]['reference_evaluations']:>12}")
    for name in rounds[-1]["cases"]:
        best = min(r["cases"][name]["per_iteration"] for r in rounds)
        s = rounds[-1]["cases"][name]["summary"]
        diff = max(r["cases"][name]["max_diff"] for r in rounds)
        print(f"{'sandblaster, ' + name:<34} {best:>12.3f} {np.median(_ratios(rounds, name)):>7.2f} "
              f"{s['evaluations']:>12} {s['backups_launched']:>8} ({s['backups_won']:>3}) "
              f"{diff:>9.1e}")


def run(quick: bool = False) -> dict:
    iterations, n_rounds = (4, 2) if quick else (8, 3)
    floor_iterations, floor_rounds = (20, 3) if quick else (40, 5)
    model = speech_mlp()
    with tempfile.TemporaryDirectory() as tmp:
        floor = iteration_floor(tmp, floor_iterations, floor_rounds)
        path = recipes.build("speech-frames", os.path.join(tmp, "speech.zarr"), size=60_000,
                             classes=CLASSES)
        store = open_store(path, split="train")
        portion = default_portion_size(store.n, WORKERS, model.flops_per_example())
        print(f"speech-frames: batch of {store.n} rows in portions of {portion} (the default); "
              f"model {model.size:,} parameters; {iterations} iterations; {WORKERS} single-threaded "
              f"workers on {os.cpu_count()} cores; {n_rounds} round(s)")
        with LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            workers = sorted(worker_info(client))
            slow = {workers[-1]: SLOWDOWN}  # the shards live on the other two
            rounds = [_round(client, model, store, iterations, portion, slow)
                      for _ in range(n_rounds)]
    _report(rounds)
    _load_table(workers, workers[-1], rounds[-1]["cases"])
    base = [r["cases"]["no straggler"]["per_iteration"] for r in rounds]
    overhead = [b / r["reference"] for b, r in zip(base, rounds)]
    slowed = {name: _ratios(rounds, name) for name in ("slowed, backups", "slowed, no backups")}
    out = {**floor, "rounds": n_rounds,
           "straggler_ratio_backup": float(np.median(slowed["slowed, backups"])),
           "straggler_ratio_nobackup": float(np.median(slowed["slowed, no backups"])),
           "overhead_ratio": float(np.median(overhead)), "overhead_ratio_rounds": overhead,
           "reference_s_per_iteration": min(r["reference"] for r in rounds),
           "sandblaster_s_per_iteration": min(base),
           "backups_launched": sum(r["cases"]["slowed, backups"]["summary"]["backups_launched"]
                                   for r in rounds),
           "backups_won": sum(r["cases"]["slowed, backups"]["summary"]["backups_won"]
                              for r in rounds),
           "max_abs_diff_vs_reference": max(c["max_diff"] for r in rounds
                                            for c in r["cases"].values())}
    print(f"\nstraggler ratio with backups {_spread(slowed['slowed, backups'])}, without "
          f"{_spread(slowed['slowed, no backups'])}; sandblaster / reference time per "
          f"iteration {_spread(overhead)}; floor {floor['iteration_floor_ms_small']:.1f} ms per "
          f"iteration (target <= 30), overhead target <= 1.05")
    return out
