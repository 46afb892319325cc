"""Faults the cluster chooses, for the chaos tests and the chaos benchmark.

Every fault is real: a worker process SIGKILLed by its pid (its nanny starts a fresh one, as a
cluster manager would), a real ``dask scheduler`` or driver process killed. What is chosen, the
victim and the moment, is drawn from a seeded generator by small pure functions: a failure names
its seed, a rerun with that seed makes the same choices, and no caller picks a convenient
victim. Every wait has a deadline (``daskbelief.waits``), and its error says what it waited for.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from daskbelief import waits
from daskbelief.monitor import events
from daskbelief.workarounds import worker_info

DASK = [sys.executable, "-m", "dask"]  # the `dask` command of this environment


def draws(seed: int) -> tuple[np.random.Generator, np.random.Generator]:
    """Two independent generators from one seed: one for victims, one for moments."""
    victims, moments = np.random.default_rng(seed).spawn(2)
    return victims, moments


def choose_victim(rng: np.random.Generator, workers) -> str:
    """One of ``workers`` drawn by ``rng``. Sorted first, as the placement policies sort: a seed
    then hits the same role (shard holder, replica home, block) whatever ports the run got."""
    ordered = sorted(workers)
    if not ordered:
        raise ValueError("no worker left to kill")
    return ordered[int(rng.integers(len(ordered)))]


def choose_moments(rng: np.random.Generator, low: float, high: float, n: int = 1) -> list[float]:
    """``n`` moments drawn uniformly from ``[low, high]`` (steps, iterations or seconds), in the
    order they come."""
    return sorted(float(m) for m in rng.uniform(low, high, n))


def every(period: float, seconds: float) -> list[float]:
    """The moments ``period, 2 period, ...`` before ``seconds``: a kill every ``period`` seconds."""
    return [period * i for i in range(1, int(seconds // period) + 1) if period * i < seconds]


def run_with_deadline(fn, timeout: float, what: str):
    """``fn()``'s result, or ``waits.WaitTimeout`` naming ``what`` once it has run ``timeout``
    seconds: a hung training call is then a test failure that says what hung, not a frozen
    suite. The call itself is left behind in a daemon thread (closing its cluster ends it)."""
    future = concurrent.futures.Future()

    def target():
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 -- re-raised by future.result in the caller
            future.set_exception(e)

    threading.Thread(target=target, daemon=True, name=f"deadline: {what}").start()
    return waits.result(future, timeout=timeout, what=what)


def worker_pids(client) -> dict[str, int]:
    """Address -> pid of each worker process (the worker itself, not its nanny)."""
    return client.run(os.getpid)


def sigkill(pid: int) -> None:
    """SIGKILL one process: no clean-up, no goodbye to the scheduler, as a crashed host."""
    os.kill(pid, signal.SIGKILL)


def holdings(client, address: str) -> list[str]:
    """What the worker at ``address`` holds now: its actors' keys, then the tasks it runs. Asked
    of the scheduler, in one call: a worker busy training answers late, and the kill with it."""
    def held(dask_scheduler, address=address):
        ws = dask_scheduler.workers.get(address)
        if ws is None:
            raise OSError(f"{address} has left")
        return sorted(str(ts.key) for ts in ws.actors) + sorted(str(ts.key) for ts in ws.processing)

    return client.run_on_scheduler(held)


def shard_holders(client, index: int) -> list[str]:
    """The workers holding parameter shard ``index`` (keys ``parameter-shard-INDEX-*``), asked
    of the scheduler in one call: one, unless a recovery is under way."""
    def holding(dask_scheduler, prefix=f"parameter-shard-{index}-"):
        return sorted(address for address, ws in dask_scheduler.workers.items()
                      if any(str(ts.key).startswith(prefix) for ts in ws.actors))

    return client.run_on_scheduler(holding)


def kill_worker(client, address: str) -> int:
    """SIGKILL the process of the worker at ``address``; its pid."""
    pid = client.run(os.getpid, workers=[address])[address]
    sigkill(pid)
    return pid


def threads_in(client, function: str) -> dict[str, int]:
    """Address -> how many threads of that worker are inside ``function`` now (found on the
    threads' stacks: a task the scheduler has released may still be running there)."""
    def count(function=function):
        def inside(frame):
            while frame is not None:
                if frame.f_code.co_name == function:
                    return True
                frame = frame.f_back
            return False
        return sum(inside(f) for f in sys._current_frames().values())
    return client.run(count)


# What a run has reached, read from its events on the scheduler (only events since ``since``,
# so that earlier runs on the same cluster do not count).

def replica_steps(client, since: float) -> float:
    """The furthest step any Downpour replica has reported."""
    return max((m["step"] for _, m in client.get_events(events.REPLICA) if m["time"] >= since),
               default=0)


def iterations(client, since: float) -> float:
    """The last completed Sandblaster iteration."""
    return max((m["iteration"] for _, m in client.get_events(events.RUN)
                if m["time"] >= since and m.get("kind") == "iteration"), default=0)


def seconds(client, since: float) -> float:
    """Seconds since ``since``."""
    return time.time() - since


@dataclass
class Kill:
    moment: float  # in the units of the progress measure
    reached: float  # where the progress measure stood at the kill (read just after it)
    victim: str
    pid: int
    time: float
    held: list  # what the victim held when it was killed (``holdings``)


@dataclass
class Chaos:
    """SIGKILLs a seeded random worker at each of ``moments`` of a run's ``progress`` (a function
    ``(client, since) -> number`` such as ``replica_steps``), in a background thread.

    ``with Chaos(client, seed, moments, progress):`` around the run; afterwards ``kills`` says who
    was killed when, and ``missed`` the moments the run ended before (reaching no moment at all
    within ``timeout`` is an ``error``). The seed is printed, so a failing test can be rerun
    with the same choices.
    """

    client: object
    seed: int
    moments: list
    progress: object = replica_steps
    timeout: float = 120.0
    kills: list = field(default_factory=list)
    error: str | None = None

    def __post_init__(self):
        self._rng = draws(self.seed)[0]
        self._pids: dict[str, int] = {}  # known before the first moment: a kill is one call less
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"chaos seed {self.seed}")

    def __enter__(self):
        print(f"chaos: seed {self.seed}, kills at {[round(m, 1) for m in self.moments]} "
              f"({self.progress.__name__})", flush=True)
        self.since = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        for k in self.kills:
            print(f"chaos: seed {self.seed}: killed {k.victim} (pid {k.pid}) at {k.moment:.1f} "
                  f"(reached {k.reached:.1f}), holding {k.held}", flush=True)

    @property
    def missed(self) -> list:
        return self.moments[len(self.kills):]

    def _run(self):
        try:
            self._pids = worker_pids(self.client)
            for moment in self.moments:
                def reached(moment=moment):
                    return self._stop.is_set() or self.progress(self.client, self.since) >= moment

                waits.until(reached, timeout=self.timeout, every=0.005,
                            what=f"{self.progress.__name__} to reach {moment:.1f} (seed {self.seed})")
                if self._stop.is_set():
                    return
                self.kills.append(waits.until(lambda: self._kill_one(moment), timeout=30,
                                              what=f"a live worker to kill at {moment:.1f}"))
        except Exception as e:  # noqa: BLE001 -- reported by whoever reads .error
            self.error = f"seed {self.seed}: {e!r}"

    def _kill_one(self, moment: float) -> Kill | None:
        """Kill a worker drawn among the live ones; None if it left before it could be killed
        (the scheduler may still list a worker killed a moment ago)."""
        killed = {k.victim for k in self.kills}
        live = [w for w in worker_info(self.client) if w not in killed]
        if not live:
            return None
        victim = choose_victim(self._rng, live)
        try:
            held = holdings(self.client, victim)
            pid = self._pids.get(victim) or worker_pids(self.client)[victim]  # one started since
            sigkill(pid)
            killed = time.time()
            return Kill(moment, self.progress(self.client, self.since), victim, pid, killed, held)
        except (OSError, KeyError):  # CommClosedError included: it left between listing and kill
            return None


