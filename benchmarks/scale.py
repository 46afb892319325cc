"""DistBelief's size: the parameter server moving 100 MB - 1 GB slices (issue 14, item 2).

``python -m benchmarks scale [--quick]``. One shard (Adagrad) holds a slice on one worker
process; a task on a second worker process pushes a gradient of the slice's size and fetches the
slice back, as a replica does. In the same run, between the same two processes, a plain TCP
socket moves the same number of bytes each way (``daskbelief.testing.tcp``: one socket, a
preallocated and touched buffer, nothing else). Rounds alternate socket, push, socket, fetch, so
a burst of load from another process slows one round of each rather than all rounds of one; each
figure is the best round (the least disturbed), the median beside it. Push runs against the
caller-to-shard socket, fetch against the shard-to-caller one.

The CPU seconds each process spends per GB moved (psutil, both processes) do not depend on how
busy the machine is: they show the copies. A shard's peak RSS (sampled every 0.1 s) is printed
against its slice: parameters + Adagrad's accumulator are two slices, a push in flight a third, a
fetch's snapshot a fourth.

Measured twice: between two worker processes of a LocalCluster (loopback), and between two hosts
on emulated 10 Gbit/s links (``daskbelief.testing.netns``; where namespaces cannot be made, the
output says why and only loopback is measured). The JSON's headline keys come from the link
(``"link"`` says which); ``"loopback"`` holds the same keys for loopback.

Then (item 6) one Downpour epoch over a speech-frames store larger than the sum of two workers'
memory limits, with every worker's RSS sampled through the epoch: peak against the limit, and
growth (the last third's peak minus the first third's).

Item 1 (``model_point``): a locally connected image model (416M parameters full, 62M quick)
split over four memory-limited workers (model parallelism, one block and one parameter shard
each): real ``dask worker --memory-limit`` processes on emulated hosts (10 Gbit/s links), each
limited to three quarters of what training the model on one worker would need
(``one_worker_footprint``). The shards draw their own ranges of the initial parameters, the
blocks fetch theirs, the test evaluation runs through blocks, and the result refers to its last
checkpoint: the driver never holds the model. Keys ``params``, ``worker_memory_limit_bytes``,
``one_worker_footprint_bytes``, ``peak_rss_bytes_max_worker``, ``peak_rss_bytes_driver``,
``steps``, ``loss_first``, ``loss_last`` (the mean training loss of the first and of the last
third of the steps), ``checkpoint_seconds`` (the final checkpoint, every shard writing its own
arrays), ``resume_seconds`` (from calling a run resumed from it to its first step),
``test_accuracy`` and ``predict_seconds`` (64 rows through blocks reading the checkpoint); the
peaks cover all of it.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time

import numpy as np
import psutil
from distributed import Client, LocalCluster

from benchmarks.downpour import RssSampler
from daskbelief.cluster import reusing_buffers
from daskbelief.workarounds import start_actors, worker_info
from daskbelief.ps.server import ParameterServer
from daskbelief.ps.shard import ParameterShard
from daskbelief.testing import netns
from daskbelief.testing.tcp import tcp_gbps

RULE = {"name": "adagrad", "lr": 1e-4}
MB = 10**6
MODEL_WORKERS = 4   # item 1: workers sharing the model, a block and a shard each
LIMIT_SHARE = 0.75  # each one's memory limit, as a share of what one worker alone would need
# Adagrad moves every weight by about lr at first: at 1e-2 and 1e-3 the model point diverged
# (loss 2.6 -> 206, 3.7 -> 26)
MODEL_LR = 2e-5


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def one_shard(client, n: int, worker: str) -> ParameterServer:
    """A one-shard server of ``n`` zeros on ``worker``, the values made there (not sent)."""
    zeros = client.submit(np.zeros, n, np.float32, workers=[worker], pure=False)
    (shard,), futures = start_actors(client, [(ParameterShard, worker, f"scale-shard-{n}",
                                               (0, 0, n, zeros, RULE, "numpy"))])
    zeros.release()
    return ParameterServer([shard], [(0, n)], futures, RULE)


def _push(ps, grad) -> float:
    """On the caller's worker: seconds of one push of the whole slice."""
    t = time.perf_counter()
    ps.push(grad, [0])
    return time.perf_counter() - t


