"""Every workaround for a limit of distributed 2026.8, in one place (docs/architecture.md says why).

* ``worker_info``: ``Client.scheduler_info()`` can return the client's periodic cache, which holds
  no workers, instead of the fresh answer; ask the scheduler directly.
* ``start_actors``: an actor's constructor runs as an ordinary task on a pool thread of its worker,
  so it waits while long-running tasks hold every thread; and its future never completes if that
  worker dies. Actors are started with a deadline that names them, and the tasks that run for the
  whole training (replicas) call ``leave_thread_pool`` so that they hold no pool thread at all.
  A worker that died after the caller listed it fails a scatter with a bare ``KeyError`` or a
  ``CommClosedError`` and leaves an actor pinned to it waiting for ever: ``start_actors``
  raises ``ConnectionError`` naming it, and callers placing on a list they fetched pass
  ``give_up`` (``recovery.gone``).
* ``forget_sent_messages``: distributed keeps the last 1000 messages of every stream for
  debugging, live objects on an in-process scheduler: the handles in the arguments of the tasks
  that started blocks and replicas kept a finished run's shards and blocks alive;
  ``release_actors`` clears those logs.
* A Variable's value lives deserialised on an in-process scheduler, and every ``Actor`` handle
  made where a client exists holds a future of its own for the actor's key: a Variable holding
  server handles keeps the shards alive after the run, so the driver deletes its Variables.
* ``stuck_without_worker``: a task submitted with ``workers=[home], allow_other_workers=True``
  whose home died while no worker was running stays in ``no-worker`` for ever (the scheduler,
  placing such tasks when workers join, ignores the loose restriction); the driver finds its
  replicas there and submits them again without a home.
* ``HandleVariable``: a Variable holding an object msgpack cannot carry (a server or block
  handle) makes distributed log its fallback to pickle on every remote-scheduler run, and an
  in-process scheduler keeps the handles deserialised; the value travels pickled, as bytes.
* ``LocalActor``: a call from a task to an actor of its own worker would go over loopback TCP
  through the worker's event loop; it is submitted straight to the actor thread instead.
* ``actor_loop``: an actor handle offers no way to chain its calls (its futures take no
  callbacks); a push whose frames go a few at a time (``ps.server.send_windowed``) is a
  coroutine on the event loop the handle sends from, read from a private attribute.
* All actors of a worker share one thread: callers spread shards and blocks over workers
  (ps.policy).
* An actor call to a worker that died can stay pending forever: callers wait with
  ``waits.result(..., give_up=...)``, which asks between slices whether to keep waiting.
* ``log_event`` can overtake a topic subscription: ``monitor.events.EventLog`` echoes a probe.
* ``prompt_streams``: messages on distributed's streams wait for a batch, 10 ms from a client to
  the scheduler and 5 ms from the scheduler to a worker (hard-coded); a chain of short tasks
  (Sandblaster's evaluations, about 30 ms each) spent a third of its time waiting on them.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
from concurrent.futures import CancelledError

import dask.config
import numpy as np
from distributed import Client, Future, Variable, get_worker, secede

from daskbelief import waits

ACTOR_START_TIMEOUT = 120.0  # seconds for actors to be constructed on their workers
WORKER_INFO_TIMEOUT = 60.0   # seconds for the scheduler to list its workers
PROMPT_INTERVAL = 0.001      # seconds a message waits for its batch in ``prompt_streams``


class InterruptRace(logging.Filter):
    """For the CLI: drops one harmless record: when Ctrl-C / SIGTERM lands just as
    distributed 2026.8's ``sync()`` starts a call, its cancel callback reads a variable not yet
    assigned and tornado logs that NameError with a traceback. The interrupt itself is handled
    (the run stops cleanly); the traceback would only make a clean stop look like a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not (isinstance(error, NameError) and "'future'" in str(error))


class SchedulerGone(logging.Filter):
    """For the CLI: drops distributed's records of its client's link to a lost scheduler: that
    the client's batched stream found it closed (an INFO record with a traceback, logged only
    when a message was being sent at that moment), that the reconnect gave up, or (the run being
    lost, the client is closed at once) the traceback of the reconnect's cancellation. The run's
    own line (``RunLost``) says what was lost, with the last checkpoint and the command that
    resumes; distributed's records would only bury it."""

    LOGGERS = ("distributed.client", "distributed.batched")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return not raised_in(record.exc_info[2], "_reconnect")
        message = record.getMessage()
        if message.startswith("Batched Comm Closed"):
            return "Client->Scheduler" not in message
        return not message.startswith("Failed to reconnect to scheduler")


def raised_in(tb, function: str) -> bool:
    """Whether the traceback ``tb`` passes through a function named ``function``."""
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


