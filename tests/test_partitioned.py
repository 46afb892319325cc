"""Partitioned replicas on a real LocalCluster: block actors exchanging activations and deltas."""
from __future__ import annotations

import threading
import tracemalloc

import numpy as np
import pytest
from distributed import Client, LocalCluster

from daskbelief.cluster import worker_info
from daskbelief.nn import Dense, LocallyConnected2D, Sequential
from daskbelief.ps.policy import place_blocks
from daskbelief.train import partition as P
from daskbelief.train.partitioned import Blocks

# float32 tolerance: a partitioned pass adds the same products in another order (partial sums of a
# dense layer over blocks, halo deltas over neighbours), so each value may differ by a few ulps of
# the largest term it sums; with O(1) terms and at most a few hundred of them that is < 1e-5.
TOL = 1e-5


def image_model():
    return Sequential((12, 10, 2), [LocallyConnected2D(4, 3, activation="relu"),
                                    LocallyConnected2D(3, 3, strides=(2, 1), activation="tanh"),
                                    Dense(16, "relu"), Dense(5)], l2=1e-3)


def dense_model():
    return Sequential((20,), [Dense(24, "relu"), Dense(18, "sigmoid"), Dense(4)], l2=1e-3)


def batch(model, n=9, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, *model.input_shape), dtype=np.float32),
            rng.integers(0, model.n_outputs, n))


PLANS = [
    (image_model, lambda m: P.vertical(m, 2)),
    (image_model, lambda m: P.horizontal(m, 2)),
    (image_model, lambda m: P.grid(m, 2, 2)),
    (image_model, lambda m: P.stages(m, [(2, (2, 2)), (2, 1)])),
    (dense_model, lambda m: P.vertical(m, 3)),
    (dense_model, lambda m: P.horizontal(m, 2)),
    (dense_model, lambda m: P.stages(m, [(1, 1), (2, 2)])),
]


@pytest.mark.parametrize("make_model, make_plan", PLANS)
def test_partitioned_loss_and_gradient_equal_the_whole_network(client, make_model, make_plan):
    model = make_model()
    plan = make_plan(model)
    params = model.init(2)
    batches = [batch(model, seed=seed) for seed in range(3)]
    blocks = Blocks.start(client, plan, params)
    try:
        # later steps reuse every buffer; each step's inputs are sent during the step before
        for tag, (X, y) in enumerate(batches):
            ahead = batches[tag + 1][0] if tag + 1 < len(batches) else None
            loss, grad = blocks.loss_and_grad(X, y, tag=tag, ahead=ahead)
            expect_loss, expect_grad = model.loss_and_grad(params, X, y)
            assert loss == pytest.approx(expect_loss, rel=TOL)
            np.testing.assert_allclose(grad, expect_grad, rtol=TOL, atol=TOL * np.abs(expect_grad).max())
        stats = [a.stats().result() for a in blocks.actors]
    finally:
        blocks.close()
    # One message per transfer and direction per step, carrying exactly the plan's bytes.
    assert sum(s["messages"] for s in stats) == 3 * 2 * len(plan.transfers)
    assert sum(s["bytes_sent"] for s in stats) == 3 * plan.bytes_per_example() * len(X)


def _spy_on_proxied_calls(dask_scheduler):
    """Record the actor methods the scheduler relays (a client's actor calls go through it)."""
    original = dask_scheduler.handlers["proxy"]
    calls = []

    async def proxy(msg, worker, serializers=None):
        calls.append(msg.get("function"))
        return await original(msg=msg, worker=worker, serializers=serializers)

    dask_scheduler.handlers["proxy"] = proxy
    dask_scheduler._partition_spy = (original, calls)


def _stop_spying(dask_scheduler):
    original, calls = dask_scheduler._partition_spy
    dask_scheduler.handlers["proxy"] = original
    del dask_scheduler._partition_spy
    return calls


def test_blocks_sit_on_distinct_workers_and_send_to_each_other_directly(client):
    model = image_model()
    plan = P.horizontal(model, 2)
    blocks = Blocks.start(client, plan, model.init(0))
    try:
        held = client.run(lambda dask_worker: [str(k) for k in dask_worker.state.actors])
        keys = {str(a.key) for a in blocks.actors}
        assert sorted(len(keys & set(ks)) for ks in held.values()) == [1, 1]
        X, y = batch(model)
        client.run_on_scheduler(_spy_on_proxied_calls)
        try:
            blocks.step(X, y)
        finally:
            relayed = client.run_on_scheduler(_stop_spying)
        # The driver's two step calls went through the scheduler; the activations and deltas
        # (``deliver``) went worker to worker.
        assert sorted(relayed) == ["step", "step"]
        sent = [a.stats().result()["messages"] for a in blocks.actors]
        assert min(sent) > 0 and sum(sent) == 2 * len(plan.transfers)
    finally:
        blocks.close()