def _fetch(ps, out) -> float:
    """On the caller's worker: seconds of one fetch of the whole slice into ``out``, the
    replica's parameter buffer (a value the worker holds, reused by every round)."""
    t = time.perf_counter()
    ps.fetch(out=out)
    return time.perf_counter() - t


def measure(client, n: int, rounds: int) -> dict:
    """GB/s and CPU s/GB of socket, push and fetch for one slice of ``n`` float32 values."""
    shard_w, caller_w = sorted(worker_info(client))
    pids = client.run(os.getpid)
    procs = {"shard": psutil.Process(pids[shard_w]), "caller": psutil.Process(pids[caller_w])}
    baseline = procs["shard"].memory_info().rss
    sampler = RssSampler(client, period=0.1)
    ps = one_shard(client, n, shard_w)
    grad = client.submit(_gradient, n, workers=[caller_w], pure=False)
    out = client.submit(np.ones, n, np.float32, workers=[caller_w], pure=False)
    nbytes = 4 * n
    ops = {"tcp_in": lambda: nbytes / tcp_gbps(client, caller_w, shard_w, nbytes) / 1e9,
           "push": lambda: client.submit(_push, ps, grad, workers=[caller_w], pure=False).result(),
           "tcp_out": lambda: nbytes / tcp_gbps(client, shard_w, caller_w, nbytes) / 1e9,
           "fetch": lambda: client.submit(_fetch, ps, out, workers=[caller_w], pure=False).result()}
    gbps = {k: [] for k in ops}
    cpu = {k: {"shard": [], "caller": []} for k in ops}
    try:
        for op in ops.values():
            op()  # warm-up: connections, buffers, first touch
        for _ in range(rounds):
            for name, op in ops.items():
                before = {k: _cpu(p) for k, p in procs.items()}
                seconds = op()
                gbps[name].append(nbytes / seconds / 1e9)
                for k, p in procs.items():
                    cpu[name][k].append((_cpu(p) - before[k]) / (nbytes / 1e9))
    finally:
        ps.close()
        client.cancel([grad, out])
        peaks = sampler.stop()
    return {"bytes": nbytes, "gbps": gbps, "cpu_s_per_gb": cpu,
            "shard_peak_rss_bytes": peaks[shard_w], "shard_baseline_rss_bytes": baseline}


