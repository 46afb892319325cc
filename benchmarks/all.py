"""Every benchmark in one run: ``python -m benchmarks all [--quick] [--out DIR]``.

Runs core, downpour, sandblaster, model_parallel, paper, gpu (which only says "no GPU" on a
machine without one), scale and network (which says why where network namespaces cannot be
made) one after another, each printing its own table, then writes
``DIR/RESULTS.md`` (default ``results/``): a table of the figures that matter with the command
that produced them, and the PNG figures (the paper's Figures 3, 4 and 5).
"""
from __future__ import annotations

import importlib
import json
import platform
import time
from pathlib import Path

import numpy as np

from benchmarks import figures
from benchmarks.paper import ADAGRAD, DOWNPOUR_ADAGRAD, N_PUSH, ONE_PROCESS, _ratio

ORDER = ("core", "downpour", "sandblaster", "model_parallel", "paper", "gpu", "scale", "network")

KEY_FIGURES = {
    "core": ["blas_peak_gflops", "mlp_gflops", "mlp_peak_ratio", "lc_gflops", "lc_peak_ratio",
             "lc_forward_peak_ratio", "lc_backward_peak_ratio", "torch_ratio"],
    "downpour": ["overhead_ratio_n1", "overhead_ratio_n1_one_process", "overhead_ratio_n5",
                 "overhead_ratio_n20", "scaling_r2", "push_gbps", "fetch_gbps", "soak_rss_growth"],
    "sandblaster": ["iteration_floor_ms_small", "straggler_ratio_backup",
                    "straggler_ratio_nobackup", "overhead_ratio"],
    "model_parallel": ["speedup_k2_lc", "speedup_k2_mlp", "boundary_bytes_per_example_lc"],
    "paper": ["samples_to_target_ratio_downpour2_vs_reference"],
    "gpu": ["gpu", "core_gpu_vs_1thread_b256", "core_gpu_vs_1thread_b4096", "downpour_gpu_vs_numpy_r1"],
    "scale": ["link", "push_gbps_large", "fetch_gbps_large", "tcp_gbps_same_run", "push_ratio_to_tcp",
              "fetch_ratio_to_tcp", "shard_rss_over_slice", "params", "worker_memory_limit_bytes",
              "peak_rss_bytes_max_worker", "peak_rss_bytes_driver"],
    "network": ["downpour_r2_samples_per_s", "downpour_r2_n5_samples_per_s",
                "downpour_r2_bf16_samples_per_s", "time_to_target_1gbit_exact",
                "time_to_target_1gbit_bf16", "time_to_target_1gbit_bf16_over_exact",
                "sandblaster_s_per_iteration", "skipped"],
}


def _network_table(network: dict, model_parallel: dict | None) -> list[str]:
    """The paper's Figure 3 from the network (k=2 speed-up by link bandwidth), beside the same
    speed-up on this machine's cores over loopback."""
    lines = ["| link | locally connected k=2 | fully connected k=2 |", "|---|---|---|"]
    if model_parallel:
        lines.append(f"| loopback (cores) | {_fmt(model_parallel.get('speedup_k2_lc'))} | "
                     f"{_fmt(model_parallel.get('speedup_k2_mlp'))} |")
    for bw, lc in network["mp_k2_speedup_lc"].items():
        lines.append(f"| {bw} | {_fmt(lc)} | {_fmt(network['mp_k2_speedup_mlp'][bw])} |")
    return lines + ["", network["note"]]


def _fmt(value) -> str:
    if isinstance(value, dict):  # a figure by link bandwidth
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3g}"
    return "-" if value is None else str(value)


