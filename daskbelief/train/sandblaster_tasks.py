"""What Sandblaster runs on the workers: portion tasks, the flush, and the claim ledger.

One *evaluation* of the batch objective (the loss and gradient at one point, tagged with an
integer that grows through the run) is cut into portions of rows. A portion is an ordinary Dask
task (``run_portion``), so whichever worker is free takes the next one. On its worker it

1. fetches the vector being evaluated from every shard, at most once per evaluation and worker
   process (the worker's cache is keyed by the evaluation tag; the other threads wait for it);
2. reads its rows, once per run (a worker keeps the data it has read, as a DistBelief replica does);
3. computes its summed float32 loss and gradient (``portion_gradient``);
4. *claims* the portion at the ``PortionLedger``: the first copy to finish wins, later copies (a
   backup, or the original a backup overtook) are dropped -- every portion counts exactly once;
5. adds a won portion into the worker's float64 accumulator for the evaluation and, every
   ``push_every`` won portions, pushes the accumulator to the shards (tagged, naming its
   portions and their losses), from the worker's event loop while the thread goes on
   computing; in the tail (fewer portions unclaimed than the cluster has threads) it pushes at
   once and waits, so the shards usually hold the whole batch when the last portion ends.

What is still unpushed when a shard finds itself short is pushed by ``flush_worker``, which the
coordinator runs on the workers' event loops (``Client.run``), not as a task: a worker whose
only thread is busy with a straggler still flushes at once.

Shards accept contributions for the open tag only, and the ledger claims for it only, so the
leftovers of an abandoned evaluation -- late copies, a restarted evaluation's first attempt --
can never leak into the next one.

A shard's worker may die while tasks wait on it, and an actor call to a dead worker can stay
pending forever. So every wait here is in slices, and gives up once the coordinator has
*abandoned* the evaluation (``abandon_evaluation``, run on every worker's event loop when it
recovers the shards): a task never holds a worker thread that the recovery needs.
"""
from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import numpy as np
from distributed import get_worker

from daskbelief import waits
from daskbelief.monitor import events
from daskbelief.ps.server import ServerLost
from daskbelief.ps.shard import early
from daskbelief.workarounds import leave_thread_pool
from daskbelief.train.evaluate import evaluate_rows
from daskbelief.train.objective import portion_gradient
from daskbelief.train.sharded_vectors import PATIENCE, WAIT_SLICE, assemble


FLUSH_PATIENCE = 60.0  # seconds a flush waits for claims in flight before giving up
EARLY_RETRY = 0.001    # seconds before asking again a shard that had not opened the evaluation


class Abandoned(Exception):
    """The coordinator gave up the evaluation this wait belongs to, or its actor is gone."""


@dataclass(frozen=True)
class PortionSpec:
    """Everything a portion task needs, shipped with each task (small: no arrays).

    ``slow`` maps a worker address to a slowdown factor: a test and benchmark option only, which
    makes that worker sleep ``(factor - 1)`` times its compute time after each portion.
    ``replicas`` maps a worker address to the model-parallel replica (a ``partitioned.Blocks``)
    that computes the portions landing on that worker (empty: each worker computes them alone).
    """

    run: str
    model: object
    store: object
    shards: tuple
    ranges: tuple
    ledger: object
    push_every: int
    slow: dict = field(default_factory=dict)
    replicas: dict = field(default_factory=dict)
    threads: int = 1  # the cluster's worker threads: the last this many portions are the tail


