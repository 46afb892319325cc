"""What every benchmark says about its own timing: how many rounds, their spread, the load.

The machine is often shared (other processes, other benchmarks), so each benchmark times
interleaved rounds and keeps the best (the least disturbed); these helpers put the rounds'
spread and the machine's load beside the figure, so a reader can tell a verdict from noise.
"""
from __future__ import annotations

import os
import statistics


def spread(times: list[float]) -> float:
    """How far the median round is from the best one, as a fraction of the best (for times:
    lower is better)."""
    return statistics.median(times) / min(times) - 1


def rate_spread(rates: list[float]) -> float:
    """The same for rates (higher is better): the best round's distance from the median."""
    return max(rates) / statistics.median(rates) - 1


def load() -> dict:
    """The 1-minute load average and the core count: over 1 per core, parallel speed-ups and
    wall-clock rates measured now are the machine's, not the code's."""
    cores = os.cpu_count() or 1
    return {"load_1min": round(os.getloadavg()[0], 2), "cores": cores}


def load_line(stage: str) -> str:
    state = load()
    return f"machine load {stage}: {state['load_1min']:.1f} on {state['cores']} cores"
