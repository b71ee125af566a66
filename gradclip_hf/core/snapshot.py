"""In-memory snapshots of trainable weights and per-parameter optimizer state (``spike_action="rollback"``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ._checks import check_int

__all__ = ["TrainingSnapshot"]


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class TrainingSnapshot:
    """Copies of the trainable parameters and of the optimizer's per-parameter state (Adam's moments and
    step counts), taken every ``every`` clean steps. The learning rate and other ``param_groups`` settings
    are not part of it: after a rollback they stay the scheduler's.

    Memory: one copy of the trainable parameters plus one of the optimizer state (for AdamW, three times the
    trainable parameters): small for LoRA adapters, large for a full fine-tune. Taking and restoring are
    device-to-device copies in place, so the optimizer keeps pointing at the same tensors.

    Args:
        every: clean optimizer steps between two snapshots, ``>= 1``.
    """

    def __init__(self, every: int = 50):
        self.every = check_int("every", every, low=1)
        self.step: int | None = None
        self._params: list[torch.Tensor] = []
        self._state: list[dict[str, Any] | None] = []

    @staticmethod
    def _trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in parameters if p.requires_grad]

    def due(self, step: int) -> bool:
        """Whether a snapshot should be taken before the clean step ``step``."""
        return self.step is None or step - self.step >= self.every

    @torch.no_grad()
    def take(self, step: int, parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Copy the trainable parameters and the per-parameter optimizer state, as they are now."""
        params = self._trainable(parameters)
        if len(params) == len(self._params) and all(a.shape == b.shape for a, b in zip(params, self._params)):
            for saved, p in zip(self._params, params):
                saved.copy_(p)
        else:
            self._params = [p.detach().clone() for p in params]
        self._state = [{k: _clone(v) for k, v in optimizer.state[p].items()} if p in optimizer.state else None
                       for p in _optimizer_params(optimizer)]
        self.step = step

    @torch.no_grad()
    def restore(self, parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
        """Put the snapshot back (weights and per-parameter state, not the learning rate); returns the step it
        was taken at.

        Raises:
            RuntimeError: no snapshot was taken yet, or the parameters changed since.
        """
        params = self._trainable(parameters)
        opt_params = _optimizer_params(optimizer)
        if self.step is None:
            raise RuntimeError("No snapshot to roll back to yet: the first one is taken before the first clean step.")
        if (len(params) != len(self._params) or any(a.shape != b.shape for a, b in zip(params, self._params))
                or len(opt_params) != len(self._state)):
            raise RuntimeError("The trainable parameters changed since the snapshot; cannot roll back.")
        for p, saved in zip(params, self._params):
            p.copy_(saved)
        for p, saved in zip(opt_params, self._state):
            if saved is None:
                optimizer.state.pop(p, None)
                continue
            current = optimizer.state[p]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and isinstance(current.get(key), torch.Tensor) \
                        and current[key].shape == value.shape:
                    current[key].copy_(value)
                else:
                    current[key] = _clone(value)
            for key in set(current) - set(saved):
                del current[key]
        return self.step
