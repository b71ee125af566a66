"""Argument checks shared by the core: each raises ``ValueError``/``TypeError`` naming the argument."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

E = TypeVar("E", bound=Enum)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, allow_inf: bool = False) -> float:
    """Return ``float(value)`` after checking that it is a real number in the given range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {value!r} of type {type(value).__name__}.")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        bound = ">=" if low_inclusive else ">"
        raise ValueError(f"`{name}` must be {bound} {low}, got {value!r}.")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        bound = "<=" if high_inclusive else "<"
        raise ValueError(f"`{name}` must be {bound} {high}, got {value!r}.")
    return value


def check_int(name: str, value: Any, *, low: int | None = None) -> int:
    """Return ``value`` after checking that it is an ``int`` (not a bool) and ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value!r}.")
    return value


def check_choice(name: str, value: Any, enum: type[E]) -> E:
    """Return the member of the ``str`` Enum ``enum`` named by ``value``, or raise listing the choices."""
    if isinstance(value, enum):
        return value
    allowed = ", ".join(repr(member.value) for member in enum)
    if isinstance(value, str):
        try:
            return enum(value.lower())
        except ValueError:
            pass
    raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")


def check_norm_type(value: Any) -> float:
    """``norm_type`` is any p >= 1 or ``inf`` (given as a number or the strings ``"inf"``)."""
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    value = check_number("norm_type", value, allow_inf=True)
    if value < 1.0 and not math.isinf(value):
        raise ValueError(f"`norm_type` must be >= 1 or inf, got {value!r}.")
    if value == -math.inf:
        raise ValueError("`norm_type` must be >= 1 or inf, got -inf.")
    return value
