"""Network core throughput on ONE thread, next to the BLAS peak and PyTorch CPU.

Everything runs under ``threadpool_limits(1)`` (and ``torch.set_num_threads(1)``): that is how a
Dask worker started by a nanny runs its BLAS, and it makes the ratios independent of how many cores
the machine has free. A training step is ``loss_and_grad`` (forward + backward, no update), timed
on a fixed batch; GFLOP/s counts ``model.flops_per_example()`` (matmul FLOPs actually performed).

Models: the DistBelief speech MLP 440-1024-1024-1024-2048 (relu, softmax over 2048 states) at
batch 256, and a small locally connected image model (32x32x3 -> LC2D 16@5x5 -> LC2D 32@4x4
stride 2 -> Dense 10), its training step and its forward pass alone (the backward's figure is
the difference of the two).

Other processes share the machine, so every figure is robust to them twice over: the clock is
this process's CPU time (``time.process_time``: with BLAS and torch pinned to one thread, the
seconds one core spent on the step, whatever else ran), and the rounds alternate between the
steps, each figure being the best round, the least disturbed one (the rounds and their spread,
the median's distance from the best, are printed beside it). ``--quick`` times as many rounds
of fewer calls with the same estimator: the best of fewer rounds (4) gave 0.82 of the peak where
the full run gives 0.87, while the rounds, not the calls in each, are what a best-of estimate
needs to find an undisturbed one, so it reaches the full run's verdicts.
"""
from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_limits

from benchmarks.timing import load, load_line, spread
from daskbelief.nn import Dense, LocallyConnected2D, Sequential

try:
    import torch
except ImportError:
    torch = None

BATCH = 256


def mlp_model() -> Sequential:
    return Sequential((440,), [Dense(1024, "relu"), Dense(1024, "relu"), Dense(1024, "relu"),
                               Dense(2048)])


def lc_model() -> Sequential:
    return Sequential((32, 32, 3), [LocallyConnected2D(16, 5, 1, "relu"),
                                    LocallyConnected2D(32, 4, 2, "relu"), Dense(10)])


def interleaved(steps: dict, rounds: int, calls: int, clock=time.perf_counter) -> dict:
    """Seconds per call of each step, per round; rounds alternate between the steps, so a burst
    of load from another process slows one round of each rather than all rounds of one.
    ``clock``: wall time by default (GPU steps, several threads); ``time.process_time`` for steps
    pinned to one thread."""
    for step in steps.values():
        step()  # warm-up: first-touch allocations, validation
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = clock()
            for _ in range(calls):
                step()
            times[name].append((clock() - t) / calls)
    return times