def test_a_failing_block_raises_instead_of_hanging(client):
    model = dense_model()
    blocks = Blocks.start(client, P.horizontal(model, 2), model.init(0))
    try:
        X, y = batch(model)
        X2, y2 = batch(model, seed=1)
        with pytest.raises(ValueError, match="labels must lie in"):
            blocks.step(X, y + 100, tag=0, ahead=X)  # what it sent ahead is dropped with it
        # the blocks still work afterwards, given their inputs again, and sent ahead again
        loss, _ = blocks.loss_and_grad(X2, y2, tag=1, ahead=X)
        assert loss == pytest.approx(model.loss_and_grad(model.init(0), X2, y2)[0], rel=TOL)
        loss, _ = blocks.loss_and_grad(X, y, tag=2)
        assert loss == pytest.approx(model.loss_and_grad(model.init(0), X, y)[0], rel=TOL)
    finally:
        blocks.close()


def test_downpour_with_a_partitioned_replica_reproduces_the_unpartitioned_run(client, digits_path):
    """R=1, n_fetch=n_push=1, no overlap: the block actors fetch and push only their own ranges,
    and the shards end where the single-block replica's shards end (float32 summation order)."""
    from daskbelief.train.downpour import downpour

    model = Sequential((64,), [Dense(24, "relu"), Dense(16, "tanh"), Dense(10)], l2=1e-4)
    args = dict(client=client, replicas=1, shards=2, n_fetch=1, n_push=1, overlap=False,
                rule={"name": "adagrad", "lr": 0.05}, batch_size=16, steps=40, seed=4)
    plain = downpour(model, digits_path, **args)
    for plan in (P.horizontal(model, 2), P.vertical(model, 2)):
        split = downpour(model, digits_path, partition=plan, **args)
        np.testing.assert_allclose(split.params, plain.params, rtol=0, atol=1e-5)
        assert split.summary["updates_applied"] > plain.summary["updates_applied"]  # per range
        assert not np.array_equal(plain.params, model.init(4))


