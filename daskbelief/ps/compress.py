"""Compressed parameter-server traffic: bf16 rounding and top-k sparsification, with error feedback.

Between hosts a push or fetch of float32 values is bound by the link, so halving (bf16) or
thinning (top-k) what crosses it buys throughput. Rounding and dropping lose information; the
replica keeps what was lost (the *residual*) and adds it to its next push, so over a run every
gradient component is applied in full, only later (error feedback, as in 1-bit SGD and
Deep Gradient Compression). Fetches can travel as bf16 too (the replica computes its gradients
on parameters rounded to bf16's 8 significant bits, as mixed-precision training does; the shards
keep and update float32). Exact transfer stays the default; every function here is pure except
``Feedback``, which owns one residual per pushed range.

A compressed payload is a small tuple, cheap to pickle and with its arrays as out-of-band buffers:
``("bf16", uint16 values)``, ``("topk", int32 indices, float32 values, length)`` or
``("topk-bf16", int32 indices, uint16 values, length)``.
"""
from __future__ import annotations

import numpy as np

KINDS = (None, "bf16", "topk", "topk-bf16")


def check_kind(kind) -> None:
    """Refuse an unknown compression name, listing the known ones."""
    if kind not in KINDS:
        raise ValueError(f"compression must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")


# Values rounded at a time: a block's passes (five integer ones) run in a core's L2 with one
# reused work buffer, instead of allocating and page-faulting temporaries of the push's size.
BF16_BLOCK = 1 << 16


def to_bf16(x: np.ndarray, *, keep_residual: bool = False) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest, ties to even.

    bf16 keeps float32's 8 exponent bits (no overflow for gradients) and 7 mantissa bits: the top
    half of the float32 word, with a rounding bias so the error is at most half a unit.
    ``keep_residual``: ``x`` (float32, writeable) is left holding what rounding dropped, in
    the same pass (error feedback's residual).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(len(x), dtype=np.uint16)
    work = np.empty(min(BF16_BLOCK, len(x)), dtype=np.uint32)
    for i in range(0, len(x), BF16_BLOCK):
        bits = x[i:i + BF16_BLOCK].view(np.uint32)
        w = work[:len(bits)]
        np.right_shift(bits, 16, out=w)
        np.bitwise_and(w, 1, out=w)
        w += np.uint32(0x7FFF)
        w += bits
        np.right_shift(w, 16, out=w)
        out[i:i + len(w)] = w
        if keep_residual:
            np.left_shift(w, 16, out=w)
            x[i:i + len(w)] -= w.view(np.float32)
    return out


def from_bf16(h: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """bf16 bit patterns (uint16) -> float32 values, widened straight into ``out``'s bits (a new
    array by default): one pass, no temporary."""
    h = np.asarray(h, dtype=np.uint16)
    out = np.empty(h.shape, dtype=np.float32) if out is None else out
    np.left_shift(h, np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    return out


def top_k(x: np.ndarray, fraction: float) -> np.ndarray:
    """Indices (int32, ascending) of the ``ceil(fraction * len(x))`` entries of largest magnitude."""
    k = max(1, min(len(x), int(np.ceil(fraction * len(x)))))
    if k == len(x):
        return np.arange(len(x), dtype=np.int32)
    return np.sort(np.argpartition(np.abs(x), len(x) - k)[len(x) - k:]).astype(np.int32)


def encode(x: np.ndarray, kind: str | None, fraction: float = 0.01):
    """The payload that carries ``x`` (float32) compressed as ``kind``; ``x`` itself for None."""
    if kind is None:
        return x
    if kind == "bf16":
        return ("bf16", to_bf16(x))
    idx = top_k(x, fraction)
    values = x[idx]
    if kind == "topk":
        return ("topk", idx, values.astype(np.float32), len(x))
    return ("topk-bf16", idx, to_bf16(values), len(x))


def decode(payload) -> np.ndarray:
    """The float32 array a payload stands for (dense; zeros where top-k dropped entries)."""
    if not isinstance(payload, tuple):
        return payload
    kind = payload[0]
    if kind == "bf16":
        return from_bf16(payload[1])
    if kind in ("topk", "topk-bf16"):
        _, idx, values, length = payload
        out = np.zeros(length, dtype=np.float32)
        out[idx] = from_bf16(values) if kind == "topk-bf16" else values
        return out
    raise ValueError(f"unknown compressed payload kind {kind!r}")


def decode_into(payload, out: np.ndarray) -> None:
    """Write the float32 values a fetched payload stands for into ``out`` (exact values are
    copied; bf16 ones are widened straight into ``out``'s bits: no float32 temporary)."""
    if not isinstance(payload, tuple):
        out[...] = payload
    elif payload[0] == "bf16":
        from_bf16(payload[1], out=out)
    else:
        out[...] = decode(payload)


def payload_bytes(payload) -> int:
    """Bytes of array data a payload carries across the link."""
    if not isinstance(payload, tuple):
        return int(payload.nbytes)
    return sum(int(p.nbytes) for p in payload[1:] if isinstance(p, np.ndarray))


class Feedback:
    """Error feedback for one replica's pushes: per pushed range, what compression has not sent yet.

    ``encode(key, g)`` compresses ``g + residual[key]`` and keeps the part the payload does not
    carry as the new residual, so the sum of everything decoded plus the residual always equals
    the sum of every gradient given (up to float32 addition).
    """

    def __init__(self, kind: str | None, fraction: float = 0.01):
        check_kind(kind)
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"topk fraction must be in (0, 1], got {fraction!r}")
        self.kind, self.fraction = kind, fraction
        self.residual: dict = {}

    def encode(self, key, grad: np.ndarray):
        """The payload for ``grad`` pushed to ``key`` (a shard, or a shard and offset)."""
        if self.kind is None:
            return grad
        residual = self.residual.get(key)
        if residual is None:
            residual = self.residual[key] = np.zeros(len(grad), dtype=np.float32)
        residual += grad
        if self.kind == "bf16":  # rounded and the residual kept in one blocked pass
            return ("bf16", to_bf16(residual, keep_residual=True))
        payload = encode(residual, self.kind, self.fraction)
        residual -= decode(payload)
        return payload
