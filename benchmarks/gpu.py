"""The network core and Downpour on a GPU through CuPy, beside NumPy on the same machine.

``python -m benchmarks gpu [--quick]`` needs CuPy and a CUDA device (the ``gpu`` extra on a
machine with an NVIDIA GPU); without them it says so and returns ``{"gpu": null}``, which is all
it does inside ``all`` on a machine without a GPU.

(a) Core: a training step (``loss_and_grad``, float32, no update) of the speech MLP
440-1024x3-2048 at batch 256 and 4096, on the GPU against NumPy on one BLAS thread (how a Dask
worker runs) and on all cores, and against PyTorch on the same GPU when it is importable. Rounds
alternate between the steps; each figure is the best round.
(b) Downpour on speech-frames: samples/s of R replicas with ``device="cupy"`` against host NumPy,
R single-threaded worker processes sharing the one GPU, same data, shards and n_fetch=n_push.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from distributed import Client, LocalCluster
from threadpoolctl import threadpool_limits

import daskbelief_datasets as recipes
from benchmarks.core import interleaved, mlp_model, model_step, torch, torch_mlp_step
from benchmarks.downpour import downpour_rate, shards_for, speech_mlp
from daskbelief.backend import gpu_available


def synchronized(step, sync):
    """``step`` followed by ``sync()``: a GPU step is timed to its end, not to its launch."""
    def run():
        step()
        sync()
    return run


def core_rates(batches: tuple[int, ...], rounds: int, calls: int) -> dict:
    """Samples/s and GFLOP/s of the MLP training step, per implementation and batch."""
    import cupy

    model = mlp_model()
    host, device, flops = {}, {}, {}
    for b in batches:
        host[b], flops[b] = model_step(model, b, np)
        device[("cupy", b)] = synchronized(model_step(model, b, cupy)[0],
                                           cupy.cuda.Device().synchronize)
        if torch is not None and torch.cuda.is_available():
            device[("torch-cuda", b)] = synchronized(torch_mlp_step(b, "cuda")[0],
                                                     torch.cuda.synchronize)
    with threadpool_limits(1):
        times = {("numpy 1 thread", b): ts for b, ts in interleaved(host, rounds, calls).items()}
    times.update({("numpy all cores", b): ts for b, ts in interleaved(host, rounds, calls).items()})
    times.update(interleaved(device, rounds, calls))
    out = {}
    for (name, b), ts in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        best = min(ts)
        out[f"{name} b{b}"] = {"samples_per_s": b / best, "gflops": flops[b] / best / 1e9}
        print(f"{name:<16} batch {b:>5}: {b / best:>12,.0f} samples/s "
              f"{flops[b] / best / 1e9:>9.1f} GFLOP/s")
    return out


def downpour_rates(replicas: tuple[int, ...], steps: int, batch: int) -> dict:
    """Downpour samples/s on host NumPy and on CuPy, R replicas each, on one cluster."""
    model = speech_mlp()
    out = {}
    with tempfile.TemporaryDirectory() as tmp, \
            LocalCluster(n_workers=max(replicas), threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster, Client(cluster) as client:
        path = recipes.build("speech-frames", os.path.join(tmp, "speech.zarr"),
                             size=max(replicas) * steps * batch, classes=2048)
        for r in replicas:
            for device in (None, "cupy"):
                rate = downpour_rate(client, model, path, replicas=r, n=5, batch_size=batch,
                                     steps=steps, shards=shards_for(r), device=device)
                out[f"{device or 'numpy'} r{r}"] = rate
                print(f"downpour R={r} S={shards_for(r)} batch {batch} on {device or 'numpy'}: "
                      f"{rate:,.0f} samples/s")
            print(f"  cupy / numpy at R={r}: {out[f'cupy r{r}'] / out[f'numpy r{r}']:.2f}")
    return out


def run(quick: bool = False) -> dict:
    if not gpu_available():
        print("no GPU: CuPy or a CUDA device is missing; nothing measured")
        return {"gpu": None}
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    print(f"GPU: {name}; host cores: {os.cpu_count()}")
    rounds, calls = (3, 3) if quick else (5, 5)
    core = core_rates((256, 4096), rounds, calls)
    ratio = {b: core[f"cupy b{b}"]["samples_per_s"] / core[f"numpy 1 thread b{b}"]["samples_per_s"]
             for b in (256, 4096)}
    print("cupy / numpy 1 thread: " + ", ".join(f"batch {b} {r:.1f}x" for b, r in ratio.items()))
    counts = (1, 2) if quick else (1, 2, 4)
    rates = downpour_rates(counts, 30 if quick else 100, 256)
    return {"gpu": name, "core": core, "core_gpu_vs_1thread_b256": ratio[256],
            "core_gpu_vs_1thread_b4096": ratio[4096], "downpour": rates,
            "downpour_gpu_vs_numpy_r1": rates["cupy r1"] / rates["numpy r1"]}
