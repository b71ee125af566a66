"""Clipping strategies: one small class each, torch only, no host sync.

Every strategy clips a list of gradients in place, given their norms (computed once by the caller),
and returns a :class:`ClipOutcome` of 0-dim device tensors. A strategy with statistics (``ZScoreClip``,
``QuantileClip``) keeps them as device tensors and exports them as a JSON-safe ``state_dict()``.

``scale`` multiplies the strategy's threshold: it is how schedules and the spike controller tighten
or relax any strategy. It is a Python float (no device work) or a 0-dim device tensor.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from ._checks import check_choice, check_int, check_norm_type, check_number
from .norms import GradNorms, grad_norms, is_dtensor, to_local

__all__ = ["ClipOutcome", "ClipStrategy", "NormClip", "ValueClip", "AGC", "ZScoreClip", "QuantileClip",
           "ZScoreMode", "ZScoreClipOption"]

Scale = "float | Tensor"
TORCH_EPS = 1e-6  # the epsilon torch.nn.utils.clip_grad_norm_ adds to the norm


@dataclass
class ClipOutcome:
    """What one strategy did to one set of gradients; all 0-dim device tensors.

    Attributes:
        norm: pre-clip total norm.
        threshold: the threshold in force (after ``scale``); for ``ValueClip`` the value bound, for
            ``AGC`` the unit-wise ratio.
        coef: post-clip norm over pre-clip norm (the multiplier for norm-based strategies), ``<= 1``.
        norm_post: post-clip total norm.
        clipped: whether the gradients were changed.
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    norm_post: Tensor
    clipped: Tensor


def _as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=like.device)
    return torch.full((), value, device=like.device, dtype=like.dtype)


def scale_grads_(grads: list[Tensor], coef: Tensor) -> None:
    """Multiply ``grads`` in place by the 0-dim ``coef`` with foreach kernels, as torch does."""
    local = [to_local(g) for g in grads]
    for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([local]).items():
        if _has_foreach_support(device_grads, device):
            torch._foreach_mul_(device_grads, coef.to(device))
        else:
            coef_device = coef.to(device)
            for g in device_grads:
                g.mul_(coef_device)


def _ratio_coef(norm_post: Tensor, norm: Tensor) -> Tensor:
    ratio = norm_post.to(norm.dtype) / norm
    return torch.where(norm > 0, ratio, torch.ones_like(ratio)).clamp(max=1.0)


class ClipStrategy(ABC):
    """Base class of clipping strategies.

    Subclasses set ``name`` and implement :meth:`clip_`; strategies with statistics override
    :meth:`state_dict` and :meth:`load_state_dict`.
    """

    name: ClassVar[str]
    norm_type: float = 2.0
    needs_params: ClassVar[bool] = False

    @abstractmethod
    def clip_(self, grads: list[Tensor], norms: GradNorms, *, scale: float | Tensor = 1.0,
              observe: Tensor | None = None, params: Sequence[Tensor] | None = None,
              names: Sequence[str] | None = None) -> ClipOutcome:
        """Clip ``grads`` in place.

        Args:
            grads: the gradients, non-empty.
            norms: their norms, computed with ``self.norm_type``.
            scale: multiplier of the threshold (schedule times spike factor).
            observe: 0-dim bool tensor; when False this step's norm is not added to the statistics
                (non-finite norms never are).
            params: the parameters the gradients belong to, for strategies with ``needs_params``.
            names: the parameters' names, same order.
        """

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (empty for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}.")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({fields})"

    def _config(self) -> dict[str, Any]:
        return {}


