"""Update rules, the vector-operations interface and L-BFGS, against hand formulas and scipy."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import minimize, rosen, rosen_der

from daskbelief.optim.lbfgs import LineSearchError, lbfgs, wolfe_search
from daskbelief.optim.rules import adagrad, make_rule, momentum, sgd
from daskbelief.optim.vectors import LocalVectors, dot64


def grads(n=50, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]


def test_adagrad_is_the_papers_rule():
    p0 = np.linspace(-1, 1, 50, dtype=np.float32)
    rule, p = adagrad(lr=0.1, eps=1e-7), p0.copy()
    state = rule.init(p)
    gs = grads()
    for g in gs:
        rule.apply(p, g, state)
    expect, acc = p0.astype(np.float64), np.zeros(50)
    for g in gs:
        acc += g.astype(np.float64) ** 2
        expect -= 0.1 * g / (np.sqrt(acc) + 1e-7)  # eta_i = gamma / sqrt(sum_j g_ij^2)
    np.testing.assert_allclose(p, expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["sum_sq"], acc, rtol=1e-5)


def test_sgd_and_momentum_match_their_formulas():
    gs, p0 = grads(), np.ones(50, np.float32)
    p = p0.copy()
    sgd(0.5).apply(p, gs[0], {})
    np.testing.assert_allclose(p, p0 - 0.5 * gs[0], rtol=1e-6)
    rule, p = momentum(lr=0.1, mu=0.9), p0.copy()
    state, v, expect = rule.init(p), np.zeros(50), p0.astype(np.float64)
    for g in gs:
        rule.apply(p, g, state)
        v = 0.9 * v + g
        expect -= 0.1 * v
    np.testing.assert_allclose(p, expect, rtol=1e-5)


@pytest.mark.parametrize("spec", ["sgd", {"name": "momentum", "lr": 0.1, "mu": 0.5},
                                  {"name": "adagrad", "lr": 0.2}])
def test_a_rule_applied_slice_by_slice_equals_the_whole_vector(spec):
    """What lets a parameter shard run the reference trainer's rule on its slice."""
    rule, gs = make_rule(spec), grads(n=101)
    whole = np.linspace(-1, 1, 101, dtype=np.float32)
    sliced = whole.copy()
    state = rule.init(whole)
    cuts = [(0, 40), (40, 41), (41, 101)]
    states = [rule.init(sliced[a:b]) for a, b in cuts]
    for g in gs:
        rule.apply(whole, g, state)
        for (a, b), st in zip(cuts, states):
            rule.apply(sliced[a:b], g[a:b], st)
    np.testing.assert_array_equal(whole, sliced)


def test_rules_round_trip_and_bad_specs():
    assert make_rule(make_rule({"name": "adagrad", "lr": 0.3}).to_dict()).hyper == {"lr": 0.3, "eps": 1e-7}
    for spec, message in [("adam", "unknown update rule 'adam'"), ({"lr": 1}, "'name'"),
                          ({"name": "sgd", "rate": 1}, "rate"), ({"name": "sgd", "lr": -1}, "lr"),
                          ({"name": "momentum", "mu": 1.5}, "mu")]:
        with pytest.raises(ValueError, match=message):
            make_rule(spec)


def test_local_vectors_operations():
    sp = LocalVectors(5, np.float32)
    sp.set("a", np.arange(5, dtype=np.float32))
    sp.copy("a", "b")
    sp.scale(2.0, "b")
    sp.axpy(-1.0, "a", "b")             # b = a
    sp.mul("a", "b", "c")               # c = a^2
    assert sp.dot("a", "b") == 30.0 and sp.dots([("c", "a"), ("a", "a")]) == [100.0, 30.0]
    sp.swap("a", "c")
    np.testing.assert_array_equal(sp.get("a"), np.arange(5) ** 2)
    sp.zeros("c")
    assert sp.dot("c", "c") == 0.0
    with pytest.raises(KeyError, match="no vector named 'zz'"):
        sp.get("zz")
    c = sp.get("c")
    sp.swap("new", "c")  # a name not in use takes the other's array, which is left unused
    assert sp.get("new") is c and "c" not in sp
    with pytest.raises(KeyError, match="no vector named 'zz'"):
        sp.swap("zz", "yy")


def test_dot_accumulates_in_float64():
    a = np.full(1_000_003, 0.1, dtype=np.float32)
    exact = float(np.dot(a.astype(np.float64), a.astype(np.float64)))
    assert dot64(a, a) == pytest.approx(exact, rel=1e-12)  # float64 summation order only
    naive = float(np.cumsum(a * a, dtype=np.float32)[-1])  # a float32 running sum drifts
    assert naive != pytest.approx(exact, rel=1e-6)


# -- line search ----------------------------------------------------------------------------

def _phi(f, df):
    calls = []

    def phi(alpha):
        calls.append(alpha)
        return f(alpha), df(alpha)
    return phi, calls