def _paper_table(paper: dict) -> list[str]:
    lines = [f"Time to {paper['target_accuracy']:.0%} test accuracy, {paper['budget_seconds']:.0f} s "
             "of training per method:", "",
             "| method | cores | samples/s | final acc | best acc | time to target (s) | "
             "each seed's (s) | samples to target |", "|---|---|---|---|---|---|---|---|"]
    for r in paper["table"]:
        reached = "never" if r["time_to_target"] is None else f"{r['time_to_target']:.1f}"
        seeds = ", ".join("never" if t is None else f"{t:.1f}" for t in r.get("time_to_target_seeds", []))
        samples = r.get("samples_to_target")
        lines.append(f"| {r['method']} | {r['cores']} | {r['samples_per_s']:,.0f} | "
                     f"{_fmt(r['final_accuracy'])} | {_fmt(r['best_accuracy'])} | {reached} | "
                     f"{seeds} | {'-' if samples is None else f'{samples:,.0f}'} |")
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
    # Not the paper's: the peers a user would run on the same cores instead (issue 15's targets).
    ("Downpour Adagrad beats PyTorch with 2 threads", "Downpour Adagrad, 2 replicas",
     "PyTorch Adagrad, 2 threads"),
    ("Downpour Adagrad beats PyTorch DDP on 2 processes", "Downpour Adagrad, 2 replicas",
     "PyTorch DDP, 2 processes"),
    ("Downpour Adagrad beats PyTorch Hogwild on 2 processes", "Downpour Adagrad, 2 replicas",
     "PyTorch Hogwild, 2 processes"),
    ("Downpour Adagrad in one 2-thread process beats PyTorch with 2 threads", ONE_PROCESS,
     "PyTorch Adagrad, 2 threads"),
    ("Downpour Adagrad in one 2-thread process beats PyTorch DDP on 2 processes",
     ONE_PROCESS, "PyTorch DDP, 2 processes"),
    ("Downpour Adagrad in one 2-thread process beats the single-process Adagrad reference",
     ONE_PROCESS, "Adagrad, 1 replica (reference)"),
]


def _row(paper: dict, method: str) -> dict | None:
    return next((r for r in paper["table"] if r["method"] == method), None)


def _when(row: dict | None) -> str:
    """Its time to target (the median over its seeds, each seed's time after it)."""
    if row is None:
        return "not run"
    when = "never" if row["time_to_target"] is None else f"{row['time_to_target']:.1f} s"
    seeds = row.get("time_to_target_seeds") or []
    if len(seeds) > 1:
        when += " (seeds: " + ", ".join("never" if t is None else f"{t:.1f}" for t in seeds) + ")"
    return when


def _sooner(a: dict, b: dict) -> bool:
    """Whether row ``a`` reached the target before row ``b`` did (or ``b`` never did): on every
    seed of each when the rows carry their seeds' times, so that an ordering holds only beyond
    the spread."""
    never = float("inf")
    ta = [never if t is None else t for t in a.get("time_to_target_seeds") or [a["time_to_target"]]]
    tb = [never if t is None else t for t in b.get("time_to_target_seeds") or [b["time_to_target"]]]
    return max(ta) < never and max(ta) < min(tb)


def orderings(paper: dict) -> list[str]:
    """Each of the paper's orderings with what this run measured: holds, does not, or cannot
    tell (neither method reached the target)."""
    lines = []
    for claim, fast, slow in ORDERINGS:
        a, b = _row(paper, fast), _row(paper, slow)
        if a is None or b is None:
            verdict = "not measured"
        elif a["time_to_target"] is None and b["time_to_target"] is None:
            verdict = "cannot tell: neither reached the target"
        elif _sooner(a, b):
            verdict = "holds"
        elif _sooner(b, a) or len(a.get("seeds", [0])) < 2 or len(b.get("seeds", [0])) < 2:
            verdict = "does not hold"
        else:
            verdict = "within the seeds' spread"
        lines.append(f"- {claim}: **{verdict}** ({fast}: {_when(a)}, {slow}: {_when(b)})")
    return lines


