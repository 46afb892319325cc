"""Partitioned model replicas on Dask: ``Blocks``, the handle to the block actors of one replica.

A model-parallel replica is one ``block_actor.BlockActor`` per block of a ``partition.Plan``, each
holding its parameter ranges (one local vector: the ranges concatenated). The handle starts and
wires them, hands each its share of a minibatch at once (the input blocks their slice of X, the
head block the labels; a caller that knows the next batch has its slices sent during the step,
``ahead=``) and waits for them; the blocks then exchange activations, partial sums and
deltas *directly*, actor to actor, one message per transfer of the plan (``block.Block``), so
blocks that do not wait on each other (the horizontal pieces of a layer) compute at the same time.
Activations are kept batch-last, ``(*box, n)`` as the locally connected layers store them, so a
band of rows is one contiguous buffer that travels without a copy; the one copy per message is
where a receiver assembles its input halo or adds up deltas (or, for an input received whole, a
copy only when it arrived unaligned: ``backend.aligned``).

The layout by role: ``pieces`` (the arithmetic of one piece of one layer), ``block`` (the step
protocol, and ``loss_and_grad``: the same blocks in one process, the oracle), ``block_actor``
(the Dask actor), this module (the handle).
"""
from __future__ import annotations

import asyncio
import itertools
import uuid

import numpy as np
from distributed import get_client, get_worker

from daskbelief import waits
from daskbelief.cluster import client_or_local
from daskbelief.ps.policy import place_shards
from daskbelief.ps.server import CALL_TIMEOUT
from daskbelief.ps.sources import Given, Ranged
from daskbelief.train.block import Staged, block_values, gather_ranges, split_inputs
from daskbelief.train.block_actor import BlockActor
from daskbelief.train.partition import Plan
from daskbelief.train.recovery import gone
from daskbelief.workarounds import release_actors, start_actors, worker_info


def _loop():
    """The event loop actor calls are awaited on: this worker's, or the client's."""
    try:
        return get_worker().loop
    except ValueError:
        return get_client().loop


async def _first_error(futures):
    tasks = [asyncio.ensure_future(f) for f in futures]
    waits.read_failures(tasks)  # what fails after the first error, or once the caller gave up
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        if t.exception() is not None:
            for p in pending:
                p.cancel()
            raise t.exception()
    return [t.result() for t in tasks]


def predict_by_blocks(client, plan: Plan, params, X) -> np.ndarray:
    """``Sequential.predict`` of ``plan``'s model at ``params`` (``Blocks.start``'s kinds: a
    ``sources.Saved`` checkpoint is read by each block, its own ranges) on the cluster of
    ``client`` (default: the current one): no process holds the whole vector."""
    with client_or_local(client) as c:
        blocks = Blocks.start(c, plan, params)
        try:
            return blocks.predict(X)
        finally:
            blocks.close()


_FORWARDS = itertools.count()  # tags of forward passes (``Blocks.predict``), unique here


def _first_values(client, plan: Plan, params: Ranged | None, block: int, worker: str):
    """Block ``block``'s first values as an actor argument: None (it fetches them), cut here
    from a vector the caller holds, or made on the block's own worker."""
    if params is None or isinstance(params, Given):
        return None if params is None else block_values(plan, params, block)
    return client.submit(block_values, plan, params, block, workers=[worker], pure=False)