@pytest.mark.parametrize("f,df,start", [
    (lambda a: (a - 3) ** 2, lambda a: 2 * (a - 3), 1.0),                 # needs extrapolation
    (lambda a: (a - 0.01) ** 2, lambda a: 2 * (a - 0.01), 1.0),           # needs zooming in
    (lambda a: -math.sin(a) + 0.1 * a, lambda a: -math.cos(a) + 0.1, 5.0),  # non-convex
])
def test_wolfe_search_meets_the_strong_wolfe_conditions(f, df, start):
    phi, calls = _phi(f, df)
    f0, g0 = f(0.0), df(0.0)
    alpha, fa, ga, evals = wolfe_search(phi, f0, g0, start)
    assert fa <= f0 + 1e-4 * alpha * g0          # sufficient decrease
    assert abs(ga) <= 0.9 * abs(g0)              # strong curvature
    assert calls[-1] == alpha and evals == len(calls)  # the accepted point is the last evaluated


def test_wolfe_search_backs_off_from_non_finite_values():
    phi, calls = _phi(lambda a: (a - 0.5) ** 2 if a < 1 else float("nan"),
                      lambda a: 2 * (a - 0.5) if a < 1 else float("nan"))
    alpha, fa, _, _ = wolfe_search(phi, 0.25, -1.0, 8.0)
    assert 0 < alpha < 1 and math.isfinite(fa)


def test_wolfe_search_gives_up_on_an_unbounded_objective():
    phi, _ = _phi(lambda a: -a, lambda a: -1.0)
    with pytest.raises(LineSearchError, match="bounded below"):
        wolfe_search(phi, 0.0, -1.0, 1.0, max_evals=10)
    with pytest.raises(ValueError, match="descent"):
        wolfe_search(phi, 0.0, 1.0)


# -- L-BFGS -----------------------------------------------------------------------------------

def rosenbrock_space(n=10):
    sp = LocalVectors(n, np.float64)
    sp.set("x", np.full(n, -1.2))

    def objective(x, g):
        v = sp.get(x)
        sp.buffer(g)[...] = rosen_der(v)
        return float(rosen(v))
    return sp, objective


def test_lbfgs_minimises_rosenbrock():
    sp, objective = rosenbrock_space()
    rows = []
    res = lbfgs(sp, objective, m=8, max_iter=500, gtol=1e-8, callback=rows.append)
    assert res.converged and res.message == "gradient norm below gtol"
    np.testing.assert_allclose(sp.get("x"), 1.0, atol=1e-6)
    assert len(rows) == res.iterations == len(res.history) and rows[-1]["loss"] == res.loss
    assert all(b["loss"] <= a["loss"] for a, b in zip(rows, rows[1:]))  # monotone: Wolfe steps
    ref = minimize(rosen, np.full(10, -1.2), jac=rosen_der, method="L-BFGS-B",
                   options={"maxiter": 500, "gtol": 1e-8})
    assert res.iterations <= 2 * ref.nit  # about as efficient as scipy's


def test_lbfgs_same_iterations_same_loss_as_scipy_on_a_quadratic():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((30, 30))
    H, b = A @ A.T / 30 + np.eye(30), rng.standard_normal(30)
    sp = LocalVectors(30, np.float64)
    sp.set("x", np.zeros(30))

    def objective(x, g):
        v = sp.get(x)
        sp.buffer(g)[...] = H @ v - b
        return float(0.5 * v @ H @ v - b @ v)

    res = lbfgs(sp, objective, m=5, max_iter=15, gtol=0)
    ref = minimize(lambda v: 0.5 * v @ H @ v - b @ v, np.zeros(30), jac=lambda v: H @ v - b,
                   method="L-BFGS-B", options={"maxiter": 15, "maxcor": 5, "gtol": 0, "ftol": 0})
    best = -0.5 * b @ np.linalg.solve(H, b)
    assert res.iterations == 15
    assert abs(res.loss - ref.fun) <= 0.01 * abs(ref.fun)
    assert res.loss - best < 1e-3 * abs(best)


class CountingVectors(LocalVectors):
    """Counts ``dots`` calls: over sharded vectors, each is a round trip."""

    dot_calls = 0

    def dots(self, pairs):
        self.dot_calls += 1
        return super().dots(pairs)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_prospective_pair_gives_the_same_iterates_with_one_dots_call_fewer_an_iteration(dtype):
    """With ``prospective=True`` every line-search evaluation forms the curvature pair its point
    would make and takes the next iteration's dots along: the iterates are bit for bit the
    plain run's (m=4 over 40 iterations: pairs' names are reused), and the dots call each
    iteration made after its step is gone."""
    runs = {}
    for prospective in (False, True):
        sp = CountingVectors(10, dtype)
        sp.set("x", np.full(10, -1.2, dtype=dtype))

        def objective(x, g, sp=sp):
            v = sp.get(x).astype(np.float64)
            sp.buffer(g)[...] = rosen_der(v)
            return float(rosen(v))

        res = lbfgs(sp, objective, m=4, max_iter=40, gtol=0, prospective=prospective)
        runs[prospective] = (sp.get("x").copy(), [r["loss"] for r in res.history],
                             res.iterations, sp.dot_calls)
    (x0, loss0, iterations, calls0), (x1, loss1, _, calls1) = runs[False], runs[True]
    np.testing.assert_array_equal(x1, x0)
    assert loss1 == loss0 and iterations == 40
    assert calls0 - calls1 == iterations, (calls0, calls1)


