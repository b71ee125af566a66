"""In-memory snapshots of trainable weights and optimizer state, for the ``rollback`` spike action."""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from ._checks import check_int

__all__ = ["TrainingSnapshot"]


def _clone_state(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_state(v) for v in value)
    return copy.deepcopy(value)


class TrainingSnapshot:
    """Copies of the trainable parameters and the optimizer state, taken every ``every`` clean steps.

    Memory: one copy of the trainable parameters plus one of the optimizer state (for AdamW, three
    times the trainable parameters): small for LoRA adapters, large for a full fine-tune. Taking a
    snapshot is a device-to-device copy; restoring copies back in place, so the optimizer keeps
    pointing at the same parameter tensors.

    Args:
        every: clean optimizer steps between two snapshots, ``>= 1``.
    """

    def __init__(self, every: int = 50):
        self.every = check_int("every", every, low=1)
        self.step: int | None = None
        self._params: list[torch.Tensor] = []
        self._optimizer_state: dict | None = None

    @staticmethod
    def _trainable(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        return [p for p in parameters if p.requires_grad]

    def due(self, step: int) -> bool:
        """Whether a snapshot should be taken after the clean step ``step``."""
        return self.step is None or step - self.step >= self.every

    @torch.no_grad()
    def take(self, step: int, parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Copy the trainable parameters and the optimizer state, as of the end of ``step``."""
        params = self._trainable(parameters)
        if len(params) == len(self._params) and all(a.shape == b.shape for a, b in zip(params, self._params)):
            for saved, p in zip(self._params, params):
                saved.copy_(p)
        else:
            self._params = [p.detach().clone() for p in params]
        self._optimizer_state = _clone_state(optimizer.state_dict())
        self.step = step

    @torch.no_grad()
    def restore(self, parameters: Iterable[nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
        """Put the snapshot back; returns the step it was taken at.

        Raises:
            RuntimeError: no snapshot was taken yet, or the trainable parameters changed shape.
        """
        if self.step is None or self._optimizer_state is None:
            raise RuntimeError("No snapshot to roll back to yet: the first one is taken after the first clean step.")
        params = self._trainable(parameters)
        if len(params) != len(self._params) or any(a.shape != b.shape for a, b in zip(params, self._params)):
            raise RuntimeError("The trainable parameters changed since the snapshot; cannot roll back.")
        for p, saved in zip(params, self._params):
            p.copy_(saved)
        optimizer.load_state_dict(_clone_state(self._optimizer_state))
        return self.step
