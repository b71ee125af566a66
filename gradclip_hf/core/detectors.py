"""``SpikeDetector``: robust running statistics of a scalar (the step loss, or the gradient norm) on the device,
and the test of a value against them. Nothing leaves the device."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from ._checks import MAX_WINDOW, OptionError, check_choice, check_floats, check_int, check_number, state_field
from ._state import DeviceState, floats_or_none, ring_write_

__all__ = ["SpikeMethod", "SpikeDetector"]


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

    Args:
        z: z-score threshold, ``> 0``.
        ratio: optional ratio threshold, ``> 1``.
        warmup_steps: values observed before any spike can be flagged, ``2 .. 1,000,000``.
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
        self.ratio = check_number("ratio", ratio, low=1.0, low_inclusive=False, optional=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=2, high=MAX_WINDOW)
        self.method = check_choice("method", method, SpikeMethod)
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.window = check_int("window", window, low=2, high=MAX_WINDOW)
        if self.method is SpikeMethod.MAD and self.window < self.warmup_steps:
            raise OptionError("window", window, f">= `warmup_steps` ({warmup_steps}) with method='mad'")
        self.min_rel_spread = check_number("min_rel_spread", min_rel_spread, low=0.0)
        self.adapt_after = check_int("adapt_after", adapt_after, low=1)

    def _fresh(self, device, dtype):
        t = {"count": torch.zeros((), dtype=torch.int64, device=device),
             "run": torch.zeros((), dtype=torch.int64, device=device),  # consecutive spikes
             "mean": torch.zeros((), dtype=dtype, device=device),
             "var": torch.zeros((), dtype=dtype, device=device)}
        if self.method is SpikeMethod.MAD:
            t["ring"] = torch.full((self.window,), math.nan, dtype=dtype, device=device)
        return t

    def _fill(self, t, state):
        for key, check, bounds in (("count", check_int, {"low": 0}), ("run", check_int, {"low": 0}),
                                   ("mean", check_number, {}), ("var", check_number, {"low": 0.0})):
            t[key].fill_(state_field(state, key, check, **bounds))
        if "ring" in t:
            ring = state_field(state, "ring", check_floats, allow_none=True, length=self.window)
            t["ring"].copy_(torch.tensor([math.nan if v is None else v for v in ring], dtype=t["ring"].dtype))

    def _export(self, t):
        state: dict[str, Any] = {"count": int(t["count"].item()), "run": int(t["run"].item()),
                                 "mean": float(t["mean"].item()), "var": float(t["var"].item())}
        if "ring" in t:
            state["ring"] = floats_or_none(t["ring"])
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
        run = torch.where(spike, t["run"] + 1, torch.where(finite, torch.zeros_like(t["run"]), t["run"]))
        t["run"].copy_(run)
        self._observe(t, x, finite & (~spike | (run > self.adapt_after)))
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
        if "ring" in t:
            ring_write_(t["ring"], count, x, take)
        count.add_(take.to(count.dtype))
