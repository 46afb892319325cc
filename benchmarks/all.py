"""Every benchmark in one run: ``python -m benchmarks all [--quick] [--out DIR]``.

Runs core, downpour, sandblaster, model_parallel and paper one after another (each prints its own
table), then writes ``DIR/RESULTS.md`` (default ``results/``): a table of the figures that matter
with the command that produced them, and the PNG figures (the paper's Figures 3, 4 and 5).
"""
from __future__ import annotations

import importlib
import json
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks import figures

ORDER = ("core", "downpour", "sandblaster", "model_parallel", "paper")

KEY_FIGURES = {
    "core": ["blas_peak_gflops", "mlp_gflops", "mlp_peak_ratio", "lc_gflops", "torch_ratio"],
    "downpour": ["overhead_ratio_n1", "overhead_ratio_n5", "overhead_ratio_n20", "scaling_r2",
                 "push_gbps", "fetch_gbps", "soak_rss_growth"],
    "sandblaster": ["straggler_ratio_backup", "straggler_ratio_nobackup", "overhead_ratio"],
    "model_parallel": ["speedup_k2_lc", "speedup_k2_mlp", "boundary_bytes_per_example_lc"],
}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _paper_table(paper: dict) -> list[str]:
    lines = [f"Time to {paper['target_accuracy']:.0%} test accuracy, {paper['budget_seconds']:.0f} s "
             "of training per method:", "",
             "| method | cores | samples/s | final acc | best acc | time to target (s) |",
             "|---|---|---|---|---|---|"]
    for r in paper["table"]:
        reached = "never" if r["time_to_target"] is None else f"{r['time_to_target']:.1f}"
        lines.append(f"| {r['method']} | {r['cores']} | {r['samples_per_s']:,.0f} | "
                     f"{_fmt(r['final_accuracy'])} | {_fmt(r['best_accuracy'])} | {reached} |")
    return lines


# The paper's orderings (Dean et al. 2012, Figures 4 and 5): (claim, faster method, slower one),
# "faster" meaning it reaches the target test accuracy sooner.
ORDERINGS = [
    ("Downpour with Adagrad beats single-replica SGD", "Downpour Adagrad, 2 replicas",
     "SGD, 1 replica (reference)"),
    ("Adagrad beats plain SGD inside Downpour", "Downpour Adagrad, 2 replicas",
     "Downpour SGD, 2 replicas"),
    ("more replicas reach the target sooner (Figure 5)", "Downpour Adagrad, 2 replicas",
     "Downpour Adagrad, 1 replica"),
    ("Sandblaster L-BFGS gains from more workers (Figure 5)", "Sandblaster L-BFGS, 2 workers",
     "Sandblaster L-BFGS, 1 worker"),
    ("Downpour Adagrad beats Sandblaster L-BFGS at equal cores", "Downpour Adagrad, 2 replicas",
     "Sandblaster L-BFGS, 2 workers"),
]


def orderings(paper: dict) -> list[str]:
    """Each of the paper's orderings with what this run measured: holds, does not, or cannot
    tell (neither method reached the target)."""
    times = {r["method"]: r["time_to_target"] for r in paper["table"]}
    lines = []
    for claim, fast, slow in ORDERINGS:
        a, b = times.get(fast), times.get(slow)
        if a is None and b is None:
            verdict = "cannot tell: neither reached the target"
        elif b is None or (a is not None and a < b):
            verdict = "holds"
        else:
            verdict = "does not hold"
        shown = ", ".join(f"{m}: {'never' if t is None else f'{t:.1f} s'}" for m, t in ((fast, a), (slow, b)))
        lines.append(f"- {claim}: **{verdict}** ({shown})")
    return lines


def write_results(results: dict, out: Path, quick: bool, seconds: float) -> Path:
    """RESULTS.md and the figures, from the benchmarks' returned figures."""
    out.mkdir(parents=True, exist_ok=True)
    flag = " --quick" if quick else ""
    lines = ["# daskbelief benchmark results", "",
             f"`python -m benchmarks all{flag}` on {platform.node()} ({platform.machine()}, "
             f"{_cores()} cores), {time.strftime('%Y-%m-%d %H:%M')}, {seconds:.0f} s in all.", "",
             "| benchmark | figure | value | command |", "|---|---|---|---|"]
    for name in ORDER:
        for key in KEY_FIGURES.get(name, []):
            if name in results:
                lines.append(f"| {name} | `{key}` | {_fmt(results[name].get(key))} | "
                             f"`python -m benchmarks {name}{flag}` |")
    if "paper" in results:
        lines += ["", "## The paper's figures and the peers", ""] + _paper_table(results["paper"])
        lines += ["", "The paper's orderings, as measured in this run:", ""] + orderings(results["paper"])
        for title, fn, file in [("Figure 4: accuracy vs time", figures.accuracy_vs_time, "fig4.png"),
                                ("Figure 5: time to target vs cores", figures.time_to_target, "fig5.png")]:
            fn(results["paper"], out / file)
            lines += ["", f"### {title}", "", f"![{title}]({file})"]
    if "model_parallel" in results:
        figures.model_parallel_speedup(results["model_parallel"], out / "fig3.png")
        lines += ["", "### Figure 3: model-parallel speed-up", "", "![Figure 3](fig3.png)"]
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    return out / "RESULTS.md"


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def run(quick: bool = False, out: str = "results") -> dict:
    started, results = time.time(), {}
    for name in ORDER:
        print(f"\n===== benchmarks {name}{' --quick' if quick else ''} =====", flush=True)
        results[name] = importlib.import_module(f"benchmarks.{name}").run(quick=quick)
    path = write_results(results, Path(out), quick, time.time() - started)
    print(f"\nwrote {path} and its figures ({time.time() - started:.0f} s in all)")
    return {name: {k: v for k, v in r.items() if np.isscalar(v) or v is None}
            for name, r in results.items()}
