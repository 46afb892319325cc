"""L-BFGS over a vector-operations interface: the coordinator only ever sees scalars.

``lbfgs(space, objective, ...)`` runs the two-loop recursion with history ``m`` and a line search
meeting the strong Wolfe conditions. ``space`` is a ``LocalVectors`` (the reference) or
Sandblaster's ``ShardedVectors``; ``objective(x_name, g_name) -> loss`` evaluates the function at
vector ``x_name`` and fills vector ``g_name`` with its gradient. Both implementations execute the
same operations in the same order, which is what lets Sandblaster be checked against the
reference iterate by iterate.

A run can stop after any iteration and continue later: each iteration's record carries an
``LbfgsState`` (the scalars and the names of the vectors in use), which with those vectors is all
``lbfgs(..., resume=state)`` needs to go on exactly as if it had never stopped.

The line search is a pure function of scalars (``wolfe_search``): Nocedal & Wright, Numerical
Optimization, Algorithms 3.5 and 3.6, with safeguarded cubic interpolation. A trial point whose
loss or slope is not finite counts as "too far": the search backs off, so a NaN is never accepted.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

C1, C2 = 1e-4, 0.9  # sufficient decrease, curvature: the usual quasi-Newton choice


class LineSearchError(RuntimeError):
    """No step satisfying the strong Wolfe conditions was found within the evaluation budget."""


def _cubic_min(a, fa, ga, b, fb, gb) -> float | None:
    """Minimiser of the cubic interpolating f and f' at a and b, or None when it has none."""
    d1 = ga + gb - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if disc < 0:
        return None
    d2 = math.copysign(math.sqrt(disc), b - a)
    denom = gb - ga + 2 * d2
    if denom == 0:
        return None
    return b - (b - a) * (gb + d2 - d1) / denom


def _trial(lo, flo, glo, hi, fhi, ghi) -> float:
    """Next trial in ``[lo, hi]``: the cubic's minimiser kept 10% away from both ends, else the
    midpoint (also when the far end's values are not finite)."""
    left, right = min(lo, hi), max(lo, hi)
    margin = 0.1 * (right - left)
    if all(map(math.isfinite, (fhi, ghi))):
        c = _cubic_min(lo, flo, glo, hi, fhi, ghi)
        if c is not None and left + margin <= c <= right - margin:
            return c
    return 0.5 * (lo + hi)


def _bad(f, g, f0, g0, alpha, c1) -> bool:
    """Not finite, or not a sufficient decrease."""
    return not (math.isfinite(f) and math.isfinite(g)) or f > f0 + c1 * alpha * g0


def wolfe_search(phi, f0: float, g0: float, alpha: float = 1.0, *, c1: float = C1, c2: float = C2,
                 max_evals: int = 20) -> tuple[float, float, float, int]:
    """A step ``alpha`` meeting the strong Wolfe conditions along a descent direction.

    ``phi(alpha) -> (f, slope)`` evaluates the objective at ``x + alpha d`` and its derivative
    along d; ``g0 < 0`` is the slope at 0. Returns ``(alpha, f, slope, evaluations)``; the accepted
    step is always the last one evaluated (callers keep that point's vectors). Raises
    ``LineSearchError`` when ``max_evals`` evaluations do not find one.
    """
    if not g0 < 0:
        raise ValueError(f"the line search needs a descent direction, got slope {g0}")
    evals, prev = 0, (0.0, f0, g0)
    while evals < max_evals:
        f, g = phi(alpha)
        evals += 1
        if _bad(f, g, f0, g0, alpha, c1) or (evals > 1 and f >= prev[1]):
            return _zoom(phi, f0, g0, prev, (alpha, f, g), c1, c2, evals, max_evals)
        if abs(g) <= -c2 * g0:
            return alpha, f, g, evals
        if g >= 0:
            return _zoom(phi, f0, g0, (alpha, f, g), prev, c1, c2, evals, max_evals)
        prev, alpha = (alpha, f, g), 2.0 * alpha
    raise LineSearchError(f"no step met the Wolfe conditions in {max_evals} evaluations "
                          "(the step kept growing: is the objective bounded below?)")


