"""``LRGuard``: cap a learning rate that jumps above anything the run has used (torch only).

A learning-rate mistake (a multiplier applied twice, a wrong unit, a schedule built for another batch size) makes
every update of the steps it lasts several times too large: the weights are damaged before any loss or gradient
norm shows it (the loss rises one step later, by 10-20 %), so no spike rule can hold it back. The update's size
is set by the learning rate the optimizer applies, so the guard caps that. Before each ``optimizer.step()``, a
parameter group's learning rate is capped when it

- jumps: more than ``cap`` x the rate the group applied at its previous step (a warmup of any length rises
  smoothly and is never capped),
- and stands above both ``cap`` x its running average (the mean of its first ``warmup_steps`` steps with a
  positive rate, then an EMA with ``alpha``) and the highest rate the group has applied so far (a warm restart
  back to the schedule's peak is never capped).

It is then lowered to the larger of those two bounds for this step and put back after it: the scheduler never
sees the cap. A capped step enters the average at its capped value, so a rise above the peak made on purpose is
followed, 10 % a step with cap 2. Nothing is capped before a group's ``warmup_steps`` steps with a positive rate
(a group held at 0 and released later starts its own).

The learning rates are Python floats the scheduler sets on the host: nothing here touches the device. A group
whose learning rate is a tensor is left alone.
"""

from __future__ import annotations

from typing import Any

from ._checks import StateError, check_int, check_number

__all__ = ["LRGuard"]

_FIELDS = ("counts", "means", "last", "peaks")  # one entry per parameter group each


class LRGuard:
    """Caps a jump of each parameter group's learning rate above its running average and its peak (see the
    module docstring).

    Args:
        cap: a rate above ``cap`` x the previous step's, ``cap`` x its running average and the group's peak so
            far is capped at the larger of the last two, ``> 1``.
        warmup_steps: steps with a positive rate averaged (and never capped) before the cap applies, ``>= 1``.
        alpha: EMA smoothing of the average after them, in ``(0, 1)``.
    """

    def __init__(self, cap: float = 2.0, warmup_steps: int = 20, alpha: float = 0.9):
        self.cap = check_number("cap", cap, low=1.0, low_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.counts: list[int] = []  # steps with a positive rate, per group
        self.means: list[float] = []  # running average of the applied rates
        self.last: list[float] = []  # the rate applied at the previous step
        self.peaks: list[float] = []  # the highest rate applied so far
        self.capped = 0  # steps with a capped learning rate so far (host count)

    def before_step(self, optimizer: Any) -> list[tuple[dict, Any, float]]:
        """Cap the learning rates of ``optimizer``'s groups for the coming step and take them into the averages;
        returns what :meth:`after_step` puts back (each group, its rate, the cap)."""
        groups = optimizer.param_groups
        for name in _FIELDS:
            values = getattr(self, name)
            values += [0] * (len(groups) - len(values)) if name == "counts" else [0.0] * (len(groups) - len(values))
        saved, capped = [], False
        for i, group in enumerate(groups):
            lr = group.get("lr")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)):
                continue
            limit = self.limit(i)
            applied = lr
            if limit is not None and lr > limit and lr > self.cap * self.last[i]:
                saved.append((group, lr, limit))
                group["lr"] = applied = limit
                capped = True
            self._observe(i, float(applied))
        self.capped += capped
        return saved

    @staticmethod
    def after_step(saved: list[tuple[dict, Any, float]]) -> None:
        """Put back the learning rates :meth:`before_step` capped, where the group still holds the cap (a scheduler
        that stepped inside the same call, as DeepSpeed's engine does, has set the next rate: it stays)."""
        for group, lr, limit in saved:
            if group["lr"] == limit:
                group["lr"] = lr

    def limit(self, index: int = 0) -> float | None:
        """The largest learning rate group ``index`` may jump to at the next step (``None``: not capped yet)."""
        if index >= len(self.counts) or self.counts[index] < self.warmup_steps:
            return None
        return max(self.cap * self.means[index], self.peaks[index])

    def _observe(self, i: int, lr: float) -> None:
        self.last[i] = lr
        if lr <= 0:  # a group held at 0 is not averaged: it has not started
            return
        count = self.counts[i]
        weight = 1.0 / (count + 1) if count < self.warmup_steps else 1.0 - self.alpha
        self.means[i] += weight * (lr - self.means[i])
        self.counts[i], self.peaks[i] = count + 1, max(self.peaks[i], lr)

    def state_dict(self) -> dict[str, Any]:
        return {**{name: list(getattr(self, name)) for name in _FIELDS}, "capped": self.capped}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`'s output; every field checked (:class:`StateError` naming it)."""
        if not isinstance(state, dict):
            raise StateError("lr_guard", state, "a dict")
        counts = state.get("counts")
        if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                   for c in counts):
            raise StateError("lr_guard.counts", counts, "a list of ints >= 0")
        rates = {}
        for name in _FIELDS[1:]:
            values = state.get(name)
            if not isinstance(values, list) or len(values) != len(counts) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf") for v in values):
                raise StateError(f"lr_guard.{name}", values, "a list of finite numbers >= 0, one per count")
            rates[name] = [float(v) for v in values]
        capped = state.get("capped", 0)
        if isinstance(capped, bool) or not isinstance(capped, int) or capped < 0:
            raise StateError("lr_guard.capped", capped, "an int >= 0")
        self.counts, self.capped = list(counts), capped
        for name, values in rates.items():
            setattr(self, name, values)
