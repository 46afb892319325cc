"""PNG figures of benchmark results (matplotlib, Agg): what ``benchmarks all`` puts in RESULTS.md."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after choosing the backend



def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_time(paper: dict, path: Path) -> Path:
    """Figure 4: test accuracy vs wall time, one line per method."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for c in paper["curves"]:
        if c.get("seed", 0) != 0:
            continue  # one line per method: its first seed
        style = "-" if c["family"] != "peer" else ":"
        ax.plot(c["times"], c["accuracy"], style, marker=".", label=f"{c['name']}")
    ax.axhline(paper["target_accuracy"], color="grey", lw=0.8, ls="--")
    ax.set(xlabel="training time (s)", ylabel="test accuracy",
           title="Figure 4 on this machine: speech-frames, accuracy vs time")
    ax.legend(fontsize=7)
    return _save(fig, path)


def family(method: str) -> str:
    """A method's name without its count of replicas, workers or processes ("Downpour Adagrad,
    2 replicas, 1 process" -> "Downpour Adagrad, 1 process"): the points one line joins."""
    words = [w.strip() for w in method.split(",")]
    return ", ".join(words[:1] + words[2:])


def time_to_target(paper: dict, path: Path) -> Path:
    """Figure 5: time to the target accuracy vs cores, per method family (the median over a
    method's seeds)."""
    groups: dict[str, list] = {}
    for r in paper["table"]:
        if r["time_to_target"] is not None:
            groups.setdefault(family(r["method"]), []).append((r["cores"], r["time_to_target"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in sorted(groups.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set(xlabel="cores (worker processes or threads)", ylabel="seconds",
           title=f"Figure 5 on this machine: time to {paper['target_accuracy']:.0%} test accuracy",
           xticks=sorted({c["cores"] for c in paper["curves"]}))
    ax.legend(fontsize=7)
    return _save(fig, path)


def model_parallel_speedup(mp: dict, path: Path) -> Path:
    """Figure 3: step-time speed-up vs partitions for each model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ks = []
    for model, label in (("lc", "locally connected image model"), ("mlp", "fully connected speech MLP")):
        ms = mp["step_ms"][model]
        ks = sorted(int(key[1:]) for key in ms if key.startswith("k"))
        ax.plot(ks, [ms["k1"] / ms[f"k{k}"] for k in ks], marker="o", label=label)
    ax.plot(ks, ks, color="grey", lw=0.8, ls="--", label="linear")
    ax.set(xlabel="partitions (workers per replica)", ylabel="speed-up over 1 partition",
           title="Figure 3 on this machine: model parallelism", xticks=ks)
    ax.legend(fontsize=8)
    return _save(fig, path)