class PortionLedger:
    """Dask actor: which copy of each portion counts, and when each portion started.

    Its methods are coroutines, so they run on the worker's event loop and never queue behind the
    shards' work on the actor thread. Times are this worker's clock, so start times and "now"
    compare without any clock skew between machines.

    Nobody opens an evaluation here: the first word of a newer tag (tags only grow) starts it,
    and from then on older tags' claims all lose. So the coordinator spends no round trip on
    the ledger per evaluation.
    """

    def __init__(self, total: int):
        self.total = total  # portions per evaluation
        self.tag = None
        self._starts: dict[int, tuple[float, str]] = {}
        self._won: set[int] = set()
        self._finished: dict[int, tuple[float, float]] = {}

    def _current(self, tag) -> bool:
        """Whether ``tag`` is the evaluation kept here, after starting it if it is newer."""
        if self.tag is None or tag > self.tag:
            self.tag, self._starts, self._won, self._finished = tag, {}, set(), {}
        return tag == self.tag

    async def started(self, tag, portion: int, worker: str) -> None:
        """A copy of ``portion`` started on ``worker`` (only the first start is kept)."""
        if self._current(tag):
            self._starts.setdefault(portion, (time.time(), worker))

    async def claim(self, tag, portion: int, seconds: float) -> int:
        """For the first copy of ``portion`` to finish (its contribution is the one applied),
        how many portions are still unclaimed; -1 for any later copy. ``seconds``: how long
        that copy took on its worker."""
        if not self._current(tag) or portion in self._won:
            return -1
        self._won.add(portion)
        self._finished[portion] = (time.time(), seconds)
        return self.total - len(self._won)

    async def snapshot(self, tag) -> dict:
        """What the backup policy needs: ``now``, the running portions' start times (and their
        workers), the finished portions' end times and durations."""
        if not self._current(tag):
            return {"now": time.time(), "running": {}, "workers": {}, "finished": {}}
        running = {p: s for p, s in self._starts.items() if p not in self._won}
        return {"now": time.time(), "running": {p: t for p, (t, _) in running.items()},
                "workers": {p: w for p, (_, w) in running.items()},
                "finished": dict(self._finished)}


class _WorkerRun:
    """One run's state in one worker process, shared by the threads running its tasks.

    ``lock`` guards the accumulator: the evaluation ``tag`` it is for, ``acc`` with the won
    portions ``pending`` in it, and ``in_flight``: claims asked for but not yet added, and
    pushes not yet acknowledged. A flush waits for ``in_flight`` to
    drop to 0, so it never misses a portion that was just won or is on its way to the shards.
    ``fetch_lock`` makes the threads of one worker fetch an evaluation's vector once between them.
    ``model`` is the first task's copy, kept so that its per-thread work buffers are reused rather
    than allocated afresh for every portion (each task brings its own unpickled copy).
    """

    def __init__(self, model):
        self.model, size = model, model.size
        self.lock, self.fetch_lock = threading.Lock(), threading.Lock()
        self.replica_lock, self.replica_steps = threading.Lock(), 0
        self.params, self.params_tag = np.empty(size, dtype=np.float32), None
        self.rows: dict[tuple[int, int], tuple] = {}
        self.tag, self.pending, self.in_flight = None, {}, 0
        self.won_tag, self.won = None, {}  # model-parallel: portion -> (loss, backup) won here
        self.abandoned = 0  # evaluations up to this tag were given up by the coordinator
        self.acc = np.zeros(size, dtype=np.float64)
        self.spare: list[np.ndarray] = []

    def current(self, tag: int) -> bool:
        """Make ``tag`` the accumulator's evaluation if it is newer; False if ``tag`` is older,
        i.e. abandoned (call locked)."""
        if self.tag is not None and self.tag > tag:
            return False
        if self.tag != tag:
            self.tag, self.pending = tag, {}
            self.acc.fill(0.0)
        return True

    def record_win(self, tag: int, portion: int, loss: float, backup: bool) -> None:
        """Remember a copy a model-parallel replica won here (its loss goes back with the
        flush), forgetting older evaluations'."""
        with self.lock:
            if self.won_tag is None or tag > self.won_tag:
                self.won_tag, self.won = tag, {}
            if tag == self.won_tag:
                self.won[portion] = (float(loss), bool(backup))

    def take(self) -> tuple[np.ndarray, dict]:
        """Hand the accumulator and its portions (``{portion: (worker, loss, backup)}``) to a
        pusher; start an empty one (call locked)."""
        acc, portions = self.acc, self.pending
        self.acc = self.spare.pop() if self.spare else np.zeros_like(acc)
        self.pending = {}
        return acc, portions

    def pushed_back(self, acc: np.ndarray) -> None:
        """After a push (accepted or not: the shards know which): keep the buffer."""
        acc.fill(0.0)
        with self.lock:
            self.spare.append(acc)


_RUNS: dict[str, _WorkerRun] = {}
_RUNS_LOCK = threading.Lock()


def _state(spec: PortionSpec) -> _WorkerRun:
    with _RUNS_LOCK:
        state = _RUNS.get(spec.run)
        if state is None:
            state = _RUNS[spec.run] = _WorkerRun(spec.model)
        return state


def abandon_evaluation(run: str, tag: int) -> None:
    """Release every wait of this worker for evaluations up to ``tag`` (run by the coordinator
    through ``Client.run``, on the event loop: no task thread needed)."""
    with _RUNS_LOCK:
        state = _RUNS.get(run)
    if state is not None:
        state.abandoned = max(state.abandoned, tag)


