"""When Sandblaster launches backup copies of portions: one small pure function, no cluster.

DistBelief (like MapReduce) fights stragglers near the end of a batch by handing copies of the
unfinished portions to idle replicas and taking whichever copy finishes first. Dask has no such
mechanism, so the coordinator asks ``portions_to_back_up`` which portions to copy; the machinery
that launches the copies and applies each portion exactly once lives in
``daskbelief.train.sandblaster``. The policy follows cubed's (``cubed/runtime/backup.py``): wait
until most portions are done, then copy a portion that has taken much longer than the typical one.
"""
from __future__ import annotations

import math
from statistics import median

MIN_DONE_FRACTION = 0.75  # copy nothing before this share of the batch's portions is done
SLOW_FACTOR = 2.0         # a portion is late once it has waited this many typical durations
MIN_DONE = 3              # finished portions needed before "typical" means anything
MIN_LATE = 0.05           # seconds: a copy cannot win back less than the round trips it costs


def tail_start(total: int, min_done_fraction: float = MIN_DONE_FRACTION,
               min_done: int = MIN_DONE) -> int:
    """How many of ``total`` portions must be done before any backup copy is considered."""
    return max(min_done, math.ceil(min_done_fraction * total))


def portions_to_back_up(now: float, running: dict, finished: dict, total: int, launched=(), *,
                        min_done_fraction: float = MIN_DONE_FRACTION,
                        slow_factor: float = SLOW_FACTOR, min_done: int = MIN_DONE,
                        min_late: float = MIN_LATE) -> list:
    """The portions (of ``range(total)``) that deserve a backup copy now, in portion order.

    ``running`` maps each started, unfinished portion to its start time; ``finished`` maps each
    finished portion to ``(end time, duration)``; times share ``now``'s clock. Portions in
    neither are still waiting to start. ``launched``: portions already copied (one copy each).

    Nothing is copied before ``max(min_done, min_done_fraction * total)`` portions are done:
    early in a batch a slow portion is better left alone while the others keep every worker
    busy. From the moment that many were done (the *tail*), a portion is late when

    * it has been running longer than ``slow_factor`` times the median finished duration, or
    * it is still waiting to start ``slow_factor`` median durations into the tail: with the
      batch nearly done, the free workers would have taken it, so it is queued behind a
      straggler (Dask hands a worker its next task before the current one ends);

    and in either case only once that time exceeds ``min_late`` seconds: with portions of a few
    milliseconds, twice the median is a hiccup, not a straggler, and a copy costs more (its
    scheduling, its parameter fetch) than it could win back.
    """
    done = len(finished)
    needed = tail_start(total, min_done_fraction, min_done)
    if total < 1 or done < needed:
        return []
    limit = max(slow_factor * median(duration for _, duration in finished.values()), min_late)
    tail_began = sorted(end for end, _ in finished.values())[needed - 1]
    since = {p: tail_began for p in range(total) if p not in finished and p not in running}
    since.update(running)
    return sorted(p for p, t in since.items() if p not in launched and now - t > limit)
