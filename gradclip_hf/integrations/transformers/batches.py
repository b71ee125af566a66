"""Which batch did it: what identifies the batch of a spike or non-finite step, kept without a host sync.

Per micro-batch, :class:`BatchTracker` computes on the device one fingerprint per sample (an order-free hash
of its non-padding token ids) and keeps the first tokens of its first sample. When a step is flagged, those
values are copied into a device ring buffer (``torch.where``: nothing leaves the device), and read back with
the spike events at the next logging step.

Dataset indices: :class:`IndexRecord` remembers the indices the train dataloader's sampler yields (from train
begin, for the mixin and the bare callback alike). At read time the fingerprints
of those candidates' dataset items are matched to the flagged step's samples, which is robust to prefetching,
sharding across processes and resumed data order. Where the dataset is not indexable, or items hold no
``input_ids``, the record has the fingerprints only.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator

import torch
from torch import Tensor

from ...core._state import ring_write_

__all__ = ["BatchTracker", "IndexRecord", "fingerprints"]

_MUL, _ADD, _MASK = 0x9E3779B1, 0x7F4A7C15, 0x7FFFFFFF
FIRST_TOKENS = 48
KEEP_INDICES = 200_000  # recorded sampler indices kept (a bounded window over the most recent ones)


def fingerprints(input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """One int64 per sample (row): the sum of a hash of each token id where the mask is 1. Order-free, so
    padding side and truncation position do not change it; identical on the host and the device."""
    ids = input_ids.long()
    if ids.ndim == 1:
        ids = ids.unsqueeze(0)
        attention_mask = None if attention_mask is None else attention_mask.unsqueeze(0)
    hashed = (ids * _MUL + _ADD) & _MASK
    if attention_mask is not None:
        hashed = hashed * attention_mask.to(hashed.device).long()
    return hashed.sum(dim=1)


class IndexRecord:
    """Remembers the last :data:`KEEP_INDICES` indices ``sampler`` yields, without changing what it yields: the
    instance's class is swapped for a subclass whose ``__iter__`` records (so ``isinstance`` checks, accelerate's
    seedable sampler and the data order are untouched) and swapped back by :meth:`release`."""

    def __init__(self, sampler: Any):
        self.sampler, self.original = sampler, type(sampler)
        self.recent: collections.deque[int] = collections.deque(maxlen=KEEP_INDICES)
        record, original = self.recent, self.original

        def __iter__(inner):
            for index in original.__iter__(inner):
                if isinstance(index, int) or (isinstance(index, Tensor) and index.ndim == 0):
                    record.append(int(index))  # an iterable dataset's sampler yields None: nothing to record
                yield index

        sampler.__class__ = type(f"Recording{original.__name__}", (original,), {"__iter__": __iter__})

    @classmethod
    def attach(cls, sampler: Any) -> "IndexRecord | None":
        """Record ``sampler`` if it can be (a plain Python sampler), else ``None``."""
        if sampler is None or not hasattr(type(sampler), "__iter__"):
            return None
        try:
            return cls(sampler)
        except TypeError:  # a C type or __slots__ layout: no indices, fingerprints only
            return None

    def release(self) -> None:
        self.sampler.__class__ = self.original


class BatchTracker:
    """Device-side record of the batches of flagged steps (see the module docstring).

    Args:
        samples: samples per optimizer step on this process (per-device batch x accumulation steps).
        capacity: flagged steps kept between two reads.
    """

    def __init__(self, samples: int, capacity: int):
        self.samples, self.capacity = max(1, samples), capacity
        self._step_prints: list[Tensor] = []
        self._first: Tensor | None = None
        self.rings: dict[str, Tensor] | None = None
        self.count: Tensor | None = None
        self.sampler: IndexRecord | None = None
        self.dataset: Any = None

    def add(self, inputs: Any) -> None:
        """A micro-batch (the ``inputs`` of ``training_step``); device work only."""
        ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
        if not isinstance(ids, Tensor):
            return
        self._step_prints.append(fingerprints(ids, inputs.get("attention_mask")))
        if self._first is None:
            first = ids.reshape(-1)[:FIRST_TOKENS].long() if ids.ndim <= 1 else ids[0, :FIRST_TOKENS].long()
            self._first = torch.nn.functional.pad(first, (0, FIRST_TOKENS - first.numel()), value=-1)

    def record(self, flag: Tensor) -> None:
        """End of a step: keep its batch where the 0-dim bool ``flag`` holds (spike or non-finite)."""
        prints, first = self._step_prints, self._first
        self._step_prints, self._first = [], None
        if not prints:
            return
        row = torch.cat([p.to(flag.device) for p in prints])[: self.samples]
        row = torch.nn.functional.pad(row, (0, self.samples - row.numel()), value=0)
        if self.rings is None:
            self.rings = {"prints": torch.zeros((self.capacity, self.samples), dtype=torch.int64, device=flag.device),
                          "first": torch.full((self.capacity, FIRST_TOKENS), -1, dtype=torch.int64, device=flag.device)}
            self.count = torch.zeros((), dtype=torch.int64, device=flag.device)
        ring_write_(self.rings["prints"], self.count, row, flag)
        ring_write_(self.rings["first"], self.count, first.to(flag.device), flag)
        self.count.add_(flag.to(torch.int64))

    def tensors(self) -> dict[str, Tensor]:
        """The rings, for a shared :func:`~gradclip_hf.core._state.to_host` transfer."""
        return {} if self.rings is None else dict(self.rings)

    def parse(self, values: dict[str, list[float]], since: int, total: int) -> list[dict[str, Any]]:
        """The records numbered ``since .. total - 1`` that are still kept: per record the sample fingerprints
        and the first tokens, from the transferred rings."""
        if not values or total <= since:
            return []
        out = []
        for number in range(max(since, total - self.capacity), total):
            at = number % self.capacity
            prints = values["prints"][at * self.samples: (at + 1) * self.samples]
            first = values["first"][at * FIRST_TOKENS: (at + 1) * FIRST_TOKENS]
            out.append({"number": number, "prints": [int(p) for p in prints if p],
                        "tokens": [int(t) for t in first if t >= 0]})
        return out

    def indices(self, prints: list[int], lookback_steps: int) -> list[int] | None:
        """Dataset indices of the samples with these fingerprints, among the indices sampled for the last
        ``lookback_steps`` steps (of every process: each one iterates the whole sampler)."""
        if self.sampler is None or self.dataset is None or not prints:
            return None
        wanted = collections.Counter(prints)
        found = []
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        recent = list(self.sampler.recent)[-self.samples * world * lookback_steps:]
        for index in reversed(recent):
            item = self.dataset[index]
            ids = item.get("input_ids") if isinstance(item, dict) else None
            if ids is None:
                return None
            mask = item.get("attention_mask")
            key = int(fingerprints(torch.as_tensor(ids), None if mask is None else torch.as_tensor(mask))[0])
            if wanted[key] > 0:
                wanted[key] -= 1
                found.append(index)
                if not +wanted:
                    break
        return sorted(found) if found else None
