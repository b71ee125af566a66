"""The gallery's batch faults: the demo's (``gradclip_hf.demo.faults``) and ``null``, the noise floor."""

from __future__ import annotations

from typing import Sequence

import torch

from gradclip_hf.demo.faults import BATCH_FAULTS as DEMO_FAULTS
from gradclip_hf.demo.faults import BatchFault, Item, LRFault, NonFiniteFault, StepStream, item
from gradclip_hf.demo.faults import batch_fault as demo_batch_fault

__all__ = ["BATCH_FAULTS", "StepStream", "LRFault", "NonFiniteFault", "batch_fault", "null"]


def null(clean: Sequence[Item], step: int, seed: int) -> list[Item]:
    """Not a fault: other clean items (the batch's items with every byte kept, in a rotated order of
    positions: ``ids.roll(1)`` after the first byte). Its "damage" is the noise floor of the measure."""
    out = []
    for c in clean:
        ids = c["input_ids"]
        body = ids[1:].roll(ids.numel() // 2)
        out.append(item(torch.cat([ids[:1], body])))
    return out


BATCH_FAULTS: dict[str, BatchFault] = {**DEMO_FAULTS, "null": null}


def batch_fault(kind: str) -> BatchFault:
    """The gallery's batch fault ``kind``; ``ValueError`` naming the known ones."""
    return demo_batch_fault(kind, BATCH_FAULTS)
