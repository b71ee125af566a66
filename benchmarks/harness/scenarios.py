"""The gallery of fault scenarios (sources in ``benchmarks/README.md``): the demo's pretraining scenarios
(``gradclip_hf.demo.scenarios``) and the LoRA and SFT ones.

``lora``: LoRA fine-tuning of a tiny Llama pretrained in-process, on another part of the standard library;
``sft``: full fine-tuning of that model on prompt/response examples of variable length. Every fault is placed
after every detector's warmup (the OLMo-core rule needs 64 steps).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from gradclip_hf.demo import scenarios as demo

__all__ = ["Scenario", "GALLERY", "scenario", "FAULTS"]


@dataclass(frozen=True)
class Scenario(demo.Scenario):
    """A gallery scenario: the demo's tasks and faults, and the ``lora`` and ``sft`` tasks and the ``null`` fault."""

    BATCH_FAULTS: ClassVar[tuple[str, ...]] = (*demo.Scenario.BATCH_FAULTS, "null")
    FAULTS: ClassVar[tuple[str, ...]] = (*demo.Scenario.FAULTS, "null")
    TASKS: ClassVar[tuple[str, ...]] = ("pretrain", "lora", "sft")


FAULTS = Scenario.FAULTS

GALLERY: dict[str, demo.Scenario] = {**demo.SCENARIOS, **{s.name: s for s in [
    Scenario("lora_garbage", "LoRA fine-tuning of a pretrained tiny Llama, 3 bursts of 4 garbage batches", "lora",
             "garbage", starts=(0.4, 0.6, 0.8), length=4),
    Scenario("sft_clean", "SFT-like variable-length, prompt-masked batches, no fault (false positives only)",
             "sft", "none"),
]}}


def scenario(name: str) -> demo.Scenario:
    return demo.scenario(name, GALLERY)
