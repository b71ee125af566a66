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

from ._checks import MAX_WINDOW, OptionError, StateError, check_choice, check_int, check_number, state_field
from ._state import DeviceState, EventLog
from .detectors import SpikeDetector, SpikeMethod
from .gate import GateStep, MicroBatchGate

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
        spike / z / baseline: the loss detector's flag, z-score and baseline (NaN: not measured); with a
            micro-batch gate, the z-score and baseline of the worst dropped micro-batch where only micro-batches
            spiked (and ``loss`` its loss).
        factor_before: the factor before this step; factor: this step's factor as far as the loss tells.
        gate: the micro-batch gate's step (``None`` without one).
    """

    step: int
    loss: Tensor
    spike: Tensor
    z: Tensor
    baseline: Tensor
    factor_before: Tensor
    factor: Tensor
    gate: GateStep | None = None

    @property
    def dropped(self) -> Tensor:
        """Micro-batches the gate dropped in this step (float, 0 without a gate)."""
        return self.gate.dropped.to(self.spike.device) if self.gate is not None else torch.zeros_like(self.z)


@dataclass
class SpikeDecision:
    """The controller's output for one step; all 0-dim device tensors.

    Attributes:
        spike: a loss spike or a gradient-norm spike.
        loss_spike / norm_spike: which detector fired.
        factor: threshold multiplier for this step (already tightened if ``spike``).
        loss: the step loss used (mean over ranks; NaN when none was given).
        loss_z / norm_z: z-scores; loss_baseline / norm_baseline: the baselines (NaN: not measured).
        act: a spike of the step (``loss_spike`` or ``norm_spike``) when the action is not ``tighten`` (skip,
            roll back or stop this step), else False. A dropped micro-batch is a ``spike`` but not an ``act``:
            the micro-batch gate acted on it already.
        dropped: micro-batches the gate dropped in this step (float, over every process; 0 without a gate).
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
    dropped: Tensor | None = None


_EVENT_FIELDS = ("step", "loss", "loss_baseline", "loss_z", "norm", "norm_baseline", "norm_z",
                 "factor_before", "factor_after", "loss_spike", "norm_spike", "dropped", "micro_batches")


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
    dropped: int = 0
    micro_batches: int = 0

    @classmethod
    def from_row(cls, row: dict[str, float]) -> "SpikeEvent":
        values = {k: _value(row[k]) for k in _EVENT_FIELDS}
        values.update(step=int(row["step"]), loss_spike=bool(row["loss_spike"]), norm_spike=bool(row["norm_spike"]),
                      dropped=int(values["dropped"] or 0), micro_batches=int(values["micro_batches"] or 0))
        return cls(**values)

    @property
    def kind(self) -> str:
        """``"loss"``, ``"norm"`` or ``"loss+norm"``: which detector fired (``"loss"`` for dropped micro-batches)."""
        return "+".join(k for k, fired in (("loss", self.loss_spike), ("norm", self.norm_spike)) if fired) or "loss"

    @property
    def outcome(self) -> str | None:
        """``"drop"``: only micro-batches spiked and some were kept (the update was made of them); ``"skip"``:
        the micro-batch gate dropped every one; ``None``: the spike action applies."""
        if not self.dropped or self.loss_spike or self.norm_spike:
            return None
        return "skip" if self.micro_batches and self.dropped >= self.micro_batches else "drop"

    def describe(self, base_threshold: float | None = None, action: str = "tighten") -> str:
        """``"step 121: loss 7.9 is 6.1 sigma above its mean 2.3; clip threshold 1 -> 0.5; update skipped"``.

        ``base_threshold`` is the threshold before the spike factor (strategy times schedule)."""
        loss = "" if self.loss is None else f"{self.loss:.4g}"
        if self.outcome is not None:
            z = "" if self.loss_z is None else f" is {self.loss_z:.1f} sigma above its mean {self.loss_baseline:.4g}"
            what = (f"micro-batch loss {loss}{z} ({self.dropped} of {self.micro_batches} micro-batches dropped)"
                    if loss else f"{self.dropped} of {self.micro_batches} micro-batches dropped")
        elif self.loss_spike:
            what = f"loss {loss} is {self.loss_z:.1f} sigma above its mean {self.loss_baseline:.4g}"
        else:
            loss = f" (loss {loss})" if loss else ""
            what = f"gradient norm {self.norm:.4g} is {self.norm_z:.1f} sigma above its mean {self.norm_baseline:.4g}{loss}"
        what_moves, scale = ("clip factor", 1.0) if base_threshold is None else ("clip threshold", base_threshold)
        before, after = scale * self.factor_before, scale * self.factor_after
        change = f"{what_moves} {before:.4g}" + (" (unchanged)" if before == after else f" -> {after:.4g}")
        return f"step {self.step}: {what}; {change}; {ACTION_WORDS[self.outcome or action]}"


