"""Asynchrony options against their formulas: Adagrad's initial accumulator, a push's learning-rate
scale, staleness-aware step sizes, delay compensation and the staleness bound."""
from __future__ import annotations

import numpy as np
import pytest

from daskbelief.optim import staleness
from daskbelief.optim.rules import adagrad, make_rule, momentum, sgd


def _grads(n=40, steps=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) * 10 ** rng.uniform(-3, 1) for _ in range(steps)]


def test_adagrad_initial_accumulator_matches_its_formula():
    p0 = np.linspace(-1, 1, 40, dtype=np.float32)
    rule, p = adagrad(lr=0.1, eps=1e-7, initial_accumulator=0.1), p0.copy()
    state = rule.init(p)
    expect, acc = p0.astype(np.float64), np.full(40, 0.1)
    for g in _grads():
        rule.apply(p, g, state)
        acc += g.astype(np.float64) ** 2
        expect -= 0.1 * g / (np.sqrt(acc) + 1e-7)
    np.testing.assert_allclose(p, expect, rtol=1e-5, atol=1e-6)
    assert make_rule(rule.to_dict()).to_dict() == rule.to_dict()
    assert adagrad(lr=0.1).to_dict() == {"name": "adagrad", "lr": 0.1, "eps": 1e-7}


def test_first_adagrad_step_is_sign_times_lr_without_an_accumulator():
    """Why the option exists: with a0 = 0 a tiny gradient moves a parameter as far as a big one."""
    g = np.float32([1e-6, -1e-3, 5.0])
    for a0, expect in [(0.0, [-0.1, 0.1, -0.1]), (1.0, -0.1 * g / np.sqrt(1.0 + g.astype(np.float64) ** 2))]:
        p = np.zeros(3, np.float32)
        rule = adagrad(lr=0.1, eps=0.0, initial_accumulator=a0)
        rule.apply(p, g, rule.init(p))
        np.testing.assert_allclose(p, expect, rtol=1e-5)


@pytest.mark.parametrize("rule", [sgd(0.3), momentum(0.3, 0.5), adagrad(0.3)])
def test_a_scaled_push_is_the_rule_with_a_scaled_rate(rule):
    g, p0 = _grads(steps=1)[0], np.ones(40, np.float32)
    scaled, plain = p0.copy(), p0.copy()
    rule.apply(scaled, g, rule.init(scaled), scale=0.25)
    reference = make_rule({**rule.to_dict(), "lr": rule.hyper["lr"] * 0.25})
    reference.apply(plain, g, reference.init(plain))
    np.testing.assert_array_equal(scaled, plain)
    unscaled = p0.copy()
    rule.apply(unscaled, g, rule.init(unscaled), scale=1.0)
    assert not np.array_equal(unscaled, scaled)


def test_step_scale_policies():
    assert [staleness.step_scale(s, "none") for s in (0, 1, 7)] == [1.0, 1.0, 1.0]
    assert [staleness.step_scale(s, "inverse") for s in (0, 1, 4)] == [1.0, 1.0, 0.25]
    assert staleness.step_scale(16, "inverse_sqrt") == 0.25
    with pytest.raises(ValueError, match="staleness policy must be one of none, inverse"):
        staleness.check_policy("linear")


def test_delay_compensation_is_a_first_order_correction():
    """On f(w) = sum(w^4)/4 the corrected gradient lies nearer the true gradient at w_now than
    the stale one does, and lam = 0 leaves the gradient untouched."""
    rng = np.random.default_rng(5)
    w_fetched = rng.uniform(0.5, 1.0, 100)
    w_now = w_fetched + rng.uniform(-0.01, 0.01, 100)
    stale = w_fetched ** 3
    corrected = staleness.delay_compensate(stale.copy(), w_now, w_fetched, lam=3.0)
    np.testing.assert_allclose(corrected, stale + 3.0 * stale * stale * (w_now - w_fetched))
    assert np.abs(corrected - w_now ** 3).mean() < np.abs(stale - w_now ** 3).mean()
    np.testing.assert_array_equal(staleness.delay_compensate(stale.copy(), w_now, w_fetched, 0.0), stale)


def test_staleness_bound():
    assert not staleness.must_wait(10, 0, None)
    assert not staleness.must_wait(3, 1, 2)
    assert staleness.must_wait(4, 1, 2)


