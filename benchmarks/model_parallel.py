"""Model parallelism (the paper's Figure 3) on this machine: step-time speed-up vs partitions.

One model replica, one minibatch step (forward, backward, every parameter gradient), timed by a
replica task on a worker exactly as training drives it: the task hands each block its slice of X
and the labels, the blocks exchange activations, partial sums and deltas directly, the task waits
for the loss. k=1 is the same actor machinery with one block; k=2 cuts the model horizontally
(locally connected layers into bands of output rows, dense layers by input rows) over two
single-threaded worker processes, one per core; k=4 and k=8 likewise where the machine has that
many cores. The single-process ``model.loss_and_grad`` with
BLAS pinned to one thread is printed beside them.

Models: a large locally connected image model (64x64x3 -> LC 32@5x5 -> LC 64@4x4 stride 2 ->
Dense 10, 36.9M parameters: the kind of model the paper's image experiments partition well) and
the fully connected 440-1024-1024-1024-2048 speech MLP (every unit talks to every unit of the next
layer, so each boundary moves half of every layer's activations per block). The two
configurations are timed in interleaved rounds (k=1, k=2, ... one after the other in each
round). The speed-up is the median over rounds of each round's own ratio (k=1's step time over
k's, measured seconds apart): a machine that is slower for a while (another tenant, a clock
change) slows both sides of a ratio, where the best of each side's rounds can pair a lucky k=1
round with an unlucky k=2 one. The best-of ratio and the ratios' spread are printed beside it,
with the machine's load before and after. ``--quick`` times the same models, batches and steps
per round in fewer rounds, so its verdicts are the full run's; a k=2 speed-up needs two idle
cores, which a load over 1 per core says it did not have.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

from benchmarks.timing import load, load_line, rate_spread, spread
from daskbelief.nn import Dense, LocallyConnected2D, Sequential
from daskbelief.train import partition
from daskbelief.train.partitioned import Blocks


def lc_model() -> Sequential:
    return Sequential((64, 64, 3), [LocallyConnected2D(32, 5, 1, "relu"),
                                    LocallyConnected2D(64, 4, 2, "relu"), Dense(10)])


def mlp_model() -> Sequential:
    return Sequential((440,), [Dense(1024, "relu"), Dense(1024, "relu"), Dense(1024, "relu"),
                               Dense(2048)])


def _time_steps(blocks: Blocks, X, y, calls: int, tag: int) -> list[float]:
    """Runs on the input block's worker, as a replica does: seconds of each of ``calls`` steps
    (after a warm-up), each step's inputs sent to the blocks during the one before."""
    blocks.step(X, y, tag=(tag, -1), ahead=X)
    out = []
    for i in range(calls):
        start = time.perf_counter()
        blocks.step(X, y, tag=(tag, i), ahead=X if i < calls - 1 else None)
        out.append(time.perf_counter() - start)
    return out


def _plain(model, params, X, y, rounds: int, calls: int) -> list[float]:
    grad = np.empty_like(params)
    with threadpool_limits(1):
        model.loss_and_grad(params, X, y, out=grad)
        out = []
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                model.loss_and_grad(params, X, y, out=grad, validate=False)
            out.append((time.perf_counter() - start) / calls)
    return out


def partition_counts(cores: int) -> list[int]:
    """The k to time: 1 and 2 always, then 4 and 8 while the machine has a core per block."""
    return [1, 2] + [k for k in (4, 8) if k <= cores]


