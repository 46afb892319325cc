"""Sandblaster L-BFGS: a coordinator over shard-resident vectors, portions balanced by Dask.

The coordinator (this process) runs ``daskbelief.optim.lbfgs.lbfgs`` -- the very code the
reference trainer runs -- over ``ShardedVectors``: the parameters, gradient, search direction and
the s/y history live sliced on the parameter shards, which execute dot, axpy, scale, copy and
multiply on their slices and return scalars. The coordinator never holds the parameter vector
(only the initial point, to seed the shards, and the final one, to return it).

Each objective evaluation (``BatchObjective``; the line search's included) cuts the batch into
many small portions, submitted as Dask tasks (``sandblaster_tasks.run_portion``): the scheduler
hands the next one to whichever worker is free, so faster workers do more. Workers add the
float32 gradients of the portions they win into a float64 accumulator, push it to the shards
every few portions and at the end; each shard then finishes its slice of the gradient with the
reference's ``finish_gradient``. The arithmetic is the reference's up to the order of float64
additions, so the iterates agree with ``train_lbfgs`` to about 1e-7 relative.

Stragglers: once most portions are done, a portion running far longer than the typical one gets
a backup copy on another worker, and so does one still waiting to start (Dask queued it behind a
straggler) -- ``backup.portions_to_back_up``. A claim ledger applies the first copy to finish and
drops the others, so every portion counts exactly once. A worker lost during
an evaluation: Dask reruns its tasks elsewhere; if it took won-but-unpushed contributions with
it, the evaluation starts again under a new tag (the shards refuse the old tag's contributions),
so the iterates are unchanged. Losing a *shard* is out of scope here (Downpour's driver handles
that); ``shard_workers`` puts the shards on machines you trust.

Checkpoints (``checkpoint_dir``): between iterations, every ``checkpoint_every`` seconds, at the
end, and when Ctrl-C / SIGTERM interrupts an evaluation, each shard writes its slice of the
iterate and of the L-BFGS vectors in use, with the L-BFGS scalars (``LbfgsState``) beside them;
``resume_from`` continues from one exactly where the run stood.
"""
from __future__ import annotations

import math
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from numbers import Real

import numpy as np
from distributed import wait

from daskbelief.checks import check_integer
from daskbelief.cluster import client_or_local, require_workers, warm_workers, worker_info
from daskbelief.data import open_store
from daskbelief.monitor import events
from daskbelief.optim.lbfgs import LbfgsResult, LbfgsState, lbfgs
from daskbelief.ps import checkpoint
from daskbelief.ps.policy import place_groups
from daskbelief.ps.server import ParameterServer
from daskbelief.train.backup import MIN_DONE_FRACTION, portions_to_back_up
from daskbelief.train.evaluate import announce_test, evaluate, evaluate_rows, finish, test_row
from daskbelief.train.objective import portions
from daskbelief.train.partition import as_plan
from daskbelief.train.partitioned import Blocks
from daskbelief.train.result import TrainResult
from daskbelief.train.sandblaster_tasks import (PortionLedger, PortionPlan, flush_worker,
                                                forget_run, run_portion)
from daskbelief.train.sharded_vectors import ShardedVectors, assemble, call_all

PORTIONS_PER_THREAD = 8   # default portion size: about this many portions per worker thread
MIN_PORTION_ROWS = 16     # ... but no smaller than this: a task has a fixed cost
MAX_RESTARTS = 5          # an evaluation restarted this often means the cluster is failing
TAIL_POLL = 0.02          # seconds between backup decisions once most portions are done
IDLE_RULE = {"name": "sgd", "lr": 0.0}  # the shards' Downpour rule: unused by Sandblaster


def default_portion_size(n_rows: int, threads: int) -> int:
    """Rows per portion: well under ``n_rows / threads`` (about ``PORTIONS_PER_THREAD`` portions
    per worker thread, so the load balances and a straggler holds up only a small part)."""
    return min(n_rows, max(MIN_PORTION_ROWS, math.ceil(n_rows / (PORTIONS_PER_THREAD * threads))))


