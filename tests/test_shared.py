"""Shared memory between replicas and the parameter shards of their host (``ps.shared``).

Real worker processes on one host: a replica's handle (``ParameterServer.here``) reads a shard
in another process out of shared memory and pushes by naming its buffer. The oracles: the
update rule applied in one process, and -- against torn reads -- a shard whose values are all
equal after every complete update, so a fetch that saw half an update sees two values.
"""
from __future__ import annotations

import os

import dask.config
import numpy as np
import pytest
from distributed import get_worker

from daskbelief import waits
from daskbelief.cluster import worker_info
from daskbelief.optim.rules import adagrad, make_rule
from daskbelief.ps import shared
from daskbelief.ps.server import ParameterServer

pytestmark = pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="needs memfd_create (Linux)")


def _push_from_shared_buffers(ps, grads):
    """On a worker: each gradient written into a buffer from ``shared.empty`` and pushed (as the
    replica's push window does), then the vector fetched; and how the handle reached the shard
    and the pushes travelled."""
    near = ps.here()
    travelled = set()
    for g in grads:
        buf = shared.empty(len(g))
        buf[:] = g
        assert shared.ref_of(buf) is not None and shared.ref_of(buf[5:9]).offset == 5
        replies = near.push_async(buf, [0] * len(near.shards))
        travelled |= {type(r).__module__ + "." + type(r).__name__ for r in replies}
        near.wait_all(replies, "pushes")
    values, versions = near.fetch()
    return [type(s).__name__ for s in near.shards], travelled, values, versions


@pytest.mark.parametrize("where", ["another process", "the shards' process"])
def test_a_replica_pushes_and_fetches_through_shared_memory_exactly(client, where):
    rng = np.random.default_rng(4)
    n = 300_001
    params = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(3)]
    rule = adagrad(lr=0.03)
    shard_worker, caller = sorted(worker_info(client))
    caller = caller if where == "another process" else shard_worker
    ps = ParameterServer.create(client, params, 2, rule, workers=[shard_worker])
    try:
        kinds, travelled, values, versions = client.submit(
            _push_from_shared_buffers, ps, grads, workers=[caller], pure=False).result()
        stats = ps.stats()
    finally:
        ps.close()
    assert kinds == ["SharedShard", "SharedShard"]
    # through the mailbox, or straight to the actor thread: never an actor call's message
    assert travelled == {"concurrent.futures._base.Future"}
    expect, state = params.copy(), rule.init(params)
    for g in grads:
        rule.apply(expect, g, state)
    np.testing.assert_array_equal(values, expect)
    assert versions == [3, 3]
    assert [s["applied"] for s in stats] == [3, 3] and [s["fetches"] for s in stats] == [1, 1]
    assert sum(s["bytes_in"] for s in stats) == 3 * 4 * n
    assert sum(s["bytes_out"] for s in stats) == 4 * n


def _read_while_pushed(ps, reads: int):
    """On a worker: fetch ``reads`` times through shared memory; every distinct value and
    version seen in each fetch."""
    near = ps.here()
    assert [type(s).__name__ for s in near.shards] == ["SharedShard"]
    out, seen = None, []
    for _ in range(reads):
        out, versions = near.fetch(out)
        seen.append((np.unique(out).tolist(), versions[0]))
    return seen


def test_a_fetch_from_shared_memory_never_sees_half_an_update(client):
    # SGD with lr 1 and a gradient of -1 everywhere: after k updates every value is k, so a
    # copy taken while the shard was writing holds two different values.
    n = 2_000_000
    rule = make_rule({"name": "sgd", "lr": 1.0})
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, np.zeros(n, np.float32), 1, rule, workers=[shard_worker])
    try:
        reading = client.submit(_read_while_pushed, ps, 300, workers=[caller], pure=False)
        grad = np.full(n, -1.0, np.float32)
        pushes = 0
        while not reading.done() and pushes < 2_000:
            ps.push(grad, [0])
            pushes += 1
        seen = reading.result()
    finally:
        ps.close()
    assert all(len(values) == 1 for values, _ in seen), [v for v, _ in seen if len(v) > 1][:3]
    assert all(values[0] == version for values, version in seen)  # the version is the values'
    versions = [version for _, version in seen]
    assert versions == sorted(versions)
    assert len(set(versions)) > 1, "no push landed while the replica read: nothing was tested"


def _kinds_here(ps, on: bool = True):
    """How a replica on this worker reaches each shard, shared memory allowed or not."""
    with dask.config.set({"daskbelief.shared-memory": on}):
        return [type(s).__name__ for s in ps.here().shards]