def measure(client, model, batch: int, rounds: int, calls: int, ks: list[int]) -> dict:
    """Step times of each k in ``ks`` (interleaved rounds) and of the plain single process."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, model.n_outputs, batch)
    params = model.init(0)
    plans = {k: partition.vertical(model, 1) if k == 1 else partition.horizontal(model, k)
             for k in ks}
    blocks = {k: Blocks.start(client, plan, params) for k, plan in plans.items()}
    X_remote = client.scatter(X, broadcast=True)
    times = {k: [] for k in plans}
    try:
        for r in range(rounds):
            for k, b in blocks.items():
                for a in b.actors:
                    a.stats(True).result()
                ts = client.submit(_time_steps, b, X_remote, y, calls, r, pure=False,
                                   workers=[b.input_home()]).result()
                times[k].append(statistics.median(ts))
        sent = {k: sum(a.stats().result()["bytes_sent"] for a in b.actors) / (calls + 1)
                for k, b in blocks.items()}
    finally:
        for b in blocks.values():
            b.close()
        client.cancel(X_remote)
    plain = _plain(model, params, X, y, max(2, rounds // 2), calls)
    return {"plans": plans, "times": times, "plain": plain, "bytes_per_step": sent, "batch": batch}


def paired_speedups(times: dict[int, list[float]]) -> dict[int, list[float]]:
    """Each round's speed-up of every k over k=1 in the same round (``times[k][r]``: round r's
    step time of k partitions)."""
    return {k: [a / b for a, b in zip(times[1], ts)] for k, ts in times.items()}


def _rows(name: str, m: dict) -> dict:
    """Print one line per k; the figures of each k (keys ``k1``, ``k2``, ...)."""
    best = {k: min(ts) for k, ts in m["times"].items()}
    paired = paired_speedups(m["times"])
    plain = min(m["plain"])
    out = {"ms": {"plain": 1e3 * plain, **{f"k{k}": 1e3 * v for k, v in best.items()}},
           "speedup": {f"k{k}": statistics.median(r) for k, r in paired.items()},
           "speedup_rounds": {f"k{k}": r for k, r in paired.items()},
           "speedup_best": {f"k{k}": best[1] / v for k, v in best.items()},
           "speedup_spread": {f"k{k}": rate_spread(r) for k, r in paired.items()},
           "vs_plain": {f"k{k}": plain / v for k, v in best.items()},
           "spread": {f"k{k}": spread(ts) for k, ts in m["times"].items()},
           "bytes_per_example": {f"k{k}": p.bytes_per_example() for k, p in m["plans"].items()}}
    for k in best:
        key = f"k{k}"
        print(f"{name:<30} {m['batch']:>5} {k:>3} {1e3 * plain:>8.1f} {out['ms'][key]:>8.1f} "
              f"{100 * out['spread'][key]:>6.1f}% {out['speedup'][key]:>7.2f} "
              f"{min(paired[k]):>5.2f}-{max(paired[k]):<5.2f} {out['speedup_best'][key]:>7.2f} "
              f"{out['vs_plain'][key]:>8.2f} {m['bytes_per_step'][k] / 1e6:>9.2f}")
    return out


def run(quick: bool = False) -> dict:
    rounds, calls = (4, 6) if quick else (8, 6)
    lc, mlp = lc_model(), mlp_model()
    ks = partition_counts(os.cpu_count() or 1)
    before = load()
    print(load_line("at the start"))
    with LocalCluster(n_workers=max(ks), threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        results = {}
        for name, model, batch in [("lc", lc, 64), ("mlp", mlp, 256)]:
            print(model.describe())
            results[name] = measure(client, model, batch, rounds, calls, ks)
            print(results[name]["plans"][2].describe())
    print(load_line("at the end"))
    print(f"\nstep time, best of {rounds} interleaved rounds (median of {calls} steps each); "
          "spread: the median round's distance from the best")
    print(f"{'model':<30} {'batch':>5} {'k':>3} {'plain ms':>8} {'step ms':>8} {'spread':>7} "
          f"{'vs k=1':>7} {'rounds':>11} {'best/best':>7} {'vs plain':>8} {'MB/step':>9}")
    rows = {"lc": _rows("locally connected (image)", results["lc"]),
            "mlp": _rows("fully connected (speech MLP)", results["mlp"])}
    print(f"vs k=1: speed-up of k partitions over the same machinery with one, the median of the "
          f"{rounds} rounds' own ratios (rounds: their range; best/best: best k=1 round over best "
          "k round); vs plain: over the single-process step; MB/step: bytes the blocks sent each "
          "other per step")
    return {"speedup_k2_lc": rows["lc"]["speedup"]["k2"], "speedup_k2_mlp": rows["mlp"]["speedup"]["k2"],
            "speedup_k2_lc_best": rows["lc"]["speedup_best"]["k2"],
            "speedup_k2_mlp_best": rows["mlp"]["speedup_best"]["k2"],
            "speedup_k2_lc_rounds": rows["lc"]["speedup_rounds"]["k2"],
            "speedup_k2_lc_spread": rows["lc"]["speedup_spread"]["k2"],
            "speedup_k2_lc_vs_plain": rows["lc"]["vs_plain"]["k2"],
            "speedup_k2_mlp_vs_plain": rows["mlp"]["vs_plain"]["k2"],
            "boundary_bytes_per_example_lc": rows["lc"]["bytes_per_example"]["k2"],
            "boundary_bytes_per_example_mlp": rows["mlp"]["bytes_per_example"]["k2"],
            "speedup": {name: row["speedup"] for name, row in rows.items()},
            "step_ms": {name: row["ms"] for name, row in rows.items()},
            "spread": {name: row["spread"] for name, row in rows.items()},
            "rounds": rounds, "steps_per_round": calls,
            "load_1min_start": before["load_1min"], "load_1min_end": load()["load_1min"],
            "cores": before["cores"]}
