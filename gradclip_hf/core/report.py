"""``ClipReport``: what :meth:`~gradclip_hf.core.GradClipper.plan` decided at one step (device tensors), and what
it left for :meth:`~gradclip_hf.core.GradClipper.apply_` to write."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .gate import GateStep
from .spikes import SpikeDecision
from .strategies import ClipOutcome

__all__ = ["ClipReport", "Pending"]


class Pending(NamedTuple):
    """What :meth:`GradClipper.plan` left to :meth:`GradClipper.apply_`."""
    scaled: list[tuple[list[Tensor], ClipOutcome]]  # each scalar group's gradients and its multiplier
    zero: list[Tensor] | None  # nonfinite="zero": every gradient, zeroed where ``nonfinite`` holds
    nonfinite: Tensor
    single: bool  # one scalar group measures every gradient: its multiplier can go to the optimizer
    rescale: Tensor | None = None  # the micro-batch gate's rescale: times each scalar group's multiplier
    unmeasured: list[Tensor] | None = None  # gradients not measured that the rescale still multiplies


@dataclass
class ClipReport:
    """What :meth:`GradClipper.plan` decided at one step (:meth:`GradClipper.clip_` did). Tensors are 0-dim and on
    the device.

    Attributes:
        step: optimizer steps done before this one (what drives the schedule).
        norm / norm_post: pre- and post-clip norm of all measured gradients.
        threshold: threshold of the default group (after schedule and factor); coef: its post/pre ratio.
        clipped: whether any group was clipped.
        nonfinite: whether any gradient (measured or not) held a NaN or Inf.
        skip: whether the update must be skipped (``nonfinite`` under the ``skip`` policy).
        scale: schedule value times factor, the multiplier of the strategies' thresholds.
        names / per_tensor_norms: the measured parameters and their pre-clip norms (1-dim).
        groups: each group's :class:`ClipOutcome`; spike: the :class:`SpikeDecision` (``None`` without one).
        gate: the micro-batch gate's step (:class:`~gradclip_hf.core.gate.GateStep`; ``None`` without a gate):
            the norms are those of the kept micro-batches' mean gradient.
        optimizer_coef: the multiplier handed to the optimizer instead of applied to the gradients
            (``apply_(report, hand_off=True)``; finite and > 0, 1 on non-finite steps); else ``None``.
    """

    step: int
    norm: Tensor
    norm_post: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    nonfinite: Tensor
    skip: Tensor
    scale: Tensor
    names: list[str]
    per_tensor_norms: Tensor
    groups: dict[str, ClipOutcome] = field(default_factory=dict)
    spike: SpikeDecision | None = None
    gate: GateStep | None = None
    optimizer_coef: Tensor | None = None
    pending: "Pending | None" = field(default=None, repr=False, compare=False)  # what apply_() still writes

    SCALARS = ("norm", "norm_post", "threshold", "coef", "clipped", "nonfinite", "skip", "scale")

    def to_floats(self) -> dict[str, float]:
        """The scalar fields as Python floats, in one device-to-host transfer."""
        values = torch.stack([getattr(self, k).detach().to(torch.float64).reshape(()) for k in self.SCALARS])
        return dict(zip(self.SCALARS, values.tolist()))
