"""Slices larger than one comm frame: pushed and fetched frame by frame, exactly.

The cluster's ``distributed.comm.shard`` is set to 256 KiB so that a 4 MB slice already takes the
large-slice path (sixteen frames) without moving hundreds of megabytes on a shared machine; the
benchmark ``python -m benchmarks scale`` measures the same path at 100 MB - 1 GB.
"""
from __future__ import annotations

import dask.config
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_worker

from daskbelief.cluster import worker_info
from daskbelief.optim.rules import adagrad
from daskbelief.ps.compress import Feedback, from_bf16, to_bf16
from daskbelief.ps.server import PUSH_WINDOW, ParameterServer, frame_values, frames

FRAME = "256KiB"  # 65,536 float32 values


def test_a_slice_is_cut_into_as_few_runs_as_fit_one_frame_each():
    with dask.config.set({"distributed.comm.shard": "16B"}):  # four float32 values
        assert frame_values() == 4
        assert frames(10) == [(0, 4), (4, 7), (7, 10)]
        assert frames(4) == [(0, 4)] and frames(1) == [(0, 1)]


@pytest.fixture(scope="module")
def small_frames():
    with dask.config.set({"distributed.comm.shard": FRAME}):
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                          dashboard_address=":0") as cluster, Client(cluster) as client:
            yield client


def _push_twice_and_fetch(ps, grads):
    """On a worker (the caller's side of a replica): two pushes, then the fetched vector."""
    for g in grads:
        ps.push(g, [0] * len(ps.shards))
    whole, _ = ps.fetch()
    middle, _ = ps.fetch_range(100_000, min(900_000, ps.size))
    return frame_values(), whole, middle


def test_a_slice_of_several_frames_is_pushed_and_fetched_exactly(small_frames):
    client = small_frames
    rng = np.random.default_rng(1)
    n = 1_000_003
    params = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(2)]
    rule = adagrad(lr=0.05)
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, params, 1, rule, workers=[shard_worker])
    try:
        limit, whole, middle = client.submit(_push_twice_and_fetch, ps, grads, workers=[caller],
                                             pure=False).result()
        stats = ps.stats()[0]
    finally:
        ps.close()
    assert limit == 65_536 and -(-n // limit) == 16  # the frame-by-frame path was taken
    expect, state = params.copy(), rule.init(params)
    for g in grads:
        rule.apply(expect, g, state)
    np.testing.assert_array_equal(whole, expect)
    np.testing.assert_array_equal(middle, expect[100_000:900_000])
    # one update per push, however many frames it took
    assert stats["applied"] == 2 and stats["version"] == 2 and stats["bytes_in"] == 2 * 4 * n


def test_a_frame_with_a_non_finite_value_is_dropped_and_the_parameters_stay_finite(small_frames):
    """Each frame is checked on its own, as each shard checks its own slice of a push."""
    client = small_frames
    n = 300_000  # five frames of 60,000 values
    params = np.ones(n, np.float32)
    grad = np.full(n, 0.5, np.float32)
    grad[-1] = np.inf  # in the last of the five frames
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, params, 1, adagrad(lr=0.05), workers=[shard_worker])
    try:
        _, values, _ = client.submit(_push_twice_and_fetch, ps, [grad], workers=[caller],
                                     pure=False).result()
        stats = ps.stats()[0]
    finally:
        ps.close()
    assert np.isfinite(values).all()
    np.testing.assert_array_equal(values[240_000:], params[240_000:])
    assert (values[:240_000] < 1).all()  # the four finite frames were applied
    assert stats["rejected"] == 1 and stats["applied"] == 0  # a push with a dropped frame is not counted


async def _close_connections(address, dask_worker):
    """On a worker's event loop: close its pooled connections to ``address`` (earlier tests'
    fetches opened some), so that the pushes below open their own."""
    dask_worker.rpc.remove(address)


def _push_and_count_connections(ps, grad, pushes):
    """On a worker: ``pushes`` pushes one after the other, then how many connections this
    worker has opened to the shard's worker since ``_close_connections`` (distributed keeps
    them for reuse: as many as were ever busy at once)."""
    for _ in range(pushes):
        ps.push(grad, [0])
    pool = get_worker().rpc
    address = ps.shards[0]._address
    return len(pool.available[address]) + len(pool.occupied[address])


def test_the_frames_of_a_push_travel_a_few_at_a_time(small_frames):
    """Sent all at once, sixteen frames would share the wire on sixteen connections and all
    arrive at the end; the window keeps at most ``PUSH_WINDOW`` travelling, and the result
    is the same update."""
    client = small_frames
    n = 16 * 65_536
    params = np.zeros(n, np.float32)
    grad = np.random.default_rng(4).standard_normal(n).astype(np.float32)
    shard_worker, caller = sorted(worker_info(client))
    rule = adagrad(lr=0.05)
    ps = ParameterServer.create(client, params, 1, rule, workers=[shard_worker])
    try:
        client.run(_close_connections, shard_worker, workers=[caller])
        connections = client.submit(_push_and_count_connections, ps, grad, 3, workers=[caller],
                                    pure=False).result()
        values, _ = ps.fetch()
        stats = ps.stats()[0]
    finally:
        ps.close()
    assert 1 <= connections <= PUSH_WINDOW < len(frames(n)) == 16
    expect, state = params.copy(), rule.init(params)
    for _ in range(3):
        rule.apply(expect, grad, state)
    np.testing.assert_array_equal(values, expect)
    assert stats["applied"] == 3


