"""Step backends: how one optimizer step's clip and decision reach the update. One per run, chosen once at train
start by the integration that knows the training loop; :class:`~gradclip_hf.run.run.ClipRun` drives it.

==================  ====================================================================================
backend             where the clip and the skip happen
==================  ====================================================================================
:class:`LocalStep`  the pack's clipper measures the gradients after backward; the multiplier goes to a fused
                    torch optimizer (``grad_scale``) or into the gradients; a skip goes through the
                    :class:`~gradclip_hf.run.gate.StepGate` on the optimizer (``found_inf``, or hidden
                    gradients). The Trainer without DeepSpeed, ``AcceleratorClipper``.
``EngineStep``      an optimizer that clips inside its own step by one threshold (DeepSpeed ZeRO:
                    :mod:`gradclip_hf.integrations.deepspeed`): the threshold and the skip are set before
                    the engine steps, inside the last micro-batch's backward (a skipped step's loss times
                    NaN: the engine's own overflow path), and its norm is read back after.
==================  ====================================================================================

One step, as the run calls a backend::

    loss = backend.before_backward(loss, last=..., step=..., step_loss=...)  # each micro-batch, where the
                                       # integration sees the backward (``loss_before_backward``)
    report = backend.measure(model, step, loss)    # the norm, the thresholds, the spike controller
    skip = skip_update(report, backend, listed)    # THE decision (gradclip_hf.run.decision), once
    backend.apply(report, skip, skip_now)          # the multiplier and the decision go to the update
    backend.end_step()                             # after the loop's own bookkeeping of the step

The micro-batch gate (``spike_gate="micro_batch"``, :mod:`gradclip_hf.core.gate`) runs before the backend sees
a micro-batch: the run hands :meth:`StepBackend.before_backward` the loss already multiplied by its keep flag
(``loss * keep``: a dropped micro-batch adds no gradient), and :meth:`StepBackend.measure` the step's
:class:`~gradclip_hf.core.gate.GateStep` (``gate=``): the factor that makes the kept sum the kept mean rides on
the clip multiplier, so the local path needs no extra pass; a step with nothing kept is skipped by the
decision. The gate's step is there before the last backward too (``run.gate.close()`` is idempotent until the
step ends): an engine that steps inside it can rescale and skip there (a non-finite factor makes an engine take
its own overflow path).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..core import ClipReport, GradClipper, NonFinitePolicy, TrainingSnapshot
from ..core.gate import GateStep
from .compat import inner_optimizer, loss_scale, scaler_enabled, unscale_once
from .gate import StepGate

__all__ = ["StepBackend", "LocalStep"]


class StepBackend:
    """The interface (and its defaults). Attributes the run reads:

    - ``name``: ``"local"`` or ``"deepspeed"``;
    - ``guard``: the pack's non-finite guard is on (``nonfinite="skip"``, and no loss scaler that skips such
      steps itself): its watchdog counts them;
    - ``holds``: the update has not happened when the run decides, so a spike action or a listed step can still
      hold it back;
    - ``host_decision``: holding an update back needs the decision on the host (one read per step);
    - ``layer_norms``: the report has per-tensor norms (per-layer metrics);
    - ``loss_before_backward``: the integration must hand every micro-batch's loss to :meth:`before_backward`
      (the step loss is needed before the last backward);
    - ``hand_off``: the clip multiplier goes to the optimizer instead of into the gradients;
    - ``optimizer``: the torch optimizer whose state a rollback snapshot keeps (``None``: none reachable);
    - ``scaler``: an fp16 loss scaler skips overflow steps itself;
    - ``uncomputed_listed``: a listed step's batches may be consumed without a forward or a backward (the update
      is then held back with :meth:`hold`); ``False``: they are computed and the update skipped as decided.
    """

    name = "base"
    guard = holds = host_decision = layer_norms = loss_before_backward = hand_off = scaler = False
    uncomputed_listed = True
    optimizer: Any = None

    def start(self, step: int) -> None:
        """Train begin, after a resumed run's state is loaded (``step``: the step training starts from)."""

    def before_backward(self, loss: Tensor, *, last: bool, step: int, step_loss: Tensor | None,
                        gate: GateStep | None = None) -> Tensor:
        """Before a micro-batch's backward: the loss to backpropagate (this one, unchanged here). ``last``: the
        step's last micro-batch; ``step_loss``: the step's loss when ``last`` (mean over its micro-batches)."""
        return loss

    def measure(self, model: Any, step: int, loss: Tensor | None, **gate: Any) -> ClipReport | None:
        """At the optimizer step: the step's report (``None``: nothing to report this step). With a micro-batch
        gate, ``gate=`` its :class:`~gradclip_hf.core.gate.GateStep` (the kept micro-batches' rescale and loss)."""
        raise NotImplementedError

    def hold(self) -> None:
        """Hold back the coming update whole, with no report (a listed step whose batches were not computed)."""

    def guard_lr(self, guard: Any) -> None:
        """Cap the learning rate of each update with ``guard`` (a :class:`~gradclip_hf.core.LRGuard`) inside the
        optimizer's step; a backend whose optimizer steps elsewhere refuses (``ValueError`` with the fix)."""
        raise ValueError(f"lr_guard caps the learning rate of each optimizer step, which the {self.name} path does "
                         f"not reach: set lr_guard=None (clip_lr_guard).")

    def nonfinite_skip(self, report: ClipReport) -> Tensor:
        """Whether this path skips the update of a step with a NaN/Inf gradient (device flag)."""
        return report.nonfinite if self.guard else torch.zeros_like(report.nonfinite)

    def apply(self, report: ClipReport, skip: Tensor, skip_now: bool) -> None:
        """Hand the step's multiplier and decision to the update (``skip_now``: the decision on the host, where
        the run read it)."""

    def loss_scale(self) -> Tensor | None:
        """The fp16 loss scaler's current scale (a device tensor), else ``None``."""
        return None

    def end_step(self) -> None:
        """After the optimizer step's bookkeeping (the Trainer: ``on_step_end``, once it has read the learning rate
        and stepped its scheduler, before it logs or saves a checkpoint)."""

    def snapshot(self, every: int) -> Any:
        """What ``spike_action="rollback"`` restores, taken every ``every`` clean steps: the trainable weights and
        the optimizer's per-parameter state (an engine with sharded state gives its own, same interface)."""
        return TrainingSnapshot(every)

    def close(self) -> None:
        """Train end (any exit): put back whatever the backend changed."""