class NormClip(ClipStrategy):
    """Clip by global norm, exactly as :func:`torch.nn.utils.clip_grad_norm_`.

    ``coef = clamp(max_norm * scale / (norm + 1e-6), max=1)``; gradients are multiplied by ``coef``.
    With ``scale=1.0`` the result is bit-identical to torch's.

    Args:
        max_norm: the threshold, ``> 0``.
        norm_type: ``p`` of the norm, ``>= 1`` or ``inf``.
    """

    name = "norm"

    def __init__(self, max_norm: float = 1.0, norm_type: float | str = 2.0):
        self.max_norm = check_number("max_norm", max_norm, low=0.0, low_inclusive=False)
        self.norm_type = check_norm_type(norm_type)

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def clip_(self, grads, norms, *, scale=1.0, observe=None, params=None, names=None) -> ClipOutcome:
        threshold = self.max_norm * scale
        coef = torch.clamp(threshold / (norms.total + TORCH_EPS), max=1.0)
        scale_grads_(grads, coef)
        return ClipOutcome(norm=norms.total, threshold=_as_tensor(threshold, norms.total), coef=coef,
                           norm_post=norms.total * coef, clipped=coef < 1.0)


class ValueClip(ClipStrategy):
    """Clamp every gradient element to ``[-clip_value * scale, clip_value * scale]``.

    Identical to :func:`torch.nn.utils.clip_grad_value_` for a float ``scale``. Costs one more norm
    pass to report the post-clip norm; ``clipped`` is "the post-clip norm is below the pre-clip norm".

    Args:
        clip_value: the bound, ``> 0``.
    """

    name = "value"

    def __init__(self, clip_value: float = 1.0):
        self.clip_value = check_number("clip_value", clip_value, low=0.0, low_inclusive=False)

    def _config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value}

    def clip_(self, grads, norms, *, scale=1.0, observe=None, params=None, names=None) -> ClipOutcome:
        bound = self.clip_value * scale
        local = [to_local(g) for g in grads]
        if isinstance(bound, Tensor):
            for g in local:
                b = bound.to(device=g.device, dtype=g.dtype)
                torch.clamp(g, min=-b, max=b, out=g)
        else:
            for (device, _), ([device_grads], _) in _group_tensors_by_device_and_dtype([local]).items():
                if _has_foreach_support(device_grads, device):
                    torch._foreach_clamp_min_(device_grads, -bound)
                    torch._foreach_clamp_max_(device_grads, bound)
                else:
                    for g in device_grads:
                        g.clamp_(min=-bound, max=bound)
        norm_post = grad_norms(grads, norms.norm_type).total
        return ClipOutcome(norm=norms.total, threshold=_as_tensor(bound, norms.total),
                           coef=_ratio_coef(norm_post, norms.total), norm_post=norm_post,
                           clipped=norm_post < norms.total)


def unitwise_norm(tensor: Tensor) -> Tensor:
    """Norms of output units: rows of matrices and conv kernels, whole tensor for scalars and biases."""
    if tensor.ndim <= 1:
        return torch.linalg.vector_norm(tensor)
    return torch.linalg.vector_norm(tensor, dim=tuple(range(1, tensor.ndim)), keepdim=True)


def _local_unitwise_norm(tensor: Tensor) -> Tensor:
    """:func:`unitwise_norm` of a plain tensor, or of a whole DTensor as the plain tensor that lines up
    with its local shard: units split across ranks (a sharded bias, a ``Shard(1)`` matrix) are
    reduced over all ranks; rows of a ``Shard(0)`` matrix stay local (no collective)."""
    norm = unitwise_norm(tensor)
    if not is_dtensor(norm):
        return norm
    from torch.distributed.tensor import Replicate

    placements = [Replicate() if p.is_partial() else p for p in norm.placements]
    return norm.redistribute(norm.device_mesh, placements).to_local()


