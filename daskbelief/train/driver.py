"""The Downpour driver: what the client process does while the replicas train.

It waits for the replica tasks and, on the side, evaluates the test set, reports shard counters,
writes checkpoints, and recreates any parameter shard whose worker died (Dask actors are not
resilient: the driver restores the shard from the latest checkpoint, or from the initial
parameters before there is one, on a live worker and publishes the new server handle, which the
replicas and their blocks pick up). A replica task that Dask gave up on (``KilledWorker``) is
submitted again and resumes from its reported progress. Every wait has a deadline; what cannot be
survived raises ``RunLost``. Ctrl-C / SIGTERM stops the replicas, writes a final checkpoint and
re-raises.
"""
from __future__ import annotations

import time

import dask.config
import numpy as np
from distributed.scheduler import KilledWorker

from daskbelief import waits
from daskbelief.monitor import events
from daskbelief.ps import checkpoint
from daskbelief.train.evaluate import announce_test, evaluate_rows, finish, test_row
from daskbelief.train.errors import RunLost
from daskbelief.train.recovery import gone, pick_worker, scheduler_lost, updates_missing
from daskbelief.train.run import Every
from daskbelief.workarounds import HandleVariable, stuck_without_worker, worker_info

CALL_TIMEOUT = 30.0         # seconds the driver waits for a shard before giving up on it this time
CHECKPOINT_TIMEOUT = 300.0  # seconds for every shard to write its part of a checkpoint
MAX_RESUBMITS = 10          # times one replica task is submitted again after Dask gave up on it


def recovery_timeout() -> float:
    """Seconds a lost shard may take to come back (a live worker to appear, its actor to start)
    before the run is lost: dask config ``daskbelief.recovery-timeout``, default 300."""
    return float(dask.config.get("daskbelief.recovery-timeout", 300.0))


def stall_timeout() -> float:
    """Seconds every replica may go without a push before the run is lost as hung: dask config
    ``daskbelief.stall-timeout``, default 300."""
    return float(dask.config.get("daskbelief.stall-timeout", 300.0))