def test_lbfgs_resumed_from_a_saved_state_goes_on_exactly():
    """Stop after iteration 9 keeping only the state and the vectors it names; a fresh space
    resumed from them ends bit for bit where the uninterrupted run does."""
    sp, objective = rosenbrock_space()
    saved = {}

    def keep(row):
        if row["iteration"] == 9:
            state = row["state"]
            saved["state"] = state
            saved["vectors"] = {n: sp.get(n).copy() for n in ["x", *state.vectors()]}

    straight = lbfgs(sp, objective, m=4, max_iter=25, gtol=0, callback=keep)
    state = saved["state"]
    assert len(state.pairs) == 4 and state.iteration == 9  # the history is full by then
    fresh, objective2 = rosenbrock_space()
    for name, values in saved["vectors"].items():
        fresh.set(name, values)
    resumed = lbfgs(fresh, objective2, m=4, max_iter=25, gtol=0, resume=state)
    np.testing.assert_array_equal(fresh.get("x"), sp.get("x"))
    assert [r["iteration"] for r in resumed.history] == list(range(10, 26))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in straight.history[9:]]
    assert (resumed.iterations, resumed.evaluations) == (straight.iterations, straight.evaluations)
    with pytest.raises(ValueError, match="history size 4, this run asks for 5"):
        lbfgs(fresh, objective2, m=5, max_iter=25, resume=state)


def test_lbfgs_bad_settings():
    sp, objective = rosenbrock_space()
    with pytest.raises(ValueError, match="history size m"):
        lbfgs(sp, objective, m=0)
    with pytest.raises(ValueError, match="max_iter"):
        lbfgs(sp, objective, max_iter=-1)
    sp.get("x")[0] = np.nan
    with pytest.raises(ValueError, match="not finite at the starting point"):
        lbfgs(sp, objective)


def test_the_two_loop_recursion_on_dot_products_is_the_classic_one():
    """The direction built from the Gram cache and one ``combine`` equals the textbook two-loop
    recursion (Nocedal & Wright, Algorithm 7.4) computed with whole NumPy vectors."""
    from collections import deque

    from daskbelief.optim.lbfgs import Gram, _two_loop

    rng = np.random.default_rng(3)
    n, m = 50, 4
    sp = LocalVectors(n, np.float64)
    S = rng.standard_normal((m, n))
    Y = S + 0.1 * rng.standard_normal((m, n))  # s'y > 0: a convex-looking history
    g = rng.standard_normal(n)
    pairs = deque()
    for i in range(m):
        sp.set(f"s{i}", S[i].copy())
        sp.set(f"y{i}", Y[i].copy())
        pairs.append((f"s{i}", f"y{i}", 1.0 / (S[i] @ Y[i])))
    sp.set("g", g.copy())
    gram = Gram()
    gram.ensure(sp, pairs, "g")
    sp.combine(list(_two_loop(gram, pairs, "g").items()), "d")

    q, alphas = g.copy(), []
    for i in reversed(range(m)):
        a = (S[i] @ q) / (S[i] @ Y[i])
        q -= a * Y[i]
        alphas.append(a)
    r = q * (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
    for i, a in zip(range(m), reversed(alphas)):
        b = (Y[i] @ r) / (S[i] @ Y[i])
        r += (a - b) * S[i]
    np.testing.assert_allclose(sp.get("d"), -r, rtol=1e-10, atol=1e-12)
    calls = []
    sp.dots = lambda pairs: calls.append(pairs) or LocalVectors.dots(sp, pairs)
    gram.ensure(sp, pairs, "g")
    assert not calls  # every dot it needs is cached: no call at all
    gram.forget("g")
    gram.ensure(sp, pairs, "g")
    assert len(calls) == 1 and len(calls[0]) == 2 * m + 1  # only g's, in one call


def test_combine_refuses_an_output_among_its_terms():
    sp = LocalVectors(3, np.float64)
    sp.set("a", np.ones(3))
    sp.combine([("a", 2.0), ("a", 0.5)], "b")
    np.testing.assert_array_equal(sp.get("b"), 2.5)
    with pytest.raises(ValueError, match="output 'a' is also one of its terms"):
        sp.combine([("a", 2.0)], "a")