def test_shards_are_reached_over_tcp_when_shared_memory_is_off_or_unusable(client):
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, np.zeros(10, np.float32), 1, "adagrad", workers=[shard_worker])
    dc = ParameterServer.create(client, np.zeros(10, np.float32), 1,
                                {"name": "adagrad", "lr": 0.1, "delay_compensation": 0.5},
                                workers=[shard_worker])
    try:
        assert client.submit(_kinds_here, ps, workers=[caller], pure=False).result() == ["SharedShard"]
        assert client.submit(_kinds_here, ps, workers=[shard_worker], pure=False).result() == ["SharedShard"]
        assert client.submit(_kinds_here, ps, False, workers=[shard_worker], pure=False).result() == ["LocalActor"]
        assert client.submit(_kinds_here, ps, False, workers=[caller], pure=False).result() == ["Actor"]
        # delay compensation keeps what each replica fetched: its fetches must reach the shard
        assert client.submit(_kinds_here, dc, workers=[caller], pure=False).result() == ["Actor"]
        ref = ps.shards[0].shared_ref().result()
        forged = shared.Ref(ref.pid, ref.fd, ref.token + 1, ref.size)
        assert client.submit(_near_with, ps, forged, workers=[caller], pure=False).result() == "Actor"
    finally:
        ps.close()
        dc.close()


def _near_with(ps, ref):
    """How ``near`` reaches the shard given ``ref`` (one whose token is wrong: not its segment)."""
    return type(shared.near(ps.shards[0], get_worker().address, ref)).__name__


def test_push_buffers_are_plain_arrays_when_shared_memory_is_off():
    with dask.config.set({"daskbelief.shared-memory": False}):
        assert not shared.enabled()
        assert type(shared.empty(4)) is np.ndarray and shared.ref_of(shared.empty(4)) is None
    assert shared.enabled()
    buf = shared.empty(8)
    ref = shared.ref_of(buf[2:6])
    assert ref.offset == 2 and ref.length == 4
    assert shared.ref_of(np.empty(8, np.float32)) is None


def _push_out_of_range(ps):
    """On a worker: a push through the mailbox that the shard refuses; what the caller sees."""
    shard = ps.here().shards[0]
    buf = shared.empty(4)
    buf[:] = 1.0
    try:
        shard.push(buf, 0, "replica-x", 8, None).result(timeout=30)
    except shared.ShardError as e:
        return type(shard).__name__, str(e)
    return type(shard).__name__, "no error"


def test_a_push_the_shard_refuses_fails_with_the_shards_error(client):
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, np.zeros(10, np.float32), 1, "adagrad", workers=[shard_worker])
    try:
        kind, error = client.submit(_push_out_of_range, ps, workers=[caller], pure=False).result()
        stats = ps.stats()[0]
    finally:
        ps.close()
    assert kind == "SharedShard"
    assert error.startswith("ValueError: shard 0: push of 4 values at offset 8"), error
    assert stats["applied"] == 0 and stats["version"] == 0


def _push_after_the_shard_dies(ps, ready: str, killed: str):
    """On a worker: reach the shard through shared memory, say so, wait until its process was
    killed, then push through its mailbox; the error the push raised."""
    from distributed import Event

    near = ps.here()
    assert [type(s).__name__ for s in near.shards] == ["SharedShard"]
    Event(ready).set()
    assert Event(killed).wait(60), "the shard's process was not killed within 60 s"
    buf = shared.empty(ps.size)
    buf[:] = 1.0
    try:
        near.shards[0].push(buf, 0, "replica-x", 0, None).result(timeout=30)
    except Exception as e:  # noqa: BLE001 -- what the caller meets is the point
        return type(e).__name__
    return "no error"


def test_a_push_to_a_shard_whose_process_died_fails_at_once():
    import signal

    from distributed import Client, Event, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        shard_worker, caller = sorted(worker_info(client))
        ps = ParameterServer.create(client, np.zeros(1000, np.float32), 1, "adagrad",
                                    workers=[shard_worker])
        outcome = client.submit(_push_after_the_shard_dies, ps, "shm-ready", "shm-killed",
                                workers=[caller], pure=False)
        assert Event("shm-ready", client=client).wait(60), "the caller never reached the shard"
        pid = client.run(os.getpid, workers=[shard_worker])[shard_worker]
        os.kill(pid, signal.SIGKILL)
        waits.until(lambda: not os.path.exists(f"/proc/{pid}"), timeout=60, every=0.05,
                    what=f"the shard's process {pid} to be gone after SIGKILL")
        Event("shm-killed", client=client).set()
        # A push sent as the process dies is never answered (its caller's wait gives up, as for
        # an actor call); one sent after fails at once instead of waiting for nobody.
        assert outcome.result(timeout=60) == "BrokenPipeError"


def _share_memory(on: bool) -> None:
    dask.config.set({"daskbelief.shared-memory": on})


def test_a_run_says_how_much_of_its_traffic_stayed_in_shared_memory(client, digits_path):
    """One host: every replica reaches every shard through shared memory, unless it is off."""
    from daskbelief.nn import Dense, Sequential
    from daskbelief.train.downpour import downpour

    model = Sequential((64,), [Dense(16, "relu"), Dense(10)])
    on = downpour(model, digits_path, client=client, replicas=2, shards=2, steps=10)
    client.run(_share_memory, False)
    try:
        off = downpour(model, digits_path, client=client, replicas=2, shards=2, steps=10)
    finally:
        client.run(_share_memory, True)
    assert on.summary["shared_memory_fraction"] == 1.0
    assert off.summary["shared_memory_fraction"] == 0.0
    assert [o["shards_shared"] for o in off.replica_outcomes] == [0, 0]
