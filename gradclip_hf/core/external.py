"""``ExternalClip``: a :class:`~gradclip_hf.core.GradClipper` driving an optimizer that clips inside its own step.

Some optimizers measure the global gradient norm and clip by a threshold inside their ``step()`` (a
sharded engine whose gradients the caller never sees). They take one number per step, set before the
step, and report the pre-clip norm after it. ``ExternalClip`` turns the clipper's strategy, schedule
and spike controller into that number, and the reported norm back into a :class:`ClipReport`:

1. ``threshold = ext.before(step, loss)``: the step loss is known, the norm is not. The loss detector
   decides now (a loss spike tightens THIS step). The strategy's part comes from the statistics of
   the steps before (:meth:`ClipStrategy.next_threshold`): adaptive strategies lag one step.
2. the optimizer steps, clipping at ``threshold`` as torch does (``coef = min(1, t / (norm + 1e-6))``).
3. ``report = ext.after(norm)``: the statistics take the norm (exactly as in :meth:`GradClipper.clip_`),
   the norm detector decides (a norm spike tightens from the NEXT step on), and the report says what
   the optimizer did: ``norm_post = norm * coef``; a non-finite norm is a skipped step.
   ``ext.after(norm, dropped=True)``: the caller made this step's gradients non-finite on purpose, so that
   the optimizer skips it by its own overflow check (a step the caller decided to skip): nothing was
   measured (the norm is NaN, kept out of the statistics and the detectors), and the step is a skip, not a
   non-finite step.

Per-tensor norms are not measured (``names`` is empty). Nothing leaves the device except where the
caller reads the threshold (:meth:`host_threshold` says when no read is needed).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._checks import OptionError
from .clipper import ClipReport, GradClipper, NonFinitePolicy
from .gate import GateStep
from .norms import GradNorms
from .spikes import LossPhase
from .strategies import TORCH_EPS, MeasureOnly, NormClip

__all__ = ["ExternalClip"]


class _Pending(NamedTuple):
    """What :meth:`ExternalClip.before` decided, for :meth:`ExternalClip.after`."""
    step: int
    threshold: Tensor
    scale: Tensor
    loss_phase: LossPhase | None  # the spike controller's first phase (None without a controller)


class ExternalClip:
    """One threshold ahead per step for an optimizer that clips by the global norm itself (see the module).

    Args:
        clipper: a :class:`GradClipper` with a scalar strategy (``norm``, ``zscore``, ``quantile``, ``none``),
            the L2 norm, no parameter groups, ``include`` or ``exclude`` (the optimizer measures every
            gradient), and ``nonfinite`` ``skip``, ``ignore`` (the optimizer's own overflow check skips such a step)
            or ``raise`` (the caller raises after such a step, which the optimizer skipped).
        device: where the statistics live.

    Raises:
        OptionError: a clipper this cannot drive, naming the setting.
    """

    def __init__(self, clipper: GradClipper, device: torch.device | str = "cpu"):
        self.check(clipper)
        self.clipper, self.device = clipper, torch.device(device)
        self._pending: _Pending | None = None

    @staticmethod
    def check(clipper: GradClipper) -> None:
        strategy = clipper.strategy
        if not strategy.scalar:
            raise OptionError("strategy", strategy.name, "'norm', 'zscore', 'quantile' or 'none' (one global-norm "
                              "threshold per step)")
        if strategy.norm_type != 2.0:
            raise OptionError("norm_type", strategy.norm_type, "2.0 (the optimizer measures the L2 norm)")
        for name, value, allowed in (("groups", list(clipper.groups), "none"), ("exclude", list(clipper.exclude), "[]"),
                                     ("include", clipper.include, "None")):
            if value:
                raise OptionError(name, value, f"{allowed} (the optimizer measures and clips every gradient)")
        if clipper.nonfinite is NonFinitePolicy.ZERO:
            raise OptionError("nonfinite", clipper.nonfinite.value, "'skip', 'ignore' or 'raise' (the optimizer "
                              "checks its gradients inside its step and skips a non-finite one itself)")

    # ------------------------------------------------------------------ before the step
    def host_threshold(self, step: int) -> float | None:
        """The threshold of ``step`` as a float when it needs no device statistics (``norm``/``none`` without a
        spike controller), else ``None``; ``inf``: no clip."""
        strategy = self.clipper.strategy
        if self.clipper.spikes is not None or not isinstance(strategy, (NormClip, MeasureOnly)):
            return None
        return math.inf if isinstance(strategy, MeasureOnly) else strategy.max_norm * self.clipper.scale_at(step)

    def peek(self, step: int) -> Tensor:
        """The threshold ``step`` would get without a spike on its loss (nothing is updated): after a resume."""
        spikes = self.clipper.spikes
        factor = 1.0 if spikes is None else spikes.current_factor(self.device)
        return self.clipper.strategy.next_threshold(self.device).to(torch.float64) * self.clipper.scale_at(step) * factor

    @torch.no_grad()
    def before(self, step: int, loss: Tensor | None = None, gate: GateStep | None = None) -> Tensor:
        """This step's threshold (0-dim, ``inf`` for no clip). ``loss``: the step loss (mean over micro-batches),
        for the loss detector (the spike controller's first phase: a loss spike tightens this step); ``gate``: the
        micro-batch gate's step, closed before the optimizer steps: the detector judges the kept loss instead, as
        :meth:`GradClipper.plan` does (the caller makes the gradient the kept mean and skips a step with nothing
        kept)."""
        spikes = self.clipper.spikes
        phase = None if spikes is None else spikes.observe_loss(loss, step, self.device, gate)
        factor = torch.ones((), dtype=torch.float64, device=self.device) if phase is None else phase.factor
        scale = factor * self.clipper.scale_at(step)
        threshold = self.clipper.strategy.next_threshold(self.device).to(torch.float64) * scale
        self._pending = _Pending(step, threshold, scale, phase)
        return threshold

    @property
    def loss_spike(self) -> Tensor | None:
        """The loss detector's flag for the step :meth:`before` prepared (0-dim bool), ``None`` without one."""
        p = self._pending
        return None if p is None or p.loss_phase is None else p.loss_phase.spike

    # ------------------------------------------------------------------ after the step
    @torch.no_grad()
    def after(self, norm: Tensor | float, dropped: bool = False) -> ClipReport:
        """The report of the step :meth:`before` prepared, from the optimizer's pre-clip ``norm`` (the spike
        controller's second phase: a norm spike tightens from the next step on, the step was clipped already).
        ``dropped``: the caller skipped this step through the optimizer's overflow path (see the module)."""
        p = self._pending
        if p is None:
            raise RuntimeError("ExternalClip.after() without before(): call before() ahead of each optimizer step.")
        self._pending = None
        norm = torch.as_tensor(math.nan if dropped else norm, dtype=torch.float64, device=self.device).reshape(())
        measured = torch.isfinite(norm)  # False for a dropped step: its norm is NaN
        nonfinite = ~measured if not dropped else torch.zeros_like(measured)
        decision = None if p.loss_phase is None else self.clipper.spikes.decide(p.loss_phase, norm,
                                                                                 factor_applied=True)
        observe = measured if decision is None else measured & ~(decision.loss_spike | decision.norm_spike)
        self.clipper.strategy.plan(GradNorms(norm, norm.reshape(1), 2.0), scale=p.scale, observe=observe)
        coef = torch.where(measured, 1.0 / torch.clamp((norm + TORCH_EPS) / p.threshold, min=1.0),
                           torch.ones_like(norm))
        return ClipReport(step=p.step, norm=norm, norm_post=norm * coef, threshold=p.threshold, coef=coef,
                          clipped=coef < 1.0, nonfinite=nonfinite, skip=self.clipper.skip_of(nonfinite) | dropped,
                          scale=p.scale, names=[], per_tensor_norms=norm.new_zeros(0), spike=decision)

    def state_dict(self) -> dict[str, Any]:
        return self.clipper.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipper.load_state_dict(state)

