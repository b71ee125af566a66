"""What the pack logs at each logging step, aggregated on the device between logging steps.

:class:`StepLoss` sums the micro-batch losses of one optimizer step. :class:`MetricsWindow` keeps the
window's aggregates as device tensors and turns them, with the last step's report, into floats in ONE
device-to-host transfer (:func:`to_host`: named tensors in, named lists out).

Metric keys (all since the previous log unless noted):

=============================  ==============================================================
``grad_norm``                  pre-clip norm of the last step (as the stock Trainer logs it)
``gradclip/norm_mean``         mean pre-clip norm over finite steps
``gradclip/norm_max``          max pre-clip norm over finite steps
``gradclip/norm_post``         post-clip norm of the last step
``gradclip/threshold``         threshold in force at the last step (after schedule and spike factor)
``gradclip/coef``              post/pre norm ratio of the last step
``gradclip/clip_rate``         fraction of steps that were clipped
``gradclip/nonfinite_steps``   steps with a NaN/Inf gradient
``gradclip/skipped_steps``     steps whose update was skipped (non-finite, spike, listed, or every
                               micro-batch dropped)
``gradclip/spikes``            spikes flagged (spike controller on; a step with a dropped micro-batch
                               counts once)
``gradclip/dropped_micro_batches``  micro-batches the micro-batch gate dropped before their backward, over
                               every process (``spike_gate="micro_batch"`` only)
``gradclip/listed_steps``      listed steps whose batches were consumed without being computed (only in a
                               row that has some; the row's ``loss`` is then the mean of the computed steps)
``gradclip/spike_factor``      threshold factor of the spike controller at the last step
``gradclip/layer/<name>``      pre-clip norm of a layer at the last step: the ``log_layers_top_k``
                               largest and those matching ``log_layer_patterns`` (not printed)
``gradclip/spike_layer/<name>``  pre-clip norm of a layer at the window's last spike step
=============================  ==============================================================
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core import ClipReport
from ..core._state import to_host

__all__ = ["StepLoss", "MetricsWindow", "to_host", "METRIC_KEYS", "SPIKE_KEYS", "GATE_KEYS"]

METRIC_KEYS = ("grad_norm", "gradclip/norm_mean", "gradclip/norm_max", "gradclip/norm_post",
               "gradclip/threshold", "gradclip/coef", "gradclip/clip_rate", "gradclip/nonfinite_steps",
               "gradclip/skipped_steps", "gradclip/spikes", "gradclip/spike_factor")
SPIKE_KEYS = ("gradclip/spikes", "gradclip/spike_factor")
GATE_KEYS = ("gradclip/dropped_micro_batches",)
_COUNTS = ("gradclip/nonfinite_steps", "gradclip/skipped_steps", "gradclip/spikes")


class StepLoss:
    """The step loss: the sum of the ``training_step`` returns of one optimizer step (each already divided by
    the accumulation steps, so the sum is the step's mean loss), a device tensor."""

    def __init__(self) -> None:
        self._loss: Tensor | None = None

    def add(self, loss: Any) -> None:
        if isinstance(loss, Tensor):
            loss = loss.detach()
            self._loss = loss.clone() if self._loss is None else self._loss + loss.to(self._loss.device)

    def take(self) -> Tensor | None:
        loss, self._loss = self._loss, None
        return loss


class MetricsWindow:
    """Device aggregates of the steps since the last logging step."""

    FIELDS = ("norm_sum", "norm_max", "finite", "steps", "clipped", "nonfinite", "skipped", "spikes", "dropped")

    def __init__(self, gate: bool = False) -> None:
        self.gate = gate  # the run gates micro-batches: their drops are counted
        self.sums: dict[str, Tensor] | None = None
        self.spike_norms: Tensor | None = None  # per-tensor norms of the window's last spike step
        self.spike_names: list[str] = []

    def add(self, report: ClipReport, skipped: Tensor, keep_spike_layers: bool) -> None:
        norm = report.norm.detach().to(torch.float32)
        finite = torch.isfinite(norm)
        if report.gate is not None:  # a step with every micro-batch dropped has no gradient: not a norm
            finite = finite & report.gate.kept.to(norm.device)
        if self.sums is None:
            self.sums = {k: torch.zeros((), dtype=torch.float32, device=norm.device) for k in self.FIELDS}
        s = self.sums
        s["norm_sum"] += torch.where(finite, norm, torch.zeros_like(norm))
        torch.maximum(s["norm_max"], torch.where(finite, norm, torch.zeros_like(norm)), out=s["norm_max"])
        s["finite"] += finite.to(torch.float32)
        s["steps"] += 1.0
        s["clipped"] += report.clipped.to(device=norm.device, dtype=torch.float32)
        s["nonfinite"] += report.nonfinite.to(device=norm.device, dtype=torch.float32)
        s["skipped"] += skipped.to(device=norm.device, dtype=torch.float32)
        if report.spike is not None:
            spike = report.spike.spike.to(norm.device)
            s["spikes"] += spike.to(torch.float32)
            if report.spike.dropped is not None:
                s["dropped"] += report.spike.dropped.to(device=norm.device, dtype=torch.float32)
            if keep_spike_layers and report.names:  # a step without per-tensor norms (DeepSpeed: most) keeps them
                self._keep_spike_layers(report, spike)

    def _keep_spike_layers(self, report: ClipReport, spike: Tensor) -> None:
        per = report.per_tensor_norms.detach().to(device=spike.device, dtype=torch.float32)
        kept = self.spike_norms
        if kept is None or kept.shape != per.shape or self.spike_names != report.names:
            kept, self.spike_names = torch.zeros_like(per), list(report.names)
        self.spike_norms = torch.where(spike, per, kept)

    def tensors(self, last: ClipReport) -> dict[str, Tensor]:
        """The window's values and the last step's, named, for :func:`to_host`."""
        s, dev = self.sums, last.norm.device
        one = torch.ones((), device=dev)
        factor = last.spike.factor if last.spike is not None else one
        return {"grad_norm": last.norm, "gradclip/norm_mean": s["norm_sum"] / s["finite"].clamp(min=1.0),
                "gradclip/norm_max": s["norm_max"], "gradclip/norm_post": last.norm_post,
                "gradclip/threshold": last.threshold, "gradclip/coef": last.coef,
                "gradclip/clip_rate": s["clipped"] / s["steps"].clamp(min=1.0),
                "gradclip/nonfinite_steps": s["nonfinite"], "gradclip/skipped_steps": s["skipped"],
                "gradclip/spikes": s["spikes"], "gradclip/spike_factor": factor, "steps": s["steps"],
                "gradclip/dropped_micro_batches": s["dropped"]}

    def metrics(self, values: dict[str, list[float]], with_spikes: bool) -> dict[str, float]:
        """The logged metrics from :func:`to_host`'s output; resets the window."""
        self.sums = None
        out = {k: values[k][0] for k in METRIC_KEYS}
        for key in _COUNTS:
            out[key] = int(out[key])
        if not with_spikes:
            for key in SPIKE_KEYS:
                del out[key]
        if self.gate:
            out["gradclip/dropped_micro_batches"] = int(values["gradclip/dropped_micro_batches"][0])
        return out
