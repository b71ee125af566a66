"""The demo's fault scenarios, the pretraining part of the benchmark gallery (sources in ``benchmarks/README.md``;
``benchmarks/harness/scenarios.py`` adds its LoRA and SFT scenarios).

A :class:`Scenario` names a task (``pretrain``: a tiny Llama trained from scratch on standard-library bytes; the
gallery also has ``lora`` and ``sft``) and a fault placed at fractions of the run, after every detector's warmup
(the OLMo-core rule needs 64 steps). ``fault="none"`` measures false positives only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

__all__ = ["Scenario", "SCENARIOS", "scenario"]


@dataclass(frozen=True)
class Scenario:
    """``starts``: fractions of the run where a fault begins; each lasts ``length`` steps.
    ``lr_factor``: the learning-rate multiplier of an ``lr`` fault."""

    BATCH_FAULTS: ClassVar[tuple[str, ...]] = ("garbage", "utf16_shard", "label_noise")  # the faulted batches
    FAULTS: ClassVar[tuple[str, ...]] = ("none", *BATCH_FAULTS, "lr", "nonfinite")
    TASKS: ClassVar[tuple[str, ...]] = ("pretrain",)

    name: str
    title: str
    task: str
    fault: str
    starts: tuple[float, ...] = ()
    length: int = 1
    lr_factor: float = 1.0

    def __post_init__(self):
        if self.fault not in self.FAULTS:
            raise ValueError(f"scenario {self.name!r}: fault {self.fault!r} is not one of {self.FAULTS}.")
        if self.task not in self.TASKS:
            raise ValueError(f"scenario {self.name!r}: task {self.task!r} is not one of {self.TASKS}.")

    def fault_steps(self, steps: int) -> list[int]:
        """The 0-based optimizer steps hit by the fault in a run of ``steps`` steps."""
        out: set[int] = set()
        for start in self.starts:
            first = int(round(start * steps))
            out.update(t for t in range(first, first + self.length) if 0 <= t < steps)
        return sorted(out)

    @property
    def batch_fault(self) -> bool:
        return self.fault in self.BATCH_FAULTS


SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("garbage_batches", "4 isolated batches of random bytes 128-255 (rare tokens)", "pretrain", "garbage",
             starts=(0.4, 0.53, 0.67, 0.8)),
    Scenario("corrupt_shard", "a shard written in the wrong encoding (UTF-16): 30 consecutive batches",
             "pretrain", "utf16_shard", starts=(0.5,), length=30),
    Scenario("label_noise_shard", "a shard whose labels belong to other texts: 30 consecutive batches",
             "pretrain", "label_noise", starts=(0.5,), length=30),
    Scenario("lr_mistake", "the learning rate 10x too high for 10 steps (a scheduler restarted at its peak)",
             "pretrain", "lr", starts=(0.5,), length=10, lr_factor=10.0),
    Scenario("nonfinite", "an activation overflow: NaN loss and gradients in 2 steps", "pretrain", "nonfinite",
             starts=(0.45, 0.7)),
]}


def scenario(name: str, scenarios: dict[str, Scenario] = SCENARIOS) -> Scenario:
    """The scenario ``name`` of ``scenarios``; ``ValueError`` naming the known ones."""
    if name not in scenarios:
        raise ValueError(f"unknown scenario {name!r}: one of {sorted(scenarios)}.")
    return scenarios[name]
