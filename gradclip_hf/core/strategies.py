"""Clipping strategies with a fixed threshold: one small class each, torch only, no host sync.

A strategy clips a list of gradients given their norms (computed once by the caller) and returns a
:class:`ClipOutcome` of 0-dim device tensors. ``scale`` multiplies the threshold: schedules and the spike
controller tighten or relax any strategy through it (a float, or a 0-dim device tensor).

*Scalar* strategies (``scalar = True``: :class:`MeasureOnly`, :class:`NormClip`, and the adaptive
:class:`~gradclip_hf.core.adaptive.ZScoreClip` and :class:`~gradclip_hf.core.adaptive.QuantileClip`) clip
by ONE multiplier of every gradient, ``outcome.coef``. Like torch's ``get_total_norm`` and
``clip_grads_with_norm_``, they work in two steps: :meth:`ClipStrategy.plan` decides the multiplier without
touching a gradient, :meth:`ClipStrategy.apply_` multiplies. The caller may instead hand ``coef`` to a
fused optimizer (``optimizer.grad_scale = 1 / coef``), which saves one write pass over the gradients.
``ValueClip`` and ``AGC`` change each element or unit differently: they only clip in place.
"""

from __future__ import annotations

import math
import re
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from ._checks import check_norm_type, check_number, check_patterns
from .norms import GradNorms, grad_norms, is_dtensor, to_local

__all__ = ["ClipOutcome", "ClipStrategy", "MeasureOnly", "NormClip", "ValueClip", "AGC", "scale_grads_",
           "TORCH_EPS"]

TORCH_EPS = 1e-6  # the epsilon torch.nn.utils.clip_grad_norm_ adds to the norm


@dataclass
class ClipOutcome:
    """What one strategy did (or plans to do) to one set of gradients; all 0-dim device tensors.

    Attributes:
        norm: pre-clip total norm.
        threshold: the threshold in force (after ``scale``); for ``ValueClip`` the value bound, for ``AGC``
            the unit-wise ratio.
        coef: post-clip norm over pre-clip norm (the multiplier of scalar strategies), ``<= 1``.
        norm_post: post-clip total norm.
        clipped: whether the gradients are changed.
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    norm_post: Tensor
    clipped: Tensor


def as_tensor(value: float | Tensor, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return torch.full((), value, device=like.device, dtype=like.dtype)


def scale_grads_(grads: list[Tensor], coef: Tensor) -> None:
    """Multiply ``grads`` in place by the 0-dim ``coef`` with foreach kernels, as torch's ``clip_grad_norm_``."""
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
    """Base class. A scalar strategy implements :meth:`plan`; an element-wise one overrides :meth:`clip_`.
    Strategies with statistics also implement ``state_dict``/``load_state_dict`` (see ``DeviceState``)."""

    name: ClassVar[str]
    scalar: ClassVar[bool] = True
    needs_params: ClassVar[bool] = False
    norm_type: float = 2.0

    @property
    def base_threshold(self) -> float | None:
        """The threshold before schedules and spike factors, for strategies where it is fixed."""
        return None

    def next_threshold(self, device: torch.device) -> Tensor:
        """The global-norm threshold for a step whose norm is not known yet, from the statistics of the steps
        before (before ``scale``; ``inf``: no clip): for optimizers that clip inside their own step, given one
        threshold ahead (:class:`~gradclip_hf.core.external.ExternalClip`). Scalar strategies only."""
        raise NotImplementedError(f"{type(self).__name__} does not clip by one global-norm threshold.")

    def plan(self, norms: GradNorms, *, scale: float | Tensor = 1.0, observe: Tensor | None = None) -> ClipOutcome:
        """Decide the clip (and update statistics) without touching a gradient (scalar strategies).

        Args:
            norms: the gradients' norms, computed with ``self.norm_type``.
            scale: multiplier of the threshold (schedule times spike factor).
            observe: 0-dim bool tensor; False keeps this step out of the statistics (non-finite norms
                never enter them).
        """
        raise NotImplementedError(f"{type(self).__name__} clips element-wise: use clip_().")

    def apply_(self, grads: list[Tensor], outcome: ClipOutcome) -> None:
        """Multiply ``grads`` in place by ``outcome.coef`` (scalar strategies)."""
        scale_grads_(grads, outcome.coef)

    def clip_(self, grads: list[Tensor], norms: GradNorms, *, scale: float | Tensor = 1.0,
              observe: Tensor | None = None, params: Sequence[Tensor] | None = None,
              names: Sequence[str] | None = None) -> ClipOutcome:
        """Clip ``grads`` in place; ``params``/``names`` are the parameters they belong to (``needs_params``)."""
        outcome = self.plan(norms, scale=scale, observe=observe)
        self.apply_(grads, outcome)
        return outcome

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no statistics, but the saved state has {sorted(state)}.")

    def _config(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._config().items())})"


