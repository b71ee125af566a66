"""Loss-spike detection and the threshold controller, as device tensors.

:class:`SpikeDetector` keeps robust running statistics of a scalar (the step loss, or the gradient norm)
and flags a step whose value is far above its baseline. :class:`SpikeController` runs one detector on the
loss and one on the gradient norm, and turns spikes into a threshold factor: on a spike the factor drops at
once (``factor *= spike_factor``, down to ``min_factor``), then relaxes back to 1 with a half-life while the
loss stays calm. The factor multiplies the threshold of any strategy (``GradClipper.clip_(..., factor=...)``),
so the spike step itself is clipped harder.

Non-finite values are not spikes: they never enter the statistics and never move the factor (the
gradient clipper's non-finite guard owns them).

Nothing here leaves the device: decisions are tensors, events go to a ring buffer read at logging steps
(:meth:`SpikeController.read_events`). Under ``torch.distributed``, the step loss and its non-finite flag are
all-reduced once per step (mean and max), so every rank decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import MAX_WINDOW, StateError, check_choice, check_int, check_number, state_field
from ._state import DeviceState, EventLog
from .detectors import SpikeDetector, SpikeMethod

__all__ = ["SpikeMethod", "SpikeAction", "SpikeDetector", "SpikeController", "LossPhase", "SpikeDecision",
           "SpikeEvent", "reduce_loss"]


class SpikeAction(str, Enum):
    """What a spike does besides tightening the threshold.

    - ``tighten``: only tighten the threshold.
    - ``skip``: no optimizer update for the spike step.
    - ``rollback``: restore weights and optimizer state from the last in-memory snapshot (one host read per step).
    - ``stop``: end training with the reason in the logs (one host read per step).
    """

    TIGHTEN = "tighten"
    SKIP = "skip"
    ROLLBACK = "rollback"
    STOP = "stop"


@dataclass
class LossPhase:
    """What :meth:`SpikeController.observe_loss` found before the norm is known; 0-dim device tensors.

    Attributes:
        step: optimizer steps done before this one.
        loss: the step loss used (mean over ranks; NaN when none was given).
        spike / z / baseline: the loss detector's flag, z-score and baseline (NaN: not measured).
        factor_before: the factor before this step; factor: this step's factor as far as the loss tells.
    """

    step: int
    loss: Tensor
    spike: Tensor
    z: Tensor
    baseline: Tensor
    factor_before: Tensor
    factor: Tensor


@dataclass
class SpikeDecision:
    """The controller's output for one step; all 0-dim device tensors.

    Attributes:
        spike: a loss spike or a gradient-norm spike.
        loss_spike / norm_spike: which detector fired.
        factor: threshold multiplier for this step (already tightened if ``spike``).
        loss: the step loss used (mean over ranks; NaN when none was given).
        loss_z / norm_z: z-scores; loss_baseline / norm_baseline: the baselines (NaN: not measured).
        act: ``spike`` when the action is not ``tighten`` (skip, rollback or stop this step), else False.
    """

    spike: Tensor
    loss_spike: Tensor
    norm_spike: Tensor
    factor: Tensor
    loss: Tensor
    loss_z: Tensor
    loss_baseline: Tensor
    norm_z: Tensor
    norm_baseline: Tensor
    act: Tensor


_EVENT_FIELDS = ("step", "loss", "loss_baseline", "loss_z", "norm", "norm_baseline", "norm_z",
                 "factor_before", "factor_after", "loss_spike", "norm_spike")


def _value(value: float) -> float | None:
    return None if value is None or math.isnan(value) else value


@dataclass(frozen=True)
class SpikeEvent:
    """One spike, read back at a logging step. ``step`` is the optimizer step's number counted from 1 (the
    Trainer's ``train/global_step`` of the log that includes it); a ``None`` value was not measured."""

    step: int
    loss: float | None
    loss_baseline: float | None
    loss_z: float | None
    norm: float | None
    norm_baseline: float | None
    norm_z: float | None
    factor_before: float
    factor_after: float
    loss_spike: bool
    norm_spike: bool

    @classmethod
    def from_row(cls, row: dict[str, float]) -> "SpikeEvent":
        values = {k: _value(row[k]) for k in _EVENT_FIELDS}
        values.update(step=int(row["step"]), loss_spike=bool(row["loss_spike"]), norm_spike=bool(row["norm_spike"]))
        return cls(**values)

    @property
    def kind(self) -> str:
        """``"loss"``, ``"norm"`` or ``"loss+norm"``: which detector fired."""
        return "+".join(k for k, fired in (("loss", self.loss_spike), ("norm", self.norm_spike)) if fired) or "loss"

    def describe(self, base_threshold: float | None = None, action: str = "tighten") -> str:
        """``"step 121: loss 7.9 is 6.1 sigma above its mean 2.3; clip threshold 1 -> 0.5; update skipped"``.

        ``base_threshold`` is the threshold before the spike factor (strategy times schedule)."""
        if self.loss_spike:
            what = f"loss {self.loss:.4g} is {self.loss_z:.1f} sigma above its mean {self.loss_baseline:.4g}"
        else:
            loss = "" if self.loss is None else f" (loss {self.loss:.4g})"
            what = f"gradient norm {self.norm:.4g} is {self.norm_z:.1f} sigma above its mean {self.norm_baseline:.4g}{loss}"
        what_moves, scale = ("clip factor", 1.0) if base_threshold is None else ("clip threshold", base_threshold)
        before, after = scale * self.factor_before, scale * self.factor_after
        change = f"{what_moves} {before:.4g}" + (" (unchanged)" if before == after else f" -> {after:.4g}")
        return f"step {self.step}: {what}; {change}; {ACTION_WORDS[action]}"


