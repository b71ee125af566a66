"""DeepSpeed ZeRO (stages 1, 2, 3): the pack's step backend on the engine (:class:`EngineStep`), which sets the
pack's threshold on the engine before each of its steps.

The ZeRO optimizers measure the global gradient norm and clip inside ``step()``, reading their
``clip_grad`` attribute every step (``unscale_and_clip_grads``: ``coef = 1 / max(1, (norm + 1e-6) /
clip_grad)``; 0 = no clip). Through accelerate, the engine's backward and step both run inside
``accelerator.backward``, before any Trainer hook. So, per optimizer step:

1. before the engine steps (the last micro-batch's ``accelerator.backward``): the step loss is known;
   :class:`~gradclip_hf.core.external.ExternalClip` gives the threshold (schedule, loss-spike factor of
   THIS step, strategy from the norms of the steps before), written to ``engine.optimizer.clip_grad``;
2. the engine steps and clips at it;
3. after (``on_pre_optimizer_step``): ``engine.get_global_grad_norm()`` (the pre-clip norm) goes back to
   the statistics and the metrics; ``norm_post = norm * coef``, exactly what the engine applied.

What cannot be done faithfully is refused at train start (:func:`check_deepspeed`), with the fix.
The engine's ``clip_grad`` is put back when the run closes (any exit of ``train()``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..config import ClipConfig
from ..core import ClipReport, GradClipper, NonFinitePolicy
from ..core.external import ExternalClip
from ..run.backends import StepBackend

__all__ = ["EngineStep", "check_deepspeed"]

_INSTEAD = "or train without DeepSpeed (DDP or FSDP2), where the pack skips inside the optimizer step"


def check_deepspeed(config: ClipConfig | None, clipper: GradClipper | None, ds_config: dict, stage: int,
                    owner: str) -> None:
    """Refuse, with the fix, what the pack cannot do faithfully under this DeepSpeed configuration."""
    def refuse(what: str, fix: str) -> None:
        raise ValueError(f"{owner}: under DeepSpeed (ZeRO stage {stage}) {what}. {fix}")

    if stage not in (1, 2, 3):
        refuse("the engine clips with its own configuration (ZeRO stage 0 has no per-step clip_grad)",
               "Use zero_optimization.stage 1, 2 or 3, or train without DeepSpeed.")
    zero = ds_config.get("zero_optimization") or {}
    if zero.get("compute_grad_norm", True) is False:
        refuse("zero_optimization.compute_grad_norm=false leaves no gradient norm to clip by",
               "Set zero_optimization.compute_grad_norm to true (the default).")
    c = config or ClipConfig()
    if config is not None:
        _check_config(c, refuse)
    if clipper is not None:
        try:
            ExternalClip.check(clipper)
        except ValueError as error:
            refuse(f"the GradClipper cannot be driven ({error})", "Pass a clipper as described, or ClipConfig options.")
    bf16 = ds_config.get("bf16") or ds_config.get("bfloat16") or {}
    nonfinite = clipper.nonfinite.value if clipper is not None else c.nonfinite
    if (nonfinite == "skip" and stage < 3 and bf16.get("enabled") in (True, "auto")
            and bf16.get("check_grad_overflow", True) is False):
        refuse("bf16.check_grad_overflow=false makes ZeRO-1/2 apply steps with NaN/Inf gradients, so "
               "nonfinite='skip' cannot hold", "Set bf16.check_grad_overflow to true, or nonfinite='ignore'.")


def _check_config(c: ClipConfig, refuse: Any) -> None:
    if c.strategy in ("value", "agc"):
        refuse(f"strategy={c.strategy!r} cannot be applied: the engine clips by ONE global-norm threshold",
               "Use strategy 'norm', 'zscore', 'quantile' or 'none'.")
    if c.norm_type != 2.0:
        refuse(f"norm_type={c.norm_type!r} cannot be applied: the engine measures the L2 norm", "Use norm_type=2.0.")
    if c.exclude or c.include is not None:
        refuse(f"exclude={c.exclude!r} / include={c.include!r} cannot be applied: the engine measures and clips "
               f"every gradient", "Leave exclude and include unset.")
    if c.spike_detection != "off" and c.spike_action in ("skip", "rollback"):
        refuse(f"spike_action={c.spike_action!r} cannot be done faithfully: the engine steps inside backward() "
               f"and its weights and optimizer state cannot be left unchanged",
               f"Use spike_action='tighten' with spike_factor below 1, e.g. 0.5 (the spike step's threshold is "
               f"tightened; ClipConfig.recommended() has 1), or 'stop', {_INSTEAD}.")
    if c.spike_gate != "step":
        refuse(f"spike_gate={c.spike_gate!r} is not supported on the engine's path yet (it averages by the full "
               f"accumulation steps inside its step)", f"Use spike_gate='step', {_INSTEAD}.")
    if c.skip_steps or c.skip_steps_from:
        refuse("skip_steps / skip_steps_from cannot be done faithfully: the engine steps inside backward()",
               f"Leave them unset (resume from a checkpoint before the bad steps with the batches removed), {_INSTEAD}.")
    if c.nonfinite in ("zero", "raise"):
        refuse(f"nonfinite={c.nonfinite!r} cannot be done: the gradients are not reachable between the engine's "
               f"backward and its step", "Use nonfinite='skip' (DeepSpeed skips non-finite steps itself: its "
               "overflow check) or 'ignore'.")


class EngineStep(StepBackend):
    """A run's step backend on a DeepSpeed engine: the threshold before each of its steps, the report after it.

    The engine steps inside the backward of a step's last micro-batch, before any hook after it: the threshold
    is set there (:meth:`before_backward`), and the update cannot be held back after it (``holds`` is False:
    a spike can tighten, or stop the run). Per-tensor norms are not measured.

    Args:
        clipper: the run's clipper (checked by :func:`check_deepspeed` before).
        engine: the ``DeepSpeedEngine`` (``engine.optimizer`` is the ZeRO optimizer).
    """

    name = "deepspeed"
    loss_before_backward = True

    def __init__(self, clipper: GradClipper, engine: Any):
        self.engine, self.zero = engine, engine.optimizer
        self.external = ExternalClip(clipper, device=engine.device)
        self.original = self.zero.clip_grad  # put back when the run closes
        self.prepared_step: int | None = None
        self.scaler = bool(engine.fp16_enabled())  # fp16: the loss scaler skips overflow steps itself
        self.guard = clipper.nonfinite is NonFinitePolicy.SKIP and not self.scaler

    def _set(self, threshold: float) -> None:
        self.zero.clip_grad = threshold if math.isfinite(threshold) and threshold > 0 else 0.0

    def start(self, step: int) -> None:
        """Set ``clip_grad`` from the pack's state (train begin; after a resume the engine's is the checkpoint's)."""
        value = self.external.host_threshold(step)
        self._set(float(self.external.peek(step)) if value is None else value)

    def before_backward(self, loss: torch.Tensor, *, last: bool, step: int,
                        step_loss: torch.Tensor | None) -> torch.Tensor:
        """At the step's last micro-batch the engine steps inside this backward: its threshold is set now, from
        the step loss and the statistics so far (a host read only for device statistics)."""
        if last:
            self.prepared_step = step
            threshold = self.external.before(step, step_loss)
            value = self.external.host_threshold(step)
            self._set(float(threshold) if value is None else value)
        return loss

    def measure(self, model: Any, step: int, loss: torch.Tensor | None) -> ClipReport | None:
        """After the engine's step: the report from its pre-clip norm (``None`` if no step was prepared)."""
        if self.prepared_step is None:
            return None
        self.prepared_step = None
        norm = self.engine.get_global_grad_norm()
        if norm is None or getattr(self.zero, "overflow", False):  # skipped by the overflow check
            norm = math.inf
        return self.external.after(norm)

    def nonfinite_skip(self, report: ClipReport) -> torch.Tensor:
        """The engine's overflow check skipped the step (counted as skipped under ``nonfinite="skip"``)."""
        return report.skip

    def close(self) -> None:
        self.zero.clip_grad = self.original
