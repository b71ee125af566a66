"""``LRGuard``: cap a jump of an optimizer step's learning rate at a multiple of its running average (torch only).

A learning-rate mistake (a scheduler restarted at its peak, a multiplier applied twice, a wrong unit) makes
every update of the steps it lasts several times too large: the weights are damaged before any loss or gradient
norm shows it (the loss rises one step later, by 10-20 %), so no spike rule can hold it back. The update's size
is set by the learning rate the optimizer applies, so the guard caps that: before each ``optimizer.step()`` a
parameter group's learning rate that *jumps* (more than ``cap`` x the rate applied at its previous step) and
stands above ``cap`` x its running average (the mean of the first ``warmup_steps`` steps' rates, then an EMA with
``alpha``) is capped at ``cap`` x that average. A smooth rise (a linear warmup of any length: each step at most
``cap`` x the one before) is never capped; nothing is capped in the first ``warmup_steps`` steps. A capped step
enters the average at its capped value, so an intended jump (a warm restart) is followed: with cap 2 the capped
rate grows 10 % a step until the jump left is at most 2x, a re-warmup of about 10 steps for a 10x jump. The
group's learning rate is put back after the step: the scheduler never sees the cap.

The learning rates are Python floats the scheduler sets on the host: nothing here touches the device. A group
whose learning rate is a tensor is left alone.
"""

from __future__ import annotations

from typing import Any

from ._checks import StateError, check_int, check_number

__all__ = ["LRGuard"]


class LRGuard:
    """Caps a jump of each parameter group's learning rate at ``cap`` x its running average (module docstring).

    Args:
        cap: a rate above ``cap`` x the previous step's and ``cap`` x its running average is capped at the
            latter, ``> 1``.
        warmup_steps: steps averaged (and never capped) before the cap applies, ``>= 1``.
        alpha: EMA smoothing of the average after them, in ``(0, 1)``.
    """

    def __init__(self, cap: float = 2.0, warmup_steps: int = 20, alpha: float = 0.9):
        self.cap = check_number("cap", cap, low=1.0, low_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.counts: list[int] = []
        self.means: list[float] = []
        self.last: list[float] = []  # the rate each group applied at its previous step
        self.capped = 0  # steps with a capped learning rate so far (host count)

    def before_step(self, optimizer: Any) -> list[tuple[dict, Any]]:
        """Cap the learning rates of ``optimizer``'s groups for the coming step and take them into the averages;
        returns what :meth:`after_step` puts back."""
        groups = optimizer.param_groups
        grow = len(groups) - len(self.counts)
        if grow > 0:
            self.counts += [0] * grow
            self.means += [0.0] * grow
            self.last += [0.0] * grow
        saved, capped = [], False
        for i, group in enumerate(groups):
            lr = group.get("lr")
            if isinstance(lr, bool) or not isinstance(lr, (int, float)):
                continue
            limit = self.cap * self.means[i]
            applied = lr
            if self.counts[i] >= self.warmup_steps and lr > limit and lr > self.cap * self.last[i]:
                saved.append((group, lr))
                group["lr"] = applied = limit
                capped = True
            self._observe(i, applied)
        self.capped += capped
        return saved

    @staticmethod
    def after_step(saved: list[tuple[dict, Any]]) -> None:
        """Put back the learning rates :meth:`before_step` capped."""
        for group, lr in saved:
            group["lr"] = lr

    def limit(self, index: int = 0) -> float | None:
        """The largest learning rate group ``index`` may take at the next step (``None``: not capped yet)."""
        if index >= len(self.counts) or self.counts[index] < self.warmup_steps:
            return None
        return self.cap * self.means[index]

    def _observe(self, i: int, lr: float) -> None:
        count = self.counts[i]
        weight = 1.0 / (count + 1) if count < self.warmup_steps else 1.0 - self.alpha
        self.means[i] += weight * (float(lr) - self.means[i])
        self.counts[i], self.last[i] = count + 1, float(lr)

    def state_dict(self) -> dict[str, Any]:
        return {"counts": list(self.counts), "means": list(self.means), "last": list(self.last), "capped": self.capped}

    def load_state_dict(self, state: Any) -> None:
        """Restore :meth:`state_dict`'s output; every field checked (:class:`StateError` naming it)."""
        if not isinstance(state, dict):
            raise StateError("lr_guard", state, "a dict")
        counts, means = state.get("counts"), state.get("means")
        if not isinstance(counts, list) or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                                                   for c in counts):
            raise StateError("lr_guard.counts", counts, "a list of ints >= 0")
        if not isinstance(means, list) or len(means) != len(counts) or not all(
                isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < float("inf") for m in means):
            raise StateError("lr_guard.means", means, "a list of finite numbers >= 0, one per count")
        last = state.get("last", list(means))
        if not isinstance(last, list) or len(last) != len(counts) or not all(
                isinstance(m, (int, float)) and not isinstance(m, bool) and 0 <= m < float("inf") for m in last):
            raise StateError("lr_guard.last", last, "a list of finite numbers >= 0, one per count")
        capped = state.get("capped", 0)
        if isinstance(capped, bool) or not isinstance(capped, int) or capped < 0:
            raise StateError("lr_guard.capped", capped, "an int >= 0")
        self.counts, self.means, self.capped = list(counts), [float(m) for m in means], capped
        self.last = [float(m) for m in last]