ACTION_WORDS = {"tighten": "threshold tightened, update applied", "skip": "update skipped",
                "rollback": "rolled back to the last snapshot, update skipped", "stop": "training stopped",
                "drop": "micro-batch dropped before its backward, update made of the kept ones"}


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


def per_micro_batch(common: dict[str, Any], micro_batches: int) -> dict[str, Any]:
    """A step detector's settings (``ratio``, ``warmup_steps``, ``method``, ``alpha``, ``window``,
    ``adapt_after``) for a detector that sees ``micro_batches`` values per step: its warmup, EMA memory, MAD
    window and ``adapt_after`` span the same number of steps (capped at the longest window)."""
    m = micro_batches
    return {**common, "warmup_steps": min(common["warmup_steps"] * m, MAX_WINDOW),
            "alpha": common["alpha"] ** (1.0 / m), "window": min(common["window"] * m, MAX_WINDOW),
            "adapt_after": common["adapt_after"] * m}


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
        micro_batches: turn on the micro-batch gate (:attr:`gate`, a :class:`~.gate.MicroBatchGate`) for steps of
            this many micro-batches: its detector has the loss detector's settings with its time constants
            (warmup, EMA memory, MAD window, ``adapt_after``) counted in steps of that many micro-batches;
            ``None``: no gate (a loss spike is the step's).
        early: the loss detectors' early-training rule (:class:`SpikeDetector`, ``early``); not the norm's.
    """

    def __init__(self, *, detect_loss: bool = True, detect_norm: bool = True, z: float = 6.0,
                 norm_z: float | None = None, ratio: float | None = None, warmup_steps: int = 20,
                 method: str = "ema", alpha: float = 0.9, window: int = 100, action: str = "tighten",
                 spike_factor: float = 0.5, relax_half_life: float = 20.0, min_factor: float = 0.05,
                 max_events: int = 256, reduce: bool = True, adapt_after: int = 10,
                 micro_batches: int | None = None, early: bool = True):
        if not (detect_loss or detect_norm):
            raise ValueError("SpikeController needs `detect_loss` or `detect_norm` (both are False).")
        if micro_batches is not None and not detect_loss:
            raise OptionError("micro_batches", micro_batches, "None without `detect_loss` (the micro-batch gate "
                              "judges losses)")
        self.action = check_choice("action", action, SpikeAction)
        self.spike_factor = check_number("spike_factor", spike_factor, low=0.0, high=1.0, low_inclusive=False)
        self.relax_half_life = check_number("relax_half_life", relax_half_life, low=0.0, low_inclusive=False)
        self.min_factor = check_number("min_factor", min_factor, low=0.0, high=1.0, low_inclusive=False)
        self.max_events = check_int("max_events", max_events, low=1, high=MAX_WINDOW)
        self.reduce = bool(reduce)
        common = {"ratio": ratio, "warmup_steps": warmup_steps, "method": method, "alpha": alpha, "window": window,
                  "adapt_after": adapt_after}
        self.loss_detector = SpikeDetector(z=z, early=early, **common) if detect_loss else None
        self.norm_detector = SpikeDetector(z=z if norm_z is None else norm_z, **common) if detect_norm else None
        self.gate = None if micro_batches is None else MicroBatchGate(
            SpikeDetector(z=z, early=early, **per_micro_batch(common, check_int("micro_batches", micro_batches, low=1))),
            reduce=self.reduce)
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
        """JSON-safe state: factor, spike count, the detectors (the micro-batch gate's with a gate; events are not
        kept). A state saved without a gate's detector loads with fresh micro-batch statistics."""
        base = super().state_dict() or {"factor": 1.0, "spikes": self.events.total()}
        base["loss_detector"] = self.loss_detector.state_dict() if self.loss_detector else {}
        base["norm_detector"] = self.norm_detector.state_dict() if self.norm_detector else {}
        if self.gate is not None:
            base["micro_batch_detector"] = self.gate.state_dict()
        return base

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict`'s output; every field is checked (``StateError`` naming it)."""
        state = dict(state or {})
        for name in ("loss_detector", "norm_detector", "micro_batch_detector"):
            detector = self.gate if name == "micro_batch_detector" else getattr(self, name)
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
    def observe_loss(self, loss: Tensor | None, step: int, device: torch.device | str,
                     gate: GateStep | None = None) -> LossPhase:
        """Phase 1, once the step loss is known: the loss detector decides, and the factor this step gets as far
        as the loss tells (tightened on a loss spike or a dropped micro-batch, else relaxed towards 1) is in
        force from now on.

        ``loss``: the step loss (mean over micro-batches; averaged over ranks here, one collective), or ``None``
        (only the norm detector runs); ``step``: optimizer steps done before this one (events record
        ``step + 1``); ``device``: where the statistics live (the gradients' device); ``gate``: the micro-batch
        gate's step (:meth:`~.gate.MicroBatchGate.close`): then the loss detector judges the mean loss of the
        kept micro-batches (already over every rank), and ``loss`` is not used."""
        t = self._device_state(torch.device(device))
        dtype, before = t["factor"].dtype, t["factor"]
        device = before.device
        if gate is not None:
            loss_x = gate.loss.to(device=device, dtype=dtype)
        else:
            loss_x = None if loss is None else loss.detach().to(device=device, dtype=dtype)
            if loss_x is not None and self.reduce:
                loss_x = reduce_loss(loss_x)
        spike, z, baseline = self._detect(self.loss_detector, loss_x, device)
        shown = torch.full((), math.nan, dtype=dtype, device=device) if loss_x is None else loss_x
        hit = spike
        if gate is not None:  # a step whose only spikes were dropped micro-batches shows the worst of them
            dropped = gate.dropped.to(device) > 0
            only = dropped & ~spike
            shown, z, baseline = (torch.where(only, mine.to(device=device, dtype=dtype), step_value) for mine, step_value
                                  in ((gate.worst_loss, shown), (gate.worst_z, z), (gate.worst_baseline, baseline)))
            hit = spike | dropped
        factor = torch.where(hit, self._tighten(before), 1.0 - (1.0 - before) * self._relax)
        t["factor"] = factor.clone()
        return LossPhase(step, shown, spike, z, baseline, before, factor, gate)

    @torch.no_grad()
    def decide(self, phase: LossPhase, norm: Tensor, *, factor_applied: bool = False) -> SpikeDecision:
        """Phase 2, once the pre-clip ``norm`` is known: the norm detector decides, the spike event is recorded
        and the factor settles. A norm spike (without a loss spike) tightens the factor in force when it is
        found: the one before this step when the step is still to be clipped (:meth:`GradClipper.clip_`: this
        step is clipped at it), the one the step was clipped at when an optimizer clipped already
        (``factor_applied``, :class:`~gradclip_hf.core.external.ExternalClip`: it acts from the next step on).
        A step whose micro-batches were all dropped has no gradient to judge: its norm is not observed.

        The factor rule, once: on a spike ``max(factor * spike_factor, min_factor)``, on a calm step
        ``1 - (1 - factor) * 0.5 ** (1 / relax_half_life)``."""
        t = self._device_state(phase.factor.device)
        dtype, device = t["factor"].dtype, phase.factor.device
        norm_x = norm.detach().to(device=device, dtype=dtype)
        dropped = phase.dropped.to(device=device, dtype=dtype)
        judged = norm_x if phase.gate is None else torch.where(phase.gate.kept.to(device), norm_x, math.nan)
        norm_spike, norm_z, norm_base = self._detect(self.norm_detector, judged, device)
        base = phase.factor if factor_applied else phase.factor_before
        loss_hit = phase.spike | (dropped > 0)
        after = torch.where(norm_spike & ~loss_hit, self._tighten(base), phase.factor)
        spike = loss_hit | norm_spike
        micro_batches = torch.zeros_like(dropped) if phase.gate is None else phase.gate.micro_batches.to(device, dtype)
        self.events.record([torch.full((), float(phase.step + 1), dtype=dtype, device=device), phase.loss,
                            phase.baseline, phase.z, norm_x, norm_base, norm_z, phase.factor_before, after,
                            phase.spike, norm_spike, dropped, micro_batches], spike)
        t["factor"] = after.clone()
        act = phase.spike | norm_spike if self.action is not SpikeAction.TIGHTEN else torch.zeros_like(spike)
        return SpikeDecision(spike=spike, loss_spike=phase.spike, norm_spike=norm_spike, factor=after,
                             loss=phase.loss, loss_z=phase.z, loss_baseline=phase.baseline, norm_z=norm_z,
                             norm_baseline=norm_base, act=act, dropped=dropped)

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
