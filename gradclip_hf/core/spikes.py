"""Loss-spike detection and the threshold controller, as device tensors.

:class:`SpikeDetector` keeps robust running statistics of a scalar (the step loss, or the gradient
norm) and flags a step whose value is far above its baseline. :class:`SpikeController` runs one
detector on the loss and one on the gradient norm, and turns spikes into a threshold factor: on a
spike the factor drops at once (``factor *= spike_factor``, down to ``min_factor``), then relaxes
back to 1 with a half-life while the loss stays calm. The factor multiplies the threshold of any
strategy (``GradClipper.clip_(..., factor=...)``), so the spike step itself is clipped harder.

Nothing here leaves the device: decisions are tensors, events go to a ring buffer that is read at
logging steps (:meth:`SpikeController.read_events`). Under ``torch.distributed``, the step loss and
its non-finite flag are all-reduced once per step (mean and max), so every rank decides the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._checks import check_choice, check_int, check_number

__all__ = ["SpikeMethod", "SpikeAction", "SpikeDetector", "SpikeController", "SpikeDecision", "SpikeEvent"]


class SpikeMethod(str, Enum):
    """Running statistics of a :class:`SpikeDetector`: ``ema`` (EMA mean and variance) or ``mad``
    (median and median absolute deviation of a window, more robust, slightly more work)."""

    EMA = "ema"
    MAD = "mad"


class SpikeAction(str, Enum):
    """What a spike does besides tightening the threshold.

    - ``tighten``: only tighten the threshold (no host sync).
    - ``skip``: no optimizer update for the spike step (one host read per step).
    - ``rollback``: restore weights and optimizer state from the last snapshot (one host read per step).
    - ``stop``: end training with the reason in the logs (one host read per step).
    """

    TIGHTEN = "tighten"
    SKIP = "skip"
    ROLLBACK = "rollback"
    STOP = "stop"


def _stats_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


class SpikeDetector:
    """Flags values far above their running baseline; spikes stay out of the statistics.

    A value is a spike when it is non-finite, or, after ``warmup_steps`` values, when its z-score
    ``(x - baseline) / spread`` exceeds ``z`` or (if ``ratio`` is set) ``x > ratio * baseline``.
    ``spread`` is the running std (``ema``) or ``1.4826 * MAD`` (``mad``), floored at
    ``min_rel_spread * |baseline|`` so that a very flat loss does not make noise look like spikes.
    After ``adapt_after`` spikes in a row the values are taken in again: the level has moved, and
    the detector follows instead of flagging every step from then on.

    Args:
        z: z-score threshold, ``> 0``.
        ratio: optional ratio threshold, ``> 1``.
        warmup_steps: values observed before any spike can be flagged, ``>= 2``.
        method: ``"ema"`` or ``"mad"``.
        alpha: EMA smoothing (``ema``), in ``(0, 1)``.
        window: values kept (``mad``), ``>= warmup_steps``.
        min_rel_spread: floor of the spread relative to the baseline, ``>= 0``.
        adapt_after: consecutive spikes after which values enter the statistics anyway, ``>= 1``.
    """

    def __init__(self, z: float = 6.0, ratio: float | None = None, warmup_steps: int = 20,
                 method: str = "ema", alpha: float = 0.9, window: int = 100, min_rel_spread: float = 0.02,
                 adapt_after: int = 10):
        self.z = check_number("z", z, low=0.0, low_inclusive=False)
        self.ratio = None if ratio is None else check_number("ratio", ratio, low=1.0, low_inclusive=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=2)
        self.method = check_choice("method", method, SpikeMethod)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.window = check_int("window", window, low=2)
        if self.method is SpikeMethod.MAD and self.window < self.warmup_steps:
            raise ValueError(f"`window` ({window}) must be >= `warmup_steps` ({warmup_steps}) with method='mad'.")
        self.min_rel_spread = check_number("min_rel_spread", min_rel_spread, low=0.0)
        self.adapt_after = check_int("adapt_after", adapt_after, low=1)
        self._t: dict[str, Tensor] | None = None
        self._loaded: dict[str, Any] | None = None

    def _fresh(self, device: torch.device) -> dict[str, Tensor]:
        dtype = _stats_dtype(device)
        t = {"count": torch.zeros((), dtype=torch.int64, device=device),
             "run": torch.zeros((), dtype=torch.int64, device=device),  # consecutive spikes
             "mean": torch.zeros((), dtype=dtype, device=device),
             "var": torch.zeros((), dtype=dtype, device=device)}
        if self.method is SpikeMethod.MAD:
            t["ring"] = torch.full((self.window,), math.nan, dtype=dtype, device=device)
        return t

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        if self._t is None:
            self._t = self._fresh(device)
            if self._loaded is not None:
                self._fill(self._t, self._loaded)
                self._loaded = None
        return self._t

    @torch.no_grad()
    def update(self, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Test ``value`` (0-dim tensor) against the statistics, then add it unless it is a spike.

        Returns:
            ``(spike, z, baseline)``: bool, the z-score (0 during warmup) and the baseline, 0-dim tensors.
        """
        t = self._tensors(value.device)
        x = value.detach().to(t["mean"].dtype)
        finite = torch.isfinite(x)
        ready = t["count"] >= self.warmup_steps
        if self.method is SpikeMethod.EMA:
            baseline, spread = t["mean"], t["var"].clamp(min=0).sqrt()
        else:
            ring = t["ring"]
            baseline = torch.nanmedian(ring)
            spread = 1.4826 * torch.nanmedian((ring - baseline).abs())
        spread = torch.maximum(spread, self.min_rel_spread * baseline.abs()).clamp(min=1e-12)
        z = torch.where(ready & finite, (x - baseline) / spread, torch.zeros_like(x))
        high = z > self.z
        if self.ratio is not None:
            high = high | (ready & finite & (x > self.ratio * baseline))
        spike = high | ~finite
        run = torch.where(spike, t["run"] + 1, torch.zeros_like(t["run"]))
        take = finite & (~spike | (run > self.adapt_after))
        t["run"].copy_(run)
        self._observe(t, x, take)
        return spike, z, baseline

    def _observe(self, t: dict[str, Tensor], x: Tensor, take: Tensor) -> None:
        count, mean, var = t["count"], t["mean"], t["var"]
        xs = torch.where(take, x, mean)  # a no-op value when not taken
        weight = torch.where(count < self.warmup_steps, 1.0 / (count + 1).to(mean.dtype),
                             torch.full_like(mean, 1.0 - self.alpha))
        weight = torch.where(take, weight, torch.zeros_like(weight))
        diff = xs - mean
        mean.add_(weight * diff)
        var.copy_((1 - weight) * (var + weight * diff * diff))
        if self.method is SpikeMethod.MAD:
            ring = t["ring"]
            index = (count % self.window).view(1)
            ring.scatter_(0, index, torch.where(take, x, ring.gather(0, index).squeeze(0)).view(1))
        count.add_(take.to(count.dtype))

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe statistics."""
        if self._t is None:
            return dict(self._loaded) if self._loaded else {}
        t = self._t
        state: dict[str, Any] = {"count": int(t["count"].item()), "run": int(t["run"].item()),
                                 "mean": float(t["mean"].item()), "var": float(t["var"].item())}
        if "ring" in t:
            state["ring"] = [None if math.isnan(v) else v for v in t["ring"].tolist()]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._t, self._loaded = None, (dict(state) if state else None)
        if self._loaded:
            self._fill(self._fresh(torch.device("cpu")), self._loaded)  # validate now

    def _fill(self, t: dict[str, Tensor], state: dict[str, Any]) -> None:
        try:
            for key in ("count", "run", "mean", "var"):
                t[key].fill_(state[key])
            if "ring" in t:
                ring = [math.nan if v is None else float(v) for v in state["ring"]]
                if len(ring) != self.window:
                    raise ValueError(f"`ring` has {len(ring)} values, expected window={self.window}")
                t["ring"].copy_(torch.tensor(ring, dtype=t["ring"].dtype))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"SpikeDetector state is malformed ({error}); got keys {sorted(state)}.") from error


@dataclass
class SpikeDecision:
    """The controller's output for one step; all 0-dim device tensors.

    Attributes:
        spike: a loss spike, a gradient-norm spike, or a non-finite loss.
        loss_spike / norm_spike: which detector fired.
        factor: threshold multiplier for this step (already tightened if ``spike``).
        loss: the step loss used (mean over ranks).
        loss_z / norm_z: z-scores; loss_baseline / norm_baseline: the baselines.
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


