"""Clipping strategies whose threshold adapts to the norms seen so far: ZClip and AutoClip.

Their statistics are device tensors (:class:`~gradclip_hf.core._state.DeviceState`), saved as a JSON-safe
``state_dict()`` and checked field by field when loaded. Both are scalar strategies (see
:mod:`gradclip_hf.core.strategies`).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from ._checks import (MAX_WINDOW, StateError, check_bool, check_choice, check_floats, check_int, check_norm_type,
                      check_number, state_field)
from ._state import DeviceState, floats_or_none, ring_write_
from .strategies import TORCH_EPS, ClipOutcome, ClipStrategy

__all__ = ["ZScoreClip", "QuantileClip", "ZScoreMode", "ZScoreClipOption"]


class ZScoreMode(str, Enum):
    ZSCORE = "zscore"
    PERCENTILE = "percentile"


class ZScoreClipOption(str, Enum):
    ADAPTIVE_SCALING = "adaptive_scaling"
    MEAN = "mean"


class ZScoreClip(DeviceState, ClipStrategy):
    """ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

    Keeps an EMA of the mean and variance of the gradient norm. After ``warmup_steps`` norms (during which
    it clips to ``max_grad_norm``, if set), a norm whose z-score exceeds ``z_thresh`` is clipped to
    ``mean + z_thresh * std / (z / z_thresh)`` (``clip_option="adaptive_scaling"``, times ``clip_factor``) or
    to ``mean`` (``"mean"``); ``mode="percentile"`` clips anything above ``mean + z_thresh * std``. The
    threshold in force is that adaptive threshold on spikes and ``max_grad_norm`` otherwise (``inf``
    without a cap), capped at ``max_grad_norm`` and multiplied by ``scale``. The statistics then take
    zclip's clip value.

    Same thresholds as the ``zclip`` 1.0.0 package step for step, except that: nothing leaves the device;
    non-finite norms (and steps the caller marks with ``observe=False``) are not added to the statistics,
    where zclip's EMA would stay NaN for good; and the state can be saved and loaded.

    Args:
        alpha: EMA smoothing, in ``(0, 1)``.
        z_thresh: z-score above which a norm is a spike, ``> 0``.
        max_grad_norm: cap of the threshold and the warmup clip value; ``None`` (or ``inf``) for none.
        eps: added to the std in the z-score, ``>= 0``.
        warmup_steps: norms collected before the EMA starts, ``>= 1``.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (``mode="zscore"`` only).
        clip_factor: multiplier of the adaptive threshold, ``> 0``.
        skip_update_on_spike: leave the statistics untouched on spike steps.
        norm_type: ``p`` of the norm it watches and clips, ``>= 1`` or ``inf``.
    """

    name = "zscore"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False, norm_type: float | str = 2.0):
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.z_thresh = check_number("z_thresh", z_thresh, low=0.0, low_inclusive=False)
        cap = check_number("max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False, optional=True,
                           allow_inf=True)
        self.max_grad_norm = None if cap is None or math.isinf(cap) else cap
        self.eps = check_number("eps", eps, low=0.0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1, high=MAX_WINDOW)
        self.mode = check_choice("mode", mode, ZScoreMode)
        self.clip_option = check_choice("clip_option", clip_option, ZScoreClipOption)
        self.clip_factor = check_number("clip_factor", clip_factor, low=0.0, low_inclusive=False)
        self.skip_update_on_spike = check_bool("skip_update_on_spike", skip_update_on_spike)
        self.norm_type = check_norm_type(norm_type)

    @property
    def base_threshold(self) -> float | None:
        return self.max_grad_norm

    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "max_grad_norm": self.max_grad_norm,
                "eps": self.eps, "warmup_steps": self.warmup_steps, "mode": self.mode.value,
                "clip_option": self.clip_option.value, "clip_factor": self.clip_factor,
                "skip_update_on_spike": self.skip_update_on_spike, "norm_type": self.norm_type}

    # ------------------------------------------------------------------ state
    def _fresh(self, device, dtype):
        zero = torch.zeros((), device=device, dtype=dtype)
        return {"count": torch.zeros((), device=device, dtype=torch.int64),
                "buffer": torch.zeros(self.warmup_steps, device=device, dtype=dtype),
                "mean": zero.clone(), "var": zero.clone()}

    def _export(self, tensors):
        count, buffer, mean, var = (tensors[k] for k in ("count", "buffer", "mean", "var"))
        values = torch.cat([count.to(buffer.dtype).view(1), mean.view(1), var.view(1), buffer]).tolist()
        count = int(values[0])
        return {"count": count, "mean": values[1], "var": values[2],
                "buffer": values[3: 3 + min(count, self.warmup_steps)]}

    def _fill(self, tensors, state):
        count = state_field(state, "count", check_int, low=0)
        mean = state_field(state, "mean", check_number)
        var = state_field(state, "var", check_number, low=0.0)
        expected = min(count, self.warmup_steps)
        buffer = state_field(state, "buffer", check_floats, length=expected)
        tensors["count"].fill_(count)
        tensors["mean"].fill_(mean)
        tensors["var"].fill_(var)
        if buffer:
            tensors["buffer"][: len(buffer)] = torch.tensor(buffer, dtype=tensors["buffer"].dtype)

    @property
    def statistics(self) -> dict[str, Tensor] | None:
        """The device tensors ``count``, ``mean``, ``var`` (``None`` before the first step)."""
        if self._tensors is None:
            return None
        return {k: self._tensors[k] for k in ("count", "mean", "var")}

    # ------------------------------------------------------------------ the step
    def _adaptive(self, norm: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
        """``(spike, adaptive threshold)`` from the statistics before this step."""
        std = var.sqrt()
        if self.mode is ZScoreMode.PERCENTILE:
            adaptive = mean + self.z_thresh * std
            return norm > adaptive, adaptive
        z = (norm - mean) / (std + self.eps)
        if self.clip_option is ZScoreClipOption.MEAN:
            return z > self.z_thresh, mean
        return z > self.z_thresh, (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor

    def _observe(self, state: dict[str, Tensor], norm: Tensor, clip_val: Tensor, keep: Tensor, spike: Tensor) -> None:
        """Warmup buffer, then EMA of zclip's clip value (the norm, or the adaptive threshold on a spike)."""
        count, buffer, mean, var = state["count"], state["buffer"], state["mean"], state["var"]
        ready = count >= self.warmup_steps
        warming = keep & ~ready
        ring_write_(buffer, count, norm, warming)
        count.add_(warming.to(count.dtype))
        just_ready = warming & (count == self.warmup_steps)
        warm_mean = buffer.mean()
        warm_var = ((buffer - warm_mean) ** 2).mean()
        update = keep & ready & ~spike if self.skip_update_on_spike else keep & ready
        new_mean = self.alpha * mean + (1 - self.alpha) * clip_val
        new_var = self.alpha * var + (1 - self.alpha) * (clip_val - new_mean) ** 2
        mean.copy_(torch.where(just_ready, warm_mean, torch.where(update, new_mean, mean)))
        var.copy_(torch.where(just_ready, warm_var, torch.where(update, new_var, var)))

    @torch.no_grad()
    def next_threshold(self, device: torch.device) -> Tensor:
        """The spike boundary of the statistics so far, capped: ``min(mean + z_thresh * (std + eps), cap)``
        (``mean + z_thresh * std`` in ``percentile`` mode), the cap during warmup. A norm above it is what
        :meth:`plan` calls a spike; it is clipped to the boundary instead of ZClip's lower spike value (which
        depends on the norm itself)."""
        state = self._device_state(device)
        mean, std = state["mean"], state["var"].clamp(min=0).sqrt()
        eps = 0.0 if self.mode is ZScoreMode.PERCENTILE else self.eps
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        boundary = (mean + self.z_thresh * (std + eps)).clamp(max=cap)
        return torch.where(state["count"] >= self.warmup_steps, boundary, torch.full_like(boundary, cap))

    @torch.no_grad()
    def plan(self, norms, *, scale=1.0, observe=None) -> ClipOutcome:
        state = self._device_state(norms.total.device)
        norm = norms.total.to(state["mean"].dtype)
        keep = torch.isfinite(norm) if observe is None else torch.isfinite(norm) & observe.to(norm.device)
        ready = state["count"] >= self.warmup_steps
        spike, adaptive = self._adaptive(norm, state["mean"], state["var"])
        # the threshold in force: the capped adaptive threshold on a spike, else the cap (inf without one); at
        # scale 1 the same decisions and coefficients as zclip's min(clip_val, cap); a schedule or spike factor
        # then scales a real threshold and never shrinks calm gradients by itself
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        threshold = torch.where(ready & spike, adaptive.clamp(max=cap), torch.full_like(norm, cap)) * scale
        coef = torch.where(norm > threshold, threshold / (norm + TORCH_EPS), torch.ones_like(norm))
        self._observe(state, norm, torch.where(spike, adaptive, norm), keep, spike)
        dtype = norms.total.dtype
        coef = coef.to(dtype)
        return ClipOutcome(norm=norms.total, threshold=threshold.to(dtype), coef=coef,
                           norm_post=norms.total * coef, clipped=norm > threshold)


