"""Threshold schedules: pure functions of the optimizer step that return a multiplier.

A schedule scales the threshold of any strategy: ``NormClip(max_norm=1.0)`` with
``Cosine(start=1.0, end=0.3, total_steps=1000)`` clips at 1.0 at step 0 and at 0.3 from step 1000 on.
Schedules compute on the host from the integer step (no device work, no state to save: resuming
at step ``s`` gives the value of step ``s``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ._checks import OptionError, check_int, check_number

__all__ = ["Schedule", "Constant", "Linear", "Cosine", "Warmup", "Piecewise"]


def _check_step(step: int) -> int:
    return check_int("step", step, low=0)


def _positive(name: str, value: float) -> float:
    return check_number(name, value, low=0.0, low_inclusive=False)


class Schedule:
    """Base class: ``schedule(step) -> float`` multiplier of the threshold."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    """``value`` at every step."""

    value: float = 1.0

    def __post_init__(self) -> None:
        _positive("value", self.value)

    def __call__(self, step: int) -> float:
        _check_step(step)
        return float(self.value)


def _progress(step: int, start_step: int, total_steps: int) -> float:
    if step <= start_step:
        return 0.0
    return min(1.0, (step - start_step) / max(1, total_steps - start_step))


@dataclass(frozen=True)
class _Ramp(Schedule):
    """From ``start`` at step 0 to ``end`` at ``total_steps``; ``end`` after (the curve in ``_value``)."""

    start: float
    end: float
    total_steps: int

    def __post_init__(self) -> None:
        _positive("start", self.start)
        _positive("end", self.end)
        check_int("total_steps", self.total_steps, low=1)

    def __call__(self, step: int) -> float:
        return self._value(_progress(_check_step(step), 0, self.total_steps))

    def _value(self, t: float) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Linear(_Ramp):
    """From ``start`` at step 0 to ``end`` at ``total_steps``, linearly; ``end`` after."""

    def _value(self, t: float) -> float:
        return self.start + (self.end - self.start) * t


@dataclass(frozen=True)
class Cosine(_Ramp):
    """From ``start`` at step 0 to ``end`` at ``total_steps`` along a half cosine; ``end`` after."""

    def _value(self, t: float) -> float:
        return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class Warmup(Schedule):
    """From ``start`` at step 0 linearly to ``value`` at ``warmup_steps``, then constant ``value``.

    A loose threshold while Adam's statistics settle (``start > value``) or a tight one while the
    first large gradients pass (``start < value``).
    """

    start: float
    value: float
    warmup_steps: int

    def __post_init__(self) -> None:
        _positive("start", self.start)
        _positive("value", self.value)
        check_int("warmup_steps", self.warmup_steps, low=1)

    def __call__(self, step: int) -> float:
        t = _progress(_check_step(step), 0, self.warmup_steps)
        return self.start + (self.value - self.start) * t


@dataclass(frozen=True)
class Piecewise(Schedule):
    """Piecewise constant: ``values[0]`` before ``boundaries[0]``, ``values[i]`` from ``boundaries[i-1]``.

    ``Piecewise(boundaries=(100, 500), values=(2.0, 1.0, 0.5))`` is 2.0 for steps 0-99, 1.0 for
    100-499, 0.5 from 500 on.
    """

    boundaries: Sequence[int]
    values: Sequence[float]

    def __post_init__(self) -> None:
        for name in ("boundaries", "values"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
                raise OptionError(name, value, "a list")
            object.__setattr__(self, name, tuple(value))
        for b in self.boundaries:
            check_int("boundaries", b, low=1)
        if list(self.boundaries) != sorted(set(self.boundaries)):
            raise OptionError("boundaries", list(self.boundaries), "strictly increasing steps")
        if len(self.values) != len(self.boundaries) + 1:
            raise OptionError("values", list(self.values), f"len(boundaries) + 1 = {len(self.boundaries) + 1} values")
        for v in self.values:
            _positive("values", v)

    def __call__(self, step: int) -> float:
        return float(self.values[bisect.bisect_right(self.boundaries, _check_step(step))])