def test_a_shard_scales_each_push_by_its_staleness_and_decodes_compressed_pushes():
    """ParameterShard (in process, the class the actor runs) against the rule applied by hand:
    a push 4 updates old gets lr/4 under the 'inverse' policy; a bf16 payload is applied as the
    float32 values it stands for."""
    from daskbelief.ps import compress
    from daskbelief.ps.shard import ParameterShard

    spec = {"name": "sgd", "lr": 0.5, "staleness": "inverse"}
    assert make_rule(spec).to_dict() == spec
    g = _grads(n=8, steps=6, seed=4)
    shard = ParameterShard(0, 0, 8, np.zeros(8, np.float32), spec)
    expect = np.zeros(8, np.float32)
    for i in range(4):                      # fresh pushes: version i, base i -> staleness 0
        shard.push(g[i], base_version=i)
        expect -= np.float32(0.5) * g[i]
    shard.push(g[4], base_version=0)        # 4 updates old
    expect -= np.float32(0.5 / 4) * g[4]
    payload = compress.encode(g[5], "bf16")
    shard.push(payload, base_version=5)
    expect -= np.float32(0.5) * compress.decode(payload)
    np.testing.assert_allclose(shard.fetch()[0], expect, rtol=1e-6)
    assert shard.bytes_in == 5 * 8 * 4 + 8 * 2
    with pytest.raises(ValueError, match="staleness policy must be one of"):
        make_rule({"name": "adagrad", "staleness": "sometimes"})


def test_a_shard_compensates_a_push_by_what_its_replica_fetched_at_the_push_base():
    """DC-ASGD on ParameterShard (in process) against the formula by hand: replica a fetches at
    version 0 (in two frames), replica b's push moves the parameters, then a's push based on
    version 0 is corrected by lam * g * g * (w_now - w_fetched_by_a); a push whose base copy is
    no longer kept (or from a replica that never fetched) is applied uncorrected."""
    from daskbelief.ps.asynchrony import FETCHED_KEPT
    from daskbelief.ps.shard import ParameterShard

    spec = {"name": "sgd", "lr": 0.5, "delay_compensation": 2.0}
    assert make_rule(spec).to_dict() == spec
    g = _grads(n=8, steps=3, seed=6)
    w0 = np.linspace(-1, 1, 8, dtype=np.float32)
    shard = ParameterShard(0, 0, 8, w0, spec)
    shard.fetch(0, 5, replica="a")
    shard.fetch(5, 3, replica="a")
    shard.push(g[0], base_version=0, replica="b")       # b never fetched: plain SGD
    w1 = w0 - np.float32(0.5) * g[0]
    np.testing.assert_allclose(shard.fetch()[0], w1, rtol=1e-6)
    shard.push(g[1], base_version=0, replica="a")
    corrected = g[1] + 2.0 * g[1] * g[1] * (w1 - w0)
    w2 = w1 - np.float32(0.5) * corrected
    np.testing.assert_allclose(shard.fetch()[0], w2, rtol=1e-5, atol=1e-7)
    assert shard.stats()["compensated"] == 1
    for _ in range(FETCHED_KEPT):                        # later fetches push version 0 out
        shard.fetch(replica="a")
        shard.push(np.zeros(8, np.float32), base_version=shard.version, replica="b")
    before = shard.fetch()[0]
    shard.push(g[2], base_version=0, replica="a")
    np.testing.assert_allclose(shard.fetch()[0], before - np.float32(0.5) * g[2], rtol=1e-6)
    assert shard.stats()["compensated"] == 1


def test_clocks_start_a_late_replica_at_the_slowest_and_forget_one_stalled_or_gone():
    from daskbelief.ps.asynchrony import STALL_SECONDS, Clocks

    clocks, t = Clocks(), 100.0
    for _ in range(5):
        clocks.tick("r0", t)                 # a warm start: r0 alone
    assert clocks.lead("r0", t) == 0 and clocks.lead("r1", t) == 0
    clocks.tick("r1", t)                     # joins at r0's clock
    assert clocks.clock == {"r0": 5, "r1": 6} and clocks.lead("r1", t) == 1
    clocks.tick("r1", t)
    clocks.tick("r1", t)
    assert clocks.lead("r1", t) == 3 and clocks.max_lead == 3 and clocks.lead("r0", t) == 0
    later = t + STALL_SECONDS + 1            # r0 silent since t: stalled, holds r1 back no more
    clocks.tick("r1", later)
    assert clocks.lead("r1", later) == 0
    clocks.tick("r0", later)                 # back: starts over at the slowest active clock
    assert clocks.clock["r0"] == 10 and clocks.lead("r0", later) == 1
    clocks.leave("r0")
    assert clocks.lead("r1", later) == 0