class QuantileClip(DeviceState, ClipStrategy):
    """AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
    Networks"): clip the global norm to the ``quantile`` of the norms seen so far.

    The current norm joins the history first, then the threshold is its ``quantile`` (linear interpolation,
    as ``numpy.percentile``), then gradients are clipped as by ``clip_grad_norm_``. The history is a ring
    buffer of the last ``history`` finite norms on the device.

    Args:
        quantile: in ``(0, 1]``; the paper recommends 0.1 (its "p = 10").
        history: number of past norms kept, ``1 .. 1,000,000``.
        norm_type: ``p`` of the norm.
    """

    name = "quantile"

    def __init__(self, quantile: float = 0.9, history: int = 1000, norm_type: float | str = 2.0):
        self.quantile = check_number("quantile", quantile, low=0.0, high=1.0, low_inclusive=False)
        self.history = check_int("history", history, low=1, high=MAX_WINDOW)
        self.norm_type = check_norm_type(norm_type)

    def _config(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "history": self.history, "norm_type": self.norm_type}

    def _fresh(self, device, dtype):
        return {"count": torch.zeros((), device=device, dtype=torch.int64),
                "ring": torch.full((self.history,), math.nan, device=device, dtype=dtype)}

    def _export(self, tensors):
        count = int(tensors["count"].item())
        ring = tensors["ring"]
        if count > self.history:  # oldest first
            start = count % self.history
            ring = torch.cat([ring[start:], ring[:start]])
        return {"count": count, "history": floats_or_none(ring[: min(count, self.history)])}

    def _fill(self, tensors, state):
        count = state_field(state, "count", check_int, low=0)
        values = state_field(state, "history", check_floats, allow_none=True)
        if len(values) > count:
            raise StateError("history", values, f"at most `count` = {count} values")
        values = values[-self.history:]
        ring = torch.full((self.history,), math.nan, dtype=tensors["ring"].dtype)
        if values:
            ring[: len(values)] = torch.tensor([math.nan if v is None else v for v in values], dtype=ring.dtype)
        if count > self.history:  # the next write (at count % history) overwrites the oldest
            ring = torch.roll(ring, shifts=count % self.history)
        tensors["ring"].copy_(ring)
        tensors["count"].fill_(count)

    @torch.no_grad()
    def next_threshold(self, device: torch.device) -> Tensor:
        """The ``quantile`` of the norms before this step (``inf`` while the history is empty)."""
        quantile = torch.nanquantile(self._device_state(device)["ring"], self.quantile)
        return torch.where(torch.isnan(quantile), torch.full_like(quantile, math.inf), quantile)

    @torch.no_grad()
    def plan(self, norms, *, scale=1.0, observe=None) -> ClipOutcome:
        state = self._device_state(norms.total.device)
        count, ring = state["count"], state["ring"]
        norm = norms.total.to(ring.dtype)
        keep = torch.isfinite(norm) if observe is None else torch.isfinite(norm) & observe.to(norm.device)
        ring_write_(ring, count, norm, keep)
        count.add_(keep.to(count.dtype))
        quantile = torch.nanquantile(ring, self.quantile)
        empty = torch.isnan(quantile)  # empty history: no threshold, no clipping (whatever the scale)
        threshold = torch.where(empty, norm, quantile * scale).to(norms.total.dtype)
        coef = torch.clamp(threshold / (norms.total + TORCH_EPS), max=1.0)
        coef = torch.where(empty.to(coef.device), torch.ones_like(coef), coef)
        return ClipOutcome(norm=norms.total, threshold=threshold, coef=coef,
                           norm_post=norms.total * coef, clipped=coef < 1.0)

