"""Compressed traffic: bf16 against ml_dtypes' bfloat16, top-k against a sort, error feedback's sum."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from daskbelief.ps import compress


def _awkward(n: int, seed: int = 0) -> np.ndarray:
    """Values over many magnitudes, with ties at the rounding point, zeros, signs and subnormals."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exactly halfway
    return np.concatenate([x, ties, -ties, np.float32([0.0, -0.0, 1e-45, -1e-40, 3.4e38])])


def test_bf16_rounds_as_ml_dtypes():
    x = _awkward(100_000)
    ours = compress.from_bf16(compress.to_bf16(x))
    oracle = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ours.view(np.uint32), oracle.view(np.uint32))
    finite = np.isfinite(oracle) & (np.abs(x) > 1e-37)
    assert np.all(np.abs(ours[finite] - x[finite]) <= np.abs(x[finite]) * 2.0 ** -8)
    kept = x.copy()  # rounded over several blocks, keeping what rounding dropped in place
    np.testing.assert_array_equal(compress.to_bf16(kept, keep_residual=True), compress.to_bf16(x))
    np.testing.assert_array_equal(kept[finite], x[finite] - ours[finite])


def test_top_k_keeps_the_largest_magnitudes():
    x = np.random.default_rng(1).standard_normal(10_000).astype(np.float32)
    idx = compress.top_k(x, 0.01)
    assert len(idx) == 100 and np.all(np.diff(idx) > 0)
    assert set(idx) == set(np.argsort(-np.abs(x))[:100])
    assert len(compress.top_k(x, 1.0)) == len(x)
    assert len(compress.top_k(x[:3], 1e-9)) == 1


@pytest.mark.parametrize("kind", ["bf16", "topk", "topk-bf16"])
def test_payload_round_trip_and_size(kind):
    x = np.random.default_rng(2).standard_normal(4096).astype(np.float32)
    payload = compress.encode(x, kind, fraction=0.05)
    dense = compress.decode(payload)
    assert dense.dtype == np.float32 and dense.shape == x.shape
    if kind == "bf16":
        assert compress.payload_bytes(payload) == x.nbytes // 2
        np.testing.assert_allclose(dense, x, rtol=2.0 ** -8)
    else:
        kept = compress.top_k(x, 0.05)
        assert np.count_nonzero(dense) == len(kept)
        assert compress.payload_bytes(payload) == len(kept) * (6 if "bf16" in kind else 8)
        np.testing.assert_allclose(dense[kept], x[kept], rtol=2.0 ** -8 if "bf16" in kind else 0)


@pytest.mark.parametrize("kind", [None, "bf16", "topk", "topk-bf16"])
def test_error_feedback_loses_nothing(kind):
    """Everything decoded plus the residual left equals everything pushed (float64 oracle)."""
    rng = np.random.default_rng(3)
    feedback = compress.Feedback(kind, fraction=0.02)
    pushed = np.zeros(2000)
    delivered = np.zeros(2000)
    for step in range(50):
        g = rng.standard_normal(2000).astype(np.float32) * (1 + step % 7)
        pushed += g
        delivered += compress.decode(feedback.encode("shard-0", g.copy()))
    left = feedback.residual.get("shard-0", np.zeros(2000))
    np.testing.assert_allclose(delivered + left, pushed, rtol=1e-4, atol=1e-3)
    if kind is not None:
        assert np.abs(left).max() > 0  # something was held back and is still owed


def test_unknown_kinds_are_refused_by_name():
    with pytest.raises(ValueError, match="compression must be one of"):
        compress.Feedback("fp8")
    with pytest.raises(ValueError, match="fraction"):
        compress.Feedback("topk", fraction=0.0)
    with pytest.raises(ValueError, match="unknown compressed payload kind 'zip'"):
        compress.decode(("zip", np.zeros(1)))


@pytest.mark.parametrize("kind", compress.KINDS)
def test_decode_into_writes_what_decode_returns(kind):
    x = _awkward(1000)
    out = np.full(len(x), np.nan, dtype=np.float32)
    payload = compress.encode(x, kind, 0.1)
    compress.decode_into(payload, out)
    np.testing.assert_array_equal(out.view(np.uint32), compress.decode(payload).view(np.uint32))
