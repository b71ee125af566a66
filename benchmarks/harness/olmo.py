"""The OLMo-core spike-skipping rule as a baseline, written independently of this pack.

OLMo-core's ``SkipStepOptimizer`` (``olmo_core/optim/skip_step_optimizer.py``) keeps the last 128 step
losses and pre-clip gradient norms and skips the update of a step whose loss or norm is more than
6 standard deviations above the mean of that window; the rule is checked once the window holds half
its length (64 values); every value enters the window, spike or not. The gradients are clipped at a
constant 1.0 first (``GradClipperCallback``). Here: :class:`OlmoSkipTrainer`, a ``transformers.Trainer``
whose optimizer is :class:`SkipStepAdamW` (``torch.optim.AdamW`` that clips, decides and maybe steps).

One deviation: a non-finite loss or norm makes the step skip (as OLMo-core's comparison does) but is
kept out of the window. OLMo-core's trainer raises on a non-finite loss instead of going on, and a NaN
in the window would make every later comparison false (every step skipped for 128 steps).
Host reads every step (``float(...)``): fine for a baseline.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import torch
from transformers import Trainer

__all__ = ["OlmoSkipRule", "SkipStepAdamW", "OlmoSkipTrainer"]


class OlmoSkipRule:
    """Rolling-window z-score rule on the step loss and the pre-clip gradient norm."""

    def __init__(self, window: int = 128, sigma: float = 6.0, min_values: int | None = None):
        self.window, self.sigma = window, sigma
        self.min_values = max(2, window // 2) if min_values is None else min_values
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.pending_loss = 0.0
        self.skipped: list[int] = []

    def add_loss(self, loss: float) -> None:
        """A micro-batch loss (already divided by the gradient accumulation steps)."""
        self.pending_loss += loss

    def _high(self, value: float, history: deque[float]) -> bool:
        if len(history) < self.min_values:
            return False
        mean, std = statistics.fmean(history), statistics.stdev(history)
        return value - mean > self.sigma * std

    def decide(self, norm: float, step: int) -> bool:
        """True: skip this step. Adds the step's loss and norm to the windows."""
        loss, self.pending_loss = self.pending_loss, 0.0
        if not (math.isfinite(loss) and math.isfinite(norm)):
            self.skipped.append(step)
            return True
        skip = self._high(loss, self.losses) or self._high(norm, self.norms)
        self.losses.append(loss)
        self.norms.append(norm)
        if skip:
            self.skipped.append(step)
        return skip


class SkipStepAdamW(torch.optim.AdamW):
    """AdamW that clips the gradients at ``max_norm`` and skips the update when ``rule`` says so."""

    def __init__(self, params: Any, rule: OlmoSkipRule, max_norm: float = 1.0, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.rule, self.max_norm, self.step_index = rule, max_norm, 0

    @torch.no_grad()
    def step(self, closure: Any = None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = float(torch.nn.utils.clip_grad_norm_(params, self.max_norm))
        skip = self.rule.decide(norm, self.step_index)
        self.step_index += 1
        return None if skip else super().step(closure)


class OlmoSkipTrainer(Trainer):
    """``Trainer`` with the OLMo-core rule. Needs ``max_grad_norm=0`` in its arguments (the optimizer
    clips) and ``optim="adamw_torch"``."""

    def __init__(self, *args: Any, window: int = 128, sigma: float = 6.0, max_norm: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.args.max_grad_norm:
            raise ValueError(f"OlmoSkipTrainer clips in its optimizer: set max_grad_norm=0 "
                             f"(got {self.args.max_grad_norm!r}).")
        self.rule, self.max_norm = OlmoSkipRule(window, sigma), max_norm

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = super().create_optimizer(model).param_groups
            self.optimizer = SkipStepAdamW(groups, rule=self.rule, max_norm=self.max_norm)
        return self.optimizer

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self.rule.add_loss(float(loss))
        return loss
