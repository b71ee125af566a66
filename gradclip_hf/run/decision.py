"""THE decision of a step: is its update skipped? One function, on the device, the same on every rank (the
gradients are reduced and the step loss averaged before it runs)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core import ClipReport
from .backends import StepBackend

__all__ = ["skip_update"]


def skip_update(report: ClipReport, backend: StepBackend, listed: bool) -> Tensor:
    """Whether the update of ``report``'s step is skipped (0-dim bool device tensor):

    - a NaN/Inf gradient, where the path skips those (:meth:`StepBackend.nonfinite_skip`: the pack's guard
      under ``nonfinite="skip"``, or an engine's own overflow check);
    - a spike whose action holds the update back (``skip``, ``rollback``, ``stop``), where the update has not
      happened yet (``backend.holds``);
    - a step whose micro-batches the micro-batch gate dropped, every one of them (``report.gate.kept`` False,
      the same on every rank after the gate's all-reduce), where the update has not happened yet;
    - a step that ``skip_steps`` / ``skip_steps_from`` lists (``listed``, known on the host), always.
    """
    skip = backend.nonfinite_skip(report)
    if backend.holds and report.spike is not None:
        skip = skip | report.spike.act
    if backend.holds and report.gate is not None:
        skip = skip | ~report.gate.kept.to(skip.device)
    if listed:
        skip = torch.ones_like(skip)
    return skip