class Blocks:
    """Handles to the block actors of one partitioned replica (picklable into a replica task)."""

    def __init__(self, plan: Plan, actors, futures=None):
        self.plan, self.actors = plan, list(actors)
        self._futures = futures  # keeps the actors alive on the driver; not pickled
        self._staged = None  # the next batch's inputs, sent ahead: their ``Staged``
        self._sender, self._stagings = uuid.uuid4().hex, itertools.count()

    def __reduce__(self):
        return (Blocks, (self.plan, self.actors))

    @classmethod
    def start(cls, client, plan: Plan, params, *, ps=None, replica: str = "", overlap: bool = False,
              max_in_flight: int = 1, addresses=None) -> "Blocks":
        """One actor per block, wired to each other; ``addresses``: the worker of each block
        (default: distinct workers while there are enough). ``params``: an array, a
        ``sources.Ranged`` (each block makes or reads its own ranges on its worker), or None:
        each block fetches its ranges from the server ``ps``. Only an array passes through here.
        """
        if params is None and ps is None:
            raise ValueError("blocks without params= fetch them: give the parameter server ps=")
        if params is not None and not isinstance(params, Ranged):
            params = Given(np.asarray(params))
        if params is not None and params.size != plan.model.size:
            raise ValueError(f"params has {params.size} values, the model has {plan.model.size}")
        if addresses is None:
            addresses = place_shards(list(worker_info(client)), plan.n_blocks)
        token = uuid.uuid4().hex[:8]
        # a worker placed on that has just died (the scheduler still listed it) would leave the
        # actor waiting for it for good and a call to it pending: give up once it has left
        left = gone(client, addresses, "starting a model-parallel replica's blocks")
        actors, futures = start_actors(client, [
            (BlockActor, addr, f"partition-block-{k}-{token}",
             (plan, k, _first_values(client, plan, params, k, addr), ps, replica, overlap,
              max_in_flight))
            for k, addr in enumerate(addresses)], give_up=left)
        try:
            waits.results([a.connect(actors) for a in actors], timeout=CALL_TIMEOUT, give_up=left,
                          what=f"{len(actors)} blocks to connect to each other")
            if params is None:
                waits.results([a.fetch() for a in actors], timeout=CALL_TIMEOUT, give_up=left,
                              what=f"{len(actors)} blocks to fetch their ranges")
        except BaseException:
            release_actors(futures, actors)
            raise
        return cls(plan, actors, futures)

    def input_home(self) -> str:
        """The worker of the block that reads the most of each batch (``Plan.input_block``):
        where a replica driving these blocks belongs."""
        return self.actors[self.plan.input_block()]._address

    def call(self, method: str, per_block, timeout: float = CALL_TIMEOUT) -> list:
        """Call ``method(*per_block[k])`` on every block at once; the results in block order.

        Waits at most ``timeout`` seconds, and stops waiting once a block's worker has left the
        cluster (``ConnectionError``). If one block fails, the others are told to stop waiting
        for it and the error is raised.
        """
        futures = [getattr(a, method)(*args) for a, args in zip(self.actors, per_block)]
        loop = _loop()
        gathered = asyncio.run_coroutine_threadsafe(_first_error(futures), loop.asyncio_loop)
        try:
            return waits.result(gathered, timeout=timeout, give_up=self._gone,
                                what=f"{method} on {len(self.actors)} blocks")
        except Exception:
            self._staged = None  # the blocks dropped what was sent ahead with their step
            gathered.cancel()
            self._abort()
            raise

    def _abort(self) -> None:
        """Tell the blocks on live workers to stop waiting for their neighbours. A call to a
        block whose worker left may never answer, so none is made, and the answers stop being
        awaited once one is found gone (the scheduler may list a worker killed a moment ago):
        each used to be awaited for 5 s while the caller, a portion task, held its worker's
        thread and the replica lock, which kept a recovery's new blocks from starting there."""
        try:
            live = worker_info(get_client())
        except Exception:  # noqa: BLE001 -- no scheduler to ask: nothing left to tell either
            return
        replies = [a.abort() for a in self.actors if a._address in live]
        try:
            waits.results(replies, timeout=5.0, every=0.2, give_up=self._gone,
                          what="the blocks to abort their step")
        except Exception:  # noqa: BLE001 -- a block lost meanwhile: it waits for nothing now
            pass

    def _gone(self):
        """A ``give_up``: ``ConnectionError`` once the worker of a block has left the cluster."""
        return gone(get_client(), [a._address for a in self.actors], "a block")()

    def loss_and_grad(self, X, y, *, tag=0, reduction: str = "mean", regularize: bool = True,
                      ahead=None):
        """(loss, full gradient vector) of one partitioned pass: the block actors compute, then
        their gradients are gathered here (for tests and benchmarks; training never gathers).
        ``ahead`` as in ``step``."""
        losses = self.step(X, y, tag=tag, reduction=reduction, regularize=regularize, ahead=ahead)
        grads = waits.results([a.get_grad() for a in self.actors], timeout=CALL_TIMEOUT,
                              what="the blocks' gradients")
        return float(sum(losses)), gather_ranges(self.plan, grads, self.plan.model.size, grads[0].dtype)

    def _per_block(self, X, y, ahead=None) -> list[tuple]:
        """Each block's share of a batch: its input slice (input blocks; ``Staged`` where it was
        sent ahead) and the labels (head). ``ahead``: the next batch's inputs, sent to the input
        blocks now (``_send_ahead``)."""
        if self._staged is None:
            xs = split_inputs(self.plan, np.asarray(X))
        else:
            xs = dict.fromkeys(self.plan.input_blocks(), self._staged)
        self._staged = None if ahead is None else self._send_ahead(ahead)
        return [(xs.get(k), y if k == self.plan.head else None) for k in range(self.plan.n_blocks)]

    def _send_ahead(self, X) -> Staged:
        """Send each input block its slice of ``X`` now, so that it travels while the blocks
        compute the step before it (over a slow link the slices of a step's batch would
        otherwise delay its start: 14 ms a step for the image model's half at 1 Gbit/s)."""
        staged = Staged(self._sender, next(self._stagings))
        for k, x in split_inputs(self.plan, np.asarray(X)).items():
            self.actors[k].deliver(staged.key, x)
        return staged

    def predict(self, X, batch_size: int = 256) -> np.ndarray:
        """Outputs ``(n, n_outputs)`` of the forward pass through the blocks (class
        probabilities, as ``Sequential.predict``), ``batch_size`` rows at a time, each batch's
        inputs sent during the one before: only the head block's outputs come back."""
        X = np.asarray(X)
        out = []
        for start in range(0, len(X), batch_size):
            xb, tag = X[start:start + batch_size], ("forward", next(_FORWARDS))
            ahead = X[start + batch_size:start + 2 * batch_size]
            shares = self._per_block(xb, None, ahead if len(ahead) else None)
            outputs = self.call("predict", [(tag, x, len(xb)) for x, _ in shares])
            out.append(outputs[self.plan.head])
        return np.concatenate(out) if out else np.empty((0, self.plan.model.n_outputs), np.float32)

    def step(self, X, y, *, tag=0, reduction: str = "mean", regularize: bool = True,
             ahead=None) -> list[float]:
        """One forward/backward pass on every block; each block's loss share. ``ahead``: the
        next step's inputs, sent to the blocks during this one."""
        return self.call("step", [(tag, x, t, len(X), reduction, regularize)
                                  for x, t in self._per_block(X, y, ahead)])

    def train_step(self, X, y, *, tag, fetch: bool, push: bool, steps_done: int | None = None,
                   ahead=None) -> list[tuple[float, list[int]]]:
        """One Downpour step on every block (see ``BlockActor.train_step``): per block, its loss
        share and the staleness of the pushes it saw acknowledged; ``ahead`` as in ``step``."""
        return self.call("train_step", [(tag, x, t, len(X), fetch, push, steps_done)
                                        for x, t in self._per_block(X, y, ahead)])

    def close(self) -> None:
        """Release the actors."""
        release_actors(self._futures, self.actors)
        self._futures = None