class LostActorCall(logging.Filter):
    """Drops the traceback of a call to an actor that is gone, which tornado logs from a callback
    nobody awaits (the call's future then never completes):

    * its worker died: distributed awaits the actor's own Future, which the scheduler cancels
      once the actor is lost (``FutureCancelledError``);
    * its worker no longer holds it, released by a recovery while a task of the abandoned work
      still called it: the worker answers ``KeyError(key)`` from ``actor_execute`` (and logs
      that on ``distributed.core`` itself).

    The caller has already given up on the call (every wait here has a deadline and a
    ``give_up``) and the lost actor is recovered or reported; the traceback would only make a
    survived fault look like a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info:
            return True
        error, tb = record.exc_info[1], record.exc_info[2]
        if record.name == "distributed.core":  # the worker's side of the released actor's call
            return not (isinstance(error, KeyError) and record.args == ("actor_execute",))
        if not raised_in(tb, "wait_then_set_result"):
            return True
        if isinstance(error, CancelledError):
            return False
        return not (isinstance(error, KeyError) and raised_in(tb, "actor_execute"))


for _name in ("tornado.application", "distributed.core"):
    logging.getLogger(_name).addFilter(LostActorCall())


def worker_info(client: Client) -> dict[str, dict]:
    """The scheduler's record of every worker (address -> info), fetched now (not the cache that
    ``client.scheduler_info()`` may return, which can hold no workers)."""
    return client.sync(client.scheduler.identity, n_workers=-1,
                       callback_timeout=WORKER_INFO_TIMEOUT)["workers"]


def stuck_without_worker(client: Client, futures) -> list[int]:
    """Indices of ``futures`` whose tasks wait in the scheduler's ``no-worker`` state."""
    keys = [f.key for f in futures]
    states = client.run_on_scheduler(
        lambda keys, dask_scheduler=None: {k: dask_scheduler.tasks[k].state for k in keys
                                           if k in dask_scheduler.tasks}, keys)
    return [i for i, k in enumerate(keys) if states.get(k) == "no-worker"]


def leave_thread_pool() -> None:
    """Hand this task's pool thread back to its worker (``distributed.secede``), if it runs in one.

    A replica runs for the whole training; were it to hold its thread, a shard or block actor
    recreated on its worker during a recovery could not be constructed (constructors run on pool
    threads) until the replicas finish, and the replicas wait for the recovery: a deadlock.
    """
    try:
        get_worker()
    except ValueError:
        return
    secede()


def start_actors(client: Client, specs: list[tuple], timeout: float = ACTOR_START_TIMEOUT,
                 give_up=None) -> tuple[list, list]:
    """Start actors ``(cls, worker, key, args)`` pinned to their workers; ``(actors, futures)``.

    NumPy array arguments are scattered straight to the actor's worker instead of travelling
    inside the task graph through the scheduler, and released once the actor holds them. All
    actors are started before any is waited for, all within ``timeout`` seconds (``WaitTimeout``
    names them), or until ``give_up()`` returns an error (as in ``waits``); a worker that has
    died fails the start with ``ConnectionError`` naming it, once distributed tells. Keep the
    futures: an actor lives as long as its future does.
    """
    scattered, futures = [], []
    what = "actors " + ", ".join(f"{key} on {worker}" for _, worker, key, _ in specs)
    try:
        for cls, worker, key, args in specs:
            args = [_scatter_to(client, a, worker, key) if isinstance(a, np.ndarray) else a
                    for a in args]
            scattered += [a for a in args if isinstance(a, Future)]
            futures.append(client.submit(cls, *args, actor=True, workers=[worker],
                                         allow_other_workers=False, pure=False, key=key))
        actors = waits.results(futures, timeout=timeout, what=what, give_up=give_up)
    except BaseException:
        client.cancel(futures)
        raise
    finally:
        for value in scattered:  # cancelling instead would cancel the actors that depend on them
            value.release()
    return actors, futures


def _scatter_to(client: Client, value: np.ndarray, worker: str, key: str) -> Future:
    """``value`` scattered to ``worker`` for actor ``key``; ``ConnectionError`` naming the worker
    once it has died: the scheduler answers with a bare KeyError once it has dropped the worker,
    with a ``CommClosedError`` (an ``OSError``) before."""
    try:
        return client.scatter(value, workers=[worker], hash=False)
    except (KeyError, OSError) as e:
        raise ConnectionError(f"worker {worker} left the cluster before actor {key} could start "
                              "on it") from e


def release_actors(futures, actors) -> None:
    """Release actors now: their ``start_actors`` futures and the Future every ``Actor`` object
    made in a client holds on its own key. Releasing only the former leaves each actor alive
    until the garbage collector happens to find its handle (in a reference cycle: any time
    later), so a long-lived cluster would keep a finished run's actors for a while.

    Only the handles of actors on live workers: a call to a lost actor's worker awaits that
    very Future forever (``Actor.__getattr__``), and releasing it turns the wait into a
    ``FutureCancelledError`` traceback on the event loop, for nothing to free."""
    for f in futures or []:
        f.release()
    owned = [(a._address, a._future) for a in actors if getattr(a, "_future", None) is not None]
    if not owned or owned[0][1].client.status != "running":
        return  # no handle of a client, or no scheduler to tell
    live = worker_info(owned[0][1].client)
    for address, own in owned:
        if address in live:
            own.release()
    forget_sent_messages(owned[0][1].client)