def _zoom(phi, f0, g0, lo, hi, c1, c2, evals, max_evals):
    """Shrink the bracket ``[lo, hi]`` (lo: the best point so far) until a Wolfe point is found."""
    while evals < max_evals:
        alpha = _trial(*lo, *hi)
        f, g = phi(alpha)
        evals += 1
        if _bad(f, g, f0, g0, alpha, c1) or f >= lo[1]:
            hi = (alpha, f, g)
            continue
        if abs(g) <= -c2 * g0:
            return alpha, f, g, evals
        if g * (hi[0] - lo[0]) >= 0:
            hi = lo
        lo = (alpha, f, g)
    raise LineSearchError(f"no step met the Wolfe conditions in {max_evals} evaluations "
                          f"(bracket [{min(lo[0], hi[0]):.3g}, {max(lo[0], hi[0]):.3g}])")


@dataclass
class LbfgsResult:
    """Outcome of ``lbfgs``: the iterate lives in the space under the name ``x``."""

    x: str
    loss: float
    grad_norm: float
    iterations: int
    evaluations: int
    converged: bool
    message: str
    history: list[dict] = field(default_factory=list)


@dataclass
class LbfgsState:
    """Where L-BFGS stands after iteration ``iteration``: besides the vectors it names (the
    iterate, ``"g"`` and every pair's ``s``/``y``), all a later run needs to continue exactly.

    ``pairs``: ``[s, y, rho]`` for the curvature pairs in use, oldest first; ``free``: the
    ``[s, y]`` names not in use, in the order they will be taken (last first).
    """

    m: int
    iteration: int
    loss: float
    gg: float
    evaluations: int
    pairs: list
    free: list

    def vectors(self) -> list[str]:
        """The vectors besides the iterate that the state refers to."""
        return ["g", *(name for s, y, _ in self.pairs for name in (s, y))]


class Gram:
    """Dot products between the vectors the two-loop recursion combines, kept between iterations.

    The recursion computes ``d = -H g`` as a linear combination of ``g`` and the history's
    ``s``/``y`` vectors, so it needs only their dot products -- and between iterations only the
    newest pair and the new gradient change. Keeping the others here means an iteration asks
    the space for about ``5m`` new dots in ONE call (``space.dots``), then builds ``d`` in one
    ``combine``: over sharded vectors, one round trip per iteration instead of ``2m + 2``
    (Chen et al., "Large-scale L-BFGS using MapReduce", NIPS 2014: vector-free L-BFGS).
    """

    def __init__(self):
        self._values: dict[tuple[str, str], float] = {}

    @staticmethod
    def _key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    def __call__(self, a: str, b: str) -> float:
        return self._values[self._key(a, b)]

    def forget(self, *names: str) -> None:
        """The vectors ``names`` were overwritten: their dots no longer hold."""
        self._values = {k: v for k, v in self._values.items()
                        if k[0] not in names and k[1] not in names}

    def ensure(self, space, pairs, g: str) -> None:
        """Fetch, in one ``space.dots`` call, the dots the recursion over ``pairs`` of
        ``(s, y, ...)`` names and gradient ``g`` needs and this cache lacks (none: no call)."""
        missing = self.missing(pairs, g)
        if missing:
            self._values.update(zip(missing, space.dots(missing)))

    def missing(self, pairs, g: str) -> list[tuple[str, str]]:
        """The dots the recursion over ``pairs`` and ``g`` needs that this cache lacks (it never
        needs ``s_i . s_j``)."""
        ys = [p[1] for p in pairs]
        wanted = {self._key(g, g)}
        for s, y, *_ in pairs:
            wanted.update(self._key(v, w) for v in (s, y) for w in (*ys, g))
        return sorted(wanted - self._values.keys())

    def put(self, values: dict[tuple[str, str], float]) -> None:
        """Dots obtained elsewhere (``Prospect``), keyed by name pairs in any order."""
        self._values.update({self._key(a, b): v for (a, b), v in values.items()})

    def dot(self, name: str, combination: dict[str, float]) -> float:
        """``name . sum(c * v)`` for a combination ``{v: c}``."""
        return sum(c * self(name, v) for v, c in combination.items())