def free_threads(dask_worker=None) -> int:
    """How many of this worker's pool threads no task holds now (run by the coordinator through
    ``Client.run``, on the event loop: asking needs no thread). A seceded task holds none."""
    state = dask_worker.state
    return state.nthreads - len(state.executing)


_TASK = threading.local()  # per task thread: whether this task left the thread pool


def _stalled() -> None:
    """A wait of this task is taking long (a lost shard?): hand its pool thread back, once, so
    that a recovery's new actors -- whose constructors need a pool thread -- never wait for it."""
    if not getattr(_TASK, "left", False):
        _TASK.left = True
        leave_thread_pool()


def _opened(state: _WorkerRun, tag: int, ask) -> list:
    """``ask()``'s replies to reads of evaluation ``tag`` from the shards, asked again every
    ``EARLY_RETRY`` seconds while one came ``EARLY``: the coordinator opens an evaluation while
    its portions are on their way, so a read can overtake the opening."""
    replies: list = []

    def answered() -> bool:
        replies[:] = ask()
        return not early(replies)

    waits.until(answered, timeout=PATIENCE, every=EARLY_RETRY,
                give_up=_given_up(state, tag), what=f"evaluation {tag}: the shards to open it")
    return replies


def _given_up(state: _WorkerRun, tag: int):
    """For ``daskbelief.waits``: ``Abandoned`` once the coordinator gave up evaluation ``tag``."""
    return lambda: Abandoned(tag) if state.abandoned >= tag else None


def _abandoned(state: _WorkerRun, tag: int):
    """``_given_up``, for a wait of a task thread: one that lasts hands its pool thread back
    first (``_stalled``)."""
    given_up = _given_up(state, tag)

    def give_up():
        _stalled()
        return given_up()
    return give_up


def reply(state: _WorkerRun, tag: int, pending, what: str = "a parameter shard's reply"):
    """The result of an actor call made for evaluation ``tag``, awaited in slices for at most
    ``PATIENCE`` seconds; raises ``Abandoned`` once the evaluation is given up or the actor's
    worker cannot be reached."""
    try:
        return waits.result(pending, timeout=PATIENCE, every=WAIT_SLICE,
                            give_up=_abandoned(state, tag), what=f"evaluation {tag}: {what}")
    except waits.WaitTimeout:
        raise
    except OSError as e:  # "Unable to contact Actor's worker"
        raise Abandoned(tag) from e


def forget_run(run: str) -> bool:
    """Drop a finished run's cached parameters, rows and accumulators from this worker."""
    with _RUNS_LOCK:
        return _RUNS.pop(run, None) is not None


def _parameters(spec: PortionSpec, state: _WorkerRun, tag: int):
    """The vector evaluated under ``tag``, fetched once per evaluation; None when ``tag`` is not
    the shards' open evaluation (this task is a leftover of an abandoned one)."""
    with state.fetch_lock:
        if state.params_tag != tag:
            if state.params_tag is not None and state.params_tag > tag:
                return None
            slices = _opened(state, tag, lambda: [
                reply(state, tag, p) for p in [s.read_evaluated(tag) for s in spec.shards]])
            if any(s is None for s in slices):
                return None
            assemble(slices, spec.ranges, state.params)
            state.params_tag = tag
        return state.params


def _rows(spec: PortionSpec, state: _WorkerRun, bounds: tuple[int, int]):
    """The portion's rows, read from the store the first time this worker computes it."""
    rows = state.rows.get(bounds)
    if rows is None:
        rows = state.rows[bounds] = spec.store.read(*bounds)
    return rows


async def _push(spec: PortionSpec, state: _WorkerRun, tag: int, acc: np.ndarray,
                portions: dict) -> None:
    """Add ``acc`` into every shard's accumulator (all shards at once, on the worker's event
    loop), naming its portions and their losses (a shard refuses an abandoned evaluation's
    contributions, and finishes only once it holds every portion)."""
    pending = [asyncio.ensure_future(s.accumulate(tag, acc[a:b], 0, portions))
               for s, (a, b) in zip(spec.shards, spec.ranges)]
    waits.read_failures(pending)  # a lost shard's error, also one that comes after abandoning
    try:  # a dead shard's reply may never come: wait until the evaluation is abandoned
        await waits.result_async(asyncio.wait(pending), timeout=PATIENCE, every=WAIT_SLICE,
                                 give_up=_given_up(state, tag),
                                 what=f"evaluation {tag}: the shards to take a worker's push")
    except Abandoned:
        pass
    finally:
        state.pushed_back(acc)


