"""Update rules as (init, apply) pairs over flat vectors: the same code in the reference trainer and
in every parameter shard.

A rule's state is a dict of arrays *as long as the parameters*, and ``apply`` is elementwise, so a
shard holding ``params[a:b]`` with ``state[k][a:b]`` applies exactly what the whole-vector rule
would to that slice: sharding the server never changes the arithmetic.

* ``sgd(lr)``: ``p -= lr * g``
* ``momentum(lr, mu)``: ``v = mu * v + g; p -= lr * v``
* ``adagrad(lr, eps, initial_accumulator)``: the paper's rule, a learning rate per parameter
  ``eta_i = lr / sqrt(a0 + sum_j g_ij^2)`` (the sum includes the current gradient; ``eps`` keeps a
  never-touched parameter at rest instead of dividing 0 by 0). With ``a0 = 0`` (the paper's
  rule) the first step moves every parameter by ``lr * sign(g)``, whatever the gradient's size;
  a small ``a0`` (TensorFlow's default is 0.1) makes the first steps proportional to the gradient.

``apply(params, grad, state, scale)`` multiplies the learning rate by ``scale`` for this one
update: how a parameter shard applies staleness-aware step sizes. A rule's ``staleness`` policy
(``{"name": "adagrad", "lr": 0.05, "staleness": "inverse"}``; see ``optim.staleness``) tells the
shard which scale each push gets from its measured staleness; "none" (the default) is the paper's.
A rule's ``delay_compensation`` (DC-ASGD's lambda, 0 by default) makes the shard correct each push
by ``lam * g * g * (w_now - w_fetched)`` before applying it (``optim.staleness.delay_compensate``).
"""
from __future__ import annotations

import math

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from numbers import Real

from daskbelief.backend import namespace
from daskbelief.optim.staleness import check_policy, step_scale


@dataclass(frozen=True)
class UpdateRule:
    """A named rule: ``init(params) -> state`` and ``apply(params, grad, state)`` (in place)."""

    name: str
    hyper: dict = field(default_factory=dict)
    _init: Callable = None
    _apply: Callable = None
    staleness: str = "none"
    delay_compensation: float = 0.0
    _younger_state: Callable = None  # (state_updates, updates) -> lr factor; None: 1

    def init(self, params) -> dict:
        """Fresh state for ``params`` (zeros, in the parameters' array type and dtype)."""
        return self._init(params, **self.hyper)

    def apply(self, params, grad, state: dict, scale: float = 1.0) -> None:
        """One update of ``params`` (and ``state``) in place from ``grad``, the learning rate
        multiplied by ``scale`` (1: the rule as configured)."""
        hyper = self.hyper if scale == 1.0 else {**self.hyper, "lr": self.hyper["lr"] * scale}
        self._apply(params, grad, state, **hyper)

    def younger_state_scale(self, state_updates: int, updates: int) -> float:
        """The learning-rate factor for parameters that have had ``updates`` updates while the
        rule's state has seen only ``state_updates`` of them (a shard that adopted a replica's
        copy of its slice, its state restored from an older checkpoint or none). Adagrad's
        accumulator then sums fewer squared gradients than the parameters' history had, and
        its steps come out larger by about ``sqrt(updates / state_updates)``: on a trained slice
        with a fresh accumulator, a step of ``lr`` on every parameter at once. Rules whose steps
        do not shrink with their state's age are unaffected (1)."""
        return 1.0 if self._younger_state is None else self._younger_state(state_updates, updates)

    def step_scale(self, staleness: int) -> float:
        """The learning-rate factor for a push ``staleness`` updates old, by this rule's policy."""
        return step_scale(staleness, self.staleness)

    def to_dict(self) -> dict:
        extra = {} if self.staleness == "none" else {"staleness": self.staleness}
        if self.delay_compensation:
            extra["delay_compensation"] = self.delay_compensation
        return {"name": self.name, **self.hyper, **extra}

    def __repr__(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v:g}' for k, v in self.hyper.items())})"


def _no_state(params, **_) -> dict:
    return {}


def _sgd_apply(params, grad, state, lr):
    params -= lr * grad


def _velocity(params, **_) -> dict:
    return {"velocity": namespace(params).zeros_like(params)}


def _momentum_apply(params, grad, state, lr, mu):
    v = state["velocity"]
    v *= mu
    v += grad
    params -= lr * v


def _accumulator(params, initial_accumulator=0.0, **_) -> dict:
    acc = namespace(params).zeros_like(params)
    acc += initial_accumulator
    return {"sum_sq": acc}


def _adagrad_apply(params, grad, state, lr, eps, initial_accumulator=0.0):
    xp = namespace(params)
    acc = state["sum_sq"]
    step = grad * grad          # the one temporary, reused for every step below
    acc += step
    xp.sqrt(acc, out=step)
    step += eps
    xp.divide(grad, step, out=step)
    step *= lr
    params -= step


def sgd(lr: float = 0.01) -> UpdateRule:
    return UpdateRule("sgd", {"lr": _rate(lr, "lr")}, _no_state, _sgd_apply)


def momentum(lr: float = 0.01, mu: float = 0.9) -> UpdateRule:
    if not 0 <= _number(mu, "mu") < 1:
        raise ValueError(f"momentum mu must lie in [0, 1), got {mu!r}")
    return UpdateRule("momentum", {"lr": _rate(lr, "lr"), "mu": float(mu)}, _velocity, _momentum_apply)


def adagrad(lr: float = 0.05, eps: float = 1e-7, initial_accumulator: float = 0.0) -> UpdateRule:
    hyper = {"lr": _rate(lr, "lr"), "eps": _rate(eps, "eps")}
    if initial_accumulator:  # absent when 0, so the paper's rule describes itself as before
        hyper["initial_accumulator"] = _rate(initial_accumulator, "initial_accumulator")
    return UpdateRule("adagrad", hyper, _accumulator, _adagrad_apply, _younger_state=_sum_sq_ratio)


def _sum_sq_ratio(state_updates: int, updates: int) -> float:
    """Adagrad's steps scale as ``1 / sqrt(sum of squared gradients)``, a sum that grows with the
    updates seen: steps the size of the parameters' history take ``sqrt(state / history)``."""
    return math.sqrt(max(state_updates, 1) / max(updates, 1))


RULES = {"sgd": sgd, "momentum": momentum, "adagrad": adagrad}


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _rate(value, name: str) -> float:
    value = _number(value, name)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return value


def make_rule(spec) -> UpdateRule:
    """An ``UpdateRule`` from a rule, a name (``"adagrad"``) or a table
    (``{"name": "adagrad", "lr": 0.05}``); unknown names and keys are errors naming them."""
    if isinstance(spec, UpdateRule):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"an update rule is a name or a table with a 'name' key, got {spec!r}")
    name = spec["name"]
    if name not in RULES:
        raise ValueError(f"unknown update rule {name!r}: expected one of {sorted(RULES)}")
    try:
        rule = RULES[name](**{k: v for k, v in spec.items() if k not in ASYNCHRONY_KEYS})
    except TypeError as e:
        raise ValueError(f"bad settings for the {name!r} rule: {e}") from None
    return replace(rule, staleness=check_policy(spec.get("staleness", "none")),
                   delay_compensation=_rate(spec.get("delay_compensation", 0.0),
                                            "delay_compensation"))


ASYNCHRONY_KEYS = ("name", "staleness", "delay_compensation")  # a table's keys besides the rule's
