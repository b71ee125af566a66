"""What one step's decision does beyond clipping: roll back, stop, watch the run; and whether the decision must be
on the host.

The skip itself goes to the step backend (:mod:`.backends`: the optimizer gate on the local path). Host reads:
none per step for ``tighten``/``skip``/``nonfinite="skip"`` on fused optimizers (the decision travels as a
device tensor) and for listed steps (``skip_steps``: known on the host); one stacked read per step for
``rollback``/``stop`` and for skips where the backend needs the decision on the host (other optimizers). The watchdogs (consecutive
non-finite steps, ``loss_cap``) count on the device and are checked wherever a flag is read: every step on
the paths above that read one, else at logging steps.

Under an fp16 ``GradScaler`` the scaler skips overflow steps itself, and each one halves the loss scale: a
few in a row while it finds its scale, one now and then when it tries a larger one, are its normal work. The
non-finite watchdog counts the overflow steps in a row taken at a loss scale of 1 or below (where no scaling
is left to explain them: the gradients are not finite unscaled), and stops at ``nonfinite_max_consecutive``
of them; DeepSpeed's fp16 loss scaler stops a run at its ``min_loss_scale`` (1 by default) itself.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..config import ClipConfig
from ..core import ClipReport, GradClipper, SpikeAction
from ..core._checks import check_int, state_field
from ..core.spikes import reduce_loss
from .backends import StepBackend
from .messages import logger

__all__ = ["StepActions"]


class _Runs:
    """Device counters of consecutive steps where a condition held (current run, longest since the read); the
    current run is saved with checkpoints (:meth:`length`) and goes on after a resume (:meth:`resume`)."""

    def __init__(self) -> None:
        self.current: Tensor | None = None
        self.worst: Tensor | None = None
        self._resumed = 0  # the run a checkpoint saved, until the first step puts it on the device

    def add(self, condition: Tensor) -> None:
        if self.current is None:
            self.current = torch.full((), self._resumed, dtype=torch.int64, device=condition.device)
            self.worst = self.current.clone()
        self.current = torch.where(condition, self.current + 1, torch.zeros_like(self.current))
        torch.maximum(self.worst, self.current, out=self.worst)

    def take_worst(self) -> Tensor | None:
        """The longest run since the last call (a device tensor), then restart from the current run."""
        if self.worst is None:
            return None
        worst, self.worst = self.worst, self.current.clone()
        return worst

    def length(self) -> int:
        """The current run (one host read: at checkpoint saves)."""
        return self._resumed if self.current is None else int(self.current.item())

    def resume(self, length: int) -> None:
        self._resumed, self.current, self.worst = length, None, None


class StepActions:
    """Per-run: carries out rollbacks, stops and the watchdogs, and reads the decision where it must.

    Args:
        clipper: the run's clipper (its spike action); config: the options.
        backend: the run's step backend (:mod:`.backends`): its non-finite guard, its loss scaler, whether it
            needs the decision on the host, the optimizer a rollback restores.
        owner: name in messages.
    """

    def __init__(self, clipper: GradClipper, config: ClipConfig, backend: StepBackend, owner: str):
        self.clipper, self.backend, self.owner = clipper, backend, owner
        spikes = clipper.spikes
        self.action = spikes.action if spikes is not None else SpikeAction.TIGHTEN
        self.guard = backend.guard
        self.loss_scale = backend.loss_scale if backend.scaler else None
        self.nonfinite_limit = config.nonfinite_max_consecutive
        self.loss_cap, self.loss_cap_patience = config.loss_cap, config.loss_cap_patience
        self.snapshot = backend.snapshot(config.spike_snapshot_every) if self.action is SpikeAction.ROLLBACK else None
        self.listed = config.steps_to_skip()
        self.stop_reason: str | None = None
        self.stop_step: int | None = None
        self.stop_kind: str | None = None  # "spike", "nonfinite" or "loss_cap"
        self.rollbacks = 0
        self.nonfinite_runs, self.loss_runs = _Runs(), _Runs()

    @property
    def reads_every_step(self) -> bool:
        """Whether a flag leaves the device at every step (rollback, stop, or a skip the backend needs on the
        host)."""
        acting = self.action in (SpikeAction.ROLLBACK, SpikeAction.STOP)
        can_skip = self.guard or self.action is SpikeAction.SKIP
        return acting or (can_skip and self.backend.host_decision)

    def state_dict(self) -> dict[str, int]:
        """The watchdogs' current runs (consecutive non-finite steps, steps above ``loss_cap``), JSON-safe."""
        return {"nonfinite_run": self.nonfinite_runs.length(), "loss_cap_run": self.loss_runs.length()}

    def load_state_dict(self, state: Any) -> None:
        """Go on counting from :meth:`state_dict`'s runs (every field checked: ``StateError`` naming it)."""
        runs = {key: state_field(state, key, check_int, low=0, high=2**53) for key in ("nonfinite_run", "loss_cap_run")}
        self.nonfinite_runs.resume(runs["nonfinite_run"])
        self.loss_runs.resume(runs["loss_cap_run"])

    def _watch(self, report: ClipReport, loss: Tensor | None) -> None:
        if self.guard:
            self.nonfinite_runs.add(report.nonfinite)
        elif self.loss_scale is not None:  # fp16: the scaler's overflow skips count once its scale is down to 1
            scale = self.loss_scale()
            if scale is not None:
                self.nonfinite_runs.add(report.nonfinite & (scale.reshape(-1)[0].to(report.nonfinite.device) <= 1))
        if self.loss_cap is not None and loss is not None:
            if report.gate is not None:  # the kept micro-batches' loss, the same on every rank (NaN: none kept)
                loss = report.gate.loss
            else:
                loss = report.spike.loss if report.spike is not None else reduce_loss(loss.detach().float())
            loss = loss.to(report.norm.device)
            self.loss_runs.add(~torch.isfinite(loss) | (loss > self.loss_cap))

    def after_decision(self, report: ClipReport, skip: Tensor, loss: Tensor | None, model: Any, listed: bool) -> bool:
        """Watch the step; read its flags and act (roll back, stop, snapshot) where this configuration needs
        it. Returns the decision on the host where it was read (a listed step: ``True``), else ``False``."""
        self._watch(report, loss)
        if listed:  # said once at train begin (skiplists.check_start) and in the spike messages
            return True
        if not self.reads_every_step:
            return False
        step = report.step + 1
        act = report.spike.act if report.spike is not None else torch.zeros_like(skip)
        named = {"skip": skip, "act": act, **self.watch_tensors()}
        values = dict(zip(named, torch.stack([v.to(skip.device, torch.float64) for v in named.values()]).tolist()))
        if values["act"] and self.action is SpikeAction.ROLLBACK:
            self._rollback(step, model, self.backend.optimizer)
        elif values["act"] and self.action is SpikeAction.STOP:
            self.stop(f"loss spike at step {step} and spike_action='stop'. Resume from the last checkpoint with a "
                      f"lower learning rate, or use clip_spike_action 'tighten', 'skip' or 'rollback'.", step, "spike")
        elif not values["skip"] and self.snapshot is not None and self.snapshot.due(step):
            self.snapshot.take(step, model.parameters(), self.backend.optimizer)
        self.check_watch(values, step)
        return bool(values["skip"])

    def _rollback(self, step: int, model: Any, optimizer: Any) -> None:
        if self.snapshot is None or self.snapshot.step is None:
            logger.warning("gradclip: step %d: no snapshot yet to roll back to; update skipped.", step)
            return
        back_to = self.snapshot.restore(model.parameters(), optimizer)
        self.rollbacks += 1
        logger.warning("gradclip: step %d: rolled back the weights and optimizer state to before step %d (the "
                       "learning rate stays the scheduler's); update skipped.", step, back_to)

    def watch_tensors(self) -> dict[str, Tensor]:
        """The watchdogs' longest runs since the last read (for a transfer); restarts them."""
        runs = {"nonfinite_run": self.nonfinite_runs.take_worst(), "loss_cap_run": self.loss_runs.take_worst()}
        return {k: v for k, v in runs.items() if v is not None}

    def check_watch(self, values: dict[str, Any], step: int) -> None:
        """Stop when a watchdog's run reached its limit (``values`` from :meth:`watch_tensors`, on the host)."""
        if self.stop_reason is not None:
            return
        nonfinite = int(_first(values.get("nonfinite_run", 0)))
        over = int(_first(values.get("loss_cap_run", 0)))
        if nonfinite >= self.nonfinite_limit:
            what = ("fp16 overflow steps at a loss scale of 1 or below (the GradScaler skipped them, and no scaling "
                    "is left to explain them)" if self.loss_scale is not None else "steps with non-finite gradients")
            self.stop(f"{nonfinite} consecutive {what} (the limit is clip_nonfinite_max_consecutive="
                      f"{self.nonfinite_limit}): lower the learning rate, check the data, or use bf16/fp32 instead of "
                      f"fp16.", step, "nonfinite")
        elif self.loss_cap is not None and over >= self.loss_cap_patience:
            self.stop(f"the loss stayed above clip_loss_cap={self.loss_cap:g} (or was NaN/Inf) for {over} steps in a "
                      f"row (clip_loss_cap_patience={self.loss_cap_patience}). Resume from a checkpoint before the divergence "
                      f"with a lower learning rate, and look at gradclip_spikes.jsonl for the batches.", step, "loss_cap")

    def stop(self, reason: str, step: int, kind: str) -> None:
        """Record the reason (logged now; the run writes it to the log row of this step, the checkpoint it asks
        for and the spike file); the callback ends training at its next event."""
        self.stop_reason = f"{self.owner} stopped training at step {step}: {reason}"
        self.stop_step, self.stop_kind = step, kind
        logger.error("gradclip: %s", self.stop_reason)


def _first(value: Any) -> float:
    value = value[0] if isinstance(value, list) else value
    return value if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)) else 0
