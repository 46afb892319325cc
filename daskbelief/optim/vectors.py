"""The vector-operations interface L-BFGS is written against, and its in-process implementation.

Vectors are *named*: an algorithm says ``axpy(alpha, "d", "x")`` and never holds an array, so the
same algorithm runs over vectors kept in this process (``LocalVectors``) or sliced over parameter
shards (Sandblaster's ``ShardedVectors``), where every operation runs on each shard's slice and
only scalars come back. Operations:

* ``zeros(name)``, ``copy(src, dst)``, ``swap(a, b)`` (exchange what two names refer to: free;
  a name not in use takes the other's array)
* ``axpy(alpha, x, y)``: ``y += alpha * x``;  ``scale(alpha, x)``: ``x *= alpha``
* ``mul(a, b, out)``: ``out = a * b`` elementwise
* ``combine([(name, c), ...], out)``: ``out = sum(c * name)`` (L-BFGS builds a direction in one)
* ``dot(a, b) -> float`` and ``dots([(a, b), ...]) -> [float, ...]`` (several in one round trip)

Dot products accumulate in float64 whatever the storage dtype, so the result depends on the
summation order only at the 1e-16 level: a sharded dot (a sum of per-shard partial sums) and a
local one agree to that precision.
"""
from __future__ import annotations

import numpy as np

from daskbelief.backend import axpy, namespace

DOT_BLOCK = 1 << 16  # elements converted to float64 at a time: bounded temporaries


def dot64(a, b) -> float:
    """``sum(a * b)`` accumulated in float64, for float32 or float64 vectors."""
    xp = namespace(a, b)
    if a.dtype == np.float64 and b.dtype == np.float64:
        return float(xp.dot(a, b))
    if xp is not np:  # on a GPU one fused pass beats a loop of small ones
        return float(xp.dot(a.astype(np.float64), b.astype(np.float64)))
    total = 0.0
    for i in range(0, len(a), DOT_BLOCK):
        total += float(np.dot(a[i:i + DOT_BLOCK].astype(np.float64),
                              b[i:i + DOT_BLOCK].astype(np.float64)))
    return total


class LocalVectors:
    """Named vectors of one length and dtype, held in this process (NumPy or CuPy)."""

    def __init__(self, size: int, dtype=np.float32, xp=np):
        self.size, self.dtype, self.xp = int(size), np.dtype(dtype), xp
        self._v: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._v

    def names(self) -> list[str]:
        return sorted(self._v)

    def set(self, name: str, array) -> None:
        """Let ``name`` refer to ``array`` itself (no copy): e.g. a shard's live parameters."""
        if array.shape != (self.size,):
            raise ValueError(f"vector {name!r} must have shape ({self.size},), got {array.shape}")
        self._v[name] = array

    def get(self, name: str):
        try:
            return self._v[name]
        except KeyError:
            raise KeyError(f"no vector named {name!r} (have: {', '.join(self.names()) or 'none'})") from None

    def buffer(self, name: str):
        """The array of ``name``, allocated (uninitialised) on first use."""
        v = self._v.get(name)
        if v is None:
            v = self._v[name] = self.xp.empty(self.size, dtype=self.dtype)
        return v

    def free(self, name: str) -> None:
        self._v.pop(name, None)

    def zeros(self, name: str) -> None:
        self.buffer(name).fill(0)

    def copy(self, src: str, dst: str) -> None:
        self.buffer(dst)[...] = self.get(src)

    def swap(self, a: str, b: str) -> None:
        """Exchange what ``a`` and ``b`` refer to; a name not yet in use takes the other's array
        and leaves it unused (L-BFGS swaps a prospective pair into names never used before)."""
        if a not in self._v and b not in self._v:
            self.get(a)  # neither exists: the usual error
        va, vb = self._v.pop(a, None), self._v.pop(b, None)
        if vb is not None:
            self._v[a] = vb
        if va is not None:
            self._v[b] = va

    def axpy(self, alpha: float, x: str, y: str) -> None:
        axpy(self.dtype.type(alpha), self.get(x), self.get(y))

    def scale(self, alpha: float, x: str) -> None:
        x_ = self.get(x)
        x_ *= self.dtype.type(alpha)

    def mul(self, a: str, b: str, out: str) -> None:
        self.xp.multiply(self.get(a), self.get(b), out=self.buffer(out))

    def combine(self, terms, out: str) -> None:
        """``out = sum(c * v for v, c in terms)``, in storage precision, term by term; ``out``
        may not be one of the terms (it is overwritten first)."""
        if any(name == out for name, _ in terms):
            raise ValueError(f"combine: the output {out!r} is also one of its terms")
        (first, c0), *rest = terms
        target = self.buffer(out)
        self.xp.multiply(self.get(first), self.dtype.type(c0), out=target)
        for name, c in rest:
            axpy(self.dtype.type(c), self.get(name), target)

    def dot(self, a: str, b: str) -> float:
        return dot64(self.get(a), self.get(b))

    def dots(self, pairs) -> list[float]:
        return [self.dot(a, b) for a, b in pairs]


def finish_gradient(acc, x, mask, n: int, l2: float, out) -> float:
    """``out = acc / n + l2 * mask * x`` elementwise (in x's dtype); returns this slice's share of
    the regulariser ``0.5 * l2 * x' M x``. Works on a whole vector or on any slice of one."""
    xp = namespace(out)
    out[...] = acc * (1.0 / n)
    if not l2:
        return 0.0
    masked = xp.multiply(mask, x)
    reg = 0.5 * l2 * dot64(masked, x)
    masked *= out.dtype.type(l2)
    out += masked
    return reg
