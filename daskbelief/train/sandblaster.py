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
drops the others, so every portion counts exactly once. A worker lost during an evaluation:
Dask reruns its tasks elsewhere; if it took won-but-unpushed contributions with it, the
evaluation starts again under a new tag (the shards refuse the old tag's contributions), so the
iterates are unchanged.

A lost *shard holder* takes its slice of every vector with it. Every wait on a shard is sliced
and checks that the shards' workers are still there (``sharded_vectors.Watch``: ``ShardLost``);
the workers' waits give up once the evaluation is abandoned, so no thread stays stuck on a dead
actor; and ``_Recovery`` makes every shard anew from the run's last checkpoint, or the start
point, and runs the iterations since again -- the same iterates, so the run still matches the
reference (the cost: those iterations; ``checkpoint_every`` bounds it). The new shards go where
a pool thread is free (an actor's constructor needs one), so a recovery never waits behind the
run's own tasks. Model-parallel, the replicas' blocks are made anew with the shards; a block's
worker lost on its own (``BlocksLost``) costs only the evaluation in progress, which starts
again on replicas made anew.

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

from daskbelief import waits
from daskbelief.checks import check_integer
from daskbelief.cluster import require_workers, worker_info
from daskbelief.monitor import events
from daskbelief.optim.lbfgs import LbfgsResult, LbfgsState, lbfgs
from daskbelief.ps import checkpoint
from daskbelief.ps.policy import place_homed_blocks
from daskbelief.ps.server import ParameterServer
from daskbelief.ps.sources import Ranged, Saved
from daskbelief.train.backup import portions_to_back_up, tail_start
from daskbelief.train.errors import RunLost
from daskbelief.train.evaluate import announce_test, finish, test_row
from daskbelief.train.objective import portions
from daskbelief.train.partition import Plan, as_plan
from daskbelief.train.partitioned import Blocks
from daskbelief.train.recovery import lost_workers
from daskbelief.train.result import TrainResult
from daskbelief.train.run import (Every, announce, check_on_snapshot, cluster, finish_run,
                                  open_data, parameter_server, run_id, start_point, summary)
from daskbelief.train.sandblaster_tasks import (PortionLedger, PortionSpec, abandon_evaluation,
                                                evaluate_current, flush_worker, forget_run,
                                                free_threads, run_portion)
from daskbelief.train.sharded_vectors import (PATIENCE, WAIT_SLICE, ShardedVectors, ShardLost,
                                              Watch, call_all, direct, in_thread, await_all)
from daskbelief.waits import WaitTimeout
from daskbelief.workarounds import ACTOR_START_TIMEOUT, prompt_streams

PORTIONS_PER_THREAD = 8   # default portion size: about this many portions per worker thread
MIN_PORTION_FLOPS = 2e8   # ... but no less work than this (~5 ms): a task has a fixed cost
MAX_RESTARTS = 5          # an evaluation restarted this often means the cluster is failing
TAIL_POLL = 0.02          # seconds between backup decisions once most portions are done
IDLE_RULE = {"name": "sgd", "lr": 0.0}  # the shards' Downpour rule: unused by Sandblaster
# Values a shard may pass over per evaluation to spare the coordinator one round trip (about a
# millisecond): about a millisecond's worth of float64 dot products on one core.
PROSPECT_BUDGET = 1_000_000


def default_portion_size(n_rows: int, threads: int, flops_per_row: float) -> int:
    """Rows per portion, sized to the work: about ``PORTIONS_PER_THREAD`` portions per worker
    thread (the load balances, a straggler holds up only a small part) unless that makes a
    portion's compute small beside a task's fixed cost of a few round trips (a scheduling, a
    claim, a push): then fewer, larger portions, down to one per thread."""
    balanced = math.ceil(n_rows / (PORTIONS_PER_THREAD * threads))
    worthwhile = math.ceil(MIN_PORTION_FLOPS / max(flops_per_row, 1.0))
    return min(max(balanced, worthwhile), math.ceil(n_rows / threads))


def prospective_dots(slice_size: int, history: int) -> bool:
    """Whether the shards form each line-search point's L-BFGS pair and its dots with the
    evaluation (``lbfgs(prospective=True)``): about ``6m + 7`` passes over a slice per
    evaluation, against one round trip saved per iteration; worth it on small slices only."""
    return slice_size * (6 * history + 7) <= PROSPECT_BUDGET


def _number(name: str, value, minimum: float, *, strict: bool = False) -> None:
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, "
                         f"got {value!r}")


def validate(model, store, *, shards, iterations, tolerance, ftol, history,
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


def _start(model, params, seed: int, resume_from, history: int) -> tuple[Ranged, LbfgsState | None]:
    """The skeleton's start point, and the L-BFGS state to go on from when resuming a
    checkpoint (its vectors stay on disk: each shard loads its own range)."""
    point = start_point(model, params, seed, resume_from, "sandblaster")
    if point.resumed is None:
        return point.params, None
    state = LbfgsState(**point.resumed.lbfgs)
    if state.m != history:
        raise ValueError(f"checkpoint {resume_from} holds an L-BFGS history of size {state.m}; "
                         f"history={history} cannot resume it")
    return point.params, state


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

    def __init__(self, client, actors: "_Actors", bounds: list[tuple[int, int]], n_rows: int,
                 backups: bool, make: "_ActorMaker"):
        self.client, self.actors = client, actors  # ``actors``: replaced by a recovery
        self.make = make  # remakes the model-parallel replicas when a block's worker is lost
        self.bounds, self.n_rows, self.backups = bounds, n_rows, backups
        self.tag = 0
        self.counters = Counters()
        self.busy = False  # from an evaluation's start until it returns: still set if interrupted

    @property
    def spec(self) -> PortionSpec:
        return self.actors.spec

    @property
    def space(self) -> ShardedVectors:
        return self.actors.space

    def __call__(self, x_name: str, g_name: str) -> float:
        return self.with_dots(x_name, g_name, [])[0]

    def with_dots(self, x_name: str, g_name: str, dots, then=()) -> tuple[float, list[float]]:
        """The loss at ``x_name`` (gradient into ``g_name``) and the ``dots`` pairs taken after
        it and after the vector operations ``then``, all of which travel with the shards' last
        call of the evaluation."""
        self.busy = True
        for _ in range(MAX_RESTARTS + 1):
            opening = self._open(x_name)
            try:
                outcome = _Evaluation(self, self.tag).run(x_name, g_name, dots, then, opening)
            except BlocksLost as lost:
                self._rebuild_replicas(lost)
                outcome = None
            if outcome is not None:
                break
            self.space.watch.check()  # a lost shard, not just a lost worker: ShardLost
            self.counters.evaluations_restarted += 1
        else:
            raise RuntimeError(f"an evaluation failed {MAX_RESTARTS + 1} times in a row because "
                               "workers holding its contributions were lost: the cluster is "
                               "failing")
        self.counters.evaluations += 1
        winners, replies = outcome
        total = 0.0
        for portion in range(len(self.bounds)):  # left to right, as the reference adds them
            total += winners[portion][1]
        loss = total / self.n_rows + sum(reply[0] for reply in replies)
        self.busy = False
        return loss, [sum(column) for column in zip(*(reply[1] for reply in replies))]

    def _rebuild_replicas(self, lost: BlocksLost) -> None:
        """Model-parallel replicas made anew after a block's worker left (the shards, and so the
        iterate and the L-BFGS history, are intact): the evaluation then starts again."""
        started = time.time()
        self.client.run(abandon_evaluation, self.spec.run, self.tag, on_error="ignore")
        self.make.start_replicas(self.make.release_replicas(self.actors.ps), self.actors.ps)
        events.emit(events.RUN, run=self.spec.run, kind="blocks-recovered", evaluation=self.tag,
                    lost_workers=lost.workers, workers=sorted(self.spec.replicas),
                    seconds=time.time() - started)

    def give_up(self) -> ShardLost | BlocksLost | None:
        """For waits during an evaluation: a shard's or a block's worker has left."""
        return self.space.watch.give_up() or self.make.blocks_gone()

    def _open(self, x_name: str) -> list:
        """A new tag, from which on the shards accept nothing older (the ledger learns it from
        the portions' first words), sent with the queued vector operations and not awaited:
        the shards' pending replies. The portions leave meanwhile; one whose read overtakes the
        opening is told to ask again (``ParameterShard.read_evaluated``)."""
        self.tag += 1
        return self.space.issue(("open_evaluation", self.tag, x_name))

    def live_workers(self) -> list[str]:
        return list(worker_info(self.client))


class _Evaluation:
    """One attempt at one evaluation: portions out, backups for stragglers, the shards finish.

    The coordinator never fetches a portion's result: futures finishing tell it how far the
    evaluation is (locally, no round trip). Workers push what they won with the portions'
    names and losses, the last ones before their tasks end, so once every portion has a
    finished copy the shards usually hold the whole batch: the call that has them finish the
    gradient also names each portion's winning copy (worker, loss). Only a shard still missing
    some makes the coordinator flush the workers first. (Model-parallel replicas push ranges,
    which name no portions: there the flush, which the blocks answer, always comes first.)
    """

    def __init__(self, objective: BatchObjective, tag: int):
        self.o, self.tag = objective, tag
        self.total = len(objective.bounds)
        self.futures: dict = {}          # outstanding copy -> portion
        self.finished: set[int] = set()  # portions with a finished copy
        self.launched: set[int] = set()  # portions with a backup copy
        self.checked = time.monotonic()  # when the shards' workers were last seen alive

    def run(self, x_name: str, g_name: str, dots, then=(), opening=()) -> tuple[dict, list] | None:
        """Once every portion is applied and every shard has finished its slice of the gradient
        at ``x_name`` into ``g_name`` (and run ``then``): the winners ``{portion: (worker, loss,
        backup)}`` and each shard's reply (regulariser share, partial sums of ``dots``); None
        when a lost worker took contributions with it (the evaluation must start again).
        ``opening``: the shards' pending replies to the evaluation's opening, awaited once the
        portions are on their way (an error there, a lost shard say, is raised then)."""
        try:
            self._submit_all()
            await_all(opening, "run_ops", self.o.space.watch)
            while len(self.finished) < self.total:
                self._wait()
                if self.o.backups:
                    self._launch_backups()
        finally:
            if self.futures:  # the losing copies, queued or running
                self.o.client.cancel(list(self.futures))
        space = self.o.space
        finish = ("finish_evaluation", self.tag, x_name, g_name, [tuple(p) for p in dots],
                  None if self.o.spec.replicas else self.total, [tuple(op) for op in then])
        if self.o.spec.replicas:
            winners = self._flush()
            if len(winners) < self.total:
                return None
        replies = space.execute(finish)
        if not self.o.spec.replicas:
            missing = [i for i, r in enumerate(replies) if r is None]
            if missing:  # contributions still on the workers: flush them, then ask again
                self._flush()
                again = call_all([space.shards[i] for i in missing], "run_ops", [finish],
                                 watch=space.watch)
                for i, results in zip(missing, again):
                    replies[i] = results[-1]
                if any(r is None for r in replies):
                    return None
            winners = replies[0][2]
        self._count(winners)
        return winners, replies

    def _key(self, portion: int, backup: bool) -> str:
        return (f"sandblaster-portion-{self.o.spec.run}-{self.tag}-{portion}"
                + ("-backup" if backup else ""))

    def _homes(self) -> list[str] | None:
        """Where portions may run: anywhere, or, model-parallel, on the workers homing a replica
        (a worker that joined later, say one restarted by its nanny, has none)."""
        return list(self.o.spec.replicas) or None

    def _submit_all(self) -> None:
        """Every portion at once, without other restrictions: Dask queues them and hands the
        next one to whichever worker thread is free (one ``map`` call, the plan pickled once)."""
        n = self.total
        futures = self.o.client.map(run_portion, [self.o.spec] * n, [self.tag] * n, range(n),
                                    self.o.bounds, key=[self._key(p, False) for p in range(n)],
                                    workers=self._homes(), pure=False)
        self.futures.update(zip(futures, range(n)))

    def _in_tail(self) -> bool:
        return len(self.finished) >= tail_start(self.total)

    def _wait(self) -> None:
        """Wait for copies to finish (briefly in the tail, where backups are decided); a task
        that failed raises its error here. A copy finishes after its claim, won or lost."""
        tail = self.o.backups and self._in_tail()
        try:
            done, _ = wait(list(self.futures), timeout=TAIL_POLL if tail else 1.0,
                           return_when="FIRST_COMPLETED")
        except TimeoutError:
            if time.monotonic() - self.checked >= WAIT_SLICE:  # not every tail poll
                lost = self.o.give_up()  # portions waiting on a dead shard never finish
                if lost is not None:
                    raise lost
                self.checked = time.monotonic()
            return
        for future in done:
            if future.status == "error":  # a lost shard's or block's, or a bug
                lost = (self.o.space.watch.lost_after(future.exception())
                        or self.o.make.blocks_gone())
                if lost is not None:
                    raise lost from future.exception()
                future.result()
            self.finished.add(self.futures.pop(future))
            self.o.counters.portion_runs += 1

    def _launch_backups(self) -> None:
        """Copy the late portions the policy picks, each once: a running one onto a worker
        other than its own, a waiting one (queued behind a straggler) to the next free thread."""
        if not self._in_tail():
            return  # the policy would say no: spare the ledger the question
        snap = self.o.space.watch.wait(self.o.actors.ledger_here.snapshot(self.tag), "the ledger")
        chosen = portions_to_back_up(snap["now"], snap["running"], snap["finished"], self.total,
                                     self.launched)
        live = (self._homes() or self.o.live_workers()) if chosen else []
        for portion in chosen:
            self.launched.add(portion)
            owner = snap["workers"].get(portion)
            others = [w for w in live if w != owner]
            if not others:
                continue
            future = self.o.client.submit(
                run_portion, self.o.spec, self.tag, portion, self.o.bounds[portion], True,
                key=self._key(portion, True), workers=others if owner else self._homes(),
                allow_other_workers=False, pure=False, priority=1)
            self.futures[future] = portion
            self.o.counters.backups_launched += 1
            events.emit(events.PORTION, run=self.o.spec.run, kind="backup-launched",
                        evaluation=self.tag, portion=portion, worker=owner or "")

    def _flush(self) -> dict:
        """Have every worker push what it still holds; ``{portion: (worker, loss, backup)}``
        of the portions model-parallel replicas won and applied (a lost worker's are missing)."""
        replies = waits.result(  # in a thread: a push to a dead shard or block never returns
            in_thread(self.o.client.run, flush_worker, self.o.spec, self.tag, on_error="return"),
            timeout=PATIENCE, every=WAIT_SLICE, give_up=self.o.give_up, what="the workers' flush")
        winners = {}
        for reply in replies.values():
            if not isinstance(reply, BaseException):
                winners.update(reply)
        return winners

    def _count(self, winners: dict) -> None:
        counters = self.o.counters
        for worker, _, backup in winners.values():
            counters.portions_per_worker[worker] += 1
            counters.backups_won += backup


@dataclass
class _Actors:
    """What a lost worker can take with it: the shards (holding every L-BFGS vector) and the
    claim ledger beside shard 0, with what the run builds on them (the portions' plan, the
    vector space). A recovery makes them anew and swaps them in whole."""

    ps: ParameterServer
    ledger: object  # the ledger actor's future: it lives as long as this does
    spec: PortionSpec
    space: ShardedVectors
    ledger_here: object  # the coordinator's own handle to it (``direct``)

    def close(self) -> None:
        """Release the actors (again: nothing happens)."""
        if self.ledger is not None:
            self.ledger.release()
            self.ledger = None
        self.ps.close()


class _ActorMaker:
    """Starts a run's ``_Actors``: at the start, and again after a lost shard."""

    def __init__(self, client, run: str, model, store, n_rows: int, portions: int, shards: int,
                 shard_workers, push_every: int, slow: dict, replicas: dict, threads: int):
        self.client, self.run, self.model, self.store = client, run, model, store
        self.n_rows, self.portions = n_rows, portions
        self.shards, self.shard_workers = shards, shard_workers
        self.push_every, self.slow, self.replicas, self.threads = push_every, slow, replicas, threads

    def __call__(self, params: Ranged, restore=None, free=None) -> _Actors:
        """Shards seeded with ``params`` on the live workers (those of ``shard_workers`` still
        there, else any; of those, the ones in ``free`` if any); ``restore``: a checkpoint whose
        ranges they load (its vectors among them)."""
        c, live = self.client, sorted(worker_info(self.client))
        allowed = [w for w in (self.shard_workers or live) if w in live] or live
        allowed = [w for w in allowed if w in (free or ())] or allowed
        try:
            ps = parameter_server(c, params, self.shards, IDLE_RULE, restore=restore,
                                  workers=allowed)
        except ConnectionError as e:  # a shard's worker left while it read the checkpoint
            raise ShardLost(lost_workers(c, allowed)) from e
        ledger = c.submit(PortionLedger, self.portions, actor=True, workers=[ps.addresses()[0]],
                          allow_other_workers=False, pure=False,
                          key=f"{self.run}-ledger-{uuid.uuid4().hex[:8]}")
        watch = Watch(c, ps.addresses())  # the ledger's worker is shard 0's
        call_all(ps.shards, "prepare_objective", self.model, self.n_rows, watch=watch)
        spec = PortionSpec(self.run, self.model, self.store, tuple(ps.shards), tuple(ps.ranges),
                           watch.wait(ledger, "the ledger's start"), self.push_every, self.slow,
                           self.replicas, self.threads)
        space = ShardedVectors(ps.shards, ps.ranges, watch)
        space.copy("params", "x")  # queued: travels with the first evaluation
        return _Actors(ps, ledger, spec, space, direct(spec.ledger))

    def blocks_gone(self) -> BlocksLost | None:
        """``BlocksLost`` once a worker holding a block of a model-parallel replica has left."""
        held = {a._address for blocks in self.replicas.values() for a in blocks.actors}
        lost = lost_workers(self.client, held) if held else []
        return BlocksLost(lost) if lost else None

    def release_replicas(self, ps: ParameterServer) -> Plan | None:
        """Release the model-parallel replicas (``replicas`` emptied); their partition plan, None
        if there were none. Each live block is handed ``ps`` again first, which ends its waits
        on lost shards, so the portion tasks waiting on it end and hand back their threads."""
        old = list(self.replicas.values())
        if not old:
            return None
        self.replicas.clear()
        live = set(worker_info(self.client))
        replies = [a.set_server(ps) for blocks in old for a in blocks.actors if a._address in live]
        for reply in replies:
            try:
                waits.result(reply, timeout=5.0, what="a block to drop its waits on the shards")
            except Exception:  # noqa: BLE001 -- its worker left meanwhile: nothing waits there
                continue
        for blocks in old:
            blocks.close()
        return old[0].plan

    def start_replicas(self, plan: Plan, ps: ParameterServer) -> None:
        """A model-parallel replica homed on each live worker, its blocks talking to the shards
        ``ps`` (they load the vector to evaluate from them each time); placed again should a
        worker leave while they start."""
        for attempt in range(MAX_RESTARTS + 1):
            live = sorted(worker_info(self.client))
            try:
                for home, where in place_homed_blocks(live, plan.n_blocks).items():
                    self.replicas[home] = Blocks.start(self.client, plan, None, ps=ps,
                                                       addresses=where)
                return
            except ConnectionError:
                self.release_replicas(ps)
                if attempt == MAX_RESTARTS:
                    raise


class BlocksLost(RuntimeError):
    """Workers holding blocks of Sandblaster's model-parallel replicas left the cluster."""

    def __init__(self, workers):
        self.workers = sorted(workers)
        super().__init__(f"lost the worker(s) holding model-parallel blocks: {', '.join(self.workers)}")


MAX_RECOVERIES = 5  # shard holders lost this often in one run: the cluster is failing
FREE_THREADS_WAIT = 10.0  # seconds a recovery waits for a free pool thread on a worker per shard


class _Recovery:
    """Brings a run back after workers holding shards were lost, keeping L-BFGS consistent.

    A lost shard takes its slice of every vector (iterate, gradient, the s/y history) with it;
    the survivors' slices are mid-iteration. So every shard is made anew from the run's last
    complete checkpoint (its iterate, vectors and ``LbfgsState``) or, with none, from the start
    point, and L-BFGS goes on from there: the iterations since are run again, computing the
    same iterates as before (they are a function of the start point and the data), so the run
    still follows the reference. The cost is those iterations, bounded by ``checkpoint_every``.
    """

    def __init__(self, client, run: str, make: _ActorMaker, start: Ranged | None):
        """``start``: the start point, None for a resumed run (whose checkpoint comes first)."""
        self.client, self.run, self.make, self.start = client, run, make, start
        self.partition: Plan | None = None  # model-parallel: the replicas' plan, once released
        self.lost: list[str] = []
        self.replayed = 0

    def __call__(self, lost: ShardLost, objective: BatchObjective,
                 checkpoints: _Checkpoints) -> LbfgsState | None:
        """New actors swapped into ``objective`` and ``checkpoints``; the state to resume from.
        Raises ``RunLost`` when the run cannot go on (named, with its last checkpoint)."""
        while True:
            try:
                return self._recover(lost, objective, checkpoints)
            except ShardLost as again:  # lost another while recovering: once more
                lost = again
            except WaitTimeout as e:
                raise RunLost(f"{', '.join(lost.workers)} (parameter shards), and the shards "
                              f"could not be made anew: {e}", checkpoints.last) from None

    def _recover(self, lost: ShardLost, objective: BatchObjective,
                 checkpoints: _Checkpoints) -> LbfgsState | None:
        self.lost += lost.workers
        where = checkpoints.last
        if len(self.lost) > MAX_RECOVERIES:
            raise RunLost(f"{', '.join(lost.workers)} (parameter shards), the "
                          f"{len(self.lost)}th shard holder lost in this run", where)
        reached = checkpoints.state.iteration if checkpoints.state is not None else 0
        # release every wait on the workers for the evaluation in progress
        self.client.run(abandon_evaluation, self.run, objective.tag, on_error="ignore")
        self.partition = self.make.release_replicas(objective.actors.ps) or self.partition
        objective.actors.close()
        if where is not None:
            saved = checkpoint.load(where, 0, 0, arrays=False)  # its metadata: shards read the rest
            params, state = Saved(where, self.make.model.size), LbfgsState(**saved.lbfgs)
        else:
            params, state = self.start, None
        objective.actors = checkpoints.actors = self.make(params, where, self._free_workers())
        if self.partition is not None:
            self.make.start_replicas(self.partition, objective.actors.ps)
        checkpoints.restored(state)
        back_to = 0 if state is None else state.iteration
        self.replayed += reached - back_to
        events.emit(events.RUN, run=self.run, kind="recovery", lost=", ".join(lost.workers),
                    restored_from=str(where or "the start point"), iteration=back_to,
                    replayed=reached - back_to)
        return state

    def _free_workers(self) -> list[str]:
        """The workers with a pool thread that no task holds, to make the new shards on: an
        actor's constructor runs on a pool thread, so a shard placed where the run's tasks hold
        every thread would wait for them. The abandoned portions hand their threads back within
        a wait slice or two: waits ``FREE_THREADS_WAIT`` seconds for one such worker per shard,
        then takes what there is, and fails (``WaitTimeout``) only when no worker has had a free
        thread for ``ACTOR_START_TIMEOUT`` seconds."""
        found: list[str] = []

        def free(per_shard: bool) -> list[str]:
            threads = self.client.run(free_threads, on_error="return")
            found[:] = sorted(w for w, n in threads.items() if isinstance(n, int) and n > 0)
            need = min(self.make.shards, len(threads)) if per_shard else 1
            return found if found and len(found) >= need else []

        try:
            return waits.until(lambda: free(True), timeout=FREE_THREADS_WAIT,
                               what="a free pool thread on a worker per shard")
        except WaitTimeout:
            if found:
                return found
        return waits.until(lambda: free(False), timeout=ACTOR_START_TIMEOUT,
                           what="a worker with a pool thread no task holds, to make the shards on")

    def summary(self) -> dict:
        return {"shard_holders_lost": len(self.lost), "iterations_replayed": self.replayed}


class OutOfTime(Exception):
    """Raised by the iteration callback once ``max_seconds`` are spent: stops ``lbfgs`` between
    iterations, when the shards' "x" is the accepted iterate and nothing is in flight."""


class _Checkpoints:
    """Sandblaster's checkpoints, written when the shards hold exactly the vectors named by the
    last iteration's ``LbfgsState``: after an iteration (every ``every`` seconds), at the end,
    and during an evaluation (which touches only the trial vectors), e.g. when interrupted.

    The iterate is first copied into the shards' ``params``, so a checkpoint's parameters are
    the iterate, as with Downpour's. ``root`` None: no checkpoints. ``last``: the newest
    complete checkpoint of this run (or the one it resumed from), what a recovery restores.
    """

    def __init__(self, root, every: float | None, keep: int, actors: "_Actors", meta: dict,
                 run: str, state: LbfgsState | None, resumed_from=None):
        self.root, self.keep, self.actors = root, keep, actors  # ``actors``: see BatchObjective
        self.due = Every(every)
        self.meta, self.run, self.state = meta, run, state
        self.written = None if state is None else state.iteration  # the one resumed from
        self.last = resumed_from

    def restored(self, state: LbfgsState | None) -> None:
        """A recovery went back to ``state`` (None: the start), which is saved already."""
        self.state = state
        self.written = None if state is None else state.iteration

    def after_iteration(self, state: LbfgsState) -> None:
        self.state = state
        if self.due.due():
            self.write()

    def write(self):
        """A checkpoint of the latest state, unless there is none or it is saved already."""
        if self.root is None or self.state is None or self.written == self.state.iteration:
            return None
        space = self.actors.space
        started = time.time()
        space.execute(("copy", "x", "params"))
        path = checkpoint.save(self.root, self.actors.ps, model=self.meta["model"],
                               config=self.meta["config"], normaliser=self.meta["normaliser"],
                               counters={"iteration": self.state.iteration}, keep=self.keep,
                               vectors=self.state.vectors(), lbfgs=asdict(self.state),
                               algorithm="sandblaster", give_up=space.watch.give_up)
        self.written, self.last = self.state.iteration, path
        self.due.done()
        events.emit(events.RUN, run=self.run, kind="checkpoint", path=str(path),
                    iteration=self.state.iteration, seconds=time.time() - started)
        return path


class _Monitor:
    """The per-iteration duties: history rows, RUN events, checkpoints, test evaluations (or
    ``on_snapshot`` calls) every ``eval_every``, the time budget."""

    def __init__(self, client, run: str, objective: BatchObjective, test_store, eval_every,
                 eval_rows: int, max_seconds: float | None, checkpoints: _Checkpoints,
                 on_snapshot=None):
        self.client, self.run, self.objective = client, run, objective
        self.checkpoints = checkpoints
        self.test_store, self.eval_rows = test_store, eval_rows
        self.max_seconds = max_seconds
        self.started = time.time()
        self.rows: list[dict] = []       # history rows: iterations and test evaluations
        self.iterations: list[dict] = []  # what lbfgs reported
        self.on_snapshot = on_snapshot
        self.evaluations = Every(eval_every if test_store is not None or on_snapshot is not None
                                 else None)

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
        if self.evaluations.due():
            if self.on_snapshot is not None:
                self.on_snapshot(elapsed, self.objective.space.gather("x"))
            else:
                self._evaluate(row["iteration"])
            self.evaluations.done()  # the period counts from the end of the evaluation
        if self.max_seconds is not None and time.time() - self.started >= self.max_seconds:
            raise OutOfTime

    def rewind(self, iteration: int) -> None:
        """Forget what came after ``iteration``: a recovery runs those iterations again."""
        self.iterations = [r for r in self.iterations if r["iteration"] <= iteration]
        self.rows = [r for r in self.rows if r["step"] <= iteration]

    def result(self) -> LbfgsResult:
        """What ``lbfgs`` would have returned, for a run the time budget stopped."""
        last = self.iterations[-1]
        return LbfgsResult("x", last["loss"], last["grad_norm"], last["iteration"],
                           last["evaluations"], False,
                           f"reached max_seconds={self.max_seconds:g}", list(self.iterations))

    def _evaluate(self, iteration: int) -> None:
        """Between iterations the shards' "x" is the iterate and no operation is in flight."""
        stop = min(self.eval_rows, self.test_store.n)
        actors = self.objective.actors
        part = actors.space.watch.wait(self.client.submit(
            evaluate_current, actors.spec, self.test_store, stop, self.objective.tag,
            pure=False), "a test evaluation")
        if part is None:  # abandoned: a shard was lost, the next wait reports it
            actors.space.watch.check()
            return
        row = test_row(time.time() - self.started, iteration, finish([part], self.test_store.task))
        self.rows.append(row)
        announce_test(self.run, row)


def sandblaster(model, data, *, client=None, shards: int = 2, iterations: int = 50,
                tolerance: float = 1e-5, ftol: float = 0.0, history: int = 10,
                portion_size: int | None = None, batch_rows: int | None = None,
                push_every: int = 4, backups: bool = True, test=None, seed: int = 0, params=None,
                max_seconds: float | None = None, eval_every: float | None = None,
                eval_rows: int = 10_000, shard_workers: list[str] | None = None,
                partition: dict | Plan | None = None,
                checkpoint_dir=None, checkpoint_every: float | None = None,
                checkpoint_keep: int = 3, resume_from=None, on_snapshot=None,
                config: dict | None = None, _slow_workers: dict | None = None) -> TrainResult:
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
    portion_size : rows per portion (default: ``default_portion_size``, sized to the work)
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
    on_snapshot : ``on_snapshot(seconds, params)``, called between iterations every
        ``eval_every`` seconds instead of the test evaluation, with the seconds since training
        started and the current iterate (a fresh array): to evaluate it later, off the cores
        that train, or to keep it. The final test evaluation stays
    config : the pipeline config, stored in checkpoints
    _slow_workers : TEST AND BENCHMARK ONLY -- ``{worker address: factor}``; portion tasks on
        that worker sleep ``(factor - 1)`` times their compute time, simulating a slow machine

    The summary holds ``iterations``, ``evaluations``, ``loss``, ``grad_norm``, ``seconds``,
    ``samples_per_second`` (rows of every evaluation, line searches included, per second),
    ``portions_per_worker``, ``backups_launched``, ``backups_won``, ``evaluations_restarted`` and,
    with a test store, ``test_loss``/``test_accuracy``. History rows: one per iteration
    (``time, step, replica=None, loss, grad_norm``) plus the test evaluations.
    """
    store, test_store = open_data(model, data, test)
    n_rows = validate(model, store, shards=shards, iterations=iterations,
                      tolerance=tolerance, ftol=ftol, history=history, portion_size=portion_size,
                      batch_rows=batch_rows, push_every=push_every, backups=backups,
                      eval_every=eval_every, eval_rows=eval_rows, seed=seed,
                      max_seconds=max_seconds, slow_workers=_slow_workers,
                      checkpoint_every=checkpoint_every, checkpoint_keep=checkpoint_keep)
    check_on_snapshot(on_snapshot)
    start, resumed = _start(model, params, seed, resume_from, history)
    plan_p = as_plan(model, partition)

    with cluster(client, "daskbelief.train.sandblaster_tasks") as c:
        workers = require_workers(c)
        unknown = sorted(set(shard_workers or ()) - set(workers))
        if unknown:
            raise ValueError(f"shard_workers names {', '.join(unknown)}, which are not workers of "
                             f"the cluster (its workers: {', '.join(workers)})")
        threads = sum(w["nthreads"] for w in worker_info(c).values())
        size = portion_size or default_portion_size(n_rows, threads, model.flops_per_example())
        bounds = portions(n_rows, size)
        run = run_id("sandblaster")
        replicas = {}  # filled below, once the shards exist; the plan refers to this very dict
        make = _ActorMaker(c, run, model, store, n_rows, len(bounds), shards, shard_workers,
                           push_every, dict(_slow_workers or {}), replicas, threads)
        objective = BatchObjective(c, make(start, resume_from if resumed else None), bounds,
                                   n_rows, backups, make)
        recovery = _Recovery(c, run, make, start if resumed is None else None)
        try:
            if plan_p is not None:
                make.start_replicas(plan_p, objective.actors.ps)
            del start  # from here on the parameters live on the shards (and in ``recovery``)
            checkpoints = _Checkpoints(checkpoint_dir, checkpoint_every, checkpoint_keep,
                                       objective.actors,
                                       {"model": model.to_dict(), "config": config or {},
                                        "normaliser": store.normaliser.to_dict()},
                                       run, resumed, resume_from)
            monitor = _Monitor(c, run, objective, test_store, eval_every, eval_rows, max_seconds,
                               checkpoints, on_snapshot)
            settings = {"shards": shards, "iterations": iterations, "history": history,
                        "portion_size": size, "portions": len(bounds), "batch_rows": n_rows,
                        "push_every": push_every, "backups": backups, "tolerance": tolerance,
                        "partition": "" if plan_p is None else f"{plan_p.kind}/{plan_p.n_blocks}",
                        "resumed_at": 0 if resumed is None else resumed.iteration}
            announce(run, "sandblaster", settings)

            with prompt_streams(c):  # an evaluation is a chain of short tasks
                result, seconds, final, shard_stats = _optimise(
                    objective, checkpoints, monitor, recovery, resumed,
                    {"m": history, "max_iter": iterations, "gtol": tolerance, "ftol": ftol})
        finally:
            for blocks in replicas.values():
                blocks.close()
            objective.actors.close()
            if c.status == "running":  # else there is no scheduler to reach the workers by
                c.run(forget_run, run, on_error="ignore")
        figures = _summary(run, result, objective.counters, settings, seconds, n_rows, shard_stats)
        figures.update(recovery.summary())
        return finish_run(model, final, run=run, client=c, test_store=test_store, seconds=seconds,
                          step=result.iterations, summary=figures, history=monitor.rows,
                          normaliser=store.normaliser, shard_stats=shard_stats)


def _optimise(objective: BatchObjective, checkpoints: _Checkpoints, monitor: _Monitor,
              recovery: _Recovery, resumed: LbfgsState | None, settings: dict):
    """L-BFGS to the end, through lost shard holders; ``(result, seconds, final iterate,
    shard counters)``. ``settings``: ``lbfgs``'s m, max_iter, gtol, ftol."""
    state = resumed
    while True:
        try:
            try:
                space = objective.space
                slice_size = max(b - a for a, b in space.ranges)
                result = lbfgs(space, objective, "x", callback=monitor, resume=state,
                               prospective=prospective_dots(slice_size, settings["m"]),
                               **settings)
            except OutOfTime:
                result = monitor.result()
            except KeyboardInterrupt:
                if objective.busy:  # the shards hold the last iteration's vectors untouched
                    checkpoints.write()
                raise
            checkpoints.write()
            seconds = time.time() - monitor.started
            final = objective.space.gather("x")
            stats = call_all(objective.actors.ps.shards, "objective_stats",
                             watch=objective.space.watch)
            return result, seconds, final, stats
        except ShardLost as lost:
            state = recovery(lost, objective, checkpoints)
            monitor.rewind(0 if state is None else state.iteration)


def _summary(run: str, result, counters: Counters, settings: dict, seconds: float, n_rows: int,
             shard_stats: list[dict]) -> dict:
    """The run's figures: the optimisation's outcome, the portions' fate, the throughput
    (``samples``: rows of every evaluation, line searches included).

    ``vector_fetches``: how often a worker fetched the vector being evaluated (every fetch reads
    each shard once), at most once per worker process and evaluation attempt.
    """
    own = {**settings, "iterations": result.iterations, "evaluations": counters.evaluations,
           "loss": result.loss, "grad_norm": result.grad_norm, "converged": result.converged,
           "message": result.message,
           "seconds_per_iteration": seconds / max(result.iterations - settings["resumed_at"], 1),
           "evaluations_restarted": counters.evaluations_restarted,
           "portion_runs": counters.portion_runs, "backups_launched": counters.backups_launched,
           "backups_won": counters.backups_won,
           "portions_per_worker": dict(counters.portions_per_worker),
           "vector_fetches": shard_stats[0]["reads"],
           "contributions_refused": sum(s["refused"] for s in shard_stats)}
    return summary(run, "sandblaster", seconds=seconds, samples=counters.evaluations * n_rows,
                   **own)
