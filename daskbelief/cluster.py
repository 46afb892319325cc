"""Finding the Dask client to train with: the one given, the current one, or a local cluster."""
from __future__ import annotations

import contextlib
import importlib
import os

from distributed import Client, LocalCluster

from daskbelief.workarounds import start_actors, worker_info  # noqa: F401 -- their old home


def default_local_workers() -> int:
    """One single-threaded worker per core: nanny workers run BLAS on one thread each anyway."""
    return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def client_or_local(client: Client | None = None, n_workers: int | None = None,
                    scheduler: str | None = None, scheduler_file: str | None = None,
                    threads_per_worker: int = 1):
    """Yield a usable ``Client``; close only what this call started.

    Precedence: an explicit ``client``; a ``scheduler`` address or ``scheduler_file``; the current
    client (``Client.current()``, e.g. one a notebook made); else a ``LocalCluster`` of worker
    processes (one thread each unless asked otherwise), stopped on exit, whose dashboard has the
    DistBelief page (``/individual-daskbelief``).
    """
    if client is not None:
        yield client
        return
    if scheduler or scheduler_file:
        with Client(scheduler, scheduler_file=scheduler_file) as remote:
            yield remote
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
    with LocalCluster(n_workers=n_workers or default_local_workers(), threads_per_worker=threads_per_worker,
                      processes=True, dashboard_address=":0") as cluster, Client(cluster) as local:
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
