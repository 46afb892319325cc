"""Downpour SGD: overhead against the reference trainer, scaling with replicas, the parameter server
alone, and memory.

``python -m benchmarks downpour [--quick]`` on speech-frames with the paper-sized
440-1024-1024-1024-2048 MLP (4.65M parameters, 18.6 MB). Every figure is measured in this one
run, side by side: the reference trainer runs in this process pinned to one BLAS thread, exactly
like a nanny-started worker process. R = 4 and 8 are timed too where the machine has the cores.

The rates are timed in interleaved rounds (reference, Downpour at n = 1, 5, 20, n = 1 over TCP
with shared memory off (``ps.shared``), n = 1 with the replica and its shard in one worker process
of 2 threads, then R = 1, 2, ...), each figure the
best round (the least disturbed by other work on the machine); the rounds' spread and the
machine's load are printed beside them. Then one R = 2, n = 1 run says where the cores of its
worker processes went: the replicas' steps, the shards' updates, distributed's event loop, the
rest (``where_the_cores_go``). ``--quick`` runs the same steps per
measurement in fewer rounds (and builds a smaller dataset), so it reaches the full run's verdicts.
"""
from __future__ import annotations

import os
import tempfile
import threading
import time

import dask.config
import numpy as np
import psutil
from distributed import Client, LocalCluster, get_worker
from threadpoolctl import threadpool_limits

import daskbelief_datasets as recipes
from benchmarks.timing import load, load_line, rate_spread
from daskbelief.cluster import reusing_buffers, worker_info
from daskbelief.data import open_store
from daskbelief.nn import Dense, Sequential
from daskbelief.ps.server import ParameterServer
from daskbelief.train.downpour import downpour
from daskbelief.train.reference import train_sgd

RULE = {"name": "adagrad", "lr": 0.01}


def speech_mlp() -> Sequential:
    return Sequential(input_shape=(440,), layers=[Dense(1024, activation="relu"),
                                                  Dense(1024, activation="relu"),
                                                  Dense(1024, activation="relu"), Dense(2048)])


def replica_counts(cores: int) -> list[int]:
    """The R to time: 1 and 2 always, then 4 and 8 while the machine has a core per replica."""
    return [1, 2] + [r for r in (4, 8) if r <= cores]