def test_a_frame_no_shard_answers_ends_the_push_as_a_lost_server(monkeypatch):
    """An actor call to a dead worker can stay pending for ever: the window gives up on it
    after ``CALL_TIMEOUT`` with ``ServerLost`` (what a replica recovers from), not with a
    timeout its own waits would read as "not yet"."""
    import asyncio

    from daskbelief.ps import server

    monkeypatch.setattr(server, "CALL_TIMEOUT", 0.05)

    async def push():
        never = asyncio.get_running_loop().create_future()
        return await server.send_windowed([lambda: never], 4)

    with pytest.raises(server.ServerLost, match="one frame"):
        asyncio.run(push())


def _offer(ps, copy, version: int, generation: int, near: bool) -> int:
    """On a worker, as a replica recovering from a loss: offer its copy to the shards."""
    ps = ps.here() if near else ps
    taken = ps.offer_copy(copy, [version] * len(ps.shards), generation, lambda r: r.result(timeout=30))
    return frame_values(), taken


@pytest.mark.parametrize("near", [False, True], ids=["handle", "replica-handle"])
def test_a_recreated_shard_adopts_a_replicas_copy_of_several_frames_exactly(small_frames, near):
    """A shard lost and made anew from its initial values takes the first copy newer than what
    it holds, all sixteen frames of it, at the copy's version; a copy from the new shard's own
    server, or one no newer, changes nothing."""
    client = small_frames
    n = 16 * 65_536
    rng = np.random.default_rng(7)
    copy = rng.standard_normal(n).astype(np.float32)
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, np.zeros(n, np.float32), 1, adagrad(lr=0.05),
                                workers=[shard_worker])
    ps = ps.replace_shard(client, 0, {"params": np.zeros(n, np.float32), "state": {}, "version": 0,
                                      "replaced_in": 1}, shard_worker)
    try:
        taken = [client.submit(_offer, ps, copy, version, generation, near, workers=[caller],
                               pure=False).result()
                 for version, generation in [(9, 1), (12, 0), (12, 0), (30, 1)]]
        values, versions = ps.fetch()
        stats = ps.stats()[0]
    finally:
        ps.close()
    assert taken == [(65_536, 0), (65_536, 1), (65_536, 0), (65_536, 0)], taken  # frame by frame
    np.testing.assert_array_equal(values, copy)
    assert versions == [12] and stats["adopted"] == 12 and stats["applied"] == 0


def _push_compressed_and_fetch(ps, grad, kind, near=False):
    """On a worker: one push compressed with error feedback, then the fetched vector; ``near``:
    through the handle a replica uses (``here``: the shard then shares this host's memory, and
    a compressed push still travels frame by frame to the actor)."""
    ps = ps.here() if near else ps
    assert [type(s).__name__ for s in ps.shards] == (["SharedShard"] if near else ["Actor"])
    feedback = Feedback(kind)
    ps.wait_all(ps.push_async(grad, [0] * len(ps.shards), encode=feedback.encode), "push")
    whole, _ = ps.fetch()
    return whole, sorted(feedback.residual)


@pytest.mark.parametrize("near", [False, True], ids=["handle", "replica-handle"])
def test_a_compressed_slice_of_several_frames_travels_frame_by_frame(small_frames, near):
    """bf16 pushes take the same frame-by-frame path: each frame is encoded on its own (its own
    residual), none is reassembled on arrival, and the shard applies exactly the rounded values."""
    client = small_frames
    rng = np.random.default_rng(2)
    n = 200_000  # four frames of 50,000 values
    params = rng.standard_normal(n).astype(np.float32)
    grad = rng.standard_normal(n).astype(np.float32)
    rule = adagrad(lr=0.05)
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, params, 1, rule, workers=[shard_worker])
    try:
        whole, keys = client.submit(_push_compressed_and_fetch, ps, grad, "bf16", near,
                                    workers=[caller], pure=False).result()
        stats = ps.stats()[0]
    finally:
        ps.close()
    assert keys == [(0, 0), (0, 50_000), (0, 100_000), (0, 150_000)]  # one residual per frame
    expect, state = params.copy(), rule.init(params)
    rule.apply(expect, from_bf16(to_bf16(grad)), state)
    np.testing.assert_array_equal(whole, expect)
    assert stats["applied"] == 1 and stats["bytes_in"] == 2 * n  # half the float32 bytes


def _fetch_bf16(ps):
    out = np.empty(ps.size, dtype=np.float32)
    whole, versions = ps.gather(ps.fetch_async("bf16"), out)
    return whole, versions, whole is out


def test_a_bf16_fetch_of_several_frames_is_the_rounded_parameters_at_half_the_bytes(small_frames):
    client = small_frames
    n = 200_003  # two shards of two frames each
    params = np.random.default_rng(3).standard_normal(n).astype(np.float32)
    shard_worker, caller = sorted(worker_info(client))
    ps = ParameterServer.create(client, params, 2, adagrad(lr=0.05), workers=[shard_worker])
    try:
        whole, versions, in_place = client.submit(_fetch_bf16, ps, workers=[caller],
                                                  pure=False).result()
        stats = ps.stats()
    finally:
        ps.close()
    np.testing.assert_array_equal(whole, from_bf16(to_bf16(params)))
    assert in_place and versions == [0, 0]
    assert sum(s["bytes_out"] for s in stats) == 2 * n
