"""A pipeline's ``[cluster.slurm]`` section turned into a Dask cluster whose workers are batch
jobs, through dask-jobqueue (``pip install -e ".[jobqueue]"``).

::

    [cluster.slurm]
    jobs = 2              # batch jobs to submit; each runs `processes` Dask workers
    cores = 2             # per job; processes defaults to cores (one single-threaded worker per core)
    memory = "4GB"        # per job
    walltime = "01:00:00"
    queue = "debug"       # any other dask_jobqueue.SLURMCluster keyword, e.g. account,
    log_directory = "runs/slurm-logs"       # job_extra_directives, python, interface
    timeout = 300         # seconds to wait for every worker to join (default 300)

The scheduler runs in the driver's process with daskbelief's dashboard page and ``/metrics``
(``daskbelief.monitor.dashboard`` preloaded); the jobs are cancelled when the run ends.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect

from distributed import Client

from daskbelief.cluster import worker_environ, worker_info

KINDS = {"slurm": "SLURMCluster"}   # section key -> dask_jobqueue class
OWN_KEYS = {"jobs": int, "timeout": (int, float)}
JOIN_TIMEOUT = 300.0


def _known_keywords(cls) -> set[str]:
    """The keywords a dask_jobqueue cluster class accepts: its own, its job class's, and the
    base job's (dask-jobqueue passes the rest along as ``**kwargs``)."""
    from dask_jobqueue.core import Job, JobQueueCluster

    names = set()
    for c in (cls, cls.job_cls, Job, JobQueueCluster):
        names |= {p for p in inspect.signature(c.__init__).parameters if p not in ("self",)}
    return names - {"kwargs", "base_class_kwargs", "job_kwargs", "job_cls", "n_workers",
                    "asynchronous", "loop"}


def check(section: dict) -> tuple[str, dict]:
    """``(kind, options)`` of a ``[cluster]`` section's batch-system part; ValueError naming the
    key at fault (an unknown kind or keyword, a missing ``cores`` or ``memory``)."""
    kinds = [k for k in section if k in KINDS]
    if len(kinds) != 1:
        raise ValueError(f"[cluster] needs exactly one of {', '.join(sorted(KINDS))}, got "
                         f"{kinds or 'none'}")
    kind, options = kinds[0], dict(section[kinds[0]])
    try:
        cls = getattr(importlib.import_module("dask_jobqueue"), KINDS[kind])
    except ImportError:
        raise ValueError(f"[cluster.{kind}] needs dask-jobqueue: pip install dask-jobqueue") from None
    known = _known_keywords(cls) | set(OWN_KEYS)
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"unknown key cluster.{kind}.{key} (a dask_jobqueue.{KINDS[kind]} "
                             f"keyword, or one of {', '.join(sorted(OWN_KEYS))})")
        expected = OWN_KEYS.get(key)
        if expected and (not isinstance(value, expected) or isinstance(value, bool) or value <= 0):
            raise ValueError(f"cluster.{kind}.{key} must be a positive number, got {value!r}")
    for key in ("cores", "memory"):
        if key not in options:
            raise ValueError(f"cluster.{kind}.{key} is required (per job, e.g. cores = 2, "
                             f"memory = \"4GB\")")
    return kind, options


def job_options(options: dict) -> dict:
    """The cluster class's keywords: one single-threaded worker per core unless ``processes``
    says otherwise, and a job script that first exports ``cluster.worker_environ()`` (workers
    that reuse large buffers), then the section's own ``job_script_prologue`` lines."""
    exports = [f"export {k}={v}" for k, v in worker_environ().items()]
    return {**options, "processes": options.get("processes", options["cores"]),
            "job_script_prologue": [*exports, *options.get("job_script_prologue", [])]}


@contextlib.contextmanager
def jobqueue_client(section: dict):
    """A ``Client`` of a dask-jobqueue cluster from a ``[cluster]`` section, once all its
    workers have joined; the jobs are cancelled and the scheduler closed on exit."""
    from daskbelief.monitor import dashboard

    kind, options = check(section)
    jobs, timeout = options.pop("jobs", 1), options.pop("timeout", JOIN_TIMEOUT)
    options = job_options(options)
    scheduler_options = dict(options.pop("scheduler_options", {}))
    scheduler_options.setdefault("preload", [dashboard.__name__])
    cls = getattr(importlib.import_module("dask_jobqueue"), KINDS[kind])
    with cls(scheduler_options=scheduler_options, **options) as cluster, Client(cluster) as client:
        cluster.scale(jobs=jobs)
        workers = jobs * options["processes"]
        try:
            client.wait_for_workers(workers, timeout=timeout)
        except TimeoutError:
            raise TimeoutError(f"waited {timeout:.0f}s for {workers} Dask workers from {jobs} "
                               f"{kind.upper()} job(s); {len(worker_info(client))} "
                               "joined (are the jobs queued? see the job logs)") from None
        yield client