def _number(name: str, value, minimum: float, *, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, "
                         f"got {value!r}")


def validate(model, store, test_store, *, shards, iterations, tolerance, ftol, history,
             portion_size, batch_rows, push_every, backups, eval_every, eval_rows, seed,
             max_seconds, slow_workers, checkpoint_every=None, checkpoint_keep=1) -> int:
    """Reject impossible settings before any work starts, naming the argument; returns the
    number of rows in the batch."""
    check_integer("shards", shards, 1)
    check_integer("iterations", iterations, 1)
    check_integer("history", history, 1)
    check_integer("push_every", push_every, 1)
    check_integer("eval_rows", eval_rows, 1)
    check_integer("seed", seed, 0)
    check_integer("checkpoint_keep", checkpoint_keep, 1)
    _number("tolerance", tolerance, 0.0)
    _number("ftol", ftol, 0.0)
    for name, value in (("eval_every", eval_every), ("max_seconds", max_seconds),
                        ("checkpoint_every", checkpoint_every)):
        if value is not None:
            _number(name, value, 0.0, strict=True)
    if not isinstance(backups, bool):
        raise ValueError(f"backups must be True or False, got {backups!r}")
    if shards > model.size:
        raise ValueError(f"shards={shards} is more than the model's {model.size} parameters")
    model.check_data(store.feature_shape, store.n_classes)
    if test_store is not None:
        model.check_data(test_store.feature_shape, test_store.n_classes)
    if batch_rows is not None:
        check_integer("batch_rows", batch_rows, 1)
        if batch_rows > store.n:
            raise ValueError(f"batch_rows={batch_rows} is more than the {store.n} rows of "
                             f"{store.url} ({store.split})")
    n_rows = store.n if batch_rows is None else int(batch_rows)
    if portion_size is not None:
        portions(n_rows, portion_size)  # its errors name portion_size and the batch
    for address, factor in (slow_workers or {}).items():
        _number(f"_slow_workers[{address!r}]", factor, 1.0)
    return n_rows


def _start(model, params, seed: int, resume_from, history: int) -> tuple[np.ndarray, LbfgsState | None]:
    """The starting iterate, and the L-BFGS state to go on from when resuming a checkpoint
    (its vectors stay on disk: each shard loads its own range)."""
    if resume_from is not None:
        ckpt = checkpoint.load_to_resume(resume_from, model.to_dict(), "sandblaster", vectors=False)
        state = LbfgsState(**ckpt.lbfgs)
        if state.m != history:
            raise ValueError(f"checkpoint {resume_from} holds an L-BFGS history of size {state.m}; "
                             f"history={history} cannot resume it")
        return ckpt.params, state
    start = model.init(seed) if params is None else np.array(params, dtype=np.float32)
    if start.shape != (model.size,):
        raise ValueError(f"params has shape {start.shape}, the model has {model.size} parameters")
    return start, None


@dataclass
class Counters:
    """What happened to the portions over a run (the summary reports these)."""

    evaluations: int = 0
    evaluations_restarted: int = 0
    portion_runs: int = 0
    backups_launched: int = 0
    backups_won: int = 0
    portions_per_worker: Counter = field(default_factory=Counter)


