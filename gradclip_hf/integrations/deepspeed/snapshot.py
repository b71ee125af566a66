"""``spike_action="rollback"`` under DeepSpeed ZeRO: an exact in-memory snapshot of what a step changes.

A ZeRO step changes this rank's fp32 master partitions and the base torch optimizer's state (Adam's moments and
step counts, for its partition); the low-precision weights the model runs on are copies of the masters. So a
snapshot clones the masters and every state tensor, and a restore ``copy_()``s them back into the SAME tensors
(DeepSpeed's links from parameters to their fragments stay valid) and then refreshes the low-precision copy from
the masters (ZeRO-1/2: ``update_lp_params``; ZeRO-3: the partitions, then the persistent parameters gathered).
Verified bit-exact on ZeRO-1/2/3, fp32 and bf16, 1 and 2 ranks (tests/deepspeed).

Memory: for AdamW, 12 bytes per parameter divided by the data-parallel world size, per rank (fp32 master 4 +
``exp_avg`` 4 + ``exp_avg_sq`` 4): a second copy of the rank's optimizer partition, on the same device.
Not restored, as on the local path: the learning rate (the scheduler's), the engine's step counters.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from ...core._checks import check_int
from . import compat

__all__ = ["EngineSnapshot"]


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)


class EngineSnapshot:
    """The :class:`~gradclip_hf.core.TrainingSnapshot` interface (``due``, ``take``, ``restore``, ``step``) on a
    DeepSpeed engine; ``take``/``restore`` ignore the parameters and optimizer they are handed (the engine's
    partitions are what a step changes).

    Under DeepSpeed the engine has stepped when the run decides: a snapshot taken at step ``s`` (clean) holds the
    state after it, i.e. before step ``s + 1`` (``step``).
    """

    def __init__(self, engine: Any, every: int = 50):
        self.engine, self.every = engine, check_int("every", every, low=1)
        self.step: int | None = None
        self._master: list[torch.Tensor] = []
        self._state: dict[Any, dict[str, Any]] = {}

    def due(self, step: int) -> bool:
        return self.step is None or step - self.step >= self.every

    def nbytes(self) -> int:
        tensors = self._master + [v for s in self._state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @torch.no_grad()
    def take(self, step: int, parameters: Any = None, optimizer: Any = None) -> None:
        live = compat.master_partitions(self.engine.optimizer)
        if [t.shape for t in live] == [t.shape for t in self._master]:
            for saved, t in zip(self._master, live):
                saved.copy_(t)
        else:
            self._master = [t.detach().clone() for t in live]
        self._state = {key: {k: _clone(v) for k, v in state.items()}
                       for key, state in compat.base_state(self.engine.optimizer).items()}
        self.step = step + 1

    @torch.no_grad()
    def restore(self, parameters: Any = None, optimizer: Any = None) -> int:
        """Put the snapshot back; returns the step it holds the state before.

        Raises:
            RuntimeError: no snapshot yet, or the engine's partitions changed since."""
        if self.step is None:
            raise RuntimeError("No snapshot to roll back to yet: the first one is taken after the first clean step.")
        live = compat.master_partitions(self.engine.optimizer)
        if [t.shape for t in live] != [t.shape for t in self._master]:
            raise RuntimeError("The engine's partitions changed since the snapshot; cannot roll back.")
        for t, saved in zip(live, self._master):
            t.copy_(saved)
        state = compat.base_state(self.engine.optimizer)
        for key in [k for k in state if k not in self._state]:
            del state[key]
        for key, saved in self._state.items():
            current = state.setdefault(key, {})
            for name, value in saved.items():
                if isinstance(value, torch.Tensor) and isinstance(current.get(name), torch.Tensor) \
                        and current[name].shape == value.shape:
                    current[name].copy_(value)
                else:
                    current[name] = _clone(value)
            for name in set(current) - set(saved):
                del current[name]
        compat.refresh_low_precision(self.engine)
        return self.step