def matmul_step(n: int = 2048):
    """A large float32 matmul into a preallocated result, and its FLOPs: the BLAS peak."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    c = np.empty_like(a)
    return (lambda: np.matmul(a, b, out=c)), 2 * n**3


def model_step(model: Sequential, batch: int = BATCH, xp=np):
    """A training step of ``model`` on arrays of ``xp`` (numpy or cupy), validated once as a
    trainer does, and its FLOPs."""
    rng = np.random.default_rng(0)
    params = xp.asarray(model.init(0))
    X = xp.asarray(rng.standard_normal((batch, *model.input_shape), dtype=np.float32))
    y = xp.asarray(rng.integers(0, model.n_outputs, batch))
    grad = xp.empty_like(params)
    model.loss_and_grad(params, X, y, out=grad)
    return (lambda: model.loss_and_grad(params, X, y, out=grad, validate=False),
            model.flops_per_example() * batch)


def forward_step(model: Sequential, batch: int = BATCH):
    """The forward pass alone of ``model`` (its predictions) on a fixed batch, and its FLOPs."""
    rng = np.random.default_rng(0)
    params = model.init(0)
    X = rng.standard_normal((batch, *model.input_shape), dtype=np.float32)
    return (lambda: model.predict(params, X, batch_size=batch),
            sum(layer.flops_per_example() for layer in model.layers) * batch)


def torch_mlp_step(batch: int = BATCH, device: str = "cpu"):
    """The same MLP step in PyTorch (gradients only, as ``loss_and_grad``)."""
    torch.manual_seed(0)
    sizes = (440, 1024, 1024, 1024, 2048)
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1]).to(device)
    loss_fn = torch.nn.CrossEntropyLoss()
    X = torch.randn(batch, sizes[0], device=device)
    y = torch.randint(0, sizes[-1], (batch,), device=device)

    def step():
        net.zero_grad(set_to_none=False)
        loss_fn(net(X), y).backward()

    return step, None


def run(quick: bool) -> dict:
    rounds, calls = (8, 3) if quick else (8, 8)
    print(load_line("at the start"))
    with threadpool_limits(1):
        mlp, lc = mlp_model(), lc_model()
        print(mlp.describe())
        print(lc.describe())
        steps = {"blas": matmul_step(), "mlp": model_step(mlp), "lc": model_step(lc),
                 "lc_forward": forward_step(lc)}
        if torch is None:
            print("torch is not importable: PyTorch comparison skipped")
        else:
            torch.set_num_threads(1)
            steps["torch"] = torch_mlp_step()
        times = interleaved({k: step for k, (step, _) in steps.items()}, rounds, calls,
                            clock=time.process_time)
    best = {k: min(ts) for k, ts in times.items()}
    gflops = {k: flops / best[k] / 1e9 for k, (_, flops) in steps.items() if flops}
    backward_flops = steps["lc"][1] - steps["lc_forward"][1]
    gflops["lc_backward"] = backward_flops / (best["lc"] - best["lc_forward"]) / 1e9
    peak = gflops["blas"]
    print(f"\n1 thread, CPU time, best of {rounds} interleaved rounds of {calls} calls; spread: "
          "the median round's distance from the best")
    print(f"{'':<36} {'samples/s':>10} {'ms/step':>9} {'GFLOP/s':>9} {'of peak':>8} {'spread':>7}")
    labels = {"blas": "BLAS float32 matmul 2048^3", "mlp": "mlp 440-1024x3-2048, batch 256",
              "lc": "locally connected 32x32x3, b 256", "lc_forward": "  its forward pass",
              "lc_backward": "  its backward (step - forward)", "torch": "torch mlp, batch 256"}
    for k in labels:
        if k not in gflops and k not in best:
            continue
        rate = f"{BATCH / best[k]:.0f}" if k in ("mlp", "lc", "torch") else ""
        ms = f"{1e3 * best[k]:.1f}" if k in best else ""
        flops = f"{gflops[k]:>9.1f} {gflops[k] / peak:>8.2f}" if k in gflops else f"{'':>18}"
        sp = f"{100 * spread(times[k]):>6.1f}%" if k in times else ""
        print(f"{labels[k]:<36} {rate:>10} {ms:>9} {flops} {sp}")
    torch_ratio = best["torch"] / best["mlp"] if "torch" in best else None
    if torch_ratio is not None:
        print(f"daskbelief / torch {torch.__version__} samples/s on the mlp: {torch_ratio:.2f}")
    return {"blas_peak_gflops": peak, "mlp_gflops": gflops["mlp"],
            "mlp_peak_ratio": gflops["mlp"] / peak, "mlp_samples_per_s": BATCH / best["mlp"],
            "lc_gflops": gflops["lc"], "lc_peak_ratio": gflops["lc"] / peak,
            "lc_forward_peak_ratio": gflops["lc_forward"] / peak,
            "lc_backward_peak_ratio": gflops["lc_backward"] / peak,
            "lc_samples_per_s": BATCH / best["lc"], "torch_ratio": torch_ratio,
            "rounds": rounds, "calls_per_round": calls, "clock": "process CPU time",
            "spread": {k: spread(ts) for k, ts in times.items()}, **load()}