def explanations(paper: dict) -> list[str]:
    """Why the orderings come out as they do here: the mechanisms, with this run's figures."""
    ref, dp2 = _row(paper, "Adagrad, 1 replica (reference)"), _row(paper, "Downpour Adagrad, 2 replicas")
    sb1, sb2 = _row(paper, "Sandblaster L-BFGS, 1 worker"), _row(paper, "Sandblaster L-BFGS, 2 workers")
    torch2 = _row(paper, "PyTorch Adagrad, 2 threads")
    lines = []
    if ref and dp2:
        lines.append(
            f"- **Two cores are not two machines.** Downpour Adagrad with 2 replicas processes "
            f"{dp2['samples_per_s'] / ref['samples_per_s']:.2f}x the samples/s of the "
            f"single-process Adagrad reference ({dp2['samples_per_s']:,.0f} vs "
            f"{ref['samples_per_s']:,.0f}), not 2x: the same two cores also run the parameter "
            "shards (Adagrad over 1.6M parameters per push), the driver's parameter snapshots and "
            "the copies in and out of shared memory. The paper's speed-ups came from hundreds of machines, where that "
            "overhead is spread thin.")
        lines.append(
            f"- **Progress per sample.** With n_fetch = n_push = {N_PUSH} (the paper's "
            "setting) each push is one minibatch's gradient, computed on parameters a step or two "
            "old and interleaved with the other replica's; Adagrad needs a rate of "
            f"{DOWNPOUR_ADAGRAD['lr']} there for its first steps to stay stable, against "
            f"{ADAGRAD['lr']} in the single process (measurements in `benchmarks/paper.py`). "
            f"Examples to the target, Downpour Adagrad x2 / the Adagrad reference: "
            f"{_fmt(_ratio(paper['table'], 'samples_to_target', dp2['method'], ref['method']))}; "
            f"times: Downpour Adagrad {_when(dp2)}, the reference "
            f"{_when(ref)} -- on two cores the extra throughput "
            f"{'buys back' if _sooner(dp2, ref) else 'does not buy back'} what asynchrony costs.")
    one = _row(paper, ONE_PROCESS)
    if one and dp2:
        lines.append(
            f"- **Processes of one host share memory.** The same 2 replicas move "
            f"{dp2['samples_per_s']:,.0f} samples/s in two single-threaded worker processes and "
            f"{one['samples_per_s']:,.0f} in one worker process of 2 threads. In both layouts a "
            "replica copies every shard of its host out of shared memory and pushes to a shard "
            "in another process by naming its buffer through a pipe (`ps/shared.py`): no message "
            "is copied through TCP (time to target: two processes "
            f"{_when(dp2)}, one process {_when(one)}).")
    if sb1 and sb2:
        ratio = sb2["samples_per_s"] / sb1["samples_per_s"]
        lines.append(
            f"- **Sandblaster needs many more cores.** Each L-BFGS iteration evaluates the whole "
            f"batch at least once (its line search more), so few iterations fit in the budget; "
            f"a second worker raises its throughput {ratio:.2f}x ({sb1['samples_per_s']:,.0f} -> "
            f"{sb2['samples_per_s']:,.0f} samples/s); time to target: 1 worker {_when(sb1)}, "
            f"2 workers {_when(sb2)}. The paper's Figure 5 points the same way: Sandblaster "
            "L-BFGS needed many times Downpour's cores to reach an accuracy as fast.")
    if torch2 and dp2:
        lines.append(_one_machine(torch2, dp2))
    return lines


def _one_machine(torch2: dict, dp2: dict) -> str:
    """PyTorch with 2 threads against Downpour x2, as this run's seeds have it."""
    how = ("splits each matmul across the cores with no communication at all and moves no "
           "parameters anywhere; Downpour's replicas compute on a core each and spend the rest of "
           "the same cores on the shards' updates and the copies in and out of shared memory")
    if _sooner(torch2, dp2):
        verdict = "one process wins: that is the best use of a single small machine"
    elif _sooner(dp2, torch2):
        verdict = "Downpour still wins, on every seed"
    else:
        verdict = "the two are level within the seeds' spread"
    return (f"- **One machine.** PyTorch with 2 threads ({_when(torch2)}) {how}; against Downpour "
            f"Adagrad x2 ({_when(dp2)}) {verdict}. DistBelief's (and daskbelief's) case is the "
            "model or the data that outgrows one machine.")


def beyond_two(results: dict) -> list[tuple[str, str, float]]:
    """(benchmark, figure, value) for R and k above 2: timed only where the machine had the cores."""
    found = [("downpour", f"scaling_{key}", value)
             for key, value in results.get("downpour", {}).get("scaling", {}).items() if int(key[1:]) > 2]
    for model, speedups in results.get("model_parallel", {}).get("speedup", {}).items():
        found += [("model_parallel", f"speedup_{key}_{model}", value)
                  for key, value in speedups.items() if int(key[1:]) > 2]
    return found


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
    for name, key, value in beyond_two(results):
        lines.append(f"| {name} | `{key}` | {_fmt(value)} | `python -m benchmarks {name}{flag}` |")
    if "paper" in results:
        lines += ["", "## The paper's figures and the peers", ""] + _paper_table(results["paper"])
        lines += ["", "The paper's orderings, as measured in this run:", ""] + orderings(results["paper"])
        lines += ["", "Why, on this machine:", ""] + explanations(results["paper"])
        for title, fn, file in [("Figure 4: accuracy vs time", figures.accuracy_vs_time, "fig4.png"),
                                ("Figure 5: time to target vs cores", figures.time_to_target, "fig5.png")]:
            fn(results["paper"], out / file)
            lines += ["", f"### {title}", "", f"![{title}]({file})"]
    if "model_parallel" in results:
        figures.model_parallel_speedup(results["model_parallel"], out / "fig3.png")
        lines += ["", "### Figure 3: model-parallel speed-up", "", "![Figure 3](fig3.png)"]
    if "mp_k2_speedup_lc" in results.get("network", {}):
        lines += ["", "### Figure 3 by link bandwidth (emulated hosts)", ""]
        lines += _network_table(results["network"], results.get("model_parallel"))
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