class BatchObjective:
    """``objective(x_name, g_name) -> loss`` for ``lbfgs``: one evaluation over shards and workers.

    Each call opens a fresh evaluation tag on the ledger and the shards (sending the queued vector
    operations along), runs the portions (``_Evaluation``), restarting under a new tag when a lost
    worker took contributions with it, and lets every shard finish its slice of the gradient into
    ``g_name``. The loss is the portions' losses added in portion order, as the reference adds
    them, divided by the batch size, plus the shards' regulariser shares.
    """

    def __init__(self, client, plan: PortionPlan, space: ShardedVectors,
                 bounds: list[tuple[int, int]], n_rows: int, backups: bool):
        self.client, self.plan, self.space = client, plan, space
        self.bounds, self.n_rows, self.backups = bounds, n_rows, backups
        self.tag = 0
        self.counters = Counters()
        self.busy = False  # from an evaluation's start until it returns: still set if interrupted

    def __call__(self, x_name: str, g_name: str) -> float:
        self.busy = True
        for _ in range(MAX_RESTARTS + 1):
            self._open(x_name)
            losses = _Evaluation(self, self.tag).run()
            if losses is not None:
                break
            self.counters.evaluations_restarted += 1
        else:
            raise RuntimeError(f"an evaluation failed {MAX_RESTARTS + 1} times in a row because "
                               "workers holding its contributions were lost: the cluster is "
                               "failing")
        self.counters.evaluations += 1
        total = 0.0
        for loss in losses:  # left to right, exactly as the reference adds them
            total += loss
        loss = total / self.n_rows + sum(self.space.execute(
            ("finish_evaluation", self.tag, x_name, g_name)))
        self.busy = False
        return loss

    def _open(self, x_name: str) -> None:
        """A new tag: the ledger and the shards accept nothing older from now on."""
        self.tag += 1
        ledger = self.plan.ledger.open(self.tag)
        self.space.execute(("open_evaluation", self.tag, x_name))
        ledger.result()

    def live_workers(self) -> list[str]:
        return list(worker_info(self.client))


class _Evaluation:
    """One attempt at one evaluation: portions out, backups for stragglers, winners in, flush.

    The coordinator never fetches a portion's result: futures finishing tell it how far the
    evaluation is (locally, no round trip), and once every portion has a finished copy, the
    ledger names each portion's winning copy (worker, loss) in one call.
    """

    def __init__(self, objective: BatchObjective, tag: int):
        self.o, self.tag = objective, tag
        self.total = len(objective.bounds)
        self.futures: dict = {}          # outstanding copy -> portion
        self.finished: set[int] = set()  # portions with a finished copy
        self.launched: set[int] = set()  # portions with a backup copy

    def run(self) -> list[float] | None:
        """The portions' losses, in portion order, once every portion is applied on the shards;
        None when a lost worker took contributions with it (the evaluation must start again)."""
        try:
            self._submit_all()
            while len(self.finished) < self.total:
                self._wait()
                if self.o.backups:
                    self._launch_backups()
            winners = self.o.plan.ledger.winners(self.tag).result()
        finally:
            self.o.client.cancel(list(self.futures))  # the losing copies, queued or running
        if len(winners) < self.total or not self._flush(winners):
            return None
        self._count(winners)
        return [winners[p][1] for p in range(self.total)]

    def _key(self, portion: int, backup: bool) -> str:
        return (f"sandblaster-portion-{self.o.plan.run}-{self.tag}-{portion}"
                + ("-backup" if backup else ""))

    def _submit_all(self) -> None:
        """Every portion at once, without restrictions: Dask queues them and hands the next one
        to whichever worker thread is free (one ``map`` call, the plan pickled once)."""
        n = self.total
        futures = self.o.client.map(run_portion, [self.o.plan] * n, [self.tag] * n, range(n),
                                    self.o.bounds, key=[self._key(p, False) for p in range(n)],
                                    pure=False)
        self.futures.update(zip(futures, range(n)))

    def _in_tail(self) -> bool:
        return len(self.finished) >= MIN_DONE_FRACTION * self.total

    def _wait(self) -> None:
        """Wait for copies to finish (briefly in the tail, where backups are decided); a task
        that failed raises its error here. A copy finishes after its claim, won or lost."""
        tail = self.o.backups and self._in_tail()
        try:
            done, _ = wait(list(self.futures), timeout=TAIL_POLL if tail else 1.0,
                           return_when="FIRST_COMPLETED")
        except TimeoutError:
            return
        for future in done:
            if future.status == "error":
                future.result()
            self.finished.add(self.futures.pop(future))
            self.o.counters.portion_runs += 1

    def _launch_backups(self) -> None:
        """Copy the late portions the policy picks, each once: a running one onto a worker
        other than its own, a waiting one (queued behind a straggler) to the next free thread."""
        if not self._in_tail():
            return  # the policy would say no: spare the ledger the question
        snap = self.o.plan.ledger.snapshot(self.tag).result()
        chosen = portions_to_back_up(snap["now"], snap["running"], snap["finished"], self.total,
                                     self.launched)
        live = self.o.live_workers() if chosen else []
        for portion in chosen:
            self.launched.add(portion)
            owner = snap["workers"].get(portion)
            others = [w for w in live if w != owner]
            if not others:
                continue
            future = self.o.client.submit(
                run_portion, self.o.plan, self.tag, portion, self.o.bounds[portion], True,
                key=self._key(portion, True), workers=others if owner else None,
                allow_other_workers=False, pure=False, priority=1)
            self.futures[future] = portion
            self.o.counters.backups_launched += 1
            events.emit(events.PORTION, run=self.o.plan.run, kind="backup-launched",
                        evaluation=self.tag, portion=portion, worker=owner or "")

    def _flush(self, winners: dict) -> bool:
        """Have every winning worker push what it still holds; True when every portion is now
        applied on the shards, False when a winner is gone (its contributions with it)."""
        holders = {worker for worker, _, _ in winners.values()}
        if not holders <= set(self.o.live_workers()):
            return False
        replies = self.o.client.run(flush_worker, self.o.plan, self.tag, workers=list(holders),
                                    on_error="return")
        applied = set()
        for reply in replies.values():
            if isinstance(reply, BaseException):
                return False
            applied.update(reply)
        return applied >= set(range(self.total))

    def _count(self, winners: dict) -> None:
        counters = self.o.counters
        for worker, _, backup in winners.values():
            counters.portions_per_worker[worker] += 1
            counters.backups_won += backup