class AGC(ClipStrategy):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image
    Recognition Without Normalization").

    For each output unit ``i`` of a parameter ``W`` (a row of a matrix, a conv kernel; a bias or
    scalar as a whole), the gradient ``G_i`` is rescaled to norm ``clipping * max(||W_i||, eps)``
    when it is larger. Parameters whose name matches a pattern in ``exclude`` (the final classifier
    in the paper) are left alone. Loops over tensors (no foreach kernel exists for per-row norms).

    Args:
        clipping: ratio λ of gradient to weight norm, ``> 0`` (0.01 for batch 4096, larger for small batches).
        eps: floor of the weight norm, so zero-initialised units can move, ``> 0``.
        exclude: regular expressions searched in parameter names.
    """

    name = "agc"
    needs_params = True

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ("lm_head",)):
        self.clipping = check_number("clipping", clipping, low=0.0, low_inclusive=False)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        if isinstance(exclude, str):
            exclude = (exclude,)
        self.exclude = tuple(exclude)
        try:
            self._exclude = [re.compile(p) for p in self.exclude]
        except re.error as error:
            raise ValueError(f"`exclude` holds an invalid regular expression: {error}") from error

    def _config(self) -> dict[str, Any]:
        return {"clipping": self.clipping, "eps": self.eps, "exclude": self.exclude}

    def clip_(self, grads, norms, *, scale=1.0, observe=None, params=None, names=None) -> ClipOutcome:
        if params is None or len(params) != len(grads):
            raise ValueError("AGC needs the parameters of the gradients (`params`, same length as `grads`).")
        names = names if names is not None else [""] * len(grads)
        ratio = self.clipping * scale
        clipped = torch.zeros((), dtype=torch.bool, device=norms.total.device)
        for param, grad, name in zip(params, grads, names):
            if any(p.search(name) for p in self._exclude):
                continue
            g = to_local(grad)
            max_norm = _local_unitwise_norm(param.detach()).clamp(min=self.eps) * (
                ratio.to(g.device) if isinstance(ratio, Tensor) else ratio)
            g_norm = _local_unitwise_norm(grad)
            trigger = g_norm > max_norm
            # one small factor per unit (1 where not triggered), then one in-place multiply: no full-size temporaries
            g.mul_(torch.where(trigger, max_norm / g_norm.clamp(min=TORCH_EPS), torch.ones_like(g_norm)))
            clipped = clipped | trigger.any().to(clipped.device)
        norm_post = grad_norms(grads, norms.norm_type).total
        if any(is_dtensor(g) for g in grads):  # triggers are per shard: decide on the global norms
            clipped = norm_post < norms.total
        return ClipOutcome(norm=norms.total, threshold=_as_tensor(ratio, norms.total),
                           coef=_ratio_coef(norm_post, norms.total), norm_post=norm_post, clipped=clipped)


class _StatefulStrategy(ClipStrategy):
    """Keeps statistics as device tensors, created on the first call on the gradients' device."""

    def __init__(self) -> None:
        self._tensors: dict[str, Tensor] | None = None
        self._loaded: dict[str, Any] | None = None

    @abstractmethod
    def _fresh_state(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]: ...

    @abstractmethod
    def _state_from_dict(self, state: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]: ...

    @abstractmethod
    def _state_to_dict(self, tensors: dict[str, Tensor]) -> dict[str, Any]: ...

    @staticmethod
    def _stats_dtype(device: torch.device) -> torch.dtype:
        # float64 matches reference implementations that keep statistics in Python floats; devices
        # without float64 (mps) fall back to float32.
        return torch.float32 if device.type == "mps" else torch.float64

    def _state(self, like: Tensor) -> dict[str, Tensor]:
        if self._tensors is None:
            dtype = self._stats_dtype(like.device)
            if self._loaded is not None:
                self._tensors = self._state_from_dict(self._loaded, like.device, dtype)
                self._loaded = None
            else:
                self._tensors = self._fresh_state(like.device, dtype)
        return self._tensors

    def state_dict(self) -> dict[str, Any]:
        if self._tensors is None:
            return dict(self._loaded) if self._loaded is not None else {}
        return self._state_to_dict(self._tensors)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state is not None and not isinstance(state, dict):
            raise ValueError(f"{type(self).__name__} state must be a dict, got {state!r}.")
        if state:  # validate now, not at the first step, and before replacing anything
            self._state_from_dict(dict(state), torch.device("cpu"), torch.float64)
        self._loaded = dict(state) if state else None
        self._tensors = None


