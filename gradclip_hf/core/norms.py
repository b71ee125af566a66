"""Gradient norms as device tensors: per tensor and total, for any ``norm_type``.

The arithmetic is the same as :func:`torch.nn.utils.get_total_norm` (foreach kernels grouped by
device and dtype, then the norm of the stacked per-tensor norms), so a total computed here is
bit-identical to torch's, and the per-tensor norms come for free for per-layer logging.

DTensor gradients (FSDP2) are measured through DTensor dispatch and reduced to a plain tensor with
one collective (``full_tensor``), so every rank sees the global norm, never its shard's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

__all__ = ["GradNorms", "grad_norms", "combine_norms", "to_local", "is_dtensor"]


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "full_tensor")


def to_local(tensor: Tensor) -> Tensor:
    """The local shard of a DTensor (a view that in-place ops write through), else ``tensor``."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


@dataclass
class GradNorms:
    """Norms of a list of gradients, all device tensors.

    Attributes:
        total: 0-dim norm of all gradients viewed as one vector.
        per_tensor: 1-dim norms of each gradient, in the order the gradients were given.
        norm_type: the ``p`` of the norms.
    """

    total: Tensor
    per_tensor: Tensor
    norm_type: float

    def scaled(self, factor: Tensor) -> "GradNorms":
        """The norms of the gradients times the 0-dim ``factor > 0`` (a norm is homogeneous: no pass over them)."""
        return GradNorms(self.total * factor.to(self.total.device, self.total.dtype),
                         self.per_tensor * factor.to(self.per_tensor.device, self.per_tensor.dtype), self.norm_type)


@torch.no_grad()
def grad_norms(grads: list[Tensor], norm_type: float = 2.0, foreach: bool | None = None) -> GradNorms:
    """Per-tensor and total ``norm_type``-norms of ``grads`` without a host sync.

    Args:
        grads: gradient tensors (plain tensors or DTensors), at least one.
        norm_type: ``p`` of the norm, ``>= 1`` or ``math.inf``.
        foreach: ``None`` uses foreach kernels where the device supports them, ``True`` requires
            them, ``False`` loops over tensors (as in torch's ``clip_grad_norm_``).

    Returns:
        A :class:`GradNorms`; ``total`` is bit-identical to ``torch.nn.utils.get_total_norm``.
    """
    if not grads:
        raise ValueError("`grads` is empty: there is no gradient to measure.")
    norm_type = float(norm_type)
    distributed = [is_dtensor(g) for g in grads]
    if any(distributed) and not all(distributed):
        # DTensor ops refuse plain tensors: measure the two kinds apart, then merge in the caller's order
        split = [[g for g, d in zip(grads, distributed) if d], [g for g, d in zip(grads, distributed) if not d]]
        parts = [iter(grad_norms(part, norm_type, foreach).per_tensor.unbind()) for part in split]
        device = grads[0].device
        per_tensor = torch.stack([next(parts[0] if d else parts[1]).to(device) for d in distributed])
        return GradNorms(total=torch.linalg.vector_norm(per_tensor, norm_type), per_tensor=per_tensor,
                         norm_type=norm_type)
    first_device = grads[0].device
    grouped = _group_tensors_by_device_and_dtype([grads], with_indices=True)
    grouped_norms: list[Tensor] = []
    order: list[int] = []
    for (device, _), ([device_grads], indices) in grouped.items():
        if (foreach is None and _has_foreach_support(device_grads, device)) or (
            foreach and _device_has_foreach_support(device)
        ):
            grouped_norms.extend(torch._foreach_norm(device_grads, norm_type))
        elif foreach:
            raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on {device.type} tensors")
        else:
            grouped_norms.extend(torch.linalg.vector_norm(g, norm_type) for g in device_grads)
        order.extend(indices)
    grouped_norms = [norm.to(first_device) for norm in grouped_norms]
    stacked = _full(torch.stack(grouped_norms))
    total = torch.linalg.vector_norm(stacked, norm_type)
    if order == sorted(order):
        per_tensor = stacked
    else:  # mixed devices or dtypes: restore the caller's order (list reindexing, no index tensor)
        position = {index: at for at, index in enumerate(order)}
        rows = stacked.unbind()  # already reduced: no second collective for DTensors
        per_tensor = torch.stack([rows[position[i]] for i in range(len(order))])
    return GradNorms(total=total, per_tensor=per_tensor, norm_type=norm_type)


def combine_norms(totals: list[Tensor], norm_type: float) -> Tensor:
    """The norm of the concatenation of vectors whose ``norm_type``-norms are ``totals``."""
    if len(totals) == 1:
        return totals[0]
    device = totals[0].device
    stacked = torch.stack([t.to(device=device, dtype=torch.float32) for t in totals])
    if math.isinf(norm_type):
        return stacked.max()
    return torch.linalg.vector_norm(stacked, norm_type)
