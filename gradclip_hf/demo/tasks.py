"""The demo's task, the pretraining task of the benchmark gallery: its data, model and learning rate from
``Settings`` (``benchmarks/harness/tasks.py`` adds the gallery's LoRA and SFT tasks).

* ``pretrain``: a fresh tiny Llama on 64-byte blocks of the standard library's top-level modules.

Seeds change the initialisation, the order of the training items and the random bytes of the faults;
everything is deterministic for a given seed (1 torch thread on CPU).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..standins import shuffled, stand_in_arguments, stdlib_blocks, tiny_llama

__all__ = ["Settings", "Task", "task_data", "task_model", "model_kwargs", "trainer_arguments"]


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides method, scenario and seed."""

    steps: int = 300
    lr: float = 4e-3
    warmup: int = 10
    schedule: str = "cosine"
    hidden: int = 64
    layers: int = 2
    block: int = 64
    batch: int = 8
    train_bytes: int = 300_000
    eval_bytes: int = 40_000
    eval_blocks: int = 64
    optim: str = "adamw_torch"

    def key(self) -> str:
        """A short hash of all fields (names cached runs)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def task_lr(self, task: str) -> float:
        if task != "pretrain":
            raise ValueError(f"task {task!r}: the demo has the pretrain task only.")
        return self.lr


@dataclass
class Task:
    """Training items in the seed's order, held-out eval items, and the data collator (``None``: default)."""

    train: list[dict[str, torch.Tensor]]
    eval: Any
    collator: Any = None


def task_data(task: str, s: Settings, seed: int) -> Task:
    """The items of ``task``: blocks of the standard library's top-level modules, in ``seed``'s order."""
    if task != "pretrain":
        raise ValueError(f"task {task!r}: the demo has the pretrain task only.")
    train, held_out = stdlib_blocks(s.train_bytes, s.eval_bytes, s.block, s.eval_blocks)
    return Task(shuffled([train[i] for i in range(len(train))], seed), held_out)


def model_kwargs(s: Settings) -> dict[str, Any]:
    """``tiny_llama`` keywords of ``s``'s model."""
    return dict(hidden_size=s.hidden, layers=s.layers, heads=4, max_position_embeddings=max(256, 2 * s.block + 32))


def task_model(task: str, s: Settings, seed: int):
    """A fresh model for one run of ``task`` (same weights for the same seed)."""
    if task != "pretrain":
        raise ValueError(f"task {task!r}: the demo has the pretrain task only.")
    return tiny_llama(seed, **model_kwargs(s))


def trainer_arguments(s: Settings, task: str, seed: int, output_dir: str, steps: int | None = None,
                      **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords of a run (without ``max_grad_norm``, which the method sets)."""
    return stand_in_arguments(output_dir, steps=steps or s.steps, batch=s.batch, lr=s.task_lr(task), seed=seed,
                              schedule=s.schedule, warmup=s.warmup, optim=s.optim, **overrides)