def _floats(values: Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _check_floats(name: str, values: Any, allow_none: bool = False) -> list[float | None]:
    """``values`` as a list of finite floats (``None`` kept where allowed), else ``ValueError``."""
    try:
        if isinstance(values, (str, bytes)):
            raise TypeError("a string is not a list of numbers")
        out = [None if v is None and allow_none else float(v) for v in values]
    except (TypeError, ValueError) as error:
        raise ValueError(f"state `{name}` must be a list of numbers, got {values!r}.") from error
    if not all(v is None or math.isfinite(v) for v in out):
        raise ValueError(f"state `{name}` must hold finite numbers, got {values!r}.")
    return out


def _tensor_of(values: Sequence[float | None], size: int, device, dtype) -> Tensor:
    out = torch.full((size,), math.nan, device=device, dtype=dtype)
    if values:
        out[: len(values)] = torch.tensor([math.nan if v is None else v for v in values], dtype=dtype)
    return out


class ZScoreMode(str, Enum):
    ZSCORE = "zscore"
    PERCENTILE = "percentile"


class ZScoreClipOption(str, Enum):
    ADAPTIVE_SCALING = "adaptive_scaling"
    MEAN = "mean"


class ZScoreClip(_StatefulStrategy):
    """ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training").

    Keeps an EMA of the mean and variance of the gradient norm. After ``warmup_steps`` norms (during
    which it clips to ``max_grad_norm``, if set), a norm whose z-score exceeds ``z_thresh`` is clipped
    to ``mean + z_thresh * std / (z / z_thresh)`` (``clip_option="adaptive_scaling"``, times
    ``clip_factor``) or to ``mean`` (``"mean"``); ``mode="percentile"`` clips anything above
    ``mean + z_thresh * std``. The threshold in force is that adaptive threshold on spikes and
    ``max_grad_norm`` otherwise (``inf`` without a cap), capped at ``max_grad_norm`` and multiplied by
    ``scale`` (schedules, the spike factor). The statistics then take zclip's clip value.

    Same thresholds as the ``zclip`` 1.0.0 package step for step, except that: nothing leaves the
    device; non-finite norms (and steps the caller marks with ``observe=False``) are not added to the
    statistics, where zclip's EMA would stay NaN for good; and the state can be saved and loaded.

    Args:
        alpha: EMA smoothing, in ``(0, 1)``.
        z_thresh: z-score above which a norm is a spike, ``> 0``.
        max_grad_norm: cap of the threshold and the warmup clip value; ``None`` for none.
        eps: added to the std in the z-score, ``>= 0``.
        warmup_steps: norms collected before the EMA starts, ``>= 1``.
        mode: ``"zscore"`` or ``"percentile"``.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (``mode="zscore"`` only).
        clip_factor: multiplier of the adaptive threshold, ``> 0``.
        skip_update_on_spike: leave the statistics untouched on spike steps.
    """

    name = "zscore"

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, max_grad_norm: float | None = 1.0,
                 eps: float = 1e-6, warmup_steps: int = 25, mode: str = "zscore",
                 clip_option: str = "adaptive_scaling", clip_factor: float = 1.0,
                 skip_update_on_spike: bool = False):
        super().__init__()
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.z_thresh = check_number("z_thresh", z_thresh, low=0.0, low_inclusive=False)
        self.max_grad_norm = (None if max_grad_norm is None else
                              check_number("max_grad_norm", max_grad_norm, low=0.0, low_inclusive=False))
        self.eps = check_number("eps", eps, low=0.0)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, low=1)
        self.mode = check_choice("mode", mode, ZScoreMode)
        self.clip_option = check_choice("clip_option", clip_option, ZScoreClipOption)
        self.clip_factor = check_number("clip_factor", clip_factor, low=0.0, low_inclusive=False)
        if not isinstance(skip_update_on_spike, bool):
            raise TypeError(f"`skip_update_on_spike` must be a bool, got {skip_update_on_spike!r}.")
        self.skip_update_on_spike = skip_update_on_spike

    def _config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "z_thresh": self.z_thresh, "max_grad_norm": self.max_grad_norm,
                "eps": self.eps, "warmup_steps": self.warmup_steps, "mode": self.mode.value,
                "clip_option": self.clip_option.value, "clip_factor": self.clip_factor,
                "skip_update_on_spike": self.skip_update_on_spike}

    def _fresh_state(self, device, dtype):
        zero = torch.zeros((), device=device, dtype=dtype)
        return {"count": torch.zeros((), device=device, dtype=torch.int64),
                "buffer": torch.zeros(self.warmup_steps, device=device, dtype=dtype),
                "mean": zero.clone(), "var": zero.clone()}

    def _state_to_dict(self, tensors):
        count, buffer, mean, var = (tensors[k] for k in ("count", "buffer", "mean", "var"))
        values = torch.cat([count.to(buffer.dtype).view(1), mean.view(1), var.view(1), buffer]).tolist()
        count = int(values[0])
        return {"count": count, "mean": values[1], "var": values[2],
                "buffer": values[3: 3 + min(count, self.warmup_steps)]}

    def _state_from_dict(self, state, device, dtype):
        try:
            count, mean, var, buffer = int(state["count"]), float(state["mean"]), float(state["var"]), state["buffer"]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"ZScoreClip state must have int `count`, float `mean`, `var` and a list "
                             f"`buffer`, got {state!r}.") from error
        if count < 0 or not (math.isfinite(mean) and math.isfinite(var) and var >= 0):
            raise ValueError(f"ZScoreClip state needs `count` >= 0, finite `mean`, finite `var` >= 0, got {state!r}.")
        buffer = _check_floats("buffer", buffer)
        if len(buffer) != min(count, self.warmup_steps):
            raise ValueError(f"ZScoreClip state: `buffer` has {len(buffer)} values, expected "
                             f"{min(count, self.warmup_steps)} for count={count} and warmup_steps={self.warmup_steps}.")
        tensors = self._fresh_state(device, dtype)
        tensors["count"].fill_(count)
        tensors["mean"].fill_(mean)
        tensors["var"].fill_(var)
        if buffer:
            tensors["buffer"][: len(buffer)] = torch.tensor(buffer, dtype=dtype)
        return tensors

    @torch.no_grad()
    def clip_(self, grads, norms, *, scale=1.0, observe=None, params=None, names=None) -> ClipOutcome:
        state = self._state(norms.total)
        count, buffer, mean, var = state["count"], state["buffer"], state["mean"], state["var"]
        norm = norms.total.to(mean.dtype)
        finite = torch.isfinite(norm)
        if observe is not None:
            finite = finite & observe.to(finite.device)
        ready = count >= self.warmup_steps

        std = var.sqrt()
        if self.mode is ZScoreMode.ZSCORE:
            z = (norm - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option is ZScoreClipOption.ADAPTIVE_SCALING:
                adaptive = (mean + (self.z_thresh * std) / (z / self.z_thresh)) * self.clip_factor
            else:
                adaptive = mean
        else:
            adaptive = mean + self.z_thresh * std
            spike = norm > adaptive
        clip_val = torch.where(spike, adaptive, norm)  # zclip's "clip value" (the norm: no clipping)
        # The threshold in force: the capped adaptive threshold on a spike, else the cap (inf without one).
        # At scale 1 this makes the same decisions and coefficients as zclip's min(clip_val, cap); a
        # schedule or spike factor then scales a real threshold and never shrinks calm gradients by itself.
        cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
        threshold = torch.where(ready & spike, adaptive.clamp(max=cap), torch.full_like(norm, cap)) * scale
        coef = torch.where(norm > threshold, threshold / (norm + TORCH_EPS), torch.ones_like(norm))
        scale_grads_(grads, coef.to(norms.total.dtype))

        # statistics: warmup buffer, then EMA of the clip value
        warming = finite & ~ready
        index = count.clamp(max=self.warmup_steps - 1).view(1)
        buffer.scatter_(0, index, torch.where(warming, norm, buffer.gather(0, index).squeeze(0)).view(1))
        count.add_(warming.to(count.dtype))
        just_ready = warming & (count == self.warmup_steps)
        warm_mean = buffer.mean()
        warm_var = ((buffer - warm_mean) ** 2).mean()
        update = finite & ready
        if self.skip_update_on_spike:
            update = update & ~spike
        new_mean = self.alpha * mean + (1 - self.alpha) * clip_val
        new_var = self.alpha * var + (1 - self.alpha) * (clip_val - new_mean) ** 2
        mean.copy_(torch.where(just_ready, warm_mean, torch.where(update, new_mean, mean)))
        var.copy_(torch.where(just_ready, warm_var, torch.where(update, new_var, var)))

        threshold = threshold.to(norms.total.dtype)
        return ClipOutcome(norm=norms.total, threshold=threshold, coef=coef.to(norms.total.dtype),
                           norm_post=norms.total * coef.to(norms.total.dtype), clipped=norm > threshold)

    @property
    def statistics(self) -> dict[str, Tensor] | None:
        """The device tensors ``count``, ``mean``, ``var`` (``None`` before the first step)."""
        if self._tensors is None:
            return None
        return {k: self._tensors[k] for k in ("count", "mean", "var")}


class QuantileClip(_StatefulStrategy):
    """AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation
    Networks"): clip the global norm to the ``quantile`` of the norms seen so far.

    The current norm joins the history first, then the threshold is its ``quantile`` (linear
    interpolation, as ``numpy.percentile``), then gradients are clipped as by ``clip_grad_norm_``.
    The history is a ring buffer of the last ``history`` finite norms on the device.

    Args:
        quantile: in ``(0, 1]``; the paper recommends 0.1 (its "p = 10").
        history: number of past norms kept, ``>= 1``.
        norm_type: ``p`` of the norm.
    """

    name = "quantile"

    def __init__(self, quantile: float = 0.9, history: int = 1000, norm_type: float | str = 2.0):
        super().__init__()
        self.quantile = check_number("quantile", quantile, low=0.0, high=1.0, low_inclusive=False)
        self.history = check_int("history", history, low=1)
        self.norm_type = check_norm_type(norm_type)

    def _config(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "history": self.history, "norm_type": self.norm_type}

    def _fresh_state(self, device, dtype):
        return {"count": torch.zeros((), device=device, dtype=torch.int64),
                "ring": torch.full((self.history,), math.nan, device=device, dtype=dtype)}

    def _state_to_dict(self, tensors):
        count = int(tensors["count"].item())
        ring = tensors["ring"]
        if count > self.history:  # oldest first
            start = count % self.history
            ring = torch.cat([ring[start:], ring[:start]])
        return {"count": count, "history": _floats(ring[: min(count, self.history)])}

    def _state_from_dict(self, state, device, dtype):
        try:
            count, values = int(state["count"]), list(state["history"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"QuantileClip state must have int `count` and list `history`, got {state!r}.") from error
        values = _check_floats("history", values, allow_none=True)
        if count < 0 or len(values) > count:
            raise ValueError(f"QuantileClip state: `count` must be >= 0 and >= len(`history`), got {state!r}.")
        values = values[-self.history:]
        tensors = self._fresh_state(device, dtype)
        # place values so that the next write (at count % history) overwrites the oldest
        ring = _tensor_of(values, self.history, device, dtype)
        if count > self.history:
            ring = torch.roll(ring, shifts=count % self.history)
        tensors["ring"].copy_(ring)
        tensors["count"].fill_(count)
        return tensors

    @torch.no_grad()
    def clip_(self, grads, norms, *, scale=1.0, observe=None, params=None, names=None) -> ClipOutcome:
        state = self._state(norms.total)
        count, ring = state["count"], state["ring"]
        norm = norms.total.to(ring.dtype)
        keep = torch.isfinite(norm)
        if observe is not None:
            keep = keep & observe.to(keep.device)
        index = (count % self.history).view(1)
        ring.scatter_(0, index, torch.where(keep, norm, ring.gather(0, index).squeeze(0)).view(1))
        count.add_(keep.to(count.dtype))
        quantile = torch.nanquantile(ring, self.quantile)
        empty = torch.isnan(quantile)  # empty history: no threshold, no clipping (whatever the scale)
        threshold = torch.where(empty, norm, quantile * scale).to(norms.total.dtype)
        coef = torch.clamp(threshold / (norms.total + TORCH_EPS), max=1.0)
        coef = torch.where(empty.to(coef.device), torch.ones_like(coef), coef)
        scale_grads_(grads, coef)
        return ClipOutcome(norm=norms.total, threshold=threshold, coef=coef,
                           norm_post=norms.total * coef, clipped=coef < 1.0)
