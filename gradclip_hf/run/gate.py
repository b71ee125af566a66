"""The optimizer gate: hand one step's clip multiplier and skip decision to a torch optimizer (torch only).

:class:`StepGate` installs a step pre-hook and post-hook on the optimizer ONCE per run (public torch hooks,
``Optimizer.register_step_pre_hook``); nothing is swapped per step. Before each step the caller arms it with
that step's decision; a step it was not armed for passes through untouched (so a gate left behind by a
crashed run is inert).

- **Fused torch optimizers** (``Adam``/``AdamW``/``SGD`` with ``fused=True``; transformers' default
  ``optim="adamw_torch_fused"``) read two 0-dim tensors in ``step()``, the contract ``GradScaler`` uses:
  ``grad_scale`` (the kernel divides every gradient by it) and ``found_inf`` (when 1, weights and optimizer
  state, step counts included, stay bit-identical). The gate sets ``grad_scale = 1 / coef`` and ``found_inf
  = skip`` as device tensors, combined with a ``GradScaler``'s own values when one set them: no host read,
  and no write pass over the gradients for the clip.
- **Any other optimizer** (foreach/for-loop AdamW, bitsandbytes 8-bit and paged optimizers, Adafactor, your
  own): the clip is applied to the gradients before the step; a skip needs the decision on the host (one
  read, made by the caller) and hides every gradient for the step (``grad = None``): every torch and
  bitsandbytes optimizer leaves a parameter without a gradient untouched, state included. The post-hook
  puts the gradients back.

A ``GradScaler`` keeps working on both paths: ``scaler.step`` still calls ``optimizer.step`` and
``scaler.update`` still runs; the gate never writes into the scaler's own ``found_inf`` tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .compat import supports_grad_scale

__all__ = ["StepGate", "supports_grad_scale"]

_UNSET = object()


@dataclass
class _Decision:
    coef: Tensor | None   # clip multiplier still to apply (fused optimizers only)
    skip: Tensor | None   # 0-dim bool: skip this update (device)
    skip_now: bool        # the same decision on the host (non-fused optimizers)


class StepGate:
    """Applies a clip multiplier and a skip decision inside ``optimizer.step()``.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (the inner one, not accelerate's wrapper).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"StepGate needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.fused = supports_grad_scale(optimizer)
        self._armed: _Decision | None = None
        self.lr_guard: Any = None  # a core LRGuard: caps the learning rates of the steps the gate is armed for
        self._lr_saved: list[tuple[dict, Any]] = []
        self._restore: list[tuple[str, Any]] = []
        self._hidden: list[tuple[Tensor, Tensor]] = []
        self._handles = [optimizer.register_step_pre_hook(self._pre_hook),
                         optimizer.register_step_post_hook(self._post_hook)]

    def arm(self, *, coef: Tensor | None = None, skip: Tensor | None = None, skip_now: bool = False) -> None:
        """The decision for the coming ``step()``: ``coef`` (fused optimizers only: the multiplier the clipper
        left out of the gradients), ``skip`` (device flag, read by fused optimizers), ``skip_now`` (the same
        decision on the host, used by the others)."""
        if coef is not None and not self.fused:
            raise ValueError("A clip multiplier can only be handed to a fused optimizer; clip in place instead.")
        self._armed = _Decision(coef, skip, skip_now)

    def hold(self) -> None:
        """Skip the coming ``step()`` whole, with no clip (a step whose batches were not computed): a fused
        optimizer gets ``found_inf = 1`` (on the device of its first parameter), any other its gradients hidden."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        skip = torch.ones((), dtype=torch.bool, device=params[0].device) if params and self.fused else None
        self._armed = _Decision(None, skip, True)

    def disarm(self) -> None:
        self._armed = None

    def remove(self) -> None:
        """Remove the hooks (train end); an optimizer step that raised between the hooks is undone here (its
        attributes, hidden gradients and capped learning rates put back)."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._armed = [], None
        if self._restore or self._hidden or self._lr_saved:
            self._post_hook(self.optimizer, (), {})

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        decision, self._armed = self._armed, None
        if decision is None:
            return
        if self.lr_guard is not None:
            self._lr_saved = self.lr_guard.before_step(optimizer)
        if self.fused:
            self._set_fused(optimizer, decision)
        elif decision.skip_now:
            self._hide_grads(optimizer)

    def _post_hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for name, value in reversed(self._restore):
            if value is _UNSET:
                delattr(optimizer, name)
            else:
                setattr(optimizer, name, value)
        for param, grad in self._hidden:
            param.grad = grad
        if self._lr_saved:
            self.lr_guard.after_step(self._lr_saved)
        self._restore, self._hidden, self._lr_saved = [], [], []

    def _set(self, optimizer: Any, name: str, value: Tensor) -> None:
        self._restore.append((name, getattr(optimizer, name, _UNSET)))
        setattr(optimizer, name, value)

    def _set_fused(self, optimizer: Any, decision: _Decision) -> None:
        if decision.coef is not None:
            ours = torch.reciprocal(decision.coef.detach().to(torch.float32))
            theirs = getattr(optimizer, "grad_scale", None)  # a GradScaler's scale, when it did not unscale yet
            self._set(optimizer, "grad_scale", ours if theirs is None else theirs * ours.to(theirs.device))
        if decision.skip is not None:
            ours = decision.skip.detach().to(torch.float32)
            theirs = getattr(optimizer, "found_inf", None)  # a GradScaler's flag: a new tensor, its own untouched
            self._set(optimizer, "found_inf", ours if theirs is None else torch.maximum(theirs, ours.to(theirs.device)))

    def _hide_grads(self, optimizer: Any) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._hidden.append((param, param.grad))
                    param.grad = None
