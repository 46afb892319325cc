"""Asynchrony that costs less per sample: what a shard or a replica does about stale gradients.

A Downpour push was computed on parameters some updates old (its *staleness*: the shard's version
when the push lands minus the version the replica fetched). Three known answers, each a small pure
function here so that the shard and the replica only call them:

* staleness-aware step sizes (Zhang et al., "Staleness-aware Async-SGD", 2016; DynSGD): the shard
  multiplies the learning rate of a push by ``step_scale(staleness, policy)``;
* delay compensation (Zheng et al., DC-ASGD, 2017): the shard corrects the gradient by a cheap
  approximation of the Hessian, ``g + lam * g * g * (w_now - w_fetched)``;
* a staleness bound (stale-synchronous parallel, Ho et al., 2013): a replica more than ``bound``
  pushes ahead of the slowest waits (``must_wait``).
"""
from __future__ import annotations

import math

POLICIES = ("none", "inverse", "inverse_sqrt")


def check_policy(policy: str) -> str:
    """Refuse an unknown staleness policy, naming the known ones."""
    if policy not in POLICIES:
        raise ValueError(f"staleness policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def step_scale(staleness: int, policy: str = "none") -> float:
    """Factor on a push's learning rate given its staleness (in shard updates).

    ``inverse`` divides by the staleness (Zhang et al.'s lr / tau, tau >= 1), ``inverse_sqrt`` by
    its square root (a gentler form); a fresh push (staleness 0 or 1) keeps the full rate.
    """
    if policy == "none" or staleness <= 1:
        return 1.0
    if policy == "inverse":
        return 1.0 / staleness
    if policy == "inverse_sqrt":
        return 1.0 / math.sqrt(staleness)
    raise ValueError(f"staleness policy must be one of {', '.join(POLICIES)}, got {policy!r}")


def delay_compensate(grad, params_now, params_fetched, lam: float):
    """DC-ASGD's corrected gradient, a new array (``grad`` may be a read-only received buffer).

    ``g + lam * g * g * (w_now - w_fetched)``: the first-order Taylor term of the gradient at the
    parameters it is applied to, with ``g * g`` standing for the Hessian's diagonal.
    """
    if lam == 0.0:
        return grad
    corrected = params_now - params_fetched
    corrected *= grad
    corrected *= grad
    corrected *= lam
    corrected += grad
    return corrected


def must_wait(own_pushes: int, slowest_pushes: int, bound: int | None) -> bool:
    """Whether a replica that has pushed ``own_pushes`` times must wait for the slowest replica
    (``slowest_pushes``) before pushing again, under a staleness bound (None: never)."""
    return bound is not None and own_pushes - slowest_pushes > bound