class LocalStep(StepBackend):
    """The local path (see the module docstring).

    Args:
        clipper: the run's clipper.
        optimizer: the optimizer ``step()`` is called on (accelerate's ``AcceleratedOptimizer`` or a torch
            optimizer; the gate goes on the inner torch optimizer), or ``None`` (clip only: nothing can be skipped).
        hand_off: give the clip multiplier to a fused optimizer when one group measures every gradient
            (``ClipConfig.defers_to_optimizer``); otherwise, and for other optimizers, clip in place.
        unscale: how fp16 gradients are unscaled (``accelerator.unscale_gradients``); default: the optimizer's
            ``GradScaler`` itself. Either way once per step, only while no one unscaled them in this step.
    """

    name = "local"
    holds = layer_norms = True

    def __init__(self, clipper: GradClipper, optimizer: Any = None, *, hand_off: bool = False,
                 unscale: Callable[[], Any] | None = None):
        self.clipper, self.stepped, self.unscale = clipper, optimizer, unscale
        inner = inner_optimizer(optimizer) if optimizer is not None else None
        self.gate = StepGate(inner) if isinstance(inner, torch.optim.Optimizer) else None
        self.optimizer = inner
        self.hand_off = self.gate is not None and self.gate.fused and hand_off
        self.scaler = optimizer is not None and scaler_enabled(optimizer)
        self.guard = clipper.nonfinite is NonFinitePolicy.SKIP and not self.scaler
        # fp16: the scaler's step needs the step's inf checks (a backward): a listed step is computed, then skipped
        self.uncomputed_listed = not self.scaler
        self.host_decision = self.gate is not None and not self.gate.fused

    def measure(self, model: Any, step: int, loss: Tensor | None, gate: GateStep | None = None) -> ClipReport:
        """Unscale fp16 gradients once, then plan the clip (nothing written yet: :meth:`apply` does)."""
        if self.stepped is not None:
            unscale_once(self.stepped, self.unscale)
        return self.clipper.plan(model, step=step, loss=loss, gate=gate)

    def hold(self) -> None:
        if self.gate is not None:
            self.gate.hold()

    def guard_lr(self, guard: Any) -> None:
        if self.gate is None:
            raise ValueError(f"lr_guard={guard.cap:g} needs a torch optimizer whose step() the pack can hook, got "
                             f"{type(self.optimizer).__name__}: pass a torch.optim.Optimizer, or set lr_guard=None "
                             f"(clip_lr_guard; ClipConfig.recommended(lr_guard=None)).")
        self.gate.lr_guard = guard

    def apply(self, report: ClipReport, skip: Tensor, skip_now: bool) -> None:
        coef = self.clipper.apply_(report, hand_off=self.hand_off)
        if self.gate is not None:
            self.gate.arm(coef=coef, skip=skip, skip_now=skip_now)

    def loss_scale(self) -> Tensor | None:
        return loss_scale(self.stepped) if self.scaler else None

    def close(self) -> None:
        if self.gate is not None:
            self.gate.remove()