# Real `dask scheduler` and `dask worker` processes, always stopped.

def spawn(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    """Start a process in its own session (so it and its children can be stopped together),
    its output into ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **kwargs)


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process's session, SIGKILL it after ``timeout`` seconds; reap the process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout)
            if sig is signal.SIGTERM:  # the group may hold children that outlive their parent
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            return
        except subprocess.TimeoutExpired:
            continue


def running(process: subprocess.Popen, what: str) -> bool:
    """True while ``process`` runs; an error naming ``what`` once it has exited."""
    if process.poll() is not None:
        raise RuntimeError(f"{what} (pid {process.pid}) exited with status {process.returncode}")
    return True


def scheduler_address(scheduler_file: Path) -> str | None:
    """The address in a scheduler file, or None while the file is missing or half-written."""
    try:
        return json.loads(Path(scheduler_file).read_text())["address"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


@contextlib.contextmanager
def dask_scheduler(directory, *, timeout: float = 60.0):
    """A real ``dask scheduler`` process writing ``directory/scheduler.json``; yields
    ``(process, scheduler_file)`` once the file names its address; always stopped."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / "scheduler.json"
    process = spawn([*DASK, "scheduler", "--scheduler-file", str(file), "--host", "127.0.0.1",
                     "--port", "0", "--dashboard-address", ":0"], directory / "scheduler.log")
    try:
        waits.until(lambda: running(process, "dask scheduler") and scheduler_address(file),
                    timeout=timeout, what=f"the dask scheduler (pid {process.pid}) to write {file}")
        yield process, file
    finally:
        stop(process)


@contextlib.contextmanager
def dask_workers(scheduler_file, n: int, *, nthreads: int = 1, directory=None, timeout: float = 60.0):
    """``n`` real ``dask worker`` processes, each under its nanny (a killed worker is restarted),
    connected to the scheduler of ``scheduler_file``; yields the nanny processes once the
    scheduler counts ``n`` workers; always stopped."""
    from distributed import Client

    directory = Path(directory or Path(scheduler_file).parent)
    processes = []
    try:
        for i in range(n):
            processes.append(spawn([*DASK, "worker", "--scheduler-file", str(scheduler_file),
                                    "--host", "127.0.0.1", "--nthreads", str(nthreads),
                                    "--name", f"worker-{i}", "--no-dashboard",
                                    "--local-directory", str(directory / f"worker-{i}")],
                                   directory / f"worker-{i}.log"))
        with Client(scheduler_file=str(scheduler_file), timeout=timeout) as client:
            waits.until(lambda: all(running(p, "dask worker") for p in processes)
                        and len(worker_info(client)) >= n, timeout=timeout,
                        what=f"{n} dask workers to join the scheduler of {scheduler_file}")
        yield processes
    finally:
        for process in processes:
            stop(process)