@dataclass(frozen=True)
class SpikeEvent:
    """One spike, read back at a logging step."""

    step: int
    loss: float
    loss_baseline: float
    loss_z: float
    norm: float
    norm_baseline: float
    norm_z: float
    factor_before: float
    factor_after: float
    loss_spike: bool
    norm_spike: bool

    def describe(self, base_threshold: float | None = None, action: str = "tighten") -> str:
        """``"step 120: loss 7.9 is 6.1 sigma above its mean 2.3; clip threshold 1.0 -> 0.5 (tighten)"``.

        ``base_threshold`` is the threshold before the spike factor (strategy times schedule)."""
        if not math.isfinite(self.loss):
            what = f"loss is {self.loss}"
        elif self.loss_spike:
            what = f"loss {self.loss:.4g} is {self.loss_z:.1f} sigma above its mean {self.loss_baseline:.4g}"
        else:
            what = (f"gradient norm {self.norm:.4g} is {self.norm_z:.1f} sigma above its mean "
                    f"{self.norm_baseline:.4g} (loss {self.loss:.4g})")
        if base_threshold is None:
            change = f"clip factor {self.factor_before:.3g} -> {self.factor_after:.3g}"
        else:
            change = (f"clip threshold {base_threshold * self.factor_before:.4g} -> "
                      f"{base_threshold * self.factor_after:.4g}")
        return f"step {self.step}: {what}; {change} ({action})"