def _two_loop(gram: Gram, pairs: deque, g: str) -> dict[str, float]:
    """The coefficients of ``d = -H g`` over ``g`` and the history ``pairs`` of ``(s, y, rho)``
    names and scalars (oldest first): the two-loop recursion, run on dot products alone."""
    q: dict[str, float] = {g: 1.0}
    alphas = []
    for s, y, rho in reversed(pairs):
        a = rho * gram.dot(s, q)
        q[y] = q.get(y, 0.0) - a
        alphas.append(a)
    if pairs:
        s, y, rho = pairs[-1]
        gamma = 1.0 / (rho * gram(y, y))  # H0 = (s'y / y'y) I
        q = {v: gamma * c for v, c in q.items()}
    for (s, y, rho), a in zip(pairs, reversed(alphas)):
        b = rho * gram.dot(y, q)
        q[s] = q.get(s, 0.0) + a - b
    return {v: -c for v, c in q.items()}


def _evaluate(objective, space, x: str, g: str, dots: list[tuple[str, str]], then=()):
    """``(loss, dots after the evaluation and the vector operations then)``: in one step where
    the objective can (``with_dots``: a distributed evaluation sends both with its last call),
    else in two."""
    with_dots = getattr(objective, "with_dots", None)
    if with_dots is not None:
        return with_dots(x, g, dots, then)
    loss = objective(x, g)
    for name, *args in then:
        getattr(space, name)(*args)
    return loss, space.dots(dots)


class Prospect:
    """The curvature pair a line-search point would make, formed with its evaluation.

    An accepted step makes ``s = alpha d`` and ``y = gt - g``, and the next two-loop needs their
    dots with the history and the new gradient: over sharded vectors, one more round trip per
    iteration. With a prospect, every line-search evaluation also forms ``s`` and ``y`` into
    scratch vectors (``SCRATCH``) exactly as the step would (the same ``combine``) and takes those
    dots in its last call. The accepted point (always the last evaluated) then swaps the scratch
    vectors in, which is free, and hands the dots to the ``Gram`` under the pair's names: the
    same vectors and the same values as without a prospect, one round trip fewer. Each
    evaluation pays about ``6m + 7`` passes over the vectors for it (Sandblaster's policy,
    ``prospective_dots``, weighs that against the trip)."""

    SCRATCH = ("s-prospect", "y-prospect")
    S, Y, G = "<s>", "<y>", "<g>"  # stand-ins for the pair's and the new gradient's names

    def __init__(self):
        self.alpha, self.keys, self.values, self.pending = None, [], {}, {}

    def request(self, gram: Gram, retained, alpha: float) -> tuple[list, list]:
        """``(then, dots)`` for the evaluation at ``alpha``: the operations forming the scratch
        pair, and the dots (in scratch names) the recursion over ``retained`` pairs plus the new
        one will need. ``self.keys`` remembers them in stand-in names."""
        s_buf, y_buf = self.SCRATCH
        then = [("combine", [("d", float(alpha))], s_buf),
                ("combine", [("gt", 1.0), ("g", -1.0)], y_buf)]
        future = [*retained, (self.S, self.Y)]
        physical = {self.S: s_buf, self.Y: y_buf, self.G: "gt"}
        self.alpha, self.keys = alpha, [k for k in gram.missing(future, self.G)
                                        if physical.keys() & set(k)]
        return then, [tuple(physical.get(v, v) for v in k) for k in self.keys]

    def got(self, values: list[float]) -> None:
        self.values = dict(zip(self.keys, values))

    def accept(self, space, alpha: float, s: str, y: str) -> bool:
        """For the step accepted at ``alpha`` into pair names ``s``, ``y`` (with ``"g"`` about to
        become the new gradient): swap the scratch pair in and queue the dots, True; False when
        the prospect is of another point (then the step forms the pair itself)."""
        if alpha != self.alpha:
            return False
        space.swap(s, self.SCRATCH[0])
        space.swap(y, self.SCRATCH[1])
        names = {self.S: s, self.Y: y, self.G: "g"}
        self.pending = {tuple(names.get(v, v) for v in k): v for k, v in self.values.items()}
        return True

    def settle(self, gram: Gram) -> None:
        """After ``gram.forget(s, y, "g")``: the accepted point's dots, under the pair's names."""
        gram.put(self.pending)


