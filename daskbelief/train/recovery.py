"""Surviving lost workers, shared by every engine: what was lost, where to rebuild it, the driver's
lease, and the one error for what cannot be survived.

* ``lost_workers`` / ``gone`` say which of some workers have left the cluster (the scheduler's
  view, fetched now); ``gone`` is a ``give_up`` for ``waits``: stop waiting for an actor whose
  worker left.
* ``pick_worker`` places a recreated actor; ``updates_missing`` counts what a restored shard lacks.
* ``Lease`` (on the driver) and ``LeaseWatch`` (in a replica): the driver renews a lease every
  second from a thread of its own; a replica that sees it unchanged for the timeout written in it
  (``lease_timeout()``) concludes that its driver is gone and stops, so a dead driver leaves
  nothing running.
* ``errors.RunLost``: the run cannot go on (the scheduler, every worker, or a recovery that
  cannot succeed); it names what was lost and the last complete checkpoint, which the CLI turns
  into one line with the command that resumes.
"""
from __future__ import annotations

import threading
import time
from collections import Counter

import dask.config
from distributed import Variable

from daskbelief.train.errors import DriverGone
from daskbelief.workarounds import worker_info

LEASE_EVERY = 1.0     # seconds between the driver's lease renewals
LEASE_TIMEOUT = 10.0  # seconds without a renewal after which a replica stops


def lost_workers(client, addresses) -> list[str]:
    """Those of ``addresses`` that are no longer workers of the cluster. ``ConnectionError``
    once the client has lost the scheduler: asking it would wait out the connect timeout."""
    if client.status != "running":
        raise ConnectionError(f"lost the scheduler (the client is {client.status})")
    live = worker_info(client)
    return sorted({a for a in addresses if a not in live})


def gone(client, addresses, what: str):
    """A ``give_up`` for ``waits``: an error naming ``what`` once any of ``addresses`` has left."""
    def check():
        lost = lost_workers(client, addresses)
        return ConnectionError(f"{what}: worker {', '.join(lost)} left the cluster") if lost else None
    return check


def scheduler_lost(client, timeout: float = 5.0) -> bool:
    """True when the client's connection to the scheduler is gone or it does not answer within
    ``timeout`` seconds."""
    if client.status != "running":
        return True
    try:
        client.sync(client.scheduler.identity, callback_timeout=timeout)
    except Exception:  # noqa: BLE001 -- whatever the failure, there is no scheduler to talk to
        return True
    return False


def pick_worker(live: list[str], holders: list[str]) -> str:
    """The live worker holding the fewest of ``holders``' actors: where a recreated one goes."""
    load = Counter(h for h in holders if h in live)
    return min(sorted(live), key=lambda w: load[w])


def updates_missing(alive: dict[int, int], saved: list[int], restored: int | None = None) -> int:
    """Updates a shard restored from a checkpoint lacks: the most any surviving shard received
    since that checkpoint (``alive``: shard -> version now; ``saved``: versions at the checkpoint).

    ``restored``: the index of the shard restored, whose own saved version is then the base for
    every shard: a checkpoint reads its shards one after another while pushes travel, so a
    survivor may have been saved an update or two ahead of it, and every push reaches every
    shard, so the restored slice lacks those too."""
    def base(i: int) -> int:
        return saved[i if restored is None else restored]
    return max((max(v - base(i), 0) for i, v in alive.items()), default=0)


def lease_timeout() -> float:
    """Seconds a replica goes on without its driver's lease renewed: dask config
    ``daskbelief.lease-timeout`` of the driver's process, default ``LEASE_TIMEOUT``."""
    return float(dask.config.get("daskbelief.lease-timeout", LEASE_TIMEOUT))


class Lease(threading.Thread):
    """The driver's heartbeat: ``[counter, timeout]`` in the Dask Variable ``name``, the counter
    renewed every ``LEASE_EVERY`` seconds by this daemon thread until ``stop()`` (or the process
    dies). The timeout travels with it: the driver says how long its replicas may wait for it."""

    def __init__(self, client, name: str):
        super().__init__(daemon=True, name=f"lease-{name}")
        self.var, self.count, self.timeout = Variable(name, client=client), 0, lease_timeout()
        self.var.set([0, self.timeout])
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(LEASE_EVERY):
            self.count += 1
            try:
                self.var.set([self.count, self.timeout], timeout=LEASE_EVERY * 5)
            except Exception:  # noqa: BLE001 -- the scheduler unreachable: the driver finds out itself
                continue

    def stop(self) -> None:
        self._stopped.set()


class LeaseWatch:
    """A replica's view of its driver's ``Lease``: ``expired()`` is cheap to call every step (it
    reads the Variable at most once a second) and true once the lease went unrenewed for the
    timeout the driver wrote into it (``timeout`` until it is first read)."""

    def __init__(self, name: str, timeout: float = LEASE_TIMEOUT):
        self.var, self.timeout = Variable(name), timeout
        self.value, self.renewed, self.checked = None, time.monotonic(), 0.0

    def give_up(self):
        """A ``give_up`` for ``waits``: ``DriverGone`` once the lease expired."""
        return DriverGone("the driver's lease expired") if self.expired() else None

    def expired(self) -> bool:
        now = time.monotonic()
        if now - self.checked < LEASE_EVERY:
            return False
        self.checked = now
        try:
            value = self.var.get(timeout=LEASE_EVERY)
        except Exception:  # noqa: BLE001 -- unreadable counts as unrenewed
            value = self.value
        if value != self.value:
            self.value, self.renewed = value, now
            self.timeout = value[1]
        return now - self.renewed > self.timeout
