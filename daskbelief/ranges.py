"""Contiguous index ranges: cutting ``range(n)`` evenly and merging adjacent runs.

One vocabulary for the flat parameter vector (shards), a store's chunks (data shards) and a
layer's units (model partitions): each is a list of ``(start, stop)`` pairs.
"""
from __future__ import annotations

from collections.abc import Sequence

Range = tuple[int, int]


def split(n: int, k: int) -> list[Range]:
    """``range(n)`` cut into ``k`` contiguous runs whose lengths differ by at most one, longer
    runs first; callers check ``1 <= k <= n`` with a message of their own."""
    base, extra = divmod(n, k)
    bounds, start = [], 0
    for i in range(k):
        stop = start + base + (i < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def merge(ranges: Sequence[Range]) -> list[Range]:
    """Sorted, disjoint ranges with the adjacent ones joined: fewer, longer reads and calls."""
    out: list[Range] = []
    for a, b in ranges:
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out