def lbfgs(space, objective, x: str = "x", *, m: int = 10, max_iter: int = 100, gtol: float = 1e-5,
          ftol: float = 0.0, max_evals_per_search: int = 20, callback=None,
          resume: LbfgsState | None = None, prospective: bool = False) -> LbfgsResult:
    """Minimise ``objective`` from the point held in vector ``x`` (updated in place).

    Stops after ``max_iter`` iterations (counted from the very first, a resumed run included),
    when the gradient norm is at most ``gtol``, or when an iteration lowers the loss by at most
    ``ftol * max(|f|, 1)``. ``callback(row)`` receives each iteration's record (iteration, loss,
    grad_norm, step, evaluations, and ``state``: the ``LbfgsState`` after it). ``resume``: a
    state some earlier run reported, with the space holding the vectors it names; the run goes
    on from the iteration after it without evaluating the starting point again.
    ``prospective``: form each line-search point's curvature pair and its dots with the
    evaluation (``Prospect``): the same iterates, one round trip fewer per iteration.
    """
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"the L-BFGS history size m must be an integer >= 1, got {m!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise ValueError(f"max_iter must be an integer >= 0, got {max_iter!r}")
    gram = Gram()
    if resume is None:
        f, (gg,) = _evaluate(objective, space, x, "g", [("g", "g")])
        if not math.isfinite(f):
            raise ValueError(f"the objective is not finite at the starting point ({f})")
        pairs: deque = deque()
        free = [(f"s{i}", f"y{i}") for i in range(m)]
        evaluations, done = 1, 0
    else:
        if resume.m != m:
            raise ValueError(f"cannot resume: the saved L-BFGS state has history size "
                             f"{resume.m}, this run asks for {m}")
        f, gg, evaluations, done = resume.loss, resume.gg, resume.evaluations, resume.iteration
        pairs = deque(tuple(p) for p in resume.pairs)
        free = [tuple(p) for p in resume.free]
    history = []
    message, converged = "reached max_iter", False

    prospect = Prospect() if prospective else None

    def phi(alpha):
        space.copy(x, "xt")
        space.axpy(alpha, "d", "xt")
        if prospect is None:
            ft, (slope,) = _evaluate(objective, space, "xt", "gt", [("gt", "d")])
            return ft, slope
        retained = list(pairs) if free else list(pairs)[1:]  # the step reuses the oldest's names
        then, dots = prospect.request(gram, retained, alpha)
        ft, (slope, *values) = _evaluate(objective, space, "xt", "gt", [("gt", "d"), *dots], then)
        prospect.got(values)
        return ft, slope

    for k in range(done + 1, max_iter + 1):
        if math.sqrt(gg) <= gtol:
            message, converged = "gradient norm below gtol", True
            break
        gram.ensure(space, pairs, "g")  # no call unless resumed: the last iteration fetched them
        direction = _two_loop(gram, pairs, "g")
        slope = gram.dot("g", direction)
        if not slope < 0:  # the curvature history misleads: restart from steepest descent
            free.extend((s, y) for s, y, _ in pairs)
            pairs.clear()
            direction, slope = {"g": -1.0}, -gg
        space.combine(list(direction.items()), "d")
        start = 1.0 if pairs else min(1.0, 1.0 / math.sqrt(gg))
        try:
            alpha, f_new, _, n = wolfe_search(phi, f, slope, start, max_evals=max_evals_per_search)
        except LineSearchError as e:
            message = f"line search failed: {e}"
            break
        evaluations += n
        # The accepted step is the last point evaluated: "xt" and "gt" hold it.
        s, y = free.pop() if free else pairs.popleft()[:2]
        prospected = prospect is not None and prospect.accept(space, alpha, s, y)
        if not prospected:
            space.combine([("d", alpha)], s)             # s = x_new - x
            space.combine([("gt", 1.0), ("g", -1.0)], y)  # y = g_new - g
        space.swap(x, "xt")
        space.swap("g", "gt")
        gram.forget(s, y, "g")
        if prospected:
            prospect.settle(gram)
        gram.ensure(space, [*pairs, (s, y)], "g")  # also what the next direction needs
        sy, gg = gram(s, y), gram("g", "g")
        if sy > 0:
            pairs.append((s, y, 1.0 / sy))
        else:
            free.append((s, y))
        f_old, f, done = f, f_new, k
        row = {"iteration": k, "loss": f, "grad_norm": math.sqrt(gg), "step": alpha,
               "evaluations": evaluations,
               "state": LbfgsState(m, k, f, gg, evaluations, [list(p) for p in pairs],
                                   [list(p) for p in free])}
        history.append(row)
        if callback is not None:
            callback(row)
        if ftol and f_old - f <= ftol * max(abs(f_old), abs(f), 1.0):
            message, converged = "loss decrease below ftol", True
            break
    return LbfgsResult(x, f, math.sqrt(gg), done, evaluations, converged, message, history)
