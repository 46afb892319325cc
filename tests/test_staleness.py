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
