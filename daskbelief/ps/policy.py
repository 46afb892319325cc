"""Which shard owns which part of the flat parameter vector, where shards and replicas run, and
which copy a recreated shard takes.

Small pure functions, kept apart from the actor machinery so they can be tested without a cluster.
"""
from __future__ import annotations

from daskbelief.ranges import split


def shard_ranges(size: int, n_shards: int) -> list[tuple[int, int]]:
    """Split ``range(size)`` into ``n_shards`` contiguous ranges whose lengths differ by at most one.

    Contiguous slices keep a push or fetch one memcpy-able buffer per shard; equal sizes keep the
    shards' update work (and so their actor threads) balanced.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if size < n_shards:
        raise ValueError(f"cannot split {size} parameters over {n_shards} shards: "
                         "need at least one parameter per shard")
    return split(size, n_shards)


def overlaps(ranges: list[tuple[int, int]], start: int, stop: int) -> list[tuple[int, int, int]]:
    """The pieces of ``[start, stop)`` held by each shard, as ``(shard, lo, hi)`` in global indices.

    A model-parallel block owns a few parameter ranges; it fetches and pushes only these pieces.
    """
    if not 0 <= start <= stop <= (ranges[-1][1] if ranges else 0):
        raise ValueError(f"range [{start}, {stop}) is outside the parameter vector")
    return [(i, max(a, start), min(b, stop))
            for i, (a, b) in enumerate(ranges) if max(a, start) < min(b, stop)]


def place_shards(workers: list[str], n_shards: int) -> list[str]:
    """The worker address for each shard: distinct workers while there are enough of them.

    All actors on one Dask worker share a single thread, so two shards on one worker serialise
    each other; with fewer workers than shards we wrap around rather than fail.
    """
    if not workers:
        raise ValueError("the Dask cluster has no workers: start at least one worker before training")
    ordered = sorted(workers)
    return [ordered[i % len(ordered)] for i in range(n_shards)]


def place_replicas(workers: list[str], shard_holders: list[str], n_replicas: int) -> list[str]:
    """The preferred worker of each replica: those holding the fewest shards first, round robin.

    A replica computing on a worker whose actor thread also serves a shard slows that shard for
    everyone, and a worker holding nothing but replicas can be lost without losing parameters.
    """
    if not workers:
        raise ValueError("the Dask cluster has no workers: start at least one worker before training")
    ordered = _by_shard_load(workers, shard_holders)
    return [ordered[i % len(ordered)] for i in range(n_replicas)]


def place_blocks(workers: list[str], shard_holders: list[str], n_replicas: int,
                 n_blocks: int) -> list[list[str]]:
    """The worker of each block of each model-parallel replica.

    Blocks, unlike shards, cannot be recreated, so they keep off the workers holding shards when
    the others are enough to give every block of a replica its own worker; a replica's blocks
    sit on distinct workers as far as possible, replicas taking turns over them.
    """
    if not workers:
        raise ValueError("the Dask cluster has no workers: start at least one worker before training")
    free = sorted(set(workers) - set(shard_holders))
    pool = free if len(free) >= n_blocks else _by_shard_load(workers, shard_holders)
    return [[pool[(r * n_blocks + k) % len(pool)] for k in range(n_blocks)] for r in range(n_replicas)]


def place_homed_blocks(workers: list[str], n_blocks: int) -> dict[str, list[str]]:
    """Sandblaster's model-parallel replicas: one per worker (portions that land on a worker run
    on the replica homed there), its blocks on that worker and the next ones, wrapping around."""
    if not workers:
        raise ValueError("the Dask cluster has no workers: start at least one worker before training")
    ordered = sorted(workers)
    return {home: [ordered[(i + k) % len(ordered)] for k in range(n_blocks)]
            for i, home in enumerate(ordered)}


def _by_shard_load(workers: list[str], shard_holders: list[str]) -> list[str]:
    """Workers ordered by how many shards they hold, then by address."""
    load = {w: 0 for w in workers}
    for holder in shard_holders:
        if holder in load:
            load[holder] += 1
    return sorted(workers, key=lambda w: (load[w], w))


def threads_to_fill(threads: dict[str, int], busy: list[str], shard_holders: list[str],
                    max_replicas: int | None) -> list[str]:
    """Elastic Downpour: the workers to start one more replica on each (a worker once per free
    thread), up to ``max_replicas`` replicas in all (None: one per thread).

    ``threads``: running worker -> threads; ``busy``: the worker of every live replica (those of
    workers no longer running are ignored). Workers take turns, those holding fewer shards first,
    for the reason ``place_replicas`` gives.
    """
    ordered = _by_shard_load(list(threads), shard_holders)
    free = {w: max(threads[w] - busy.count(w), 0) for w in ordered}
    turns = [w for k in range(max(free.values(), default=0)) for w in ordered if free[w] > k]
    return turns if max_replicas is None else turns[:max(max_replicas - len(busy), 0)]


def adoptable(replaced_in: int | None, version_now: int, offered: int, generation: int) -> bool:
    """Whether a shard takes a replica's copy of its slice in place of what it holds.

    ``replaced_in``: the server generation in which a recovery created this shard (None for one
    nobody lost); the copy was fetched at version ``offered`` from the server of ``generation``.
    Only a copy from an earlier server is of a shard this one replaced (directly or through
    other recoveries of the same slice), and it is worth taking when it holds more updates than
    the slice holds now: every shard of the slice counts versions from the same start, the
    initial values or the checkpoint the recoveries restored.
    """
    return replaced_in is not None and generation < replaced_in and offered > version_now
