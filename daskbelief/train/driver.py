"""The Downpour driver: what the client process does while the replicas train.

It waits for the replica tasks and, on the side, evaluates the test set, reports shard counters,
writes checkpoints, and recreates any parameter shard whose worker died (Dask actors are not
resilient: the driver restores the shard from the latest checkpoint on a live worker and publishes
the new server handle, which the replicas pick up). Ctrl-C / SIGTERM stops the replicas, writes a
final checkpoint and re-raises.
"""
from __future__ import annotations

import time
from collections import Counter

from daskbelief.cluster import worker_info
from daskbelief.monitor import events
from daskbelief.ps import checkpoint
from daskbelief.train.evaluate import announce_test, evaluate_rows, finish, test_row


CALL_TIMEOUT = 30.0         # seconds the driver waits for a shard before giving up on it this time
CHECKPOINT_TIMEOUT = 300.0  # seconds for every shard to write its part of a checkpoint


def updates_missing(alive: dict[int, int], saved: list[int]) -> int:
    """Updates a shard restored from a checkpoint lacks: the most any surviving shard received
    since that checkpoint (``alive``: shard -> version now; ``saved``: versions at the checkpoint)."""
    return max((max(v - saved[i], 0) for i, v in alive.items()), default=0)


def pick_worker(live: list[str], holders: list[str]) -> str:
    """The live worker holding the fewest shards: where a recreated shard should go."""
    load = Counter(h for h in holders if h in live)
    return min(sorted(live), key=lambda w: load[w])