def test_blocks_push_ranges_larger_than_one_comm_frame_frame_by_frame(digits_path):
    """A block's range on a shard larger than one comm frame travels as several push calls
    (``server.push_slice``), which the block awaits on its event loop: with 1 KiB frames, the
    partitioned run still equals the unpartitioned one and loses no push."""
    import dask

    from daskbelief.train.downpour import downpour

    model = Sequential((64,), [Dense(24, "relu"), Dense(10)], l2=1e-4)
    args = dict(replicas=1, shards=2, n_fetch=1, n_push=1, overlap=False,
                rule={"name": "adagrad", "lr": 0.05}, batch_size=16, steps=20, seed=4)
    with dask.config.set({"distributed.comm.shard": "1KiB"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                         dashboard_address=":0") as cluster, Client(cluster) as c:
        assert c.run(lambda: dask.config.get("distributed.comm.shard")) == {
            w: "1KiB" for w in c.scheduler_info()["workers"]}  # the workers cut frames small
        plain = downpour(model, digits_path, client=c, **args)
        split = downpour(model, digits_path, client=c, partition=P.horizontal(model, 2), **args)
    assert max(b - a for a, b in P.horizontal(model, 2).block_ranges(0)) > 256  # > 1 frame
    np.testing.assert_allclose(split.params, plain.params, rtol=0, atol=1e-5)
    assert split.replica_outcomes[0]["pushes_lost"] == 0
    assert split.summary["shard_recoveries"] == 0 and split.summary["updates_rejected"] == 0


def test_downpour_partitioned_replicas_train_together(client, digits_path):
    from daskbelief.train.downpour import downpour

    model = Sequential((64,), [Dense(32, "relu"), Dense(10)])
    result = downpour(model, digits_path, test=digits_path, client=client, replicas=2, shards=2,
                      n_fetch=2, n_push=2, rule={"name": "adagrad", "lr": 0.05}, batch_size=32,
                      epochs=6, partition={"kind": "horizontal", "k": 2})
    assert result.summary["test_accuracy"] >= 0.9
    for shard in result.shard_stats:
        assert sorted(shard["per_replica"]) == ["replica-0", "replica-1"]
    # each replica ran beside the block it sends the most of every batch (both workers hold a
    # shard, so the replicas would otherwise have been spread over them)
    workers = sorted(worker_info(client))
    blocks = place_blocks(workers, workers, 2, 2)
    ran = {o["replica"]: o["worker"] for o in result.replica_outcomes}
    assert ran == {r: blocks[r][result.plan.input_block()] for r in range(2)}


def test_a_plan_for_another_model_is_refused(client, digits_path):
    from daskbelief.train.downpour import downpour

    model = Sequential((64,), [Dense(32, "relu"), Dense(10)])
    other = Sequential((64,), [Dense(16, "relu"), Dense(10)])
    with pytest.raises(ValueError, match="plan was made for another model: layer 0 differs"):
        downpour(model, digits_path, client=client, replicas=1, steps=1,
                 partition=P.horizontal(other, 2))
    with pytest.raises(ValueError, match="partition.kind"):
        downpour(model, digits_path, client=client, replicas=1, steps=1, partition={"kind": "diagonal"})


@pytest.mark.parametrize("make_model, make_plan", [PLANS[1], PLANS[2], PLANS[6]])
def test_blocks_predict_what_the_whole_network_predicts(client, make_model, make_plan):
    """The forward pass alone through the block actors (a test evaluation or a prediction of a
    model no process holds): the head block's outputs equal ``Sequential.predict``, over
    batches that do not divide the rows."""
    model = make_model()
    params = model.init(2)
    X, _ = batch(model, n=11)
    blocks = Blocks.start(client, make_plan(model), params)
    try:
        np.testing.assert_allclose(blocks.predict(X, batch_size=4), model.predict(params, X),
                                   rtol=0, atol=TOL)
    finally:
        blocks.close()


def test_blocks_make_their_own_ranges_of_a_source(client):
    """Blocks started from a seed (``sources.Fresh``) draw their own ranges on their workers:
    together they hold ``model.init(seed)``."""
    from daskbelief.ps.sources import Fresh
    from daskbelief.train.block import gather_ranges

    model, seed = image_model(), 7
    plan = P.horizontal(model, 2)
    blocks = Blocks.start(client, plan, Fresh(model, seed))
    try:
        held = [a.get_params().result() for a in blocks.actors]
    finally:
        blocks.close()
    np.testing.assert_array_equal(gather_ranges(plan, held, model.size, np.float32), model.init(seed))


class _Watch:
    """Takes a tracemalloc snapshot (25 frames deep) the first time the traced allocations
    exceed ``bound`` bytes, polling every 2 ms, so that a failure names what was allocated."""

    def __init__(self, bound: int):
        self.bound, self.snapshot, self._stop = bound, None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while self.snapshot is None and not self._stop.wait(0.002):
            if tracemalloc.get_traced_memory()[0] > self.bound:
                self.snapshot = tracemalloc.take_snapshot()

    def __enter__(self):
        tracemalloc.start(25)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()

    def biggest(self) -> str:
        if self.snapshot is None:
            return "(the polling missed it: no snapshot)"
        top = self.snapshot.statistics("traceback")[0]
        return f"{top.size:,} B allocated at\n" + "\n".join(top.traceback.format())


def test_a_model_parallel_run_never_holds_its_model_in_the_driver(client, digits_path, tmp_path):
    """A model-parallel Downpour run that keeps checkpoints: the shards draw their own ranges of
    the initial parameters, the blocks fetch theirs, test evaluations and the final one go
    through blocks, and the result refers to the last checkpoint. The driver's Python
    allocations (tracemalloc: NumPy's included) stay far below the model's size all along; the
    result's evaluation and predictions equal the whole model's at the checkpoint's parameters."""
    from daskbelief.ps import checkpoint
    from daskbelief.train.downpour import downpour
    from daskbelief.train.evaluate import evaluate

    model = Sequential((64,), [Dense(1536, "relu"), Dense(1536, "relu"), Dense(10)])
    nbytes = 4 * model.size  # 10 MB
    with _Watch(nbytes // 4) as watch:
        result = downpour(model, digits_path, test=digits_path, client=client, replicas=1,
                          shards=2, n_fetch=2, n_push=2, rule={"name": "adagrad", "lr": 0.01},
                          batch_size=32, steps=30, eval_every=1e-3, checkpoint_dir=tmp_path,
                          partition={"kind": "horizontal", "k": 2})
    print(f"driver's peak traced allocation {watch.peak / 1e6:.1f} MB, model {nbytes / 1e6:.1f} MB")
    assert watch.peak < nbytes / 4, watch.biggest()
    assert result.params is None and result.rule_state is None
    assert result.checkpoint == checkpoint.latest(tmp_path)
    assert sum(h["test_loss"] is not None for h in result.history) >= 2  # during and at the end
    params = checkpoint.load(result.checkpoint, arrays=False).params
    whole = evaluate(model, params, digits_path, client=client)
    # the blocks add in another order: a near-tie could flip one row's class, no more
    assert result.summary["test_accuracy"] == pytest.approx(whole["accuracy"], abs=1.5 / whole["n"])
    assert result.summary["test_loss"] == pytest.approx(whole["loss"], rel=1e-5)
    X = np.random.default_rng(0).uniform(0, 16, (7, 64)).astype(np.float32)  # raw features
    np.testing.assert_allclose(result.predict(X, client=client),
                               model.predict(params, result.normaliser(X)), rtol=0, atol=TOL)


def test_a_finished_model_parallel_run_leaves_no_actor_behind(client, digits_path):
    """The shards, the replica's blocks and the evaluation's blocks are gone from the workers
    once the run returns (distributed's logs of sent messages held their handles, and with them
    the actors, on an in-process scheduler: ``workarounds.forget_sent_messages``)."""
    from daskbelief import waits
    from daskbelief.train.downpour import downpour

    def actors():
        return sorted(k for keys in client.run(lambda dask_worker: list(dask_worker.state.actors))
                      .values() for k in keys)

    before = actors()
    model = Sequential((64,), [Dense(32, "relu"), Dense(10)])
    downpour(model, digits_path, test=digits_path, client=client, replicas=1, shards=2,
             steps=20, eval_every=1e-3, partition={"kind": "horizontal", "k": 2})
    waits.until(lambda: actors() == before, timeout=10.0,
                what="the run's shards and blocks to leave the workers")


@pytest.mark.parametrize("first", ["array", "made on the workers"])
def test_blocks_placed_on_a_worker_that_has_just_died_give_up_naming_it(first):
    """A placement made from a list the scheduler gave just before one of its workers died (a
    rebuild racing a second loss): starting blocks there fails at once with ``ConnectionError``
    naming the dead worker (the caller places them again), instead of an actor waiting for that
    worker until ``ACTOR_START_TIMEOUT`` (a ``WaitTimeout`` two minutes later). The first
    values go either way: scattered there from here, or made there by a task."""
    from daskbelief.ps.sources import Fresh
    from daskbelief.testing import chaos

    seed = int(np.random.SeedSequence().entropy % 1000)
    print(f"victim seed {seed}")
    model = dense_model()
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      worker_dashboard_address=None) as cluster, Client(cluster) as c:
        workers = sorted(worker_info(c))
        victim = workers[np.random.default_rng(seed).integers(len(workers))]
        chaos.kill_worker(c, victim)
        with pytest.raises(ConnectionError, match=victim):
            Blocks.start(c, P.horizontal(model, 2),
                         model.init(0) if first == "array" else Fresh(model, 0), addresses=workers)


def test_a_fetch_sent_before_a_recovered_server_arrived_stops_waiting_for_the_old_one():
    """A block (overlapping its fetch with the pass) sends the fetch, then the driver hands it a
    recovered server (``set_server``), then the block awaits the replies. A reply of the lost
    shard may never come (an actor call to a dead worker can stay pending): the wait must end
    with ``ServerLost`` at its next slice, judged by the server the fetch went to, not wait for
    the dead shard until the replica's 120-s deadline (a chaos run met that)."""
    import asyncio

    from daskbelief.ps.server import ServerLost
    from daskbelief.ps.sources import Given
    from daskbelief.train.block import block_values
    from daskbelief.train.block_actor import BlockActor

    model = dense_model()
    plan = P.horizontal(model, 2)
    block = BlockActor(plan, 0, block_values(plan, Given(model.init(0)), 0), overlap=True)

    async def fetch_then_recovery():
        never = asyncio.get_running_loop().create_future()  # the lost shard's reply
        issued = (block.generation, [(0, 0, 0, 1, never)])  # what ``_issue_fetch`` returns
        await block.set_server(None)
        await asyncio.wait_for(block._finish_fetch(issued), timeout=30)

    with pytest.raises(ServerLost, match="replaced"):
        asyncio.run(fetch_then_recovery())