_EVENT_FIELDS = ("step", "loss", "loss_baseline", "loss_z", "norm", "norm_baseline", "norm_z",
                 "factor_before", "factor_after", "loss_spike", "norm_spike")


class SpikeController:
    """Detects loss and gradient-norm spikes and sets the clip-threshold factor.

    Per step: ``decision = controller.step(loss, norm, step)``, then clip with
    ``factor=decision.factor`` and ``observe=~decision.spike`` (spikes stay out of the strategy's
    statistics). On a spike the factor becomes ``max(factor * spike_factor, min_factor)`` (so repeated
    spikes tighten further, down to the floor); on calm steps it relaxes towards 1 as
    ``1 - (1 - factor) * 0.5 ** (1 / relax_half_life)``.

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
        reduce: all-reduce the loss across ranks when ``torch.distributed`` is initialized.
    """

    def __init__(self, *, detect_loss: bool = True, detect_norm: bool = True, z: float = 6.0,
                 norm_z: float | None = None, ratio: float | None = None, warmup_steps: int = 20,
                 method: str = "ema", alpha: float = 0.9, window: int = 100, action: str = "tighten", spike_factor: float = 0.5,
                 relax_half_life: float = 20.0, min_factor: float = 0.05, max_events: int = 64,
                 reduce: bool = True):
        if not (detect_loss or detect_norm):
            raise ValueError("SpikeController needs `detect_loss` or `detect_norm` (both are False).")
        self.action = check_choice("action", action, SpikeAction)
        self.spike_factor = check_number("spike_factor", spike_factor, low=0.0, high=1.0, low_inclusive=False)
        self.relax_half_life = check_number("relax_half_life", relax_half_life, low=0.0, low_inclusive=False)
        self.min_factor = check_number("min_factor", min_factor, low=0.0, high=1.0, low_inclusive=False)
        self.max_events = check_int("max_events", max_events, low=1)
        self.reduce = bool(reduce)
        common = {"ratio": ratio, "warmup_steps": warmup_steps, "method": method, "alpha": alpha, "window": window}
        self.loss_detector = SpikeDetector(z=z, **common) if detect_loss else None
        self.norm_detector = SpikeDetector(z=z if norm_z is None else norm_z, **common) if detect_norm else None
        self._relax = 0.5 ** (1.0 / self.relax_half_life)
        self._t: dict[str, Tensor] | None = None
        self._loaded: dict[str, Any] | None = None

    def _tensors(self, device: torch.device) -> dict[str, Tensor]:
        if self._t is None:
            dtype = _stats_dtype(device)
            self._t = {"factor": torch.ones((), dtype=dtype, device=device),
                       "spikes": torch.zeros((), dtype=torch.int64, device=device),
                       "events": torch.zeros((self.max_events, len(_EVENT_FIELDS)), dtype=dtype, device=device)}
            if self._loaded is not None:
                self._t["factor"].fill_(float(self._loaded["factor"]))
                self._t["spikes"].fill_(int(self._loaded["spikes"]))
                self._loaded = None
        return self._t

    def _reduce(self, loss: Tensor) -> Tensor:
        if not (self.reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return loss
        packed = torch.stack([torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0),
                              (~torch.isfinite(loss)).to(loss.dtype)])
        dist.all_reduce(packed)  # one collective: sum of losses, count of non-finite ranks
        mean = packed[0] / dist.get_world_size()
        return torch.where(packed[1] > 0, torch.full_like(mean, math.nan), mean)

    @torch.no_grad()
    def step(self, loss: Tensor | None, norm: Tensor, step: int) -> SpikeDecision:
        """Decide for one optimizer step. ``loss`` is the step loss (mean over micro-batches) or
        ``None`` when unavailable (only the norm detector runs); ``norm`` the pre-clip norm."""
        t = self._tensors(norm.device)
        dtype = t["factor"].dtype
        zero = torch.zeros((), dtype=dtype, device=norm.device)
        false = torch.zeros((), dtype=torch.bool, device=norm.device)
        norm_x = norm.detach().to(dtype)
        loss_x = zero if loss is None else self._reduce(loss.detach().to(device=norm.device, dtype=dtype))
        if self.loss_detector is not None and loss is not None:
            loss_spike, loss_z, loss_base = self.loss_detector.update(loss_x)
        else:
            loss_spike, loss_z, loss_base = false, zero, zero
        if self.norm_detector is not None:
            norm_spike, norm_z, norm_base = self.norm_detector.update(norm_x)
            norm_spike = norm_spike & torch.isfinite(norm_x)  # non-finite gradients have their own guard
        else:
            norm_spike, norm_z, norm_base = false, zero, zero
        spike = loss_spike | norm_spike
        before = t["factor"]
        relaxed = 1.0 - (1.0 - before) * self._relax
        after = torch.where(spike, (before * self.spike_factor).clamp(min=self.min_factor), relaxed)
        row = torch.stack([torch.full_like(zero, float(step)), loss_x, loss_base, loss_z, norm_x, norm_base,
                           norm_z, before, after, loss_spike.to(dtype), norm_spike.to(dtype)])
        index = (t["spikes"] % self.max_events).view(1)
        events = t["events"]
        events.index_copy_(0, index, torch.where(spike, row, events.index_select(0, index).squeeze(0)).view(1, -1))
        t["spikes"].add_(spike.to(torch.int64))
        t["factor"] = after.clone()
        act = spike if self.action is not SpikeAction.TIGHTEN else false
        return SpikeDecision(spike=spike, loss_spike=loss_spike, norm_spike=norm_spike, factor=after, loss=loss_x,
                             loss_z=loss_z, loss_baseline=loss_base, norm_z=norm_z, norm_baseline=norm_base, act=act)

    @property
    def factor(self) -> Tensor | None:
        """The current threshold factor (device tensor), ``None`` before the first step."""
        return None if self._t is None else self._t["factor"]

    def read_events(self, since: int) -> tuple[list[SpikeEvent], int]:
        """Spike events numbered ``since`` and later (at most ``max_events``), and the new total.
        One device-to-host transfer; call at logging steps."""
        if self._t is None:
            return [], since
        flat = torch.cat([self._t["spikes"].to(self._t["events"].dtype).view(1), self._t["events"].flatten()])
        values = flat.tolist()
        total = int(values[0])
        rows = [values[1 + i * len(_EVENT_FIELDS): 1 + (i + 1) * len(_EVENT_FIELDS)] for i in range(self.max_events)]
        first = max(since, total - self.max_events)
        events = []
        for number in range(first, total):
            row = dict(zip(_EVENT_FIELDS, rows[number % self.max_events]))
            row["step"] = int(row["step"])
            row["loss_spike"], row["norm_spike"] = bool(row["loss_spike"]), bool(row["norm_spike"])
            events.append(SpikeEvent(**row))
        return events, total

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state: factor, spike count, both detectors (events are not kept)."""
        if self._t is None:
            base = dict(self._loaded) if self._loaded else {"factor": 1.0, "spikes": 0}
        else:
            base = {"factor": float(self._t["factor"].item()), "spikes": int(self._t["spikes"].item())}
        base = {"factor": base["factor"], "spikes": base["spikes"]}
        base["loss_detector"] = self.loss_detector.state_dict() if self.loss_detector else {}
        base["norm_detector"] = self.norm_detector.state_dict() if self.norm_detector else {}
        return base

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        try:
            factor, spikes = float(state["factor"]), int(state["spikes"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"SpikeController state needs `factor` and `spikes`, got {state!r}.") from error
        if self.loss_detector:
            self.loss_detector.load_state_dict(state.get("loss_detector", {}))
        if self.norm_detector:
            self.norm_detector.load_state_dict(state.get("norm_detector", {}))
        self._t, self._loaded = None, {"factor": factor, "spikes": spikes}