class Driver:
    """Periodic duties around a running set of replica futures; see the module docstring.

    ``resubmit(r)``: a new future for replica ``r`` (its task submitted again); ``blocks``: the
    names of the Variables holding each model-parallel replica's current ``Blocks``;
    ``initial``: the run's start (a ``sources.Ranged``), from which a shard lost before any
    checkpoint is remade, its range alone; ``evaluator(ps, store, rows)``: the test metrics
    at the server's parameters, when not computed here (``evaluate.BlockEvaluator``).
    """

    def __init__(self, client, run: str, ps, futures, model, test_store, coordination: dict, *,
                 blocks=(), resubmit=None,
                 eval_every=None, eval_rows: int = 10_000, max_seconds=None, checkpoint_dir=None,
                 checkpoint_every=None, initial=None, checkpoint_meta=None,
                 watch_every: float = 1.0, evaluator=None, on_snapshot=None):
        self.client, self.run, self.ps, self.futures = client, run, ps, list(futures)
        self.blocks = list(blocks)
        self.resubmit = resubmit
        self.model, self.test_store = model, test_store
        self.coordination, self.generation = coordination, 0
        self.eval_rows, self.max_seconds = eval_rows, max_seconds
        self.checkpoint_dir = checkpoint_dir
        self.initial, self.meta = initial, checkpoint_meta or {}
        self.evaluator, self.on_snapshot = evaluator, on_snapshot
        self.started = time.time()
        self.seconds = 0.0
        self.test_rows: list[dict] = []
        self.versions = [0] * len(ps.shards)
        self._moved = (None, time.time())  # the shards' versions last seen to change, and when
        self.updates_lost = 0       # net of what adopted copies regained (``updates_regained``)
        self.updates_regained = 0
        self.recoveries = 0
        self._adopted: dict[int, int] = {}  # shard -> updates its adopted copies brought, as reported
        self.resubmits = [0] * len(self.futures)
        self._lost_since: dict[int, float] = {}  # shard -> when it was first found lost
        self.duties = {"eval": Every(eval_every), "watch": Every(watch_every),
                       "checkpoint": Every(checkpoint_every)}

    def wait(self) -> list[dict]:
        """Block until every replica finished; return their outcomes (re-raising a failure)."""
        try:
            while True:
                self.check_scheduler()
                if self._failed() or self._finished():
                    break
                time.sleep(0.05)
                self._tick()
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except RunLost:
            raise
        except Exception:
            self.check_scheduler(probe=True)
            raise
        self.seconds = time.time() - self.started
        self.check_scheduler()
        return self._outcomes()

    def _finished(self) -> bool:
        """Every replica done, none of them failed: a replica Dask gave up on is done too, and is
        ``_failed``'s to submit again rather than an outcome."""
        return all(f.done() and f.status != "error" for f in self.futures)

    def _outcomes(self) -> list[dict]:
        return waits.results(self.futures, timeout=CALL_TIMEOUT, what="the replicas' outcomes")

    def final(self, gather: bool = True) -> tuple:
        """The trained parameters, the shards' counters and the update rule's state (joined into
        model-sized arrays by name), after the final checkpoint when the run keeps them;
        ``gather=False``: the counters alone (parameters and state None), the model staying in
        that checkpoint (no process holds it whole).

        All of it comes from one recovering attempt: a shard lost at any point of it is
        recreated and the whole attempt starts again, so the parameters, the state and the
        checkpoint returned always describe the same server."""
        def attempt():
            try:
                parts = (self.ps.state_dicts(timeout=CALL_TIMEOUT, give_up=self._server_gone)
                         if gather else None)
                stats = self.ps.stats(timeout=CALL_TIMEOUT, give_up=self._server_gone)
                if self.checkpoint_dir is not None:
                    self.checkpoint()
            except Exception:  # noqa: BLE001 -- a shard lost: recover it and ask again
                self.check_scheduler(probe=True)
                self._watch()
                return None
            if parts is None:
                return None, stats, None
            return (np.concatenate([p["params"] for p in parts]), stats,
                    {name: np.concatenate([p["state"][name] for p in parts]) for name in parts[0]["state"]})
        return waits.until(attempt, timeout=recovery_timeout(), every=0.5,
                           what="the final parameters and state from every shard")

    def check_scheduler(self, probe: bool = False) -> None:
        """Raise ``RunLost`` when the connection to the scheduler is gone (``probe``: or the
        scheduler does not answer a call, after some other call failed)."""
        if self.client.status != "running" or (probe and scheduler_lost(self.client)):
            raise RunLost(f"the scheduler at {self.client.scheduler.address}", self.last_checkpoint())

    def _failed(self) -> bool:
        """True when a replica failed for good; a replica Dask gave up on is submitted again."""
        for r, f in enumerate(self.futures):
            if f.status != "error":
                continue
            if not isinstance(f.exception(timeout=CALL_TIMEOUT), KilledWorker) or self.resubmit is None:
                return True
            self._submit_again(r, "its workers died while running it")
        return False

    def _submit_again(self, r: int, why: str) -> None:
        """Replica ``r``'s task submitted anew (it resumes from its reported progress)."""
        if self.resubmits[r] >= MAX_RESUBMITS:
            raise RunLost(f"replica {r}: submitted {MAX_RESUBMITS} times over ({why})",
                          self.last_checkpoint())
        self.resubmits[r] += 1
        self.client.cancel([self.futures[r]])
        self.futures[r] = self.resubmit(r)
        events.emit(events.RUN, run=self.run, kind="replica-restarted", replica=r,
                    resubmits=self.resubmits[r], reason=why)

    def last_checkpoint(self):
        """The latest complete checkpoint of this run's directory, or None."""
        return checkpoint.latest(self.checkpoint_dir) if self.checkpoint_dir else None

    def _tick(self) -> None:
        if self.max_seconds is not None and time.time() - self.started > self.max_seconds:
            self.coordination["stop"].set()  # replicas stop at their next report
        if self.duties["watch"].due():
            self._watch()
        if self.duties["eval"].due():
            if self.on_snapshot is not None:
                self._snapshot()
            elif self.test_store is not None:
                self._evaluate()
        if self.checkpoint_dir is not None and self.duties["checkpoint"].due():
            try:
                self.checkpoint()
            except Exception as e:  # noqa: BLE001 -- a shard lost meanwhile: the next watch recovers it
                events.emit(events.RUN, run=self.run, kind="checkpoint-failed", error=repr(e)[:500])

    def _server_gone(self):
        """A ``give_up`` for waits on the shards: an error once a shard's worker has left."""
        return gone(self.client, self.ps.addresses(), "the parameter server")()

    def _watch(self) -> None:
        """Resubmit replicas stuck without a worker; recreate shards whose worker left; otherwise
        publish the shards' counters."""
        live = list(worker_info(self.client))
        if live and self.resubmit is not None:
            for r in stuck_without_worker(self.client, self.futures):
                self._submit_again(r, "its home worker died")
        lost = [i for i, addr in enumerate(self.ps.addresses()) if addr not in live]
        if lost:
            self._recover(lost, live)
            return
        try:
            stats = self.ps.stats(timeout=CALL_TIMEOUT, give_up=self._server_gone)
        except Exception:  # noqa: BLE001 -- a worker dying right now; the next watch sees it
            return
        self.report_shards(stats)
        self._check_progress()

    def _check_progress(self) -> None:
        """``RunLost`` once no shard's version moved for ``stall_timeout()`` seconds: replicas
        that all stopped pushing without failing (a hang) end the run, naming it, instead of
        keeping it waiting for ever."""
        now, (seen, since) = time.time(), self._moved
        if self.versions != seen:
            self._moved = (list(self.versions), now)
        elif now - since > stall_timeout():
            raise RunLost(f"every replica: none pushed for {now - since:.0f}s", self.last_checkpoint())

    def report_shards(self, stats: list[dict]) -> None:
        """Remember the shards' versions and publish their counters as SHARD events; a copy a
        recreated shard adopted since the last report takes what it brought off the updates
        lost (``shard-adopted``)."""
        for s in stats:
            self.versions[s["shard"]] = s["version"]
            self._count_adopted(s["shard"], s.get("adopted", 0))
            events.emit(events.SHARD, run=self.run, **{k: v for k, v in s.items()
                                                      if k not in ("per_replica", "replica_steps")})

    def _count_adopted(self, index: int, adopted: int) -> None:
        """Updates shard ``index`` regained from replicas' copies since last seen: no longer lost
        (at most what its recoveries counted lost)."""
        regained = min(adopted - self._adopted.get(index, 0), self.updates_lost)
        self._adopted[index] = adopted
        if regained > 0:
            self.updates_lost -= regained
            self.updates_regained += regained
            events.emit(events.RUN, run=self.run, kind="shard-adopted", shard=index,
                        updates_regained=regained)

    def _recover(self, lost: list[int], live: list[str]) -> None:
        """Bring the ``lost`` shards back on live workers; what fails is retried at the next watch
        until ``recovery_timeout()`` seconds have passed since the shard was found lost."""
        now = time.time()
        for i in lost:
            self._lost_since.setdefault(i, now)
        if not live:
            try:
                live = waits.until(lambda: list(worker_info(self.client)), timeout=recovery_timeout(),
                                   what="a live worker to recreate the parameter shards on", every=0.5)
            except waits.WaitTimeout as e:
                raise RunLost("every worker", self.last_checkpoint()) from e
        # the lost shards' last reported versions count too: with every shard lost, they are all
        # that tells how many updates the restored slices miss
        versions = {**{i: self.versions[i] for i in lost}, **self._versions_now(set(lost))}
        for i in lost:
            try:
                self._recover_shard(i, live, versions)
            except Exception as e:  # noqa: BLE001 -- its new worker died too, say: retry next watch
                if time.time() - self._lost_since[i] > recovery_timeout():
                    raise RunLost(f"parameter shard {i} (not recreated: {e})", self.last_checkpoint()) from e
                events.emit(events.RUN, run=self.run, kind="recovery-failed", shard=i, error=repr(e)[:500])
                return
        self.generation += 1
        self._moved = (None, time.time())  # the replicas reconnect from now
        self.coordination["ps"].set((self.generation, self.ps))
        self._hand_over()

    def _recover_shard(self, index: int, live: list[str], versions: dict[int, int]) -> None:
        """Shard ``index`` restored from the latest checkpoint (or the initial parameters).

        The updates lost are the most any shard received since that checkpoint (``versions``: a
        survivor's now, a lost shard's when last reported, so a lower bound when every shard is
        lost): every push of a replica goes to every shard, so that is what the slice is missing.
        """
        started = time.time()
        a, b = self.ps.ranges[index]
        path = self.last_checkpoint()
        saved = [0] * len(self.ps.shards)
        if path is not None:
            ckpt = checkpoint.load(path, a, b)
            saved = ckpt.versions
            snapshot = {"params": ckpt.params, "state": ckpt.state, "version": saved[index],
                        "state_updates": saved[index] - ckpt.state_lag(a, b)}
        else:
            snapshot = {"params": self.initial.values(a, b), "state": {}, "version": 0}
        # a replica's copy of the lost slice is adopted if newer (``ParameterShard.adopt``)
        snapshot["replaced_in"] = self.generation + 1
        lost_worker = self.ps.addresses()[index]
        worker = pick_worker(live, self.ps.addresses())
        self.ps = self.ps.replace_shard(self.client, index, snapshot, worker, timeout=recovery_timeout(),
                                        give_up=gone(self.client, [worker], f"recreating shard {index}"))
        missing = updates_missing(versions, saved, index)
        self.updates_lost += missing
        self.recoveries += 1
        self.versions[index] = snapshot["version"]
        self._adopted.pop(index, None)
        del self._lost_since[index]
        events.emit(events.RUN, run=self.run, kind="shard-recovered", shard=index,
                    updates_lost=missing, checkpoint=str(path) if path else "", worker=worker,
                    lost_worker=lost_worker, seconds=time.time() - started)

    def _hand_over(self) -> None:
        """Give every model-parallel replica's blocks the recovered server (they talk to the
        shards themselves); a block lost too is its replica's to recreate."""
        replies = []
        for name in self.blocks:
            try:
                blocks = HandleVariable(name, client=self.client).get(timeout=CALL_TIMEOUT)
            except Exception:  # noqa: BLE001 -- not published yet: the replica reads the server itself
                continue
            replies += [a.set_server(self.ps) for a in blocks.actors]
        for reply in replies:
            try:
                waits.result(reply, timeout=5.0, what="a block to take the recovered server")
            except Exception:  # noqa: BLE001 -- that block is gone: its replica recreates it
                continue

    def _versions_now(self, lost: set[int]) -> dict[int, int]:
        """Current versions of the shards that are alive (the last ones seen if they do not answer)."""
        out = {}
        for i, shard in enumerate(self.ps.shards):
            if i in lost:
                continue
            try:
                out[i] = self.ps.wait(shard.stats(), f"shard {i}'s counters", CALL_TIMEOUT,
                                      gone(self.client, [self.ps.addresses()[i]], f"shard {i}"))["version"]
            except Exception:  # noqa: BLE001 -- about to be found lost as well
                out[i] = self.versions[i]
        return out

    def _evaluate(self) -> None:
        try:
            metrics = self.test_metrics(min(self.eval_rows, self.test_store.n))
        except Exception:  # noqa: BLE001 -- a shard or block is being recovered; next time
            return
        row = test_row(time.time() - self.started, None, metrics)
        self.test_rows.append(row)
        announce_test(self.run, row)

    def _snapshot(self) -> None:
        """Hand ``on_snapshot`` the parameters the shards hold now (``downpour(on_snapshot=)``)."""
        try:
            params, _ = self.ps.fetch(timeout=CALL_TIMEOUT, give_up=self._server_gone)
        except Exception:  # noqa: BLE001 -- a shard is being recovered; next time
            return
        self.on_snapshot(time.time() - self.started, params)

    def test_metrics(self, rows: int) -> dict:
        """Mean loss (and accuracy) over the first ``rows`` test rows at the server's current
        parameters: through the run's ``evaluator`` (a model-parallel run's blocks), or here
        on the whole vector fetched."""
        if self.evaluator is not None:
            return self.evaluator(self.ps, self.test_store, rows)
        params, _ = self.ps.fetch(timeout=CALL_TIMEOUT, give_up=self._server_gone)
        return finish([evaluate_rows(self.model, params, self.test_store, 0, rows)],
                      self.test_store.task)

    def checkpoint(self):
        """Write a checkpoint of every shard now; returns its path."""
        started = time.time()
        path = checkpoint.save(self.checkpoint_dir, self.ps, model=self.meta.get("model", {}),
                               config=self.meta.get("config", {}),
                               normaliser=self.meta.get("normaliser"),
                               counters={"run": self.run, "seconds": time.time() - self.started},
                               keep=self.meta.get("keep", 3), timeout=CHECKPOINT_TIMEOUT,
                               give_up=self._server_gone, algorithm="downpour")
        events.emit(events.RUN, run=self.run, kind="checkpoint", path=str(path),
                    seconds=time.time() - started)
        return path

    def _interrupted(self, grace: float = 60.0) -> None:
        """Stop the replicas, let them push what they hold, and checkpoint the result."""
        self.coordination["stop"].set()
        try:
            waits.until(lambda: all(f.done() for f in self.futures), timeout=grace,
                        what="the replicas to stop after an interrupt")
        except waits.WaitTimeout:
            pass  # checkpoint what the shards hold now
        if self.checkpoint_dir is not None:
            self.checkpoint()

    def close(self, grace: float = 5.0) -> None:
        """Stop any replica still running (released from the warm start too, given ``grace``
        seconds to return before its task is cancelled, unless no worker is left), end the
        lease, delete the run's Variables and release the shards."""
        self.coordination["lease"].stop()
        if self.client.status == "running":
            self.coordination["stop"].set()
            self.coordination["warm"].set()
            try:
                if worker_info(self.client):  # with no worker left, no replica can return
                    waits.until(lambda: all(f.done() for f in self.futures), timeout=grace,
                                what="the replicas to stop")
            except waits.WaitTimeout:
                pass  # cancelled below
            self.client.cancel(self.futures)
            for var in self.coordination["variables"]:  # the scheduler would keep the handles alive
                var.delete()
        self.ps.close()
