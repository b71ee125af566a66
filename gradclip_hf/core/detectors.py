"""``SpikeDetector``: robust running statistics of a scalar (the step loss, or the gradient norm) on the device,
and the test of a value against them. Nothing leaves the device."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from ._checks import (MAX_WINDOW, OptionError, check_bool, check_choice, check_floats, check_int, check_number,
                      state_field)
from ._state import DeviceState, floats_or_none, ring_write_

__all__ = ["SpikeMethod", "SpikeDetector", "EARLY_MIN_VALUES", "EARLY_RATIO"]

EARLY_WINDOW, EARLY_QUANTILE, EARLY_MIN_VALUES, EARLY_ALPHA = 8, 0.25, 6, 0.9
EARLY_RATIO, EARLY_MIN_SPREAD = 1.5, 0.02


class SpikeMethod(str, Enum):
    """Running statistics of a :class:`SpikeDetector`: ``ema`` (EMA mean and variance) or ``mad`` (median
    and median absolute deviation of a window: more robust, slightly more work)."""

    EMA = "ema"
    MAD = "mad"


class SpikeDetector(DeviceState):
    """Flags values far above their running baseline; spikes stay out of the statistics.

    After ``warmup_steps`` values, a value is a spike when its z-score ``(x - baseline) / spread`` exceeds
    ``z``, or (if ``ratio`` is set) when ``x > ratio * baseline``. ``spread`` is the running std (``ema``) or
    ``1.4826 * MAD`` (``mad``), floored at ``min_rel_spread * |baseline|`` so that a very flat loss does not
    make noise look like spikes. After ``adapt_after`` spikes in a row the values are taken in again: the
    level has moved, and the detector follows instead of flagging every step from then on. Non-finite
    values are neither spikes nor observed.

    ``early=True`` adds a second rule for the start of training, where the running statistics still carry the
    steep first descent of a loss (a 2x jump stays under 6 sigma of the EMA for tens of steps): on ``y = log(x)``,
    the baseline is the 25th percentile of the last 8 values taken in (it follows a falling loss within a few
    steps), the noise ``sqrt(EMA of (y - y_prev)^2 / 2)`` over consecutive values taken in (a trend hardly enters
    step-to-step differences; heavy tails do: non-robust on purpose; the cumulative mean of the squared
    differences from the second on, then alpha 0.9), floored at 0.02. A value is also a spike when
    ``(y - baseline) / noise > z`` **and** ``x > 1.5 x exp(baseline)``, from the 7th value taken in on (whatever
    ``warmup_steps``: the EMA rule's). A spike of either rule stays out of both statistics (one ``adapt_after``
    run). Only positive values enter the early rule. Measured on the gallery's clean and faulted runs (issue 25.5,
    docs/spikes.md#detection).

    Args:
        z: z-score threshold, ``> 0``.
        ratio: optional ratio threshold, ``> 1``.
        warmup_steps: values observed before any spike can be flagged, ``2 .. 1,000,000``.
        method: ``"ema"`` or ``"mad"``.
        alpha: EMA smoothing (``ema``), in ``(0, 1)``.
        window: values kept (``mad``), ``>= warmup_steps``.
        min_rel_spread: floor of the spread relative to the baseline, ``>= 0``.
        adapt_after: consecutive spikes after which values enter the statistics anyway, ``>= 1``.
        early: also the early-training rule above.
    """

    def __init__(self, z: float = 6.0, ratio: float | None = None, warmup_steps: int = 20,
                 method: str = "ema", alpha: float = 0.9, window: int = 100, min_rel_spread: float = 0.02,
                 adapt_after: int = 10, early: bool = False):
        self.z = check_number("z", z, low=0.0, low_inclusive=False)
        self.ratio = check_number("ratio", ratio, low=1.0, low_inclusive=False, optional=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=2, high=MAX_WINDOW)
        self.method = check_choice("method", method, SpikeMethod)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.window = check_int("window", window, low=2, high=MAX_WINDOW)
        if self.method is SpikeMethod.MAD and self.window < self.warmup_steps:
            raise OptionError("window", window, f">= `warmup_steps` ({warmup_steps}) with method='mad'")
        self.min_rel_spread = check_number("min_rel_spread", min_rel_spread, low=0.0)
        self.adapt_after = check_int("adapt_after", adapt_after, low=1)
        self.early = check_bool("early", early)

    def _fresh(self, device, dtype):
        t = {"count": torch.zeros((), dtype=torch.int64, device=device),
             "run": torch.zeros((), dtype=torch.int64, device=device),  # consecutive spikes
             "mean": torch.zeros((), dtype=dtype, device=device),
             "var": torch.zeros((), dtype=dtype, device=device)}
        if self.method is SpikeMethod.MAD:
            t["ring"] = torch.full((self.window,), math.nan, dtype=dtype, device=device)
        if self.early:
            t.update(early_count=torch.zeros((), dtype=torch.int64, device=device),
                     early_last=torch.zeros((), dtype=dtype, device=device),
                     early_d2=torch.zeros((), dtype=dtype, device=device),
                     early_ring=torch.full((EARLY_WINDOW,), math.nan, dtype=dtype, device=device))
        return t

    def _fill(self, t, state):
        for key, check, bounds in (("count", check_int, {"low": 0}), ("run", check_int, {"low": 0}),
                                   ("mean", check_number, {}), ("var", check_number, {"low": 0.0})):
            t[key].fill_(state_field(state, key, check, **bounds))
        if "ring" in t:
            ring = state_field(state, "ring", check_floats, allow_none=True, length=self.window)
            t["ring"].copy_(torch.tensor([math.nan if v is None else v for v in ring], dtype=t["ring"].dtype))
        if "early_ring" in t and "early_count" in state:  # a state saved without the early rule: it starts fresh
            for key, check, bounds in (("early_count", check_int, {"low": 0}), ("early_last", check_number, {}),
                                       ("early_d2", check_number, {"low": 0.0})):
                t[key].fill_(state_field(state, key, check, **bounds))
            ring = state_field(state, "early_ring", check_floats, allow_none=True, length=EARLY_WINDOW)
            t["early_ring"].copy_(torch.tensor([math.nan if v is None else v for v in ring],
                                               dtype=t["early_ring"].dtype))

    def _export(self, t):
        state: dict[str, Any] = {"count": int(t["count"].item()), "run": int(t["run"].item()),
                                 "mean": float(t["mean"].item()), "var": float(t["var"].item())}
        if "ring" in t:
            state["ring"] = floats_or_none(t["ring"])
        if "early_ring" in t:
            state.update(early_count=int(t["early_count"].item()), early_last=float(t["early_last"].item()),
                         early_d2=float(t["early_d2"].item()), early_ring=floats_or_none(t["early_ring"]))
        return state

    def _baseline(self, t: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.method is SpikeMethod.EMA:
            baseline, spread = t["mean"], t["var"].clamp(min=0).sqrt()
        else:
            baseline = torch.nanmedian(t["ring"])
            spread = 1.4826 * torch.nanmedian((t["ring"] - baseline).abs())
        return baseline, torch.maximum(spread, self.min_rel_spread * baseline.abs()).clamp(min=1e-12)

    @torch.no_grad()
    def update(self, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Test ``value`` (0-dim tensor) against the statistics, then add it unless it is a spike.

        Returns:
            ``(spike, z, baseline)``: bool, the z-score (0 during warmup or for a non-finite value) and
            the baseline, 0-dim tensors.
        """
        t = self._device_state(value.device)
        x = value.detach().to(t["mean"].dtype)
        finite = torch.isfinite(x)
        ready = t["count"] >= self.warmup_steps
        baseline, spread = self._baseline(t)
        z = torch.where(ready & finite, (x - baseline) / spread, torch.zeros_like(x))
        spike = z > self.z
        if self.ratio is not None:
            spike = spike | (ready & finite & (x > self.ratio * baseline))
        if self.early:
            early, early_z, early_base, y, positive = self._early(t, x)
            shown = spike | ~early  # today's z and baseline, unless only the early rule fired
            z, baseline = torch.where(shown, z, early_z), torch.where(shown, baseline, early_base)
            spike = spike | early
        run = torch.where(spike, t["run"] + 1, torch.where(finite, torch.zeros_like(t["run"]), t["run"]))
        t["run"].copy_(run)
        take = finite & (~spike | (run > self.adapt_after))
        self._observe(t, x, take)
        if self.early:
            self._observe_early(t, y, take & positive)
        return spike, z, baseline

    def _early(self, t: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The early rule (class docstring): ``(spike, z, baseline, log x, x > 0 and finite)``."""
        positive = torch.isfinite(x) & (x > 0)
        y = torch.log(torch.where(positive, x, torch.ones_like(x)))
        base = torch.nan_to_num(torch.nanquantile(t["early_ring"], EARLY_QUANTILE), nan=0.0)
        noise = (t["early_d2"] / 2).clamp(min=0).sqrt().clamp(min=EARLY_MIN_SPREAD)
        excess = y - base
        z = excess / noise
        ready = positive & (t["early_count"] >= EARLY_MIN_VALUES)
        spike = ready & (z > self.z) & (excess > math.log(EARLY_RATIO))
        return spike, torch.where(ready, z, torch.zeros_like(z)), torch.exp(base), y, positive

    @staticmethod
    def _observe_early(t: dict[str, Tensor], y: Tensor, take: Tensor) -> None:
        count = t["early_count"]
        diff = y - t["early_last"]
        seen = (count - 1).clamp(min=1).to(y.dtype)  # the first difference is left out of the mean
        weight = torch.where(count - 1 < EARLY_MIN_VALUES, 1.0 / seen, torch.full_like(y, 1 - EARLY_ALPHA))
        weight = torch.where(take & (count >= 1), weight, torch.zeros_like(weight))
        t["early_d2"].add_(weight * (diff * diff - t["early_d2"]))
        t["early_last"].copy_(torch.where(take, y, t["early_last"]))
        ring_write_(t["early_ring"], count, y, take)
        count.add_(take.to(count.dtype))

    def _observe(self, t: dict[str, Tensor], x: Tensor, take: Tensor) -> None:
        count, mean, var = t["count"], t["mean"], t["var"]
        xs = torch.where(take, x, mean)  # a no-op value when not taken
        weight = torch.where(count < self.warmup_steps, 1.0 / (count + 1).to(mean.dtype),
                             torch.full_like(mean, 1.0 - self.alpha))
        weight = torch.where(take, weight, torch.zeros_like(weight))
        diff = xs - mean
        mean.add_(weight * diff)
        var.copy_((1 - weight) * (var + weight * diff * diff))
        if "ring" in t:
            ring_write_(t["ring"], count, x, take)
        count.add_(take.to(count.dtype))
