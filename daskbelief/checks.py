"""Argument checks shared by the library's entry points, so every refusal reads the same way."""
from __future__ import annotations

from numbers import Integral


def check_integer(name: str, value, minimum: int) -> int:
    """``value`` as an ``int``; a ValueError naming ``name`` unless it is an integer (NumPy's
    included, ``bool`` not) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
