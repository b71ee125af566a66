"""The gallery of fault scenarios (sources in ``benchmarks/README.md``): the demo's pretraining scenarios
(``gradclip_hf.demo.scenarios``) and the LoRA and SFT ones.

``lora``: LoRA fine-tuning of a tiny Llama pretrained in-process, on another part of the standard library;
``sft``: full fine-tuning of that model on prompt/response examples of variable length. Every fault is placed
after every detector's warmup (the OLMo-core rule needs 64 steps).

The accumulation scenarios (``ga4_*``, ``ga8_*``) run the ``pretrain`` task as 4 or 8 micro-batches per optimizer
step with the same samples per step (``tasks.ACCUMULATION``), at the same fault steps as the pretraining ones; a
scenario's ``items`` are the positions among a fault step's samples that the fault replaces (``None``: all of
them), so the bad micro-batches are exactly ``position // micro-batch size`` (:meth:`Scenario.bad_micro_batches`).
The clean counterfactual is the one of every batch fault: the clean items the bad ones displaced.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from gradclip_hf.demo import scenarios as demo

from .tasks import ACCUMULATION, accumulation

__all__ = ["Scenario", "GALLERY", "scenario", "FAULTS"]


@dataclass(frozen=True)
class Scenario(demo.Scenario):
    """A gallery scenario: the demo's tasks and faults, the ``lora``, ``sft`` and accumulation tasks and the ``null``
    fault. ``items``: the positions (0-based, among the ``batch`` samples of a fault step) that a batch fault
    replaces; ``None``: every sample of the step."""

    BATCH_FAULTS: ClassVar[tuple[str, ...]] = (*demo.Scenario.BATCH_FAULTS, "null")
    FAULTS: ClassVar[tuple[str, ...]] = (*demo.Scenario.FAULTS, "null")
    TASKS: ClassVar[tuple[str, ...]] = ("pretrain", "lora", "sft", *ACCUMULATION)

    items: tuple[int, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.items is None:
            return
        if not self.batch_fault:
            raise ValueError(f"scenario {self.name!r}: `items` needs a batch fault, got fault {self.fault!r}.")
        if not self.items or len(set(self.items)) != len(self.items) or min(self.items) < 0:
            raise ValueError(f"scenario {self.name!r}: `items` must be distinct positions >= 0, got {self.items!r}.")

    def positions(self, batch: int) -> tuple[int, ...]:
        """The positions a fault step's batch fault replaces, for ``batch`` samples per step."""
        if self.items is None:
            return tuple(range(batch))
        if max(self.items) >= batch:
            raise ValueError(f"scenario {self.name!r}: `items` {self.items!r} must be below the batch ({batch}).")
        return self.items

    def bad_micro_batches(self, steps: int, batch: int) -> dict[int, tuple[int, ...]]:
        """``{fault step: the micro-batches (0-based within the step) that hold a bad sample}`` of a run of
        ``steps`` steps of ``batch`` samples each (one micro-batch per step without accumulation)."""
        ga = accumulation(self.task)
        if batch % ga:
            raise ValueError(f"scenario {self.name!r}: `batch` must be a multiple of {ga}, got {batch!r}.")
        if not self.batch_fault:  # a learning-rate or non-finite fault hits the whole step
            return {t: tuple(range(ga)) for t in self.fault_steps(steps)}
        bad = tuple(sorted({p // (batch // ga) for p in self.positions(batch)}))
        return {t: bad for t in self.fault_steps(steps)}


FAULTS = Scenario.FAULTS
_ISOLATED = demo.SCENARIOS["garbage_batches"].starts

GALLERY: dict[str, Scenario] = {**{n: Scenario(**asdict(s)) for n, s in demo.SCENARIOS.items()}, **{s.name: s for s in [
    Scenario("lora_garbage", "LoRA fine-tuning of a pretrained tiny Llama, 3 bursts of 4 garbage batches", "lora",
             "garbage", starts=(0.4, 0.6, 0.8), length=4),
    Scenario("sft_clean", "SFT-like variable-length, prompt-masked batches, no fault (false positives only)",
             "sft", "none"),
    # gradient accumulation: the same 8 samples per step as 4 x 2 or 8 x 1; the steps of the pretraining faults
    Scenario("ga4_garbage_micro", "GA 4 x 2 samples: garbage in 1 micro-batch of 4 (the 2nd) at 4 isolated steps",
             "pretrain_ga4", "garbage", starts=_ISOLATED, items=(2, 3)),
    Scenario("ga8_garbage_micro", "GA 8 x 1 sample: garbage in 1 micro-batch of 8 (the 6th) at 4 isolated steps",
             "pretrain_ga8", "garbage", starts=_ISOLATED, items=(5,)),
    Scenario("ga4_garbage_sample", "GA 4 x 2 samples: 1 garbage sample of 8, in the last micro-batch, at 4 isolated "
             "steps", "pretrain_ga4", "garbage", starts=_ISOLATED, items=(6,)),
    Scenario("ga4_shard_steps", "GA 4 x 2 samples: a UTF-16 shard over every micro-batch of 30 consecutive steps",
             "pretrain_ga4", "utf16_shard", starts=(0.5,), length=30),
    Scenario("ga4_shard_micro", "GA 4 x 2 samples: a UTF-16 shard in 1 micro-batch of 4 (the 1st) of 30 consecutive "
             "steps", "pretrain_ga4", "utf16_shard", starts=(0.5,), length=30, items=(0, 1)),
    Scenario("ga8_shard_steps", "GA 8 x 1 sample: a UTF-16 shard over every micro-batch of 30 consecutive steps",
             "pretrain_ga8", "utf16_shard", starts=(0.5,), length=30),
]}}


def scenario(name: str) -> Scenario:
    return demo.scenario(name, GALLERY)