async def _push_counted(spec: PortionSpec, state: _WorkerRun, tag: int, acc: np.ndarray,
                        portions: dict, landed: threading.Event | None = None) -> None:
    """A push, counted in flight until it lands (a flush waits for it); ``landed`` is set then."""
    try:
        await _push(spec, state, tag, acc, portions)
    finally:
        with state.lock:
            state.in_flight -= 1
        if landed is not None:
            landed.set()


def _claim_and_add(spec: PortionSpec, state: _WorkerRun, tag: int, portion: int, loss, grad,
                   seconds: float, backup: bool) -> bool:
    """Claim the portion; if this copy won, add it into the worker's accumulator, and push that
    to the shards every ``push_every`` won portions -- in the background while the thread
    computes on -- and in the *tail* (fewer portions unclaimed than the cluster has threads:
    this thread has probably nothing left to do) at once, waiting for it, so that when the last
    portion ends the shards usually hold everything and no flush is needed. Returns whether
    this copy counted."""
    worker = get_worker()
    with state.lock:
        state.in_flight += 1
    try:
        unclaimed = reply(state, tag, spec.ledger.claim(tag, portion, seconds),
                          f"the ledger's claim of portion {portion}")
        if unclaimed < 0:
            return False
        tail = unclaimed < spec.threads
        with state.lock:
            if not state.current(tag):
                return True  # counted in an evaluation abandoned meanwhile: nothing to add to
            state.acc += grad
            state.pending[portion] = (worker.address, float(loss), bool(backup))
            if len(state.pending) < spec.push_every and not tail:
                return True
            acc, portions = state.take()
            state.in_flight += 1  # the push: a flush waits for it to land
        landed = threading.Event() if tail else None
        worker.loop.add_callback(_push_counted, spec, state, tag, acc, portions, landed)
        if tail:  # the thread waits, but never for an abandoned evaluation (a lost shard)
            try:
                waits.until(lambda: landed.wait(WAIT_SLICE), timeout=PATIENCE, every=0,
                            give_up=_abandoned(state, tag),
                            what=f"evaluation {tag}: portion {portion}'s push to land")
            except Abandoned:
                pass
        return True
    finally:
        with state.lock:
            state.in_flight -= 1


def run_portion(spec: PortionSpec, tag: int, portion: int, bounds: tuple[int, int],
                backup: bool = False) -> bool:
    """Compute one portion of evaluation ``tag``, claim it, keep it if won (module docstring).

    Returns whether this copy counted (False too when the evaluation was abandoned while the
    copy waited on an actor). The coordinator does not fetch it: it learns the winners and their
    losses from the flush, not one result at a time.
    """
    start, _TASK.left = time.perf_counter(), False
    worker = get_worker().address
    spec.ledger.started(tag, portion, worker)  # not awaited: the reply is of no use here
    state = _state(spec)
    replica = spec.replicas.get(worker)
    if replica is not None:
        return _run_on_blocks(spec, state, replica, tag, portion, bounds, backup, start, worker)
    try:
        params = _parameters(spec, state, tag)
        if params is None:
            return False
        X, y = _rows(spec, state, bounds)
        tick = time.perf_counter()
        loss, grad = portion_gradient(state.model, params, X, y)
        _straggle(spec, worker, tick)
        compute = time.perf_counter() - tick
        counted = _claim_and_add(spec, state, tag, portion, loss, grad,
                                 time.perf_counter() - start, backup)
    except Abandoned:
        return False
    _report(spec, tag, portion, worker, compute, backup, counted)
    return counted


def evaluate_current(spec: PortionSpec, store, stop: int, tag: int) -> dict | None:
    """Test metrics on the first ``stop`` rows of ``store`` at the current iterate (vector
    ``"x"``, between iterations), on a worker that fetches it itself; None when the
    coordinator abandoned ``tag`` meanwhile (a shard was lost)."""
    state = _state(spec)
    pending = [s.read("x") for s in spec.shards]
    try:
        params = assemble([reply(state, tag, p) for p in pending], spec.ranges)
    except Abandoned:
        return None
    return evaluate_rows(spec.model, params, store, 0, stop)