def _gradient(n: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(n, dtype=np.float32)


def summarise(m: dict) -> dict:
    """Best and median of each figure, the ratios to the socket, the shard's memory."""
    best = {k: max(v) for k, v in m["gbps"].items()}
    median = {k: statistics.median(v) for k, v in m["gbps"].items()}
    cpu = {op: {side: statistics.median(v) for side, v in sides.items()}
           for op, sides in m["cpu_s_per_gb"].items()}
    return {"mb": m["bytes"] / MB, "best": best, "median": median, "cpu_s_per_gb": cpu,
            "push_ratio_to_tcp": best["push"] / best["tcp_in"],
            "fetch_ratio_to_tcp": best["fetch"] / best["tcp_out"],
            "push_ratio_median": median["push"] / median["tcp_in"],
            "fetch_ratio_median": median["fetch"] / median["tcp_out"],
            "shard_peak_rss_bytes": m["shard_peak_rss_bytes"],
            "shard_rss_over_slice": m["shard_peak_rss_bytes"] / m["bytes"],
            "shard_growth_over_slice": (m["shard_peak_rss_bytes"] - m["shard_baseline_rss_bytes"])
            / m["bytes"]}


def ps_point(client, sizes: list[int], rounds: int) -> list[dict]:
    """The summaries of every slice size on ``client``'s first two workers."""
    return [summarise(measure(client, nbytes // 4, rounds)) for nbytes in sizes]


class RssSeries:
    """Every worker's RSS every ``period`` seconds (psutil by pid), for telling flat from growing."""

    def __init__(self, client, period: float = 0.5):
        self.procs = {w: psutil.Process(pid) for w, pid in client.run(os.getpid).items()}
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(period,), daemon=True)
        self._thread.start()

    def _loop(self, period: float) -> None:
        while not self._stop.wait(period):
            row = {}
            for w, proc in self.procs.items():
                try:
                    row[w] = proc.memory_info().rss
                except psutil.NoSuchProcess:
                    row[w] = 0
            self.rows.append(row)

    def stop(self) -> dict:
        """Each worker's peak, and its growth: the peak of the last third of the samples minus
        the peak of the first third."""
        self._stop.set()
        self._thread.join()
        third = max(len(self.rows) // 3, 1)
        return {w: {"peak": max(r[w] for r in self.rows),
                    "growth": max(r[w] for r in self.rows[-third:])
                    - max(r[w] for r in self.rows[:third])} for w in self.procs}


def data_epoch(quick: bool, tmp: str) -> dict:
    """Item 6: one Downpour epoch over a speech-frames store larger than the sum of the two
    workers' memory limits; the workers' RSS must stay flat (and below the limits: the nanny
    would kill a worker past 95% of its limit)."""
    import daskbelief_datasets as recipes
    from daskbelief.data import open_store
    from daskbelief.nn import Dense, Sequential
    from daskbelief.train.downpour import downpour

    limit, rows = (300 * MB, 380_000) if quick else (400 * MB, 560_000)
    t = time.perf_counter()
    path = recipes.build("speech-frames", os.path.join(tmp, "big.zarr"), size=rows, classes=64)
    store = open_store(path, split="train")
    data_bytes = store.n * int(np.prod(store.feature_shape)) * 4
    print(f"\nspeech-frames: {store.n:,} train rows, {data_bytes / MB:,.0f} MB of features "
          f"(written in {time.perf_counter() - t:.0f} s); 2 workers of {limit / MB:.0f} MB each")
    model = Sequential((440,), [Dense(256, activation="relu"), Dense(64)])
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=limit,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        series = RssSeries(client)
        result = downpour(model, store, client=client, replicas=2, shards=2, n_fetch=5, n_push=5,
                          rule={"name": "adagrad", "lr": 0.01}, batch_size=256, epochs=1,
                          report_every=50)
        rss = series.stop()
    losses = [h["loss"] for h in result.history if h.get("loss") is not None]
    out = {"data_bytes": data_bytes, "data_workers_memory_limit_sum": 2 * limit,
           "data_epoch_seconds": result.summary["seconds"],
           "data_epoch_samples": result.summary["samples"],
           "data_peak_rss_bytes_max_worker": max(r["peak"] for r in rss.values()),
           "data_rss_growth_bytes_max_worker": max(r["growth"] for r in rss.values()),
           "data_loss_first": losses[0], "data_loss_last": losses[-1]}
    print(f"one epoch, {out['data_epoch_samples']:,} samples in {out['data_epoch_seconds']:.0f} s; "
          f"peak worker RSS {out['data_peak_rss_bytes_max_worker'] / MB:.0f} MB of a "
          f"{limit / MB:.0f} MB limit; RSS growth, last third vs first third of the epoch: "
          f"{out['data_rss_growth_bytes_max_worker'] / MB:+.0f} MB; loss "
          f"{out['data_loss_first']:.3f} -> {out['data_loss_last']:.3f}")
    return out


def image_model(side: int):
    """The locally connected image model of item 1: ``side`` x ``side`` x 3 pixels, two
    untied-weight layers (62M parameters at side 96, 116M at 128, 416M at 236)."""
    from daskbelief.nn import Dense, LocallyConnected2D, Sequential

    return Sequential((side, side, 3), [LocallyConnected2D(32, 7, 1, "relu"),
                                        LocallyConnected2D(16, 5, 2, "relu"), Dense(10)])


def one_worker_footprint(size: int, max_in_flight: int = 2) -> int:
    """Bytes that training a model of ``size`` parameters with Downpour on one worker needs at
    least, all float32: the parameters, Adagrad's accumulator, a gradient, its sum for the next
    push, ``max_in_flight`` pushes travelling, and one fetched copy."""
    return 4 * size * (4 + max_in_flight + 1)


def model_point(quick: bool, tmp: str) -> dict:
    """Item 1: a model-parallel Downpour replica of ``image_model`` over ``MODEL_WORKERS``
    workers (one block and one parameter shard each) whose memory limit is ``LIMIT_SHARE`` of
    ``one_worker_footprint``: real ``dask worker --memory-limit`` processes on emulated hosts
    joined by 10 Gbit/s links (``netns``), or, where namespaces cannot be made, LocalCluster
    worker processes with ``memory_limit=``."""
    import daskbelief_datasets as recipes

    side, steps = (96, 12) if quick else (236, 24)
    model = image_model(side)
    footprint = one_worker_footprint(model.size)
    limit = int(LIMIT_SHARE * footprint)
    path = recipes.build("images", os.path.join(tmp, "images.zarr"), size=800, side=side,
                         chunk_rows=100)
    print(f"\na model no worker may hold: {model.size:,} parameters ({4 * model.size / MB:,.0f} MB), "
          f"one worker would need {footprint / MB:,.0f} MB; {MODEL_WORKERS} workers of "
          f"{limit / MB:,.0f} MB, one block and one shard each; {steps} steps of 8 images")
    run = dict(side=side, steps=steps, path=path, root=os.path.join(tmp, "checkpoints"))
    reason = netns.unavailable_reason()
    if reason:
        print(f"no emulated hosts ({reason}): LocalCluster worker processes instead")
        with LocalCluster(n_workers=MODEL_WORKERS, threads_per_worker=1, processes=True,
                          memory_limit=limit, dashboard_address=":0") as cluster, \
                Client(cluster) as client:
            out = model_run(client, **run)
    else:
        with netns.Network(workers=MODEL_WORKERS, bandwidth="10gbit",
                           memory_limit=str(limit)) as net:
            out = net.call(f"{__name__}:model_run", timeout=3600, **run)
    out.update({"params": model.size, "worker_memory_limit_bytes": limit,
                "one_worker_footprint_bytes": footprint, "model_workers": MODEL_WORKERS,
                "model_hosts": "localcluster" if reason else "10gbit"})
    print(f"peak RSS: workers {', '.join(f'{v / MB:,.0f}' for v in out.pop('peaks'))} MB, driver "
          f"{out['peak_rss_bytes_driver'] / MB:,.0f} MB, against a {limit / MB:,.0f} MB limit; "
          + (f"loss {out['loss_first']:.3f} -> {out['loss_last']:.3f}; checkpoint written in "
             f"{out['checkpoint_seconds']:.1f} s, a resumed run's first step "
             f"{out['resume_seconds']:.1f} s after its call; test accuracy "
             f"{out['test_accuracy']:.3f} (blocks); {out['predict_rows']} predictions in "
             f"{out['predict_seconds']:.1f} s (blocks reading the checkpoint)"
             if "predict_seconds" in out else f"the run failed: {out['model_run_error']}"))
    return out


def model_run(client, side: int, steps: int, path: str, root: str) -> dict:
    """Train ``image_model(side)`` on ``client``'s workers for ``steps`` steps with a test
    evaluation and a checkpoint at the end, resume from the checkpoint for 2 more steps, and
    predict through blocks reading the last checkpoint; every worker's and this driver's peak
    RSS throughout (a worker past its limit is the finding, not an error)."""
    from daskbelief.data import open_store
    from daskbelief.monitor import events
    from daskbelief.ps import checkpoint
    from daskbelief.train.downpour import downpour

    model = image_model(side)
    train = dict(replicas=1, shards=MODEL_WORKERS, n_fetch=1, n_push=1, batch_size=8,
                 partition={"kind": "horizontal", "k": MODEL_WORKERS}, report_every=1,
                 rule={"name": "adagrad", "lr": MODEL_LR}, checkpoint_dir=root, test=path,
                 eval_every=1e9, checkpoint_every=1e9)  # both at the end only
    out = {}
    rss = RssSampler(client, extra={"driver": os.getpid()})
    try:
        result = downpour(model, path, client=client, steps=steps, **train)
        out["checkpoint_seconds"] = _events(client, events.RUN, result,
                                            kind="checkpoint")[-1]["seconds"]
        called = time.time()  # resumed for 2 more steps: until its first step is reported
        again = downpour(model, path, client=client, steps=steps + 2,
                         resume_from=checkpoint.latest(root), **train)
        out["resume_seconds"] = min(m["time"] for m in
                                    _events(client, events.REPLICA, again)) - called
        X, _ = open_store(path, split="test").read_raw(slice(0, 64))  # as a user wrote them
        t = time.perf_counter()
        predicted = again.predict(X, client=client)
        out.update(predict_seconds=time.perf_counter() - t, predict_rows=len(predicted),
                   test_accuracy=again.summary["test_accuracy"],
                   result_holds_params=again.params is not None)
    except Exception as e:  # noqa: BLE001 -- a worker past its limit is the finding
        out["model_run_error"] = f"{type(e).__name__}: {e}"
        result = None
    finally:
        peaks = rss.stop()
    out["peak_rss_bytes_driver"] = peaks.pop("driver")
    out["peak_rss_bytes_max_worker"] = max(peaks.values())
    out["peaks"] = list(peaks.values())
    if result is not None:
        losses = [h["loss"] for h in result.history if h.get("loss") is not None]
        third = max(len(losses) // 3, 1)  # one minibatch of 8 per report: average a few
        out.update(steps=steps, loss_first=float(np.mean(losses[:third])),
                   loss_last=float(np.mean(losses[-third:])))
    return out


def _events(client, topic: str, result, **match) -> list[dict]:
    """The events of ``topic`` that ``result``'s run logged, with the ``match`` fields."""
    return [m for _, m in client.get_events(topic) if m.get("run") == result.summary["run"]
            and all(m.get(k) == v for k, v in match.items())]


def _print(where: str, rows: list[dict], rounds: int) -> None:
    print(f"\n{where}: GB/s, best of {rounds} interleaved rounds (median); tcp_in: caller->shard "
          f"socket, tcp_out: shard->caller")
    print(f"{'slice MB':>9} {'tcp_in':>13} {'push':>13} {'tcp_out':>13} {'fetch':>13} "
          f"{'push/tcp':>9} {'fetch/tcp':>9} {'shard RSS/slice':>15}")
    for r in rows:
        cells = " ".join(f"{r['best'][k]:>6.2f} ({r['median'][k]:.2f})"
                         for k in ("tcp_in", "push", "tcp_out", "fetch"))
        print(f"{r['mb']:>9.0f} {cells} {r['push_ratio_to_tcp']:>9.2f} "
              f"{r['fetch_ratio_to_tcp']:>9.2f} {r['shard_rss_over_slice']:>15.2f}")
    print("\nCPU seconds per GB moved (median), shard process / caller process")
    for r in rows:
        cells = "  ".join(f"{k} {c['shard']:.3f}/{c['caller']:.3f}" for k, c in r["cpu_s_per_gb"].items())
        print(f"{r['mb']:>9.0f} MB: {cells}")


def run(quick: bool = False) -> dict:
    sizes = [100 * MB] if quick else [100 * MB, 1000 * MB]
    rounds = 3 if quick else 5
    with reusing_buffers(), LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        tables = {"loopback": ps_point(client, sizes, rounds)}
    reason = netns.unavailable_reason()
    if reason:
        print(f"no emulated 10gbit link: {reason}")
    else:
        with netns.Network(workers=2, bandwidth="10gbit") as net:
            tables["10gbit"] = net.call(f"{__name__}:ps_point", timeout=1200, sizes=sizes,
                                        rounds=rounds)
    for where, rows in tables.items():
        _print({"loopback": "loopback between two worker processes (LocalCluster)",
                "10gbit": "two hosts on emulated 10 Gbit/s links"}[where], rows, rounds)
    print("\none machine: the socket and the parameter server share its cores and memory bus, "
          "and other work on it; the ratios are measured side by side. A push applies Adagrad "
          "to the slice on one core: that bounds it where the socket is faster than the rule")
    link = "10gbit" if "10gbit" in tables else "loopback"
    out = _keys(tables[link][-1])
    out.update({"link": link, "rounds": rounds, "tables": tables,
                "loopback": _keys(tables["loopback"][-1])})
    with tempfile.TemporaryDirectory() as tmp:
        out.update(model_point(quick, tmp))
        out.update(data_epoch(quick, tmp))
    return out


def _keys(large: dict) -> dict:
    """The issue's keys, from the largest slice of one table."""
    return {"push_gbps_large": large["best"]["push"], "fetch_gbps_large": large["best"]["fetch"],
            "tcp_gbps_same_run": large["best"]["tcp_in"],
            "tcp_gbps_same_run_reverse": large["best"]["tcp_out"],
            "push_ratio_to_tcp": large["push_ratio_to_tcp"],
            "fetch_ratio_to_tcp": large["fetch_ratio_to_tcp"],
            "push_ratio_median": large["push_ratio_median"],
            "fetch_ratio_median": large["fetch_ratio_median"],
            "slice_bytes_large": int(large["mb"] * MB),
            "shard_peak_rss_bytes": large["shard_peak_rss_bytes"],
            "shard_rss_over_slice": large["shard_rss_over_slice"],
            "shard_growth_over_slice": large["shard_growth_over_slice"]}