def forget_sent_messages(client: Client) -> None:
    """Drop the copies of recent messages distributed keeps for debugging (up to 1000 per
    stream, ``BatchedSend.recent_message_log``). An in-process scheduler keeps them as live
    objects: the arguments of the tasks that started actors and replicas, actor handles among
    them, each with a future on its actor's key, so a finished run's actors stayed alive until
    1000 more messages had gone by."""
    stream = getattr(client, "scheduler_comm", None)
    if stream is not None:
        stream.recent_message_log.clear()
    client.run_on_scheduler(_forget_on_scheduler)


def _forget_on_scheduler(dask_scheduler) -> None:
    for stream in [*dask_scheduler.stream_comms.values(), *dask_scheduler.client_comms.values()]:
        stream.recent_message_log.clear()


class HandleVariable:
    """A Dask ``Variable`` whose value (actor handles and all) travels pickled as bytes."""

    def __init__(self, name: str, client: Client | None = None):
        self.var = Variable(name, client=client)

    def set(self, value, timeout: float | None = None) -> None:
        self.var.set(pickle.dumps(value), timeout=timeout)

    def get(self, timeout: float):
        return pickle.loads(self.var.get(timeout=timeout))

    def delete(self) -> None:
        self.var.delete()


class LocalActor:
    """An actor that lives in this very worker process, called without leaving it.

    A call from a task to an actor of the same worker would otherwise be serialised, sent over
    loopback TCP and read back by the worker's own event loop, both ways, on the cores the
    replica computes on. Here it is submitted straight to the worker's actor thread, the thread
    distributed runs every actor method on, so the actor still sees one method at a time; arrays
    travel by reference (a replica reuses a push buffer only after the push was acknowledged).
    Calls return ``concurrent.futures.Future`` objects, which wait like actor futures.
    """

    def __init__(self, actor, worker):
        self._obj = worker.state.actors[actor.key]
        self._executor = worker.executors["actor"]
        self._address = actor._address
        self.key = actor.key

    def __getattr__(self, name):
        method = getattr(self._obj, name)
        return lambda *args: self._executor.submit(method, *args)


def actor_loop(actor):
    """The asyncio loop a distributed actor handle sends its calls from (its worker's, or its
    client's in a driver); None for a ``LocalActor``, whose calls never leave the process."""
    if isinstance(actor, LocalActor):
        return None
    return actor._io_loop.asyncio_loop


def local_actor(actor):
    """``actor`` itself, or a ``LocalActor`` when it lives in the worker this code runs in."""
    try:
        worker = get_worker()
    except ValueError:
        return actor
    if actor._address == worker.address and actor.key in worker.state.actors:
        return LocalActor(actor, worker)
    return actor


@contextlib.contextmanager
def prompt_streams(client: Client, interval: float = PROMPT_INTERVAL):
    """While inside: ``client``'s messages to the scheduler, and the scheduler's to its workers
    and to ``client``, wait at most ``interval`` for their batch; restored on the way out.

    Measured on Sandblaster's floor (2 workers, 2 cores): 22-28 ms per L-BFGS iteration
    against 28-34 ms with distributed's batching. A worker that joins meanwhile keeps the
    default. A scheduler that cannot run the change (it cannot import daskbelief, say) keeps
    its own batching: that costs time, nothing else. More, smaller messages cost the scheduler
    more work; on a cluster shared with others, dask config ``daskbelief.prompt-streams:
    false`` leaves distributed's batching alone."""
    if not dask.config.get("daskbelief.prompt-streams", True):
        yield
        return
    own = client.scheduler_comm.interval
    try:
        saved = client.run_on_scheduler(_set_intervals, interval, client.id)
    except Exception:  # noqa: BLE001 -- an optimisation only: the run goes on without it
        saved = None
    client.scheduler_comm.interval = interval
    try:
        yield
    finally:
        if client.scheduler_comm is not None:
            client.scheduler_comm.interval = own
        if saved is not None and client.status == "running":
            with contextlib.suppress(Exception):  # a scheduler lost meanwhile has no streams
                client.run_on_scheduler(_restore_intervals, saved)


def _streams(scheduler, client_id: str) -> dict:
    """The scheduler's batched streams to its workers and to one client, by address or id."""
    streams = dict(scheduler.stream_comms)
    if client_id in scheduler.client_comms:
        streams[client_id] = scheduler.client_comms[client_id]
    return streams


def _set_intervals(interval: float, client_id: str, dask_scheduler=None) -> dict:
    """On the scheduler: set the streams' batch intervals; the previous ones, for restoring."""
    saved = {}
    for key, stream in _streams(dask_scheduler, client_id).items():
        saved[key], stream.interval = stream.interval, interval
    return {"client": client_id, "intervals": saved}


def _restore_intervals(saved: dict, dask_scheduler=None) -> None:
    """On the scheduler: the intervals ``_set_intervals`` replaced, on the streams still there."""
    streams = _streams(dask_scheduler, saved["client"])
    for key, interval in saved["intervals"].items():
        if key in streams:
            streams[key].interval = interval