def _evaluate_current(model, shards, ranges, store, stop: int) -> dict:
    """Test metrics at the current iterate, computed on a worker that fetches it itself."""
    params = assemble(call_all(shards, "read", "x"), ranges)
    return evaluate_rows(model, params, store, 0, stop)


class OutOfTime(Exception):
    """Raised by the iteration callback once ``max_seconds`` are spent: stops ``lbfgs`` between
    iterations, when the shards' "x" is the accepted iterate and nothing is in flight."""


class _Checkpoints:
    """Sandblaster's checkpoints, written when the shards hold exactly the vectors named by the
    last iteration's ``LbfgsState``: after an iteration (every ``every`` seconds), at the end,
    and during an evaluation (which touches only the trial vectors), e.g. when interrupted.

    The iterate is first copied into the shards' ``params``, so a checkpoint's parameters are
    the iterate, as with Downpour's. ``root`` None: no checkpoints.
    """

    def __init__(self, root, every: float | None, keep: int, space: ShardedVectors, ps,
                 meta: dict, run: str, state: LbfgsState | None):
        self.root, self.keep, self.space, self.ps = root, keep, space, ps
        self.every = math.inf if every is None else every
        self.meta, self.run, self.state = meta, run, state
        self.written = None if state is None else state.iteration  # the one resumed from
        self._due = time.time() + self.every

    def after_iteration(self, state: LbfgsState) -> None:
        self.state = state
        if time.time() >= self._due:
            self.write()

    def write(self):
        """A checkpoint of the latest state, unless there is none or it is saved already."""
        if self.root is None or self.state is None or self.written == self.state.iteration:
            return None
        self.space.execute(("copy", "x", "params"))
        path = checkpoint.save(self.root, self.ps, model=self.meta["model"],
                               config=self.meta["config"],
                               counters={"iteration": self.state.iteration}, keep=self.keep,
                               vectors=self.state.vectors(), lbfgs=asdict(self.state),
                               algorithm="sandblaster")
        self.written, self._due = self.state.iteration, time.time() + self.every
        events.emit(events.RUN, run=self.run, kind="checkpoint", path=str(path),
                    iteration=self.state.iteration)
        return path


