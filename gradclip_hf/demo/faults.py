"""Fault injection for the demo's Trainer runs (and the benchmark gallery's, ``benchmarks/harness``): bad batches,
a learning-rate mistake, non-finite activations.

Every fault has a clean counterfactual with the same initialisation, data order and steps:

* batch faults (``garbage``, ``utf16_shard``, ``label_noise``) replace the whole batch of the fault
  steps in a :class:`StepStream`; the clean run gets the clean batches they displaced, so the clean
  stream is the same for every batch fault;
* ``lr`` multiplies the learning rate of the fault steps (:class:`LRFault`); the clean run has no such
  mistake;
* ``nonfinite`` multiplies the input embeddings of the fault steps by ``inf`` in the forward pass
  (:class:`NonFiniteFault`), as an fp16/bf16 overflow does: the loss and every gradient of that step
  are NaN. The clean run has no such step.

All faults are deterministic functions of (seed, step).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils.data import IterableDataset
from transformers import TrainerCallback

from ..standins import BOS_ID, rare_byte_block

__all__ = ["BATCH_FAULTS", "BatchFault", "Item", "item", "StepStream", "LRFault", "NonFiniteFault", "batch_fault"]

Item = dict[str, torch.Tensor]


def item(ids: torch.Tensor, labels: torch.Tensor | None = None) -> Item:
    """A training item of ``ids`` (its ``labels``, else the ids themselves), every position attended."""
    return {"input_ids": ids, "labels": ids.clone() if labels is None else labels,
            "attention_mask": torch.ones_like(ids)}


def _generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)


def garbage(clean: Sequence[Item], step: int, seed: int) -> list[Item]:
    """Random bytes 128-255, never seen in the ASCII training text ("rare token" batches)."""
    g = _generator(seed, step)
    return [item(rare_byte_block(len(c["input_ids"]), g)) for c in clean]


def utf16_shard(clean: Sequence[Item], step: int, seed: int) -> list[Item]:
    """The same text written in the wrong encoding (UTF-16-LE: every byte followed by a zero byte)."""
    out = []
    for c in clean:
        ids = c["input_ids"]
        body = torch.stack([ids[1:], torch.zeros_like(ids[1:])], dim=1).flatten()[: len(ids) - 1]
        out.append(item(torch.cat([torch.tensor([BOS_ID]), body])))
    return out


def label_noise(clean: Sequence[Item], step: int, seed: int) -> list[Item]:
    """Real text whose labels belong to other texts of the batch (a pairing or alignment bug)."""
    g = _generator(seed, step)
    n = len(clean)
    shift = 1 + int(torch.randint(0, max(n - 1, 1), (1,), generator=g)) if n > 1 else 0
    out = []
    for i, c in enumerate(clean):
        other = clean[(i + shift) % n]
        labels = other["labels"].clone()
        if n == 1:
            labels = labels[torch.randperm(len(labels), generator=g)]
        out.append(item(c["input_ids"], labels))
    return out


BatchFault = Callable[[Sequence[Item], int, int], list[Item]]
BATCH_FAULTS: dict[str, BatchFault] = {"garbage": garbage, "utf16_shard": utf16_shard, "label_noise": label_noise}


def batch_fault(kind: str, faults: dict[str, BatchFault] = BATCH_FAULTS) -> BatchFault:
    """The batch fault ``kind`` of ``faults``; ``ValueError`` naming the known ones."""
    if kind not in faults:
        raise ValueError(f"batch fault {kind!r} is not one of {sorted(faults)}.")
    return faults[kind]


class StepStream(IterableDataset):
    """Items in a fixed order, ``samples_per_step`` per optimizer step; the batches of ``fault_steps``
    are replaced by ``fault(clean_items, step, seed)``.

    Step ``t`` gets items ``t * samples_per_step ...`` of ``items`` (cycling), whether or not an earlier
    step was replaced: a faulted stream and its clean counterfactual agree on every other step. An
    ``IterableDataset`` is never shuffled by the Trainer (``max_steps`` must be set).
    """

    def __init__(self, items: Sequence[Item], samples_per_step: int, fault_steps: Sequence[int] = (),
                 fault: Callable[[Sequence[Item], int, int], list[Item]] | None = None, seed: int = 0):
        super().__init__()
        if samples_per_step < 1:
            raise ValueError(f"`samples_per_step` must be >= 1, got {samples_per_step!r}.")
        if fault_steps and fault is None:
            raise ValueError("`fault_steps` given without a `fault`.")
        self.items, self.samples_per_step = items, samples_per_step
        self.fault_steps, self.fault, self.seed = frozenset(fault_steps), fault, seed

    def batch(self, step: int) -> list[Item]:
        n, b = len(self.items), self.samples_per_step
        clean = [self.items[(step * b + j) % n] for j in range(b)]
        if step in self.fault_steps:
            return self.fault(clean, step, self.seed)
        return clean

    def __iter__(self):
        step = 0
        while True:
            yield from self.batch(step)
            step += 1


class LRFault(TrainerCallback):
    """Multiply the learning rate of the optimizer steps in ``steps`` by ``factor`` (set just before
    ``optimizer.step()``, restored just after: the scheduler never sees it)."""

    def __init__(self, steps: Sequence[int], factor: float):
        self.steps, self.factor = frozenset(steps), float(factor)
        self._saved: list[float] | None = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs: Any):
        if state.global_step in self.steps and optimizer is not None:
            self._saved = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.factor

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs: Any):
        if self._saved is not None and optimizer is not None:
            for group, lr in zip(optimizer.param_groups, self._saved):
                group["lr"] = lr
            self._saved = None


class NonFiniteFault(TrainerCallback):
    """In the training forward pass of the optimizer steps in ``steps``, multiply the input embeddings by
    ``inf`` (an activation overflow): the step's loss and gradients are NaN."""

    def __init__(self, steps: Sequence[int]):
        self.steps = frozenset(steps)
        self.step = -1
        self._handle = None

    def _hook(self, module, inputs, output):
        if module.training and self.step in self.steps:
            return output * float("inf")
        return output

    def on_train_begin(self, args, state, control, model=None, **kwargs: Any):
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def on_step_begin(self, args, state, control, **kwargs: Any):
        self.step = state.global_step

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
