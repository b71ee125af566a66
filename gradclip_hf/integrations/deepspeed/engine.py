"""``EngineStep``: the pack's step backend on a DeepSpeed ZeRO engine (stages 1, 2, 3).

The ZeRO optimizers measure the global gradient norm and clip inside ``step()``, reading their ``clip_grad``
attribute every step (``coef = 1 / max(1, (norm + 1e-6) / clip_grad)``; 0 = no clip). Through accelerate, the
engine's backward and step both run inside ``accelerator.backward`` of the step's last micro-batch, before any
Trainer hook. So, per optimizer step:

1. before the last micro-batch's backward (:meth:`EngineStep.before_backward`): the step loss is known.
   :class:`~gradclip_hf.core.external.ExternalClip` gives the threshold (schedule, loss-spike factor of THIS
   step, strategy from the norms of the steps before), written to ``engine.optimizer.clip_grad``; and the pack's
   skip, as far as it is known now (:func:`~gradclip_hf.run.decision.skip_before_update`: a listed step, a loss
   spike whose action holds the update back). A skipped step's loss is multiplied by NaN: the engine's own
   overflow check then skips the step (no update, gradients dropped, weights, moments and step counts
   bit-identical; verified on ZeRO-1/2/3, fp32 and bf16, gradient accumulation 1 to 4, 1 and 2 ranks);
2. between the engine's backward and its step (``engine.step``, wrapped for the run), at logging steps and
   loss-spike steps only: the per-layer norms (each rank's partitions, one all-reduce);
3. the engine steps and clips at the threshold;
4. after (:meth:`EngineStep.measure`, ``on_pre_optimizer_step``): the report from the engine's pre-clip norm
   (``engine.get_global_grad_norm()``); after a step the pack skipped, the learning-rate scheduler is stepped
   once where it would have been (the engine's own right after the engine's step; the Trainer's at the end of the
   step, :meth:`EngineStep.end_step`): DeepSpeed pauses it on an overflow step, the local path does not; now both
   advance, and log the same learning rates as a run without the skip.

The micro-batch gate (``spike_gate="micro_batch"``): the run hands every micro-batch's loss in as ``loss * keep``
(a dropped one adds exactly nothing) and, at the last one, the gate's step: its kept loss feeds the loss detector,
a step with nothing kept takes the NaN factor (a skip), and the ``engine.step`` wrapper divides the ZeRO
optimizer's loss scale by the gate's rescale for that step (the engine divides the gradients and the norm it
clips by and reports by it): the update is the mean of the kept micro-batches (not on ``BF16_Optimizer`` nor under
fp16: refused at train start, :mod:`.checks`).

fp16: a step the pack skipped does not reach the dynamic loss scaler (it would halve its scale, or raise at its
minimum). Host reads: none added; the pack's skip is on the host already (listed steps; a loss spike, and the
gate's kept flag and rescale, read with the threshold, which the engine takes as a Python float, in one transfer
at the last micro-batch: the engine reads its own overflow flag on the host in every step anyway).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.distributed as dist

from ...core import ClipReport, GradClipper, NonFiniteGradientError, NonFinitePolicy
from ...core.external import ExternalClip
from ...core.gate import GateStep
from ...run.backends import StepBackend
from ...run.decision import skip_before_update
from . import compat
from .snapshot import EngineSnapshot

__all__ = ["EngineStep"]


class EngineStep(StepBackend):
    """A run's step backend on a DeepSpeed engine (see the module).

    Args:
        clipper: the run's clipper (checked by :func:`~.checks.check_deepspeed` before).
        engine: the ``DeepSpeedEngine`` (``engine.optimizer`` is the ZeRO optimizer).
        listed: the steps ``skip_steps`` / ``skip_steps_from`` skip (numbered from 1).
        scheduler: gives the loop's learning-rate scheduler, stepped at the end of a step the pack skipped when the
            engine has none of its own (``engine.lr_scheduler``: stepped right after the engine's step, where the
            engine steps it): the Trainer's.
        layers_at: whether the per-layer norms are read at step ``s`` (numbered from 1; the Trainer's logging
            steps), ``None``: never; ``layers_at_spikes``: also at loss-spike steps whose update is applied.
    """

    name = "deepspeed"
    loss_before_backward = layer_norms = True
    # a listed step is computed and skipped through the engine's overflow path: a step without backward would
    # leave the engine's counters, its own scheduler and its overflow flag (the Trainer's LR step reads it) behind
    uncomputed_listed = False

    def __init__(self, clipper: GradClipper, engine: Any, *, listed: Any = (),
                 scheduler: Callable[[], Any] | None = None, layers_at: Callable[[int], bool] | None = None,
                 layers_at_spikes: bool = False):
        self.engine, self.zero = engine, engine.optimizer
        self.external = ExternalClip(clipper, device=engine.device)
        self.original = self.zero.clip_grad  # put back when the run closes
        self.action = clipper.spikes.action if clipper.spikes is not None else None
        self.listed = frozenset(listed)
        self.scheduler = scheduler
        self.layers_at, self.layers_at_spikes = layers_at, layers_at_spikes
        self.scaler = bool(engine.fp16_enabled())  # fp16: the loss scaler skips overflow steps itself
        self.guard = clipper.nonfinite is NonFinitePolicy.SKIP and not self.scaler
        self.prepared_step: int | None = None
        self.dropping = False  # the pack skips the step being prepared (decided before its last backward)
        self.engine_skipped = False  # the engine's overflow path skipped the last measured step
        self.advance = False  # the scheduler is owed one step (a step the pack skipped)
        self.read_layers = False
        self.rescale = 1.0  # the micro-batch gate's, for the coming engine step (1: nothing dropped)
        self.lr_guard: Any = None  # a core LRGuard: caps the learning rate of each engine step (guard_lr)
        self.layer_values: torch.Tensor | None = None
        named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self._undo = [self._wrap_step()]
        if self.scaler:
            self._undo.append(compat.hold_scaler(self.zero, lambda: self.dropping))

    def _wrap_step(self) -> Callable[[], None]:
        engine = self.engine

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def step(*args: Any, **kwargs: Any) -> Any:
                if not engine.is_gradient_accumulation_boundary():
                    return original(*args, **kwargs)
                rescale, self.rescale = self.rescale, 1.0
                undo = compat.rescaled(self.zero, rescale) if rescale != 1.0 else None  # the gate: the kept mean
                try:
                    if self.read_layers:
                        self.read_layers = False
                        self.layer_values = self._read_layers()  # divided by the loss scale: rescaled too
                    return original(*args, **kwargs)
                finally:
                    if undo is not None:
                        undo()
            return step

        return _patch(engine, "step", make)

    def guard_lr(self, guard: Any) -> None:
        """Cap each step's learning rate with ``guard`` (a :class:`~gradclip_hf.core.LRGuard`): around the ZeRO
        optimizer's own ``step`` (inside ``engine.step``, before the engine's scheduler steps), on its parameter
        groups, which its base optimizer reads; put back before the scheduler computes the next rate."""
        self.lr_guard, zero = guard, self.zero

        def make(original: Callable[..., Any]) -> Callable[..., Any]:
            def step(*args: Any, **kwargs: Any) -> Any:
                capped = guard.before_step(zero)
                try:
                    return original(*args, **kwargs)
                finally:
                    guard.after_step(capped)
            return step

        self._undo.append(_patch(zero, "step", make))

    @torch.no_grad()
    def _read_layers(self) -> torch.Tensor:
        """Each parameter's gradient norm: this rank's sums of squares, ONE all-reduce over the partitions' group,
        unscaled (fp16). Between the engine's backward and its step, on every rank at the same steps."""
        device = torch.device(self.engine.device)
        squares = torch.stack([compat.local_grad_squares(p, device) for p in self.params])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(squares, group=compat.dp_group(self.zero))
        return squares.sqrt() / compat.loss_scale(self.zero)

    def _set(self, threshold: float) -> None:
        self.zero.clip_grad = threshold if math.isfinite(threshold) and threshold > 0 else 0.0

    def start(self, step: int) -> None:
        """Set ``clip_grad`` from the pack's state (train begin; after a resume the engine's is the checkpoint's)."""
        value = self.external.host_threshold(step)
        self._set(float(self.external.peek(step)) if value is None else value)

    def before_backward(self, loss: torch.Tensor, *, last: bool, step: int, step_loss: torch.Tensor | None,
                        gate: GateStep | None = None) -> torch.Tensor:
        """At the step's last micro-batch the engine steps inside this backward: its threshold and the pack's skip
        are set now, from the step loss and the statistics so far. With the micro-batch gate every loss comes in
        as ``loss * keep`` already, and ``gate`` is the step's (closed before this last backward): the kept loss
        feeds the loss detector, a step with nothing kept is skipped (the NaN factor), and the kept sum is made
        the kept mean in the ``engine.step`` wrapper (the loss scale divided by ``gate.rescale``)."""
        if not last:
            return loss
        self.prepared_step = step
        threshold = self.external.before(step, step_loss, gate=gate)
        value, spike, kept, rescale = self._host_values(step, threshold, gate)
        self._set(value)
        self.dropping = skip_before_update(spike, self.action, step + 1 in self.listed) or not kept
        self.rescale = 1.0 if self.dropping else rescale
        self.read_layers = self.layers_at is not None and not self.dropping and (
            self.layers_at(step + 1) or (spike and self.layers_at_spikes))
        return loss * math.nan if self.dropping else loss

    def _host_values(self, step: int, threshold: torch.Tensor,
                     gate: GateStep | None) -> tuple[float, bool, bool, float]:
        """The threshold, the loss-spike flag, whether the gate kept a micro-batch and its rescale, on the host:
        known there (no device statistics, so no spike controller and no gate), else read in ONE transfer."""
        value = self.external.host_threshold(step)
        if value is not None:
            return value, False, True, 1.0
        flag, one = self.external.loss_spike, torch.ones((), dtype=torch.float64, device=threshold.device)
        parts = [threshold.to(torch.float64), torch.zeros_like(one) if flag is None else flag.to(one)]
        parts += [one, one] if gate is None else [gate.kept.to(one), gate.rescale.to(one)]
        value, spike, kept, rescale = torch.stack(parts).tolist()
        return value, bool(spike), bool(kept), rescale

    def measure(self, model: Any, step: int, loss: torch.Tensor | None,
                gate: GateStep | None = None) -> ClipReport | None:
        """After the engine's step: the report from its pre-clip norm (``None`` if no step was prepared); ``gate``:
        the micro-batch gate's step (the report carries it: dropped micro-batches, the spike file's positions)."""
        if self.prepared_step is None:
            return None
        self.prepared_step = None
        dropped, self.dropping = self.dropping, False
        self.engine_skipped = bool(getattr(self.zero, "overflow", False))
        if self.engine_skipped and not dropped and self.external.clipper.nonfinite is NonFinitePolicy.RAISE:
            raise NonFiniteGradientError(f"step {step + 1}: a gradient holds NaN or Inf (DeepSpeed's overflow check "
                                         f"found it and skipped the step: the weights and the optimizer state are "
                                         f"unchanged). Pass nonfinite='skip' to skip such steps and go on.")
        if dropped and not self.engine_skipped:
            raise RuntimeError("gradclip: DeepSpeed applied a step the pack skipped (its overflow check did not see "
                               "the NaN gradients): the weights hold NaN now. Its configuration must have changed "
                               "since train start (zero_optimization.compute_grad_norm, bf16.check_grad_overflow).")
        if dropped and self.engine.lr_scheduler is not None:  # the engine's own: stepped where the engine would have
            self.engine.lr_scheduler.step()
        self.advance = dropped and self.engine.lr_scheduler is None  # else the loop's, at the end of the step
        norm = self.engine.get_global_grad_norm()
        if norm is None or self.engine_skipped:
            norm = math.inf
        report = self.external.after(norm, dropped=dropped)
        report.gate = gate
        layers, self.layer_values = self.layer_values, None
        if layers is not None:
            report = dataclasses.replace(report, names=list(self.names), per_tensor_norms=layers.to(report.norm.device))
        return report

    def end_step(self) -> None:
        """After a step the pack skipped, when the engine has no scheduler: the loop's stepped once, where the Trainer
        would have stepped it (after it read the step's learning rate, before it logs or saves)."""
        if self.advance:
            self.advance = False
            scheduler = self.scheduler() if self.scheduler is not None else None
            if scheduler is not None:
                scheduler.step()

    def nonfinite_skip(self, report: ClipReport) -> torch.Tensor:
        """Whether the engine skipped the step: its overflow path (NaN/Inf gradients, or the pack's own skip),
        known on the host."""
        return torch.full_like(report.skip, self.engine_skipped)

    def snapshot(self, every: int) -> EngineSnapshot:
        return EngineSnapshot(self.engine, every)

    def close(self) -> None:
        self.zero.clip_grad = self.original
        while self._undo:
            self._undo.pop()()
        self.read_layers, self.dropping = False, False


def _patch(owner: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Set ``make(owner.name)`` on the instance ``owner`` in place of its method ``name``; returns the undo (an
    instance attribute that was there is put back, else the class's method shows through again)."""
    own, original = name in owner.__dict__, getattr(owner, name)
    setattr(owner, name, make(original))
    return (lambda: setattr(owner, name, original)) if own else (lambda: owner.__dict__.pop(name, None))