class _Monitor:
    """The per-iteration duties: history rows, RUN events, checkpoints, test evaluations every
    ``eval_every``, the time budget."""

    def __init__(self, client, run: str, model, ps, test_store, eval_every, eval_rows: int,
                 max_seconds: float | None, checkpoints: _Checkpoints):
        self.client, self.run, self.model, self.ps = client, run, model, ps
        self.checkpoints = checkpoints
        self.test_store, self.eval_every, self.eval_rows = test_store, eval_every, eval_rows
        self.max_seconds = max_seconds
        self.started = time.time()
        self.rows: list[dict] = []       # history rows: iterations and test evaluations
        self.iterations: list[dict] = []  # what lbfgs reported
        self._next_eval = self.started + (eval_every or 0.0)

    def __call__(self, row: dict) -> None:
        self.checkpoints.after_iteration(row["state"])  # before reporting it: a reported
        elapsed = time.time() - self.started            # iteration is saved, when one is due
        self.iterations.append(row)
        self.rows.append({"time": elapsed, "step": row["iteration"], "replica": None,
                          "loss": row["loss"], "grad_norm": row["grad_norm"],
                          "evaluations": row["evaluations"], "test_loss": None,
                          "test_accuracy": None})
        events.emit(events.RUN, run=self.run, kind="iteration", iteration=row["iteration"],
                    loss=row["loss"], grad_norm=row["grad_norm"],
                    evaluations=row["evaluations"], elapsed=elapsed)
        if self.test_store is not None and self.eval_every and time.time() >= self._next_eval:
            self._evaluate(row["iteration"])
            self._next_eval = time.time() + self.eval_every
        if self.max_seconds is not None and time.time() - self.started >= self.max_seconds:
            raise OutOfTime

    def result(self) -> LbfgsResult:
        """What ``lbfgs`` would have returned, for a run the time budget stopped."""
        last = self.iterations[-1]
        return LbfgsResult("x", last["loss"], last["grad_norm"], last["iteration"],
                           last["evaluations"], False,
                           f"reached max_seconds={self.max_seconds:g}", list(self.iterations))

    def _evaluate(self, iteration: int) -> None:
        """Between iterations the shards' "x" is the iterate and no operation is in flight."""
        stop = min(self.eval_rows, self.test_store.n)
        part = self.client.submit(_evaluate_current, self.model, self.ps.shards, self.ps.ranges,
                                  self.test_store, stop, pure=False).result()
        row = test_row(time.time() - self.started, iteration, finish([part], self.test_store.task))
        self.rows.append(row)
        announce_test(self.run, row)