class MeasureOnly(ClipStrategy):
    """Strategy ``"none"``: measure the norm (for logging and the spike controller), never clip."""

    name = "none"

    def __init__(self, norm_type: float | str = 2.0):
        self.norm_type = check_norm_type(norm_type)

    def _config(self) -> dict[str, Any]:
        return {"norm_type": self.norm_type}

    def next_threshold(self, device: torch.device) -> Tensor:
        return torch.full((), math.inf, device=device)

    def plan(self, norms, *, scale=1.0, observe=None) -> ClipOutcome:
        total = norms.total
        return ClipOutcome(norm=total, threshold=torch.full_like(total, math.inf), coef=torch.ones_like(total),
                           norm_post=total, clipped=torch.zeros((), dtype=torch.bool, device=total.device))

    def apply_(self, grads, outcome) -> None:
        return None


class NormClip(ClipStrategy):
    """Clip by global norm, exactly as :func:`torch.nn.utils.clip_grad_norm_`.

    ``coef = clamp(max_norm * scale / (norm + 1e-6), max=1)``; with ``scale=1.0`` in place, bit-identical
    to torch's.

    Args:
        max_norm: the threshold, ``> 0``.
        norm_type: ``p`` of the norm, ``>= 1`` or ``inf``.
    """

    name = "norm"

    def __init__(self, max_norm: float = 1.0, norm_type: float | str = 2.0):
        self.max_norm = check_number("max_norm", max_norm, low=0.0, low_inclusive=False)
        self.norm_type = check_norm_type(norm_type)

    @property
    def base_threshold(self) -> float:
        return self.max_norm

    def _config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def next_threshold(self, device: torch.device) -> Tensor:
        return torch.full((), self.max_norm, device=device)

    def plan(self, norms, *, scale=1.0, observe=None) -> ClipOutcome:
        threshold = self.max_norm * scale
        coef = torch.clamp(threshold / (norms.total + TORCH_EPS), max=1.0)
        return ClipOutcome(norm=norms.total, threshold=as_tensor(threshold, norms.total), coef=coef,
                           norm_post=norms.total * coef, clipped=coef < 1.0)


class ValueClip(ClipStrategy):
    """Clamp every gradient element to ``[-clip_value * scale, clip_value * scale]``.

    Identical to :func:`torch.nn.utils.clip_grad_value_` for a float ``scale``. Costs one more norm pass
    (with ``norm_type``) to report the post-clip norm; ``clipped`` is "the post-clip norm is below the
    pre-clip norm".

    Args:
        clip_value: the bound, ``> 0``.
        norm_type: ``p`` of the reported norms.
    """

    name = "value"
    scalar = False

    def __init__(self, clip_value: float = 1.0, norm_type: float | str = 2.0):
        self.clip_value = check_number("clip_value", clip_value, low=0.0, low_inclusive=False)
        self.norm_type = check_norm_type(norm_type)

    @property
    def base_threshold(self) -> float:
        return self.clip_value

    def _config(self) -> dict[str, Any]:
        return {"clip_value": self.clip_value, "norm_type": self.norm_type}

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
        return ClipOutcome(norm=norms.total, threshold=as_tensor(bound, norms.total),
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

    For each output unit ``i`` of a parameter ``W`` (a row of a matrix, a conv kernel; a bias or scalar as
    a whole), the gradient ``G_i`` is rescaled to norm ``clipping * max(||W_i||, eps)`` when it is larger
    (unit norms are L2, as in the paper; the reported total norms too). Parameters whose name matches a
    pattern in ``exclude`` (the final classifier in the paper) are left alone. Loops over tensors (no
    foreach kernel exists for per-row norms).

    Args:
        clipping: ratio λ of gradient to weight norm, ``> 0`` (0.01 for batch 4096, larger for small batches).
        eps: floor of the weight norm, so zero-initialised units can move, ``> 0``.
        exclude: regular expressions searched in parameter names.
    """

    name = "agc"
    scalar = False
    needs_params = True

    def __init__(self, clipping: float = 0.01, eps: float = 1e-3, exclude: Sequence[str] = ("lm_head",)):
        self.clipping = check_number("clipping", clipping, low=0.0, low_inclusive=False)
        self.eps = check_number("eps", eps, low=0.0, low_inclusive=False)
        self.exclude = tuple(check_patterns("exclude", exclude))
        self._exclude = [re.compile(p) for p in self.exclude]

    @property
    def base_threshold(self) -> float:
        return self.clipping

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
            # one small factor per unit (1 where not triggered), then one in-place multiply
            g.mul_(torch.where(trigger, max_norm / g_norm.clamp(min=TORCH_EPS), torch.ones_like(g_norm)))
            clipped = clipped | trigger.any().to(clipped.device)
        norm_post = grad_norms(grads, norms.norm_type).total
        if any(is_dtensor(g) for g in grads):  # triggers are per shard: decide on the global norms
            clipped = norm_post < norms.total
        return ClipOutcome(norm=norms.total, threshold=as_tensor(ratio, norms.total),
                           coef=_ratio_coef(norm_post, norms.total), norm_post=norm_post, clipped=clipped)
