"""Which batch did it: what identifies the batch of a spike or non-finite step, kept without a host sync.

Per micro-batch (any ``Mapping`` with ``input_ids``: a ``dict``, or the ``BatchEncoding`` the Trainer's default
collators return), :class:`BatchTracker` computes on the device one fingerprint per sample (an order-free hash
of its non-padding token ids) and keeps the first non-padding tokens of its first sample. When a step is
flagged, those values are copied into a device ring buffer (``torch.where``: nothing leaves the device), and
read back with the spike events.

Dataset indices: :class:`IndexRecord` remembers the indices the train dataloader's sampler yields (from train
begin, for the mixin and the bare callback alike) and how many it has yielded (a host count). For each step
the tracker notes, on the host, the sampler position when the step ran and how many samples the run had
consumed before it: the step's samples lie between the two, whatever data-loader workers, ``prefetch_factor``,
the Trainer's accumulation prefetch or a resume skipped ahead. At read time the fingerprints of the dataset
items in that window are matched to the flagged step's samples, newest first, looking at most
:data:`SCAN_AHEAD` items past the step's own (a search that cannot match stays cheap). Where the dataset is
not indexable (an ``IterableDataset``), items hold no ``input_ids``, or the collator changes the token ids
(masked language modelling), the record has no indices: its fingerprint and text identify the batch.
"""

from __future__ import annotations

import array
import collections
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..core._state import ring_write_

__all__ = ["BatchTracker", "IndexRecord", "fingerprints", "batch_fingerprint"]

_MUL, _ADD, _MASK = 0x9E3779B1, 0x7F4A7C15, 0x7FFFFFFF
FIRST_TOKENS = 48
KEEP_INDICES = 200_000  # recorded sampler indices kept (a bounded window over the most recent ones)
SCAN_AHEAD = 16_384  # dataset items looked at per record beyond the step's own samples (bounds a search that
#                      cannot match, e.g. a collator that changes the token ids: the MLM collator masks them)


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


def batch_fingerprint(prints: list[int]) -> str | None:
    """The record's ``fingerprint``: the sum of the samples' fingerprints, as 16 hex digits."""
    return format(sum(prints) & (2 ** 64 - 1), "016x") if prints else None


def _first_tokens(ids: Tensor, mask: Tensor | None) -> Tensor:
    """The first :data:`FIRST_TOKENS` non-padding tokens of the first sample, padded with -1 (device only)."""
    row = ids.reshape(-1).long() if ids.ndim <= 1 else ids[0].long()
    if mask is not None:
        keep = (mask.reshape(-1) if ids.ndim <= 1 else mask[0]).to(row.device) != 0
        order = torch.argsort((~keep).to(torch.int8), stable=True)  # kept tokens first, in their order
        row = torch.where(keep[order], row[order], torch.full_like(row, -1))
    row = row[:FIRST_TOKENS]
    return torch.nn.functional.pad(row, (0, FIRST_TOKENS - row.numel()), value=-1)


