"""Finding the Dask client to train with: the one given, the current one, or a local cluster."""
from __future__ import annotations

import contextlib
import importlib
import os

import dask
from distributed import Client, LocalCluster

from daskbelief.workarounds import worker_info


def default_local_workers() -> int:
    """One single-threaded worker per core: nanny workers run BLAS on one thread each anyway."""
    return max(1, os.cpu_count() or 1)


# glibc's malloc in a worker a nanny started: distributed sets MALLOC_TRIM_THRESHOLD_=65536, which
# also pins the mmap threshold at 128 KiB, so every buffer over that -- each message frame a
# shard receives, each slice it copies out for a fetch -- is a fresh mmap whose pages are faulted
# in and zeroed again on every call. Buffers up to 32 MiB taken from the heap, and up to 256 MiB
# of freed heap kept, are reused instead: one shard's 100 MB pushes over an emulated 10 Gbit/s
# link went from 0.46 to 0.71 GB/s (2-core VM; push frames are 16 MiB, ``ps.server.FRAME_BYTES``).
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


@contextlib.contextmanager
def reusing_buffers():
    """Workers that nannies made inside this block start with ``WORKER_MALLOC``: a nanny reads
    dask config ``distributed.nanny.pre-spawn-environ`` when it is made, but takes a variable
    already in this process's environment first -- and every earlier nanny here put distributed's
    own value there -- so the environment says it too until the block ends."""
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **WORKER_MALLOC}
    before = {k: os.environ.get(k) for k in WORKER_MALLOC}
    os.environ.update(WORKER_MALLOC)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def worker_environ() -> dict[str, str]:
    """``reusing_buffers`` for ``dask worker`` processes started from here: the variables to add
    to their environment (a nanny keeps a variable its environment has, and its worker process
    inherits the others)."""
    return dict(WORKER_MALLOC)


@contextlib.contextmanager
def client_or_local(client: Client | None = None, n_workers: int | None = None,
                    scheduler: str | None = None, scheduler_file: str | None = None,
                    threads_per_worker: int = 1, jobqueue: dict | None = None):
    """Yield a usable ``Client``; close only what this call started.

    Precedence: an explicit ``client``; a ``scheduler`` address or ``scheduler_file``; a batch
    system's jobs from a ``[cluster]`` section (``jobqueue``, see ``daskbelief.jobqueue``); the current
    client (``Client.current()``, e.g. one a notebook made); else a ``LocalCluster`` of worker
    processes (one thread each unless asked otherwise, malloc set to reuse large buffers:
    ``WORKER_MALLOC``), stopped on exit, whose dashboard has the DistBelief page
    (``/individual-daskbelief``) and whose ``/metrics`` has daskbelief's figures.
    """
    if client is not None:
        yield client
        return
    if scheduler or scheduler_file:
        with Client(scheduler, scheduler_file=scheduler_file) as remote:
            yield remote
        return
    if jobqueue:
        from daskbelief.jobqueue import jobqueue_client

        with jobqueue_client(jobqueue) as batch:
            yield batch
        return
    try:
        current = Client.current()
    except ValueError:
        current = None
    if current is not None:
        yield current
        return
    from daskbelief.monitor import dashboard  # here: workers importing this module skip bokeh

    dashboard.register()  # the scheduler below runs in this process and serves the DistBelief page
    with reusing_buffers(), LocalCluster(n_workers=n_workers or default_local_workers(), threads_per_worker=threads_per_worker,
                      processes=True, dashboard_address=":0",
                      scheduler_kwargs={"preload": [dashboard.__name__]},  # /metrics too
                      ) as cluster, Client(cluster) as local:
        yield local


def require_workers(client: Client, minimum: int = 1) -> list[str]:
    """The workers' addresses; a clear error when the cluster has fewer than ``minimum``."""
    workers = sorted(worker_info(client))
    if len(workers) < minimum:
        raise RuntimeError(f"the Dask cluster at {client.scheduler.address} has {len(workers)} "
                           f"worker(s); this run needs at least {minimum}")
    return workers


def require_threads(client: Client, minimum: int, what: str) -> None:
    """Fail clearly when the cluster cannot run ``minimum`` long-running tasks at once.

    Downpour replicas are long-running tasks that must all run together; on too few worker
    threads the later ones would wait for the earlier ones to finish, which is not Downpour.
    """
    threads = sum(w["nthreads"] for w in worker_info(client).values())
    if threads < minimum:
        raise RuntimeError(f"{what} need {minimum} worker threads running at once, but the cluster "
                           f"has {threads}: add workers or threads (e.g. --local-workers {minimum})")


def require_gpus(client: Client) -> None:
    """Fail clearly unless every worker can compute with CuPy on a GPU."""
    from daskbelief.backend import gpu_available

    missing = sorted(w for w, ok in client.run(gpu_available).items() if not ok)
    if missing:
        raise RuntimeError(f"device='cupy' needs CuPy and a CUDA device on every worker; "
                           f"{len(missing)} worker(s) have none: {', '.join(missing)}")


def warm_workers(client: Client, *modules: str) -> None:
    """Import ``modules`` on every worker now, so that a fresh worker's first task does not pay
    for the imports (zarr's and daskbelief's take a good part of a second) inside the timed run."""
    client.run(_import_all, modules)


def _import_all(modules) -> None:
    for name in modules:
        importlib.import_module(name)