def shards_for(replicas: int) -> int:
    """Parameter shards for R replicas: two, and one more per two replicas beyond four, so the
    shards' updates keep up with the pushes as R grows."""
    return max(2, replicas // 2)


def _reference_rate(model, store, batch_size: int, steps: int) -> float:
    with threadpool_limits(1):
        train_sgd(model, store, RULE, batch_size=batch_size, steps=2)  # warm caches and BLAS
        t = time.perf_counter()
        train_sgd(model, store, RULE, batch_size=batch_size, steps=steps)
        return steps * batch_size / (time.perf_counter() - t)


def downpour_rate(client, model, store, *, replicas: int, n: int, batch_size: int, steps: int,
                  shards: int = 1, device: str | None = None, shared: float | None = None) -> float:
    """Samples/s of one Downpour run with n_fetch = n_push = ``n``. ``shared``: the share of its
    replica-shard pairs that must have met in shared memory (the transport a row's label names;
    a run that fell back to TCP unnoticed would mislabel its row)."""
    result = downpour(model, store, client=client, replicas=replicas, shards=shards, n_fetch=n,
                      n_push=n, rule=RULE, batch_size=batch_size, steps=steps, report_every=10,
                      device=device)
    got = result.summary["shared_memory_fraction"]
    if shared is not None and got != shared:
        raise RuntimeError(f"{got} of the run's replica-shard pairs met in shared memory, "
                           f"expected {shared}")
    return result.summary["samples_per_second"]


# Threads of a worker process by what they do, from their names: the task threads run the
# replicas' steps, the actor thread the shards' updates, the main thread distributed's event loop.
THREAD_KINDS = (("compute", "Dask-Default-Threads"), ("shard", "Dask-Actor-Threads"),
                ("event loop", "MainThread"))


def _thread_cpu() -> tuple[float, dict[int, tuple[str, float]]]:
    """This worker process's CPU seconds, and each live thread's as ``{tid: (kind, seconds)}``
    (kinds: ``THREAD_KINDS``, else "other"), from /proc (Linux)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(stat: str) -> float:
        with open(stat) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    threads = {}
    for tid in os.listdir("/proc/self/task"):
        name = names.get(int(tid), "")
        kind = next((k for k, prefix in THREAD_KINDS if prefix in name), "other")
        threads[int(tid)] = (kind, cpu(f"/proc/self/task/{tid}/stat"))
    return cpu("/proc/self/stat"), threads


def where_the_cores_go(client, run, every: float = 0.5) -> dict[str, float]:
    """Cores each worker process spent, on average, by kind of thread while ``run()`` ran: how
    much of a replica's core its steps got, and what the shards and distributed took. Threads
    are sampled every ``every`` seconds, since a replica's thread ends with its task; "other"
    is the rest of the process (threads of no listed kind, and what ended between samples)."""
    samples, stop = [client.run(_thread_cpu)], threading.Event()

    def sample():
        while not stop.wait(every):
            samples.append(client.run(_thread_cpu))

    sampler, started = threading.Thread(target=sample, daemon=True), time.perf_counter()
    sampler.start()
    try:
        run()
    finally:
        stop.set()
        sampler.join()
    samples.append(client.run(_thread_cpu))
    wall = time.perf_counter() - started
    per_worker = []
    for w in samples[0]:
        seen = {}  # each thread's last sample
        for s in samples:
            seen.update(s[w][1])
        first = samples[0][w][1]
        cores = {k: 0.0 for k, _ in THREAD_KINDS}
        for tid, (kind, seconds) in seen.items():
            if kind in cores:
                cores[kind] += seconds - first.get(tid, (kind, 0.0))[1]
        cores["other"] = samples[-1][w][0] - samples[0][w][0] - sum(cores.values())
        per_worker.append({k: v / wall for k, v in cores.items()})
    return {k: float(np.mean([c[k] for c in per_worker])) for k in per_worker[0]}


class RssSampler:
    """Peak RSS of every worker process (and of the ``extra`` ones, name -> pid), sampled in a
    thread (psutil by pid)."""

    def __init__(self, client, period: float = 0.2, extra: dict | None = None):
        self.pids = {**client.run(os.getpid), **(extra or {})}
        self.peak = {w: 0 for w in self.pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)
        self._thread.start()

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            for w, pid in self.pids.items():
                try:
                    self.peak[w] = max(self.peak[w], psutil.Process(pid).memory_info().rss)
                except psutil.NoSuchProcess:
                    pass

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return self.peak


def _server_rates(client, sizes: list[int], n_calls: int) -> list[dict]:
    """Push/fetch GB/s per shard and calls/s, measured from a task on a worker (worker to actor)."""
    rows = []
    workers = sorted(worker_info(client))
    for S in sizes:
        n = 4_000_000  # 16 MB of float32 over S shards
        ps = ParameterServer.create(client, np.zeros(n, np.float32), S, {"name": "sgd", "lr": 0.0})
        try:
            out = client.submit(_measure_server, ps, n_calls, workers=[workers[-1]], pure=False).result()
        finally:
            ps.close()
        out.update({"shards": S, "bytes": 4 * n})
        rows.append(out)
    return rows


def _measure_server(ps, n_calls: int) -> dict:
    grad = np.ones(ps.size, np.float32)
    params, versions = ps.fetch()
    t = time.perf_counter()
    for _ in range(n_calls):
        ps.fetch(out=params)
    fetch_s = (time.perf_counter() - t) / n_calls
    t = time.perf_counter()
    for _ in range(n_calls):
        ps.push(grad, versions)
    push_s = (time.perf_counter() - t) / n_calls
    t = time.perf_counter()
    for _ in range(n_calls):  # a tiny call to every shard at once: the round-trip rate
        ps.stats()
    call_s = (time.perf_counter() - t) / n_calls
    nbytes = 4 * ps.size
    return {"fetch_gbps_total": nbytes / fetch_s / 1e9, "push_gbps_total": nbytes / push_s / 1e9,
            "fetch_gbps_per_shard": nbytes / fetch_s / 1e9 / len(ps.shards),
            "push_gbps_per_shard": nbytes / push_s / 1e9 / len(ps.shards),
            "calls_per_s": len(ps.shards) / call_s, "worker": get_worker().address}


def _soak(client, pushes: int) -> float:
    """RSS growth of the shard's worker over ``pushes`` pushes of a 1M-parameter vector."""
    workers = sorted(worker_info(client))
    ps = ParameterServer.create(client, np.zeros(1_000_000, np.float32), 1, "adagrad",
                                workers=[workers[0]])
    try:
        pid = client.run(os.getpid, workers=[workers[0]])[workers[0]]
        proc = psutil.Process(pid)
        client.submit(_push_many, ps, pushes // 10, workers=[workers[-1]], pure=False).result()
        before = proc.memory_info().rss  # after warm-up: allocator pools and comm buffers exist
        client.submit(_push_many, ps, pushes - pushes // 10, workers=[workers[-1]], pure=False).result()
        after = proc.memory_info().rss
    finally:
        ps.close()
    return (after - before) / before


def _push_many(ps, n: int) -> int:
    grad = np.full(ps.size, 1e-3, np.float32)
    pending = []
    for _ in range(n):
        pending.append(ps.push_async(grad, [0] * len(ps.shards)))
        if len(pending) > 4:
            [r.result() for r in pending.pop(0)]
    for replies in pending:
        [r.result() for r in replies]
    return n


def _over_tcp(client, measure):
    """``measure()`` with shared memory off on every worker (``ps.shared``): its processes then
    talk over TCP, as processes of different hosts do."""
    client.run(_share_memory, False)
    try:
        return measure()
    finally:
        client.run(_share_memory, True)


def _share_memory(on: bool) -> None:
    dask.config.set({"daskbelief.shared-memory": on})


def _best_rates(measures: dict, rounds: int) -> tuple[dict, dict]:
    """Best samples/s of each named measurement over ``rounds`` interleaved rounds, and the
    rounds' spread."""
    rates = {name: [] for name in measures}
    for _ in range(rounds):
        for name, measure in measures.items():
            rates[name].append(measure())
    return ({name: max(r) for name, r in rates.items()},
            {name: rate_spread(r) for name, r in rates.items()})


def run(quick: bool = False) -> dict:
    rows = 12_000 if quick else 60_000
    rounds, steps = (2, 60) if quick else (4, 60)
    batch = 256
    model = speech_mlp()
    with tempfile.TemporaryDirectory() as tmp:
        path = recipes.build("speech-frames", os.path.join(tmp, "speech.zarr"), size=rows,
                             classes=2048)
        store = open_store(path, split="train")
        print(f"speech-frames: {store.n} train rows; model {model.size:,} parameters; "
              f"batch {batch}, {steps} steps per measurement, best of {rounds} interleaved rounds")
        print(load_line("at the start"))
        out = {"rounds": rounds, "steps_per_measurement": steps, **load()}
        counts = replica_counts(os.cpu_count() or 1)
        with reusing_buffers(), LocalCluster(n_workers=max(counts), threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client, \
                LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                             dashboard_address=":0") as one, Client(one) as one_process:
            sampler = RssSampler(client)
            measures = {"reference": lambda: _reference_rate(model, store, batch, steps)}
            for n in (1, 5, 20):
                measures[f"n{n}"] = lambda n=n: downpour_rate(client, model, store, replicas=1, n=n,
                                                              batch_size=batch, steps=steps,
                                                              shared=1.0)
            # The same with the shard and the replica talking over TCP, as between hosts.
            measures["n1_tcp"] = lambda: _over_tcp(client, lambda: downpour_rate(
                client, model, store, replicas=1, n=1, batch_size=batch, steps=steps, shared=0.0))
            # The replica and its shard in one worker process of 2 threads: pushes are calls on
            # the actor thread with the arrays by reference (workarounds.LocalActor), fetches a
            # copy out of the shard's memory (ps.shared).
            measures["n1_one_process"] = lambda: downpour_rate(
                one_process, model, store, replicas=1, n=1, batch_size=batch, steps=steps,
                shared=1.0)
            for r in counts:
                measures[f"r{r}"] = lambda r=r: downpour_rate(client, model, store, replicas=r, n=5,
                                                              batch_size=batch, steps=steps,
                                                              shards=shards_for(r), shared=1.0)
            best, spreads = _best_rates(measures, rounds)
            ref = best["reference"]
            out["reference_samples_per_s"] = ref
            out["spread"] = spreads
            print(f"reference trainer (1 thread): {ref:,.0f} samples/s "
                  f"(spread {100 * spreads['reference']:.1f}%)")
            labels = {f"n{n}": f"n_fetch=n_push={n:>2}" for n in (1, 5, 20)}
            labels["n1_tcp"] = "n_fetch=n_push= 1, over TCP (shared memory off)"
            labels["n1_one_process"] = "n_fetch=n_push= 1, one process of 2 threads"
            for key, label in labels.items():
                rate, sp = best[key], spreads[key]
                out[f"overhead_ratio_{key}"] = rate / ref
                print(f"downpour R=1 {label}: {rate:,.0f} samples/s, "
                      f"ratio to reference {rate / ref:.2f} (spread {100 * sp:.1f}%)")
            out["scaling"] = {f"r{r}": best[f"r{r}"] / best["r1"] for r in counts}
            out["scaling_r2"] = out["scaling"]["r2"]
            for r in counts:
                print(f"scaling (n=5): R={r} S={shards_for(r)} {best[f'r{r}']:,.0f} samples/s: "
                      f"{best[f'r{r}'] / best['r1']:.2f}x R=1 (spread {100 * spreads[f'r{r}']:.1f}%)")
            cores = where_the_cores_go(client, lambda: downpour_rate(
                client, model, store, replicas=2, n=1, batch_size=batch, steps=4 * steps,
                shards=2, shared=1.0))
            out["cores_per_worker_r2_n1"] = cores
            print("where the cores go, R=2 S=2 n=1 (one replica per worker process), cores per "
                  "process: " + ", ".join(f"{k} {v:.2f}" for k, v in cores.items()))
            print(load_line("after the rates"))
            out["load_1min_end"] = load()["load_1min"]
            peaks = sampler.stop()
            out["peak_rss_mb"] = {w: round(v / 2**20) for w, v in peaks.items()}
            print("peak worker RSS (MB):", out["peak_rss_mb"])
            server = _server_rates(client, [1, 2], 10 if quick else 30)
            for row in server:
                print(f"parameter server S={row['shards']}: fetch {row['fetch_gbps_per_shard']:.2f} "
                      f"GB/s/shard, push {row['push_gbps_per_shard']:.2f} GB/s/shard, "
                      f"{row['calls_per_s']:,.0f} calls/s")
            out["push_gbps"] = server[0]["push_gbps_per_shard"]
            out["fetch_gbps"] = server[0]["fetch_gbps_per_shard"]
            out["server"] = server
            pushes = 2_000 if quick else 20_000
            out["soak_rss_growth"] = _soak(client, pushes)
            print(f"soak: {pushes} pushes of 1M parameters, shard worker RSS growth "
                  f"{100 * out['soak_rss_growth']:.2f}%")
    return out
