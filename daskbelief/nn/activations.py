"""Elementwise activations, applied in place and differentiated from their *output*.

Every activation here has a derivative that is a function of its output y (relu: y > 0,
sigmoid: y(1 - y), tanh: 1 - y^2, linear: 1), so a layer caches only y, overwriting its
pre-activation: one array per layer instead of two. Both directions work in place for the same
reason: the training step allocates nothing per activation beyond small temporaries.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _relu(xp, z):
    return xp.maximum(z, 0, out=z)


def _relu_grad(xp, y, dy):
    return xp.multiply(dy, y > 0, out=dy)


def _sigmoid(xp, z):
    # 1 / (1 + exp(-z)) written as (1 + tanh(z / 2)) / 2: no overflow for large |z|.
    z *= 0.5
    xp.tanh(z, out=z)
    z += 1
    z *= 0.5
    return z


def _sigmoid_grad(xp, y, dy):
    slope = 1 - y
    slope *= y
    return xp.multiply(dy, slope, out=dy)


def _tanh(xp, z):
    return xp.tanh(z, out=z)


def _tanh_grad(xp, y, dy):
    slope = y * y
    xp.subtract(1, slope, out=slope)
    return xp.multiply(dy, slope, out=dy)


def _identity(xp, z):
    return z


def _identity_grad(xp, y, dy):
    return dy


@dataclass(frozen=True)
class Activation:
    """A named pair: ``forward(xp, z) -> y`` overwrites z; ``backward(xp, y, dy) -> dz`` overwrites dy."""

    name: str
    forward: Callable
    backward: Callable


ACTIVATIONS = {
    a.name: a
    for a in (
        Activation("relu", _relu, _relu_grad),
        Activation("sigmoid", _sigmoid, _sigmoid_grad),
        Activation("tanh", _tanh, _tanh_grad),
        Activation("linear", _identity, _identity_grad),
    )
}


def get_activation(name: str) -> Activation:
    """The activation called ``name``; ValueError listing the known names otherwise."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown activation {name!r}: expected one of {sorted(ACTIVATIONS)}") from None