def _straggle(spec: PortionSpec, worker: str, tick: float) -> None:
    """Test / benchmark only: make a slowed worker a straggler machine."""
    factor = spec.slow.get(worker, 1.0)
    if factor > 1.0:
        time.sleep((factor - 1.0) * (time.perf_counter() - tick))


def _report(spec: PortionSpec, tag: int, portion: int, worker: str, compute: float, backup: bool,
            counted: bool) -> None:
    events.emit(events.PORTION, run=spec.run, evaluation=tag, portion=portion, worker=worker,
                seconds=compute, backup=backup, counted=counted)


def _run_on_blocks(spec: PortionSpec, state: _WorkerRun, replica, tag: int, portion: int,
                   bounds: tuple[int, int], backup: bool, start: float, worker: str) -> bool:
    """The portion computed by this worker's model-parallel replica: its blocks take their own
    ranges of the evaluated vector from the shards, compute the portion together and, when it
    wins its claim, add their ranges of its gradient into their own float64 sums, which they
    push to the shards themselves. One portion at a time: the blocks hold its gradient until
    the claim is decided."""
    k = replica.plan.n_blocks
    with state.replica_lock:
        if state.abandoned >= tag:  # queued behind a portion the recovery released
            return False
        try:
            if not all(_opened(state, tag, lambda: replica.call("load_evaluated", [(tag,)] * k))):
                return False
            X, y = _rows(spec, state, bounds)
            tick = time.perf_counter()
            state.replica_steps += 1
            loss = sum(replica.step(X, y, tag=(tag, portion, state.replica_steps), reduction="sum",
                                  regularize=False))
            _straggle(spec, worker, tick)
            compute = time.perf_counter() - tick
            counted = reply(state, tag, spec.ledger.claim(tag, portion, time.perf_counter() - start),
                            f"the ledger's claim of portion {portion}") >= 0
            if counted:
                state.record_win(tag, portion, loss, backup)
                replica.call("add_portion", [(tag, portion, spec.push_every)] * k)
        except (Abandoned, ServerLost, OSError):  # a shard or a block lost: so is the portion
            return False                          # (OSError: a block's worker left, a timeout)
    _report(spec, tag, portion, worker, compute, backup, counted)
    return counted


async def flush_worker(spec: PortionSpec, tag: int, dask_worker=None) -> dict:
    """Push what this worker still holds for evaluation ``tag`` -- its accumulator, and its
    model-parallel replica's sums -- and return ``{portion: (worker, loss, backup)}`` for every
    portion of ``tag`` its replica won and has applied on the shards (block pushes name no
    portions, so this is how the coordinator learns those winners).

    Run by the coordinator through ``Client.run`` on the worker's event loop: it needs no task
    thread, so a worker whose threads are all busy (with a straggler) flushes at once. It waits
    only for claims and pushes in flight (round trips), never for a computation. The shard calls
    are awaited, so the event loop keeps serving while they travel. ``dask_worker`` is the
    worker, which ``Client.run`` passes in.
    """
    with _RUNS_LOCK:
        state = _RUNS.get(spec.run)
    if state is None:
        return {}
    await _flush_accumulator(spec, state, tag)
    replica = spec.replicas.get(dask_worker.address) if dask_worker is not None else None
    if replica is None:
        return {}
    # a portion counts once every block of the replica has pushed it
    replies = await asyncio.gather(*[a.flush_evaluation(tag) for a in replica.actors])
    applied = set.intersection(*map(set, replies))
    with state.lock:
        won = state.won if state.won_tag == tag else {}
        return {p: (dask_worker.address, *won[p]) for p in applied if p in won}


async def _flush_accumulator(spec: PortionSpec, state: _WorkerRun, tag: int) -> None:
    """Push what the accumulator holds for ``tag`` once no claim or push is in flight."""
    def settled():
        """None while claims or pushes travel; then ``(accumulator, portions)`` to push, or
        ``(None, None)`` for nothing."""
        with state.lock:  # task threads hold it only for an in-memory add
            if state.in_flight and state.abandoned < tag:
                return None
            if state.tag != tag or state.abandoned >= tag or not state.pending:
                return None, None
            return state.take()

    try:
        acc, portions = await waits.until_async(settled, timeout=FLUSH_PATIENCE, every=0.001,
                                                what=f"evaluation {tag}: the claims in flight")
    except waits.WaitTimeout:  # a claim that never returns: push nothing, and the shards'
        return                 # count starts the evaluation again
    if acc is not None:
        await _push(spec, state, tag, acc, portions)
