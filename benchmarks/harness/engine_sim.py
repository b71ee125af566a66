"""The DeepSpeed path of the pack, simulated in-process for the stability benchmark (method ``engine:...``).

Under DeepSpeed the engine clips inside its own step at the threshold the pack set BEFORE it
(:class:`~gradclip_hf.core.external.ExternalClip`): the loss of the step is known then, its norm is not, so
adaptive strategies and the gradient-norm spike detector lag one step. :class:`EngineSimTrainer` runs exactly
that order with a plain optimizer, without DeepSpeed: ``before(step, loss)`` -> clip at that threshold as the
ZeRO optimizers do (``coef = 1 / max(1, (norm + 1e-6) / threshold)``) -> ``after(norm)``; a step with a
non-finite norm is skipped (every ``grad`` set to ``None``: the optimizer leaves weights and state alone), as
the engine's overflow check does. A loss spike whose action holds the update back (``skip``, ``rollback``,
``stop``: :func:`~gradclip_hf.run.decision.skip_before_update`) is skipped the same way, as the pack makes the
engine skip it (its loss times NaN), and reported as a dropped step (``after(norm, dropped=True)``: its norm is
not measured); the learning-rate schedule advances on it, as the pack has it under DeepSpeed. (Rollback itself is
not simulated: its spike step is skipped.) Comparing ``engine:<options>`` with ``pack:<options>`` on the same
scenarios and seeds measures what the lag costs.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import Trainer

from gradclip_hf.core.external import ExternalClip
from gradclip_hf.core.strategies import TORCH_EPS
from gradclip_hf.run.decision import skip_before_update

__all__ = ["EngineSimTrainer"]


class EngineSimTrainer(Trainer):
    """``Trainer`` whose clipping is the pack's DeepSpeed path (see the module); ``clip_config``: the options."""

    def __init__(self, *args: Any, clip_config: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.clip_config, self.external = clip_config, None
        self._loss: torch.Tensor | None = None
        self._last: dict[str, torch.Tensor] = {}
        self._spikes: torch.Tensor | None = None

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._loss = loss.detach() if self._loss is None else self._loss + loss.detach()
        return loss

    @torch.no_grad()
    def _clip_grad_norm(self, model):
        if self.external is None:
            self.external = ExternalClip(self.clip_config.build(self.state.max_steps, self.args.max_grad_norm))
        loss, self._loss = self._loss, None
        threshold = self.external.before(self.state.global_step, loss)  # before the "engine" step
        spikes, flag = self.external.clipper.spikes, self.external.loss_spike
        dropped = skip_before_update(flag is not None and bool(flag), spikes.action if spikes else None, False)
        params = [p for p in model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        report = self.external.after(norm, dropped=dropped)
        if dropped or not math.isfinite(float(norm)):  # the engine's overflow check: no update at all
            for p in params:
                p.grad = None
        else:
            coef = 1.0 / torch.clamp((norm + TORCH_EPS) / threshold, min=1.0)
            torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.dtype))
        spike = report.spike.spike.to(torch.float64) if report.spike is not None else torch.zeros((), dtype=torch.float64)
        self._spikes = spike if self._spikes is None else self._spikes + spike
        self._last = {"gradclip/threshold": report.threshold, "gradclip/norm_post": report.norm_post,
                      "gradclip/skipped_steps": report.skip.to(torch.float64)}
        return norm

    def log(self, logs, *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._last:
            logs.update({k: float(v) for k, v in self._last.items()})
            logs["gradclip/spikes"] = float(self._spikes) if self._spikes is not None else 0.0
            self._spikes = None
        return super().log(logs, *args, **kwargs)