class IndexRecord:
    """Remembers the last :data:`KEEP_INDICES` indices ``sampler`` yields (a ring of 8-byte ints) and
    counts them all (``count``), without changing what it yields: the instance's class is swapped for a
    subclass whose ``__iter__`` records (so ``isinstance`` checks, accelerate's seedable sampler and the data
    order are untouched) and swapped back by :meth:`release`."""

    def __init__(self, sampler: Any, keep: int = KEEP_INDICES):
        self.sampler, self.original, self.keep = sampler, type(sampler), keep
        self.ring = array.array("q")  # grows to `keep`, then wraps around
        self.count = 0
        original, record = self.original, self

        def __iter__(inner):
            for index in original.__iter__(inner):
                if isinstance(index, int) or (isinstance(index, Tensor) and index.ndim == 0):
                    record.add(int(index))  # an iterable dataset's sampler yields None: nothing to record
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

    def add(self, index: int) -> None:
        if self.count < self.keep:
            self.ring.append(index)
        else:
            self.ring[self.count % self.keep] = index
        self.count += 1

    def window(self, low: int, high: int) -> list[int]:
        """The indices yielded at positions ``low .. high - 1`` that are still kept."""
        low, high = max(low, self.count - self.keep, 0), min(high, self.count)
        return [self.ring[p % self.keep] for p in range(low, high)]

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
        self._step_dropped: list[Tensor | None] = []  # per micro-batch: the micro-batch gate dropped it
        self._firsts: list[Tensor] = []  # per micro-batch: the first tokens of its first sample
        self.rings: dict[str, Tensor] | None = None
        self.count: Tensor | None = None
        self.sampler: IndexRecord | None = None
        self.dataset: Any = None
        self.consumed = 0  # samples this process trained on in this run (host: shapes only)
        self._consumed_before = 0
        self._windows: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()

    def add(self, inputs: Any, dropped: Tensor | None = None) -> None:
        """A micro-batch (the ``inputs`` of ``training_step``; ``dropped``: the micro-batch gate dropped it, a
        0-dim bool); device work only."""
        ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        if not isinstance(ids, Tensor) or ids.ndim > 2:
            return
        mask = inputs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.shape == ids.shape else None  # not a 4-d packing mask
        self._step_prints.append(fingerprints(ids, mask))
        self._step_dropped.append(dropped)
        self.consumed += 1 if ids.ndim <= 1 else int(ids.shape[0])
        self._firsts.append(_first_tokens(ids, mask))

    def record(self, flag: Tensor, step: int, whole: Tensor | None = None) -> None:
        """End of ``step`` (1-based): keep its batch where the 0-dim bool ``flag`` holds (spike or non-finite):
        every sample where ``whole`` holds (or is ``None``), else only those of the micro-batches the gate
        dropped (the record then names the dropped micro-batches)."""
        self._note_window(step)
        prints, dropped, firsts = self._step_prints, self._step_dropped, self._firsts
        self._step_prints, self._step_dropped, self._firsts = [], [], []
        if not prints:
            return
        first = firsts[0]
        if whole is not None and all(d is not None for d in dropped):  # the dropped micro-batches only
            named = torch.stack([whole.to(flag.device) | d.to(flag.device) for d in dropped])
            prints = [p * n.to(device=p.device, dtype=p.dtype) for p, n in zip(prints, named)]
            first = torch.stack([f.to(flag.device) for f in firsts])[named.to(torch.int8).argmax()]
        row = self._row(prints, flag.device)
        if self.rings is None:
            self.rings = {"prints": torch.zeros((self.capacity, self.samples), dtype=torch.int64, device=flag.device),
                          "first": torch.full((self.capacity, FIRST_TOKENS), -1, dtype=torch.int64, device=flag.device)}
            self.count = torch.zeros((), dtype=torch.int64, device=flag.device)
        ring_write_(self.rings["prints"], self.count, row, flag)
        ring_write_(self.rings["first"], self.count, first.to(flag.device), flag)
        self.count.add_(flag.to(torch.int64))

    def pass_step(self, step: int) -> None:
        """End of a ``step`` that is recorded without a device flag (a listed step, not computed)."""
        self._note_window(step)
        self._step_prints, self._step_dropped, self._firsts = [], [], []

    def _row(self, prints: list[Tensor], device: torch.device) -> Tensor:
        row = torch.cat([p.to(device) for p in prints])[: self.samples]
        return torch.nn.functional.pad(row, (0, self.samples - row.numel()), value=0)

    def _note_window(self, step: int) -> None:
        """Host: where the sampler was when ``step`` ran, and the samples consumed before it (world-wide)."""
        if self.sampler is not None and self.sampler.count:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            self._windows[step] = (self._consumed_before * world, self.sampler.count)
            while len(self._windows) > self.capacity + 8:  # reads come at least every `capacity` steps
                self._windows.popitem(last=False)
        self._consumed_before = self.consumed

    def fingerprint_now(self) -> str | None:
        """The fingerprint of the step in progress (ONE host read: called only at steps a skip list names)."""
        if not self._step_prints:
            return None
        return batch_fingerprint([int(p) for p in self._row(self._step_prints, self._step_prints[0].device).tolist()])

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

    def indices(self, prints: list[int], step: int) -> list[int] | None:
        """Dataset indices of the samples with these fingerprints, among those the sampler yielded between the
        samples consumed before ``step`` and the sampler's position when it ran, newest first."""
        window = self._windows.get(step)
        if self.sampler is None or self.dataset is None or not prints or window is None:
            return None
        low, high = window
        low = max(low, high - len(prints) * 8 - SCAN_AHEAD)
        wanted = collections.Counter(prints)
        found = []
        for index in reversed(self.sampler.window(low, high)):
            key = self._item_print(index)
            if key is None:
                return None
            if wanted[key] > 0:
                wanted[key] -= 1
                found.append(index)
                if not +wanted:
                    break
        return sorted(found) if found else None

    def _item_print(self, index: int) -> int | None:
        try:
            item = self.dataset[index]
        except Exception:  # a dataset that cannot be indexed by position: fingerprints only
            return None
        ids = item.get("input_ids") if isinstance(item, Mapping) else None
        if ids is None:
            return None
        mask = item.get("attention_mask")
        return int(fingerprints(torch.as_tensor(ids), None if mask is None else torch.as_tensor(mask))[0])