class Driver:
    """Periodic duties around a running set of replica futures; see the module docstring."""

    def __init__(self, client, run: str, ps, futures, model, test_store, coordination: dict, *,
                 blocks=(),
                 eval_every=None, eval_rows: int = 10_000, max_seconds=None, checkpoint_dir=None,
                 checkpoint_every=None, initial=None, checkpoint_meta=None,
                 watch_every: float = 1.0):
        self.client, self.run, self.ps, self.futures = client, run, ps, futures
        self.blocks = [b for b in blocks if b is not None]  # model-parallel replicas' block actors
        self.model, self.test_store = model, test_store
        self.coordination, self.generation = coordination, 0
        self.eval_every, self.eval_rows, self.max_seconds = eval_every, eval_rows, max_seconds
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.initial, self.meta = initial, checkpoint_meta or {}
        self.watch_every = watch_every
        self.started = time.time()
        self.seconds = 0.0
        self.test_rows: list[dict] = []
        self.versions = [0] * len(ps.shards)
        self.updates_lost = 0
        self.recoveries = 0
        self._due = {"eval": self.started, "watch": self.started, "checkpoint": self.started}

    def wait(self) -> list[dict]:
        """Block until every replica finished; return their outcomes (re-raising a failure)."""
        try:
            while not all(f.done() for f in self.futures):
                if any(f.status == "error" for f in self.futures):
                    break
                time.sleep(0.05)
                self._tick()
        except KeyboardInterrupt:
            self._interrupted()
            raise
        self.seconds = time.time() - self.started
        return self.client.gather(self.futures)

    def _every(self, duty: str, period) -> bool:
        if period is None or time.time() < self._due[duty] + period:
            return False
        self._due[duty] = time.time()
        return True

    def _tick(self) -> None:
        if self.max_seconds is not None and time.time() - self.started > self.max_seconds:
            self.coordination["stop"].set()  # replicas stop at their next report
        if self._every("watch", self.watch_every):
            self._watch()
        if self.test_store is not None and self._every("eval", self.eval_every):
            self._evaluate()
        if self.checkpoint_dir is not None and self._every("checkpoint", self.checkpoint_every):
            try:
                self.checkpoint()
            except Exception as e:  # noqa: BLE001 -- a shard lost meanwhile: the next watch recovers it
                events.emit(events.RUN, run=self.run, kind="checkpoint-failed", error=repr(e)[:500])

    def _watch(self) -> None:
        """Recreate shards whose worker left; otherwise publish the shards' counters."""
        live = list(worker_info(self.client))
        lost = [i for i, addr in enumerate(self.ps.addresses()) if addr not in live]
        for i in lost:
            self._recover(i, live, set(lost))
        if lost:
            return
        try:
            stats = self.ps.stats(timeout=CALL_TIMEOUT)
        except Exception:  # noqa: BLE001 -- a worker dying right now; the next watch sees it
            return
        self.report_shards(stats)

    def report_shards(self, stats: list[dict]) -> None:
        """Remember the shards' versions and publish their counters as SHARD events."""
        for s in stats:
            self.versions[s["shard"]] = s["version"]
            events.emit(events.SHARD, run=self.run, **{k: v for k, v in s.items()
                                                      if k not in ("per_replica", "replica_steps")})

    def _recover(self, index: int, live: list[str], lost: set[int]) -> None:
        """Bring shard ``index`` back on a live worker from the latest checkpoint.

        The updates lost are those the surviving shards received since that checkpoint: every
        push of a replica goes to every shard, so that is what the restored slice is missing.
        """
        while not live:
            time.sleep(0.5)
            live = list(worker_info(self.client))
        a, b = self.ps.ranges[index]
        path = checkpoint.latest(self.checkpoint_dir) if self.checkpoint_dir else None
        saved = [0] * len(self.ps.shards)
        if path is not None:
            ckpt = checkpoint.load(path, a, b)
            saved = ckpt.versions
            snapshot = {"params": ckpt.params, "state": ckpt.state, "version": saved[index]}
        else:
            snapshot = {"params": self.initial[a:b], "state": {}, "version": 0}
        missing = updates_missing(self._versions_now(lost), saved)
        self.updates_lost += missing
        self.recoveries += 1
        self.ps = self.ps.replace_shard(self.client, index, snapshot, pick_worker(live, self.ps.addresses()))
        self.versions[index] = snapshot["version"]
        self.generation += 1
        self.coordination["ps"].set((self.generation, self.ps))
        for blocks in self.blocks:  # they talk to the shards themselves
            for actor in blocks.actors:
                try:
                    actor.set_server(self.ps).result(timeout=CALL_TIMEOUT)
                except Exception:  # noqa: BLE001 -- a block lost too: its replica fails, reported
                    continue
        events.emit(events.RUN, run=self.run, kind="shard-recovered", shard=index,
                    updates_lost=missing, checkpoint=str(path) if path else "")

    def _versions_now(self, lost: set[int]) -> dict[int, int]:
        """Current versions of the shards that are alive (the last ones seen if they do not answer)."""
        out = {}
        for i, shard in enumerate(self.ps.shards):
            if i in lost:
                continue
            try:
                out[i] = shard.stats().result(timeout=CALL_TIMEOUT)["version"]
            except Exception:  # noqa: BLE001 -- about to be found lost as well
                out[i] = self.versions[i]
        return out

    def _evaluate(self) -> None:
        try:
            params, _ = self.ps.fetch(timeout=CALL_TIMEOUT)
        except Exception:  # noqa: BLE001 -- a shard is being recovered; evaluate next time
            return
        part = evaluate_rows(self.model, params, self.test_store, 0,
                             min(self.eval_rows, self.test_store.n))
        row = test_row(time.time() - self.started, None, finish([part], self.test_store.task))
        self.test_rows.append(row)
        announce_test(self.run, row)

    def checkpoint(self):
        """Write a checkpoint of every shard now; returns its path."""
        path = checkpoint.save(self.checkpoint_dir, self.ps, model=self.meta.get("model", {}),
                               config=self.meta.get("config", {}),
                               normaliser=self.meta.get("normaliser"),
                               counters={"run": self.run, "seconds": time.time() - self.started},
                               keep=self.meta.get("keep", 3), timeout=CHECKPOINT_TIMEOUT)
        events.emit(events.RUN, run=self.run, kind="checkpoint", path=str(path))
        return path

    def _interrupted(self, grace: float = 60.0) -> None:
        """Stop the replicas, let them push what they hold, and checkpoint the result."""
        self.coordination["stop"].set()
        deadline = time.time() + grace
        while not all(f.done() for f in self.futures) and time.time() < deadline:
            time.sleep(0.1)
        if self.checkpoint_dir is not None:
            self.checkpoint()

    def close(self) -> None:
        """Stop any replica still running and release the shards."""
        self.coordination["stop"].set()
        self.client.cancel(self.futures)
        self.ps.close()