ACTION_WORDS = {"tighten": "threshold tightened, update applied", "skip": "update skipped",
                "rollback": "rolled back to the last snapshot, update skipped", "stop": "training stopped"}


def reduce_loss(loss: Tensor) -> Tensor:
    """The mean of ``loss`` over the ranks of ``torch.distributed`` (NaN if any rank's is non-finite), in one
    collective and no host sync; ``loss`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return loss
    packed = torch.stack([torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
                          (~torch.isfinite(loss)).to(loss.dtype)])
    dist.all_reduce(packed)  # one collective: sum of losses, count of non-finite ranks
    mean = packed[0] / dist.get_world_size()
    return torch.where(packed[1] > 0, torch.full_like(mean, math.nan), mean)


class SpikeController(DeviceState):
    """Detects loss and gradient-norm spikes and sets the clip-threshold factor.

    Per step, in two phases: ``phase = controller.observe_loss(loss, step, device)`` once the step loss is known,
    then ``decision = controller.decide(phase, norm)`` once the pre-clip norm is; clip with
    ``factor=decision.factor`` and ``observe=~decision.spike`` (spikes stay out of the strategy's statistics). On a spike the factor becomes
    ``max(factor * spike_factor, min_factor)`` (repeated spikes tighten further, down to the floor); on calm
    steps it relaxes towards 1 as ``1 - (1 - factor) * 0.5 ** (1 / relax_half_life)``. ``spike_factor=1``
    never tightens (with ``action="skip"``: skip the spike step and change nothing else).

    Args:
        detect_loss: run a detector on the step loss.
        detect_norm: run a detector on the pre-clip gradient norm (spikes without a loss spike).
        z: z-score threshold of the loss detector; ``norm_z`` of the norm detector (default ``z``).
        ratio: optional ratio threshold of both detectors.
        warmup_steps: steps before spikes can be flagged.
        method: ``"ema"`` or ``"mad"``; ``alpha`` (ema) and ``window`` (mad) as in :class:`SpikeDetector`.
        action: a :class:`SpikeAction` value.
        spike_factor: multiplier of the factor on a spike, in ``(0, 1]``.
        relax_half_life: steps for the factor's distance to 1 to halve while calm, ``> 0``.
        min_factor: floor of the factor, in ``(0, 1]``.
        max_events: spike events kept on the device between two reads.
        adapt_after: consecutive spikes after which the detectors take values in again (:class:`SpikeDetector`).
        reduce: all-reduce the loss across ranks when ``torch.distributed`` is initialized.
    """

    def __init__(self, *, detect_loss: bool = True, detect_norm: bool = True, z: float = 6.0,
                 norm_z: float | None = None, ratio: float | None = None, warmup_steps: int = 20,
                 method: str = "ema", alpha: float = 0.9, window: int = 100, action: str = "tighten",
                 spike_factor: float = 0.5, relax_half_life: float = 20.0, min_factor: float = 0.05,
                 max_events: int = 256, reduce: bool = True, adapt_after: int = 10):
        if not (detect_loss or detect_norm):
            raise ValueError("SpikeController needs `detect_loss` or `detect_norm` (both are False).")
        self.action = check_choice("action", action, SpikeAction)
        self.spike_factor = check_number("spike_factor", spike_factor, low=0.0, high=1.0, low_inclusive=False)
        self.relax_half_life = check_number("relax_half_life", relax_half_life, low=0.0, low_inclusive=False)
        self.min_factor = check_number("min_factor", min_factor, low=0.0, high=1.0, low_inclusive=False)
        self.max_events = check_int("max_events", max_events, low=1, high=MAX_WINDOW)
        self.reduce = bool(reduce)
        common = {"ratio": ratio, "warmup_steps": warmup_steps, "method": method, "alpha": alpha, "window": window,
                  "adapt_after": adapt_after}
        self.loss_detector = SpikeDetector(z=z, **common) if detect_loss else None
        self.norm_detector = SpikeDetector(z=z if norm_z is None else norm_z, **common) if detect_norm else None
        self.events = EventLog(_EVENT_FIELDS, self.max_events)
        self._relax = 0.5 ** (1.0 / self.relax_half_life)

    # ------------------------------------------------------------------ state
    def _fresh(self, device, dtype):
        return {"factor": torch.ones((), dtype=dtype, device=device)}

    def _fill(self, t, state):
        t["factor"].fill_(state_field(state, "factor", check_number, low=self.min_factor, high=1.0))
        self.events.reset(state_field(state, "spikes", check_int, low=0))

    def _export(self, t):
        return {"factor": float(t["factor"].item()), "spikes": self.events.total()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: factor, spike count, both detectors (events are not kept)."""
        base = super().state_dict() or {"factor": 1.0, "spikes": self.events.total()}
        base["loss_detector"] = self.loss_detector.state_dict() if self.loss_detector else {}
        base["norm_detector"] = self.norm_detector.state_dict() if self.norm_detector else {}
        return base

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output; every field is checked (``StateError`` naming it)."""
        state = dict(state or {})
        for name in ("loss_detector", "norm_detector"):
            detector = getattr(self, name)
            if detector is not None:
                try:
                    detector.load_state_dict(state.pop(name, None))
                except StateError as error:
                    raise error.within(name) from None
            else:
                state.pop(name, None)
        self.events.reset(0)
        super().load_state_dict(state)

    # ------------------------------------------------------------------ the step, in two phases
    def _detect(self, detector: SpikeDetector | None, value: Tensor | None,
                device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if detector is None or value is None:
            nan = torch.full((), math.nan, dtype=torch.float64)
            return torch.zeros((), dtype=torch.bool, device=device), nan.to(device), nan.to(device)
        return tuple(v.to(device) for v in detector.update(value))

    def _tighten(self, factor: Tensor) -> Tensor:
        return (factor * self.spike_factor).clamp(min=self.min_factor)

    @torch.no_grad()
    def observe_loss(self, loss: Tensor | None, step: int, device: torch.device | str) -> LossPhase:
        """Phase 1, once the step loss is known: the loss detector decides, and the factor this step gets as far
        as the loss tells (tightened on a loss spike, else relaxed towards 1) is in force from now on.

        ``loss``: the step loss (mean over micro-batches; averaged over ranks here, one collective), or ``None``
        (only the norm detector runs); ``step``: optimizer steps done before this one (events record
        ``step + 1``); ``device``: where the statistics live (the gradients' device)."""
        t = self._device_state(torch.device(device))
        dtype, before = t["factor"].dtype, t["factor"]
        device = before.device
        loss_x = None if loss is None else loss.detach().to(device=device, dtype=dtype)
        if loss_x is not None and self.reduce:
            loss_x = reduce_loss(loss_x)
        spike, z, baseline = self._detect(self.loss_detector, loss_x, device)
        factor = torch.where(spike, self._tighten(before), 1.0 - (1.0 - before) * self._relax)
        t["factor"] = factor.clone()
        shown = torch.full((), math.nan, dtype=dtype, device=device) if loss_x is None else loss_x
        return LossPhase(step, shown, spike, z, baseline, before, factor)

    @torch.no_grad()
    def decide(self, phase: LossPhase, norm: Tensor, *, factor_applied: bool = False) -> SpikeDecision:
        """Phase 2, once the pre-clip ``norm`` is known: the norm detector decides, the spike event is recorded
        and the factor settles. A norm spike (without a loss spike) tightens the factor in force when it is
        found: the one before this step when the step is still to be clipped (:meth:`GradClipper.clip_`: this
        step is clipped at it), the one the step was clipped at when an optimizer clipped already
        (``factor_applied``, :class:`~gradclip_hf.core.external.ExternalClip`: it acts from the next step on).

        The factor rule, once: on a spike ``max(factor * spike_factor, min_factor)``, on a calm step
        ``1 - (1 - factor) * 0.5 ** (1 / relax_half_life)``."""
        t = self._device_state(phase.factor.device)
        dtype, device = t["factor"].dtype, phase.factor.device
        norm_x = norm.detach().to(device=device, dtype=dtype)
        norm_spike, norm_z, norm_base = self._detect(self.norm_detector, norm_x, device)
        base = phase.factor if factor_applied else phase.factor_before
        after = torch.where(norm_spike & ~phase.spike, self._tighten(base), phase.factor)
        spike = phase.spike | norm_spike
        self.events.record([torch.full((), float(phase.step + 1), dtype=dtype, device=device), phase.loss,
                            phase.baseline, phase.z, norm_x, norm_base, norm_z, phase.factor_before, after,
                            phase.spike, norm_spike], spike)
        t["factor"] = after.clone()
        act = spike if self.action is not SpikeAction.TIGHTEN else torch.zeros_like(spike)
        return SpikeDecision(spike=spike, loss_spike=phase.spike, norm_spike=norm_spike, factor=after,
                             loss=phase.loss, loss_z=phase.z, loss_baseline=phase.baseline, norm_z=norm_z,
                             norm_baseline=norm_base, act=act)

    def current_factor(self, device: torch.device | str) -> Tensor:
        """The factor in force (a device tensor), made on ``device`` if no step ran yet (after a resume: the
        checkpoint's)."""
        return self._device_state(torch.device(device))["factor"]

    @property
    def factor(self) -> Tensor | None:
        """The current threshold factor (device tensor), ``None`` before the first step."""
        return None if self._tensors is None else self._tensors["factor"]

    def read_events(self, since: int) -> tuple[list[SpikeEvent], int]:
        """``(events, total)``: the spikes numbered ``since`` and later (``since`` is the ``total`` a previous
        call returned, 0 at first), at most ``max_events`` of them (the newest), and the number of spikes so
        far. ``total - since - len(events)`` spikes were overwritten before this read. One transfer."""
        return self.parse_events(self.events.read(since))

    @staticmethod
    def parse_events(read: tuple[list[dict[str, float]], int]) -> tuple[list[SpikeEvent], int]:
        """``(events, total)`` from an ``EventLog`` read of :attr:`events` (rows and total)."""
        rows, total = read
        return [SpikeEvent.from_row(row) for row in rows], total
