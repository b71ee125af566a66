"""What the clipper does with a NaN/Inf gradient: the policy, its error, and the zeroing without a host sync."""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from .norms import to_local
from .strategies import scale_grads_

__all__ = ["NonFinitePolicy", "NonFiniteGradientError", "zero_if_"]


class NonFinitePolicy(str, Enum):
    """What to do when any gradient holds a NaN or Inf.

    - ``skip``: report ``skip=True``: the update must not be applied (the integrations skip it inside the
      optimizer step; a hand-written loop checks ``report.skip``).
    - ``zero``: zero all gradients of the step (no host sync; the optimizer still steps, so momentum and
      weight decay still move the weights).
    - ``raise``: raise :class:`NonFiniteGradientError` before any gradient is changed (one host read per step).
    - ``ignore``: do nothing (e.g. fp16 with a GradScaler, which skips such steps itself).
    """

    SKIP = "skip"
    ZERO = "zero"
    RAISE = "raise"
    IGNORE = "ignore"


class NonFiniteGradientError(FloatingPointError, RuntimeError):
    """A gradient held a NaN or Inf and ``nonfinite="raise"`` was chosen.

    A ``RuntimeError``, as torch's ``clip_grad_norm_(error_if_nonfinite=True)`` raises, so code written for
    torch catches it; also a ``FloatingPointError``, as in earlier versions of the pack."""


def zero_if_(condition: Tensor, grads: list[Tensor]) -> None:
    """Zero every gradient where the 0-dim bool ``condition`` holds, without a host sync: ``nan_to_num_``
    clears NaN/Inf (a multiply alone keeps ``NaN * 0``), then a foreach multiply by 0/1 (bit-exact when 1)."""
    for g in grads:
        to_local(g).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    scale_grads_(grads, (~condition).to(torch.float32))
