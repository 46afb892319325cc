"""RESULTS.md's verdicts on the paper's orderings: a pure function of the measured table."""
from __future__ import annotations

from benchmarks.all import ORDERINGS, explanations, orderings


def paper(times: dict, rates: dict | None = None) -> dict:
    rates = rates or {}
    return {"table": [{"method": m, "time_to_target": t, "samples_per_s": rates.get(m, 1000.0)}
                      for m, t in times.items()]}


def test_each_ordering_is_judged_on_time_to_target():
    claim, fast, slow = ORDERINGS[0]
    assert "**holds**" in orderings(paper({fast: 5.0, slow: 9.0}))[0]
    assert "**holds**" in orderings(paper({fast: 5.0, slow: None}))[0]
    assert "**does not hold**" in orderings(paper({fast: 9.0, slow: 5.0}))[0]
    assert "**does not hold**" in orderings(paper({fast: None, slow: 5.0}))[0]
    assert "cannot tell" in orderings(paper({fast: None, slow: None}))[0]
    assert "**not measured**" in orderings(paper({fast: 5.0}))[0]
    assert orderings(paper({fast: 5.0, slow: None}))[0].endswith(f"({fast}: 5.0 s, {slow}: never)")


def test_explanations_quote_the_measured_figures_and_follow_the_outcome():
    ref, dp2 = "Adagrad, 1 replica (reference)", "Downpour Adagrad, 2 replicas"
    sb1, sb2 = "Sandblaster L-BFGS, 1 worker", "Sandblaster L-BFGS, 2 workers"
    rates = {ref: 8000.0, dp2: 12000.0, sb1: 10000.0, sb2: 17000.0}
    slower = "\n".join(explanations(paper({ref: 8.0, dp2: 11.0, sb1: None, sb2: None}, rates)))
    assert "1.50x the samples/s" in slower and "does not buy back" in slower
    assert "raises its throughput 1.70x" in slower and "1 worker never, 2 workers never" in slower
    faster = "\n".join(explanations(paper({ref: 8.0, dp2: 6.0}, rates)))
    assert "throughput buys back" in faster and "Sandblaster" not in faster
