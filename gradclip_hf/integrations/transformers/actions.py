"""What one step's decision does beyond clipping: skip the update, roll back, stop, count non-finite steps.

The skip goes through the :class:`~gradclip_hf.integrations.optim.StepGate` on the optimizer, installed once
per run. Host reads: none per step for ``tighten``/``skip``/``nonfinite="skip"`` on fused optimizers (the
decision travels as a device tensor); one stacked read per step for ``rollback``/``stop`` and for skipping on
other optimizers. Where no flag is read, the run of consecutive non-finite steps is checked at logging steps.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from ...core import ClipReport, GradClipper, NonFinitePolicy, SpikeAction, TrainingSnapshot
from ..optim import StepGate

logger = logging.getLogger("transformers.gradclip_hf")

__all__ = ["StepActions", "logger"]


class StepActions:
    """Per-run: arms the optimizer gate each step and carries out rollbacks and stops.

    Args:
        clipper: the run's clipper (its non-finite policy and spike action).
        gate: the gate on the inner optimizer, or ``None`` where the pack cannot skip (DeepSpeed).
        owner: name in messages; nonfinite_limit: stop after this many non-finite steps in a row.
        scaler: a GradScaler is active (it skips non-finite steps itself).
        snapshot_every: clean steps between snapshots (``rollback``).
    """

    def __init__(self, clipper: GradClipper, gate: StepGate | None, owner: str, nonfinite_limit: int,
                 scaler: bool = False, snapshot_every: int = 50):
        self.clipper, self.gate, self.owner, self.nonfinite_limit = clipper, gate, owner, nonfinite_limit
        spikes = clipper.spikes
        self.action = spikes.action if spikes is not None else SpikeAction.TIGHTEN
        self.guard = clipper.nonfinite is NonFinitePolicy.SKIP and not scaler
        self.snapshot = TrainingSnapshot(snapshot_every) if self.action is SpikeAction.ROLLBACK else None
        self.listed: frozenset[int] = frozenset()  # steps to skip whatever happens (clip_skip_steps)
        self.stop_reason: str | None = None
        self.rollbacks = 0
        self._run: Tensor | None = None   # consecutive non-finite steps (device)
        self._worst: Tensor | None = None  # longest run since the last read (device)

    @property
    def reads_every_step(self) -> bool:
        """Whether a flag leaves the device at every step (rollback, stop, or a skip on a non-fused optimizer)."""
        acting = self.action in (SpikeAction.ROLLBACK, SpikeAction.STOP)
        can_skip = self.guard or self.action is SpikeAction.SKIP or bool(self.listed)
        return acting or (can_skip and self.gate is not None and not self.gate.fused)

    def skip_flag(self, report: ClipReport) -> Tensor:
        """Device flag: this step's update is not applied."""
        skip = report.skip if self.guard else torch.zeros_like(report.skip)
        if report.spike is not None:
            skip = skip | report.spike.act
        if report.step + 1 in self.listed:
            skip = skip | torch.ones_like(skip)
        return skip

    def _count_nonfinite(self, report: ClipReport) -> None:
        if not self.guard:
            return
        nonfinite = report.nonfinite
        if self._run is None:
            self._run = torch.zeros((), dtype=torch.int64, device=nonfinite.device)
            self._worst = torch.zeros_like(self._run)
        self._run = torch.where(nonfinite, self._run + 1, torch.zeros_like(self._run))
        torch.maximum(self._worst, self._run, out=self._worst)

    def after_clip(self, report: ClipReport, skip: Tensor, model: Any, optimizer: Any, state: Any) -> None:
        """Arm the gate for this step's update; read flags and act where this configuration needs it."""
        self._count_nonfinite(report)
        if not self.reads_every_step:
            if self.gate is not None:
                self.gate.arm(coef=report.optimizer_coef, skip=skip)
            return
        act = report.spike.act if report.spike is not None else torch.zeros_like(skip)
        run = self._run if self._run is not None else torch.zeros((), dtype=torch.int64, device=skip.device)
        skip_now, acted, nonfinite_run = torch.stack([skip.to(torch.float64), act.to(torch.float64),
                                                      run.to(skip.device, torch.float64)]).tolist()  # ONE read
        step = report.step + 1
        if acted and self.action is SpikeAction.ROLLBACK:
            self._rollback(step, model, optimizer)
        elif acted and self.action is SpikeAction.STOP:
            self.stop(f"loss spike at step {step} and spike_action='stop'. Resume from the last checkpoint with a "
                      f"lower learning rate, or use spike_action 'tighten', 'skip' or 'rollback'.", step, state)
        elif not skip_now and self.snapshot is not None and self.snapshot.due(step):
            self.snapshot.take(step, model.parameters(), optimizer)
        self.check_nonfinite_run(int(nonfinite_run), step, state)
        if self.gate is not None:
            self.gate.arm(coef=report.optimizer_coef, skip=skip, skip_now=bool(skip_now))

    def _rollback(self, step: int, model: Any, optimizer: Any) -> None:
        if self.snapshot is None or self.snapshot.step is None:
            logger.warning("gradclip: step %d: no snapshot yet to roll back to; the update is skipped.", step)
            return
        back_to = self.snapshot.restore(model.parameters(), optimizer)
        self.rollbacks += 1
        logger.warning("gradclip: step %d: rolled back the weights and optimizer state to before step %d (the "
                       "learning rate stays the scheduler's); update skipped.", step, back_to)

    def nonfinite_run_tensors(self) -> dict[str, Tensor]:
        """The longest run of non-finite steps since the last read (for the logging transfer); resets it."""
        if self._worst is None:
            return {}
        worst = torch.maximum(self._worst, self._run)
        self._worst = self._run.clone()
        return {"nonfinite_run": worst}

    def check_nonfinite_run(self, run: int, step: int, state: Any) -> None:
        if run >= self.nonfinite_limit and self.stop_reason is None:
            self.stop(f"{run} consecutive steps with non-finite gradients (the limit is "
                      f"clip_nonfinite_max_consecutive={self.nonfinite_limit}): lower the learning rate, check the "
                      f"data, or use bf16/fp32 instead of fp16.", step, state)

    def stop(self, reason: str, step: int, state: Any) -> None:
        """Record the reason (log, ``trainer_state.json``); the callback ends training at its next event."""
        self.stop_reason = f"{self.owner} stopped training at step {step}: {reason}"
        logger.error("gradclip: %s", self.stop_reason)
        if state is not None:
            state.log_history.append({"step": step, "gradclip/stop_reason": self.stop_reason})
