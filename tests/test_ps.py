"""The parameter server: placement policies (pure) and the shard actors on a real cluster."""
from __future__ import annotations

import numpy as np
import pytest

from daskbelief.backend import aligned, all_finite
from daskbelief.optim.rules import adagrad, make_rule
from daskbelief.ps.policy import (adoptable, overlaps, place_blocks, place_replicas, place_shards,
                                  shard_ranges)
from daskbelief.ps.server import ParameterServer
from daskbelief.ps import shard as shard_module
from daskbelief.ps.shard import ParameterShard


def test_shard_ranges_cover_contiguously_and_evenly():
    for size, k in [(10, 1), (10, 3), (7, 7), (1_000_003, 8)]:
        r = shard_ranges(size, k)
        assert r[0][0] == 0 and r[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
        lengths = [b - a for a, b in r]
        assert max(lengths) - min(lengths) <= 1


@pytest.mark.parametrize("size,k", [(3, 4), (10, 0)])
def test_shard_ranges_reject_impossible_splits(size, k):
    with pytest.raises(ValueError, match="shard"):
        shard_ranges(size, k)


def test_overlaps_cut_a_range_at_shard_boundaries():
    ranges = shard_ranges(10, 3)  # [0,4) [4,7) [7,10)
    assert overlaps(ranges, 2, 8) == [(0, 2, 4), (1, 4, 7), (2, 7, 8)]
    assert overlaps(ranges, 4, 7) == [(1, 4, 7)]
    with pytest.raises(ValueError, match="outside"):
        overlaps(ranges, 5, 11)


def test_place_shards_prefers_distinct_workers():
    assert place_shards(["b", "a"], 2) == ["a", "b"]
    assert place_shards(["a", "b"], 3) == ["a", "b", "a"]
    with pytest.raises(ValueError, match="no workers"):
        place_shards([], 1)


def test_place_replicas_prefers_workers_without_shards():
    assert place_replicas(["a", "b", "c"], ["a"], 2) == ["b", "c"]
    assert place_replicas(["a", "b", "c"], ["a"], 4) == ["b", "c", "a", "b"]
    assert place_replicas(["a", "b"], ["a", "b", "a"], 3) == ["b", "a", "b"]
    with pytest.raises(ValueError, match="no workers"):
        place_replicas([], [], 1)


def test_place_blocks_keeps_them_off_shard_holders_when_it_can():
    assert place_blocks(["a", "b", "c"], ["a"], 2, 2) == [["b", "c"], ["b", "c"]]
    # Too few free workers for a replica's blocks to be apart: all workers, least loaded first.
    assert place_blocks(["a", "b", "c"], ["a", "b"], 1, 2) == [["c", "a"]]
    assert place_blocks(["a"], ["a"], 1, 2) == [["a", "a"]]


def test_push_and_fetch_apply_the_rule_exactly(client):
    rng = np.random.default_rng(0)
    params = rng.standard_normal(1001).astype(np.float32)
    ps = ParameterServer.create(client, params, 3, adagrad(lr=0.1))
    try:
        rule, expect = adagrad(lr=0.1), params.copy()
        state = rule.init(expect)
        for _ in range(3):
            grad = rng.standard_normal(1001).astype(np.float32)
            rule.apply(expect, grad, state)
            got, versions = ps.fetch()
            ps.push(grad, versions, "t")
        got, versions = ps.fetch()
        np.testing.assert_array_equal(got, expect)
        assert versions == [3, 3, 3]
        workers = {s["shard"]: s for s in ps.stats()}
        assert all(s["applied"] == 3 and s["per_replica"] == {"t": 3} for s in workers.values())
    finally:
        ps.close()


def test_all_finite_agrees_with_isfinite_also_where_squares_overflow():
    """The shard's one-pass check (``backend.all_finite``) against NumPy's elementwise answer."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    print(f"seed {seed}")
    rng = np.random.default_rng(seed)
    for _ in range(200):
        x = (rng.standard_normal(int(rng.integers(0, 300))) * 10.0 ** rng.integers(-3, 38)).astype(
            np.float32)
        if len(x) and rng.random() < 0.5:
            x[rng.integers(len(x))] = rng.choice([np.nan, np.inf, -np.inf])
        assert all_finite(x) == bool(np.isfinite(x).all()), x
    assert all_finite(np.full(4, 3e38, np.float32))  # x . x overflows, every value is finite
    for bad in (None, np.nan, np.inf):
        x = _unaligned(rng.standard_normal(1000).astype(np.float32))
        if bad is not None:
            x[500] = bad
        assert all_finite(x) == (bad is None)


def test_aligned_copies_only_an_unaligned_array():
    values = np.arange(10, dtype=np.float32)
    assert aligned(values) is values
    odd = _unaligned(values)
    copy = aligned(odd)
    assert copy.flags.aligned and copy is not odd
    np.testing.assert_array_equal(copy, values)


def _unaligned(values: np.ndarray) -> np.ndarray:
    """A writable copy of ``values`` starting at an odd byte, as arrays received over TCP can."""
    raw = bytearray(values.nbytes + 1)
    out = np.frombuffer(raw, values.dtype, len(values), offset=1)
    out[:] = values
    assert not out.flags.aligned
    return out


def test_an_unaligned_push_is_applied_as_the_same_push_aligned():
    """A gradient received at an odd address (copied aligned by the shard) updates the slice
    exactly as the rule applied to it in one process does."""
    rng = np.random.default_rng(4)
    start, grads = rng.standard_normal(300_000).astype(np.float32), []
    shard = ParameterShard(0, 0, len(start), start, {"name": "adagrad", "lr": 0.1})
    params, rule = start.copy(), adagrad(0.1)
    state = rule.init(params)
    for _ in range(3):
        grads.append(rng.standard_normal(len(start)).astype(np.float32))
        shard.push(_unaligned(grads[-1]), shard.version)
        rule.apply(params, grads[-1], state)
    np.testing.assert_array_equal(shard.params, params)
    bad = grads[-1].copy()
    bad[123_456] = np.nan
    shard.push(_unaligned(bad), shard.version)
    assert shard.rejected == 1 and shard.applied == 3
    np.testing.assert_array_equal(shard.params, params)


def test_non_finite_pushes_are_rejected_and_counted(client):
    ps = ParameterServer.create(client, np.ones(10, np.float32), 2, "sgd")
    try:
        bad = np.zeros(10, np.float32)
        bad[7] = np.nan
        ps.push(bad, [0, 0])
        bad[7] = np.inf
        ps.push(bad, [0, 0])
        params, versions = ps.fetch()
        np.testing.assert_array_equal(params, 1.0)
        stats = ps.stats()
        assert [s["rejected"] for s in stats] == [0, 2]  # only the shard holding index 7 saw it
        assert [s["applied"] for s in stats] == [2, 0]
        assert all(s["params_finite"] for s in stats)
    finally:
        ps.close()


def test_staleness_counts_versions_missed(client):
    ps = ParameterServer.create(client, np.zeros(4, np.float32), 1, make_rule({"name": "sgd", "lr": 1.0}))
    try:
        g = np.ones(4, np.float32)
        for _ in range(3):
            ps.push(g, [0])  # computed on version 0 each time: staleness 0, 1, 2
        hist = ps.stats()[0]["staleness_hist"]
        assert hist[:3] == [1, 1, 1]
        np.testing.assert_array_equal(ps.fetch()[0], -3.0)
    finally:
        ps.close()


def test_partial_ranges_touch_only_their_parameters(client):
    params = np.arange(10, dtype=np.float32)
    ps = ParameterServer.create(client, params, 3, make_rule({"name": "sgd", "lr": 1.0}))
    try:
        values, versions = ps.fetch_range(2, 8)
        np.testing.assert_array_equal(values, params[2:8])
        for r in ps.push_range_async(2, np.ones(6, np.float32), versions):
            r.result()
        expect = params.copy()
        expect[2:8] -= 1
        np.testing.assert_array_equal(ps.fetch()[0], expect)
    finally:
        ps.close()


def test_state_dicts_round_trip(client):
    ps = ParameterServer.create(client, np.ones(6, np.float32), 2, "adagrad")
    try:
        ps.push(np.full(6, 0.5, np.float32), [0, 0])
        snap = ps.state_dicts()
        ps.push(np.full(6, 2.0, np.float32), [1, 1])
        ps.load_state_dicts(snap)
        after = ps.state_dicts()
        for a, b in zip(snap, after):
            np.testing.assert_array_equal(a["params"], b["params"])
            assert a["version"] == b["version"] == 1
            for k in a["state"]:
                np.testing.assert_array_equal(a["state"][k], b["state"][k])
    finally:
        ps.close()


def test_a_server_cut_otherwise_restores_each_shards_range_of_a_checkpoint(client, tmp_path):
    """Resuming, every shard reads its own range of the checkpoint (parameters, rule state,
    Sandblaster's vectors) whatever ranges wrote it, at the newest saved version."""
    from daskbelief.ps import checkpoint
    from daskbelief.train.run import parameter_server

    values = np.arange(10, dtype=np.float32)
    ps = ParameterServer.create(client, values, 3, "adagrad")
    try:
        ps.push(np.linspace(-1, 1, 10, dtype=np.float32), [0, 0, 0])
        [r.result() for r in [s.run_ops([("combine", [("params", 2.0)], "g")]) for s in ps.shards]]
        path = checkpoint.save(tmp_path, ps, model={}, vectors=["g"])
    finally:
        ps.close()
    saved = checkpoint.load(path)
    other = parameter_server(client, np.zeros(10, np.float32), 2, "adagrad", restore=path)
    try:
        for snap, (a, b) in zip(other.state_dicts(), other.ranges):
            np.testing.assert_array_equal(snap["params"], saved.params[a:b])
            np.testing.assert_array_equal(snap["state"]["sum_sq"], saved.state["sum_sq"][a:b])
            assert snap["version"] == max(saved.versions) == 1
        g = [r.result() for r in [s.read("g") for s in other.shards]]
        np.testing.assert_array_equal(np.concatenate(g), saved.vectors["g"])
    finally:
        other.close()
    assert checkpoint.load(path, arrays=False).state == {}  # what a driver reads to resume


def test_updates_missing_from_a_restored_shard():
    from daskbelief.train.recovery import pick_worker, updates_missing

    # Survivors went from versions 10 and 12 at the checkpoint to 17 and 18: 7 updates missing.
    assert updates_missing({1: 17, 2: 18}, [9, 10, 12]) == 7
    assert updates_missing({}, [5]) == 0  # nothing survived to compare with
    assert updates_missing({0: 3}, [4, 0]) == 0
    assert pick_worker(["a", "b", "c"], ["a", "b", "a"]) == "c"
    assert pick_worker(["a", "b"], ["gone", "a"]) == "b"


def test_place_homed_blocks_homes_one_replica_per_worker_on_distinct_workers():
    from daskbelief.ps.policy import place_homed_blocks

    assert place_homed_blocks(["b", "a", "c"], 2) == {"a": ["a", "b"], "b": ["b", "c"], "c": ["c", "a"]}
    assert place_homed_blocks(["a"], 2) == {"a": ["a", "a"]}


def test_a_copy_is_adoptable_only_from_an_earlier_server_and_with_more_updates():
    assert adoptable(2, 5, 40, 1) and adoptable(2, 5, 40, 0)  # a copy of the shard it replaced
    assert not adoptable(None, 5, 40, 1)  # a shard nobody lost keeps its own
    assert not adoptable(2, 5, 40, 2)  # fetched from this very shard
    assert not adoptable(2, 40, 40, 1) and not adoptable(2, 41, 40, 1)  # no more updates than it holds


def recreated_shard(n: int = 10, version: int = 3) -> ParameterShard:
    """A shard as a recovery makes it in generation 2: restored values at ``version``."""
    shard = ParameterShard(0, 0, n, np.zeros(n, np.float32), {"name": "adagrad", "lr": 0.1})
    shard.load_state({"params": np.zeros(n, np.float32), "state": {}, "version": version,
                      "replaced_in": 2})
    return shard


def test_a_recreated_shard_adopts_the_newest_copy_whole_and_counts_what_it_brought():
    shard, copy = recreated_shard(), np.arange(10, dtype=np.float32)
    assert ParameterShard(0, 0, 10, copy, "adagrad").wants(40, 1) is None  # never lost
    older = shard.wants(30, 1)
    token = shard.wants(40, 1)  # a newer copy takes over from the one on its way
    assert older and token and shard.wants(40, 1) is None and shard.wants(35, 1) is None
    assert shard.adopt(copy[:6] + 100, older, 0, 2) == 3  # not the copy it waits for now
    shard.push(np.ones(10, np.float32), 3)  # a push between the two frames: overwritten
    assert shard.adopt(copy[6:], token, 6, 2) == 4 and shard.version == 4  # half of it so far
    assert shard.adopt(copy[:6], token, 0, 2) == 40
    np.testing.assert_array_equal(shard.params, copy)
    assert shard.stats()["adopted"] == 36 and shard.wants(40, 1) is None  # no more than it holds
    assert shard.wants(45, 1)


def test_a_copy_that_never_finishes_arriving_holds_the_shard_no_longer_than_its_timeout(monkeypatch):
    shard = recreated_shard()
    token = shard.wants(40, 1)
    shard.adopt(np.ones(5, np.float32), token, 0, 2)  # its second frame never comes
    assert shard.wants(30, 1) is None  # an older copy waits for it
    now = shard_module.time.time()
    monkeypatch.setattr(shard_module.time, "time", lambda: now + shard_module.ADOPT_TIMEOUT + 1)
    late = shard.wants(30, 1)
    assert late and late != token
    shard.adopt(np.full(5, 2, np.float32), token, 5, 2)  # the old copy's last frame: ignored
    assert shard.version == 3 and shard.stats()["adopted"] == 0
    assert shard.adopt(np.full(10, 7, np.float32), late, 0, 1) == 30
    np.testing.assert_array_equal(shard.params, np.full(10, 7, np.float32))


def test_a_push_based_on_a_fetch_from_before_the_adoption_is_not_delay_compensated():
    """DC-ASGD corrects a push by ``w_now - w_fetched``: across an adopted copy that difference
    is the copy's distance from the restored values, no staleness to correct for."""
    rule = {"name": "adagrad", "lr": 0.1, "delay_compensation": 0.5}
    shard = ParameterShard(0, 0, 4, np.zeros(4, np.float32), rule)
    shard.load_state({"params": np.zeros(4, np.float32), "state": {}, "version": 0, "replaced_in": 2})
    shard.fetch(replica="r")  # the restored values, at version 0
    shard.adopt(np.full(4, 5, np.float32), shard.wants(40, 1))
    shard.push(np.ones(4, np.float32), 0, "r")
    assert shard.stats()["compensated"] == 0 and shard.version == 41
    shard.fetch(replica="r")
    shard.push(np.ones(4, np.float32), 41, "r")
    assert shard.stats()["compensated"] == 1


def test_after_an_adoption_adagrad_steps_as_its_history_would_not_as_a_fresh_accumulator():
    """A copy adopted at version 99 onto a fresh accumulator: the n-th push after it takes the
    step scaled by sqrt(n / (99 + n)), the size Adagrad's steps have after 99 + n updates of
    gradients of one size, not the full ``lr`` a fresh accumulator gives every parameter."""
    lr, g = 0.1, np.array([0.5, -2.0, 1.0, 3.0], np.float32)
    shard = recreated_shard(4, version=0)
    shard.adopt(np.ones(4, np.float32), shard.wants(99, 1))
    shard.push(g, 99)
    np.testing.assert_allclose(1 - shard.params, lr * np.sign(g) * np.sqrt(1 / 100), rtol=1e-4)
    before = shard.params.copy()
    shard.push(g, 100)  # the accumulator now holds 2 g^2
    np.testing.assert_allclose(before - shard.params, lr * np.sign(g) / np.sqrt(2) * np.sqrt(2 / 101),
                               rtol=1e-4)
    plain = ParameterShard(0, 0, 4, np.ones(4, np.float32), {"name": "adagrad", "lr": lr})
    plain.push(g, 0)  # nothing adopted: the rule as configured
    np.testing.assert_allclose(1 - plain.params, lr * np.sign(g), rtol=1e-4)


def test_only_rules_whose_steps_shrink_with_their_state_scale_after_an_adoption():
    assert make_rule("sgd").younger_state_scale(1, 100) == 1.0
    assert make_rule("momentum").younger_state_scale(1, 100) == 1.0
    assert make_rule({"name": "adagrad", "staleness": "inverse"}).younger_state_scale(1, 100) == 0.1
    assert adagrad().younger_state_scale(50, 50) == 1.0


def test_a_checkpoint_after_an_adoption_resumes_with_the_same_scaled_steps(client, tmp_path):
    """The state saved after an adoption is younger than the parameters saved with it: a shard
    resumed from that checkpoint (cut into other ranges, as a resumed run may) and one recreated
    from it by a recovery step as the shard that wrote it would have stepped."""
    from daskbelief.ps import checkpoint

    n, g = 8, np.linspace(-1, 1, 8, dtype=np.float32)
    ps = ParameterServer.create(client, np.zeros(n, np.float32), 2, "adagrad")
    fresh = []
    try:
        for i in range(2):  # both shards lost and made anew from their initial values
            ps = ps.replace_shard(client, i, {"params": np.zeros(n // 2, np.float32), "state": {},
                                              "version": 0, "replaced_in": 1},
                                  ps.addresses()[i])
        assert ps.offer_copy(np.ones(n, np.float32), [99, 99], 0, lambda r: r.result(timeout=30)) == 2
        ps.push(g, [99, 99])
        path = checkpoint.save(tmp_path, ps, model={})
        saved = checkpoint.load(path)
        assert saved.state_lag() == saved.state_lag(0, 4) == 99 and saved.versions == [100, 100]
        ps.push(g, [100, 100])
        expect, _ = ps.fetch()
        for shards in (1, 3):
            fresh.append(ParameterServer.create(client, np.zeros(n, np.float32), shards, "adagrad"))
            fresh[-1].restore(path)
            fresh[-1].push(g, [100] * shards)
            np.testing.assert_allclose(fresh[-1].fetch()[0], expect, rtol=1e-6)
        a, b = ps.ranges[0]
        ps = ps.replace_shard(client, 0, {"params": saved.params[a:b], "state": {
            k: v[a:b] for k, v in saved.state.items()}, "version": 100,
            "state_updates": 100 - saved.state_lag(a, b)}, ps.addresses()[0])
        ps.push(g, [100, 100])
        np.testing.assert_allclose(ps.fetch()[0][a:b], expect[a:b], rtol=1e-6)
    finally:
        for server in [ps, *fresh]:
            server.close()