def sandblaster(model, data, *, client=None, shards: int = 2, iterations: int = 50,
                tolerance: float = 1e-5, ftol: float = 0.0, history: int = 10,
                portion_size: int | None = None, batch_rows: int | None = None,
                push_every: int = 4, backups: bool = True, test=None, seed: int = 0, params=None,
                max_seconds: float | None = None, eval_every: float | None = None,
                eval_rows: int = 10_000, shard_workers=None, partition=None,
                checkpoint_dir=None, checkpoint_every: float | None = None,
                checkpoint_keep: int = 3, resume_from=None, config: dict | None = None,
                _slow_workers: dict | None = None) -> TrainResult:
    """Train ``model`` with Sandblaster L-BFGS on a Dask cluster; returns a ``TrainResult``.

    Parameters
    ----------
    model : Sequential
    data : DataStore or str -- the training store; the batch is its first ``batch_rows`` rows
    client : distributed.Client, optional -- default: the current client, else a local cluster
    shards : parameter shards holding every L-BFGS vector (actors on distinct workers)
    iterations : at most this many L-BFGS iterations
    tolerance : stop once the gradient norm is at most this (the reference's ``gtol``)
    ftol : stop once an iteration lowers the loss by at most ``ftol * max(|f|, 1)`` (0: never)
    history : L-BFGS history size m (pairs of s/y vectors kept on the shards), >= 1
    portion_size : rows per portion (default: about ``batch / (8 x worker threads)``, >= 16)
    batch_rows : rows of the train split in the batch (default: all)
    push_every : a worker pushes its accumulated gradient to the shards every this many won
        portions (and whatever it holds at the end of each evaluation)
    backups : launch backup copies of straggling portions near the end of each evaluation
    test : DataStore or str, optional -- evaluated every ``eval_every`` seconds and at the end
    seed : parameter init (when ``params`` is None)
    params : initial flat parameter vector
    max_seconds : stop after the first iteration that ends this many seconds into training
    eval_every : seconds between test evaluations during training (None: only at the end)
    eval_rows : test rows used by the evaluations during training
    shard_workers : addresses the shards (and the claim ledger) may be placed on (default: all)
    partition : a ``partition.Plan`` of ``model`` or a table such as ``{"kind": "horizontal",
        "k": 2}``: every worker then homes a model-parallel replica (block actors on it and the
        next workers) that computes the portions landing there, each block taking its own ranges
        of the evaluated vector from the shards and pushing its own ranges of the gradient sums
    checkpoint_dir, checkpoint_every : write a checkpoint there after the first iteration that
        ends this many seconds after the last one (None: only at the end), at the end, and when
        Ctrl-C / SIGTERM interrupts an evaluation
    checkpoint_keep : how many complete checkpoints to keep (older ones are deleted)
    resume_from : a Sandblaster checkpoint of this model: the run goes on from the iteration
        after it (``iterations`` counts from the very first) with the saved L-BFGS history, as
        if it had never stopped; ``history`` must be the saved one
    config : the pipeline config, stored in checkpoints
    _slow_workers : TEST AND BENCHMARK ONLY -- ``{worker address: factor}``; portion tasks on
        that worker sleep ``(factor - 1)`` times their compute time, simulating a slow machine

    The summary holds ``iterations``, ``evaluations``, ``loss``, ``grad_norm``, ``seconds``,
    ``samples_per_second`` (rows of every evaluation, line searches included, per second),
    ``portions_per_worker``, ``backups_launched``, ``backups_won``, ``evaluations_restarted`` and,
    with a test store, ``test_loss``/``test_accuracy``. History rows: one per iteration
    (``time, step, replica=None, loss, grad_norm``) plus the test evaluations.
    """
    store = open_store(data, split="train")
    test_store = None if test is None else open_store(test, split="test")
    n_rows = validate(model, store, test_store, shards=shards, iterations=iterations,
                      tolerance=tolerance, ftol=ftol, history=history, portion_size=portion_size,
                      batch_rows=batch_rows, push_every=push_every, backups=backups,
                      eval_every=eval_every, eval_rows=eval_rows, seed=seed,
                      max_seconds=max_seconds, slow_workers=_slow_workers,
                      checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep)
    start, resumed = _start(model, params, seed, resume_from, history)
    plan_p = as_plan(model, partition)

    with client_or_local(client) as c:
        workers = require_workers(c)
        warm_workers(c, "daskbelief.train.sandblaster_tasks")
        unknown = sorted(set(shard_workers or ()) - set(workers))
        if unknown:
            raise ValueError(f"shard_workers names {', '.join(unknown)}, which are not workers of "
                             f"the cluster (its workers: {', '.join(workers)})")
        threads = sum(w["nthreads"] for w in worker_info(c).values())
        size = portion_size or default_portion_size(n_rows, threads)
        bounds = portions(n_rows, size)
        run = f"sandblaster-{uuid.uuid4().hex[:8]}"
        ps = ParameterServer.create(c, start, shards, IDLE_RULE, workers=shard_workers)
        groups = {} if plan_p is None else {
            home: Blocks.start(c, plan_p, start, ps=ps, addresses=where)
            for home, where in place_groups(workers, plan_p.n_blocks).items()}
        del start  # from here on the parameters live on the shards only
        ledger_future = c.submit(PortionLedger, actor=True, workers=[ps.addresses()[0]],
                                 allow_other_workers=False, pure=False, key=f"{run}-ledger")
        try:
            call_all(ps.shards, "prepare_objective", model, n_rows)
            if resumed is not None:
                call_all(ps.shards, "restore_vectors", str(resume_from))
            plan = PortionPlan(run, model, store, tuple(ps.shards), tuple(ps.ranges),
                               ledger_future.result(), push_every, dict(_slow_workers or {}),
                               groups)
            space = ShardedVectors(ps.shards, ps.ranges)
            space.copy("params", "x")  # queued: travels with the first evaluation
            objective = BatchObjective(c, plan, space, bounds, n_rows, backups)
            checkpoints = _Checkpoints(checkpoint_dir, checkpoint_every, checkpoint_keep, space,
                                       ps, {"model": model.to_dict(), "config": config or {}},
                                       run, resumed)
            monitor = _Monitor(c, run, model, ps, test_store, eval_every, eval_rows, max_seconds,
                               checkpoints)
            settings = {"shards": shards, "iterations": iterations, "history": history,
                        "portion_size": size, "portions": len(bounds), "batch_rows": n_rows,
                        "push_every": push_every, "backups": backups, "tolerance": tolerance,
                        "partition": "" if plan_p is None else f"{plan_p.kind}/{plan_p.n_blocks}",
                        "resumed_at": 0 if resumed is None else resumed.iteration}
            events.emit(events.RUN, run=run, kind="start", algorithm="sandblaster", **settings)
            try:
                result = lbfgs(space, objective, "x", m=history, max_iter=iterations,
                               gtol=tolerance, ftol=ftol, callback=monitor, resume=resumed)
            except OutOfTime:
                result = monitor.result()
            except KeyboardInterrupt:
                if objective.busy:  # the shards hold the last iteration's vectors untouched
                    checkpoints.write()
                raise
            checkpoints.write()
            seconds = time.time() - monitor.started
            final = space.gather("x")
            shard_stats = call_all(ps.shards, "objective_stats")
        finally:
            ledger_future.release()
            for blocks in groups.values():
                blocks.close()
            ps.close()
            c.run(forget_run, run, on_error="ignore")
        summary = _summary(run, result, objective.counters, settings, seconds, n_rows, shard_stats)
        history_rows = monitor.rows
        if test_store is not None:
            metrics = evaluate(model, final, test_store, client=c)
            summary.update({"test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy")})
            history_rows.append(test_row(seconds, result.iterations, metrics))
            announce_test(run, history_rows[-1])
        events.emit(events.RUN, kind="end",  # the summary's scalars, its run id included
                    **{k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
    return TrainResult(model, final, history_rows, summary)


def _summary(run: str, result, counters: Counters, settings: dict, seconds: float, n_rows: int,
             shard_stats: list[dict]) -> dict:
    """The run's figures: the optimisation's outcome, the portions' fate, the throughput.

    ``vector_fetches``: how often a worker fetched the vector being evaluated (every fetch reads
    each shard once), at most once per worker process and evaluation attempt.
    """
    samples = counters.evaluations * n_rows
    return {"algorithm": "sandblaster", "run": run, **settings, "iterations": result.iterations,
            "evaluations": counters.evaluations, "loss": result.loss,
            "grad_norm": result.grad_norm, "converged": result.converged,
            "message": result.message, "seconds": seconds,
            "seconds_per_iteration": seconds / max(result.iterations - settings["resumed_at"], 1),
            "samples": samples, "samples_per_second": samples / seconds,
            "evaluations_restarted": counters.evaluations_restarted,
            "portion_runs": counters.portion_runs,
            "backups_launched": counters.backups_launched, "backups_won": counters.backups_won,
            "portions_per_worker": dict(counters.portions_per_worker),
            "vector_fetches": shard_stats[0]["reads"],
            "contributions_refused": sum(s["refused"] for s in shard_stats)}
