"""The gallery's batch faults: the demo's (``gradclip_hf.demo.faults``) and ``null``, the noise floor; ``on_items``
makes any of them replace only some samples of a step (a bad micro-batch, a single bad sample)."""

from __future__ import annotations

from typing import Sequence

import torch

from gradclip_hf.demo.faults import BATCH_FAULTS as DEMO_FAULTS
from gradclip_hf.demo.faults import BatchFault, Item, LRFault, NonFiniteFault, StepStream, item
from gradclip_hf.demo.faults import batch_fault as demo_batch_fault

__all__ = ["BATCH_FAULTS", "StepStream", "LRFault", "NonFiniteFault", "batch_fault", "null", "on_items"]


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


def on_items(fault: BatchFault, positions: Sequence[int]) -> BatchFault:
    """``fault`` applied to the samples at ``positions`` of a step only; the step's other samples stay clean. The
    bad samples are ``fault`` of the clean ones they displace (same step and seed), so the clean counterfactual
    is the same stream as for a whole-step fault."""
    positions = tuple(positions)

    def partial(clean: Sequence[Item], step: int, seed: int) -> list[Item]:
        out = list(clean)
        for j, bad in zip(positions, fault([clean[j] for j in positions], step, seed)):
            out[j] = bad
        return out

    partial.__name__ = f"{getattr(fault, '__name__', 'fault')}_on_{'_'.join(map(str, positions))}"
    return partial
