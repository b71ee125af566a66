"""The three tasks of the gallery: their data, models and learning rates, all from ``Settings``.

* ``pretrain``: a fresh tiny Llama on 64-byte blocks of the standard library's top-level modules.
* ``lora``: LoRA (peft) on the ``email`` package's source, on top of a tiny Llama pretrained here (the
  ``pretrain`` task with the stock Trainer for ``base_steps`` steps; cached per seed in memory).
* ``sft``: full fine-tuning of that pretrained model on prompt/response examples of variable length
  (:mod:`.sft`), padded per batch.

Seeds change the initialisation, the order of the training items and the random bytes of the faults;
everything is deterministic for a given seed (1 torch thread on CPU).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .bytelm import ByteLMDataset, stdlib_text, tiny_llama
from .sft import pad_collate, sft_examples

__all__ = ["Settings", "Task", "task_data", "task_model", "base_model"]

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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
    base_steps: int = 300
    lora_lr: float = 1e-2
    lora_rank: int = 8
    sft_lr: float = 1e-3
    optim: str = "adamw_torch"

    def key(self) -> str:
        """A short hash of all fields (names cached runs)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]

    def task_lr(self, task: str) -> float:
        return {"pretrain": self.lr, "lora": self.lora_lr, "sft": self.sft_lr}[task]


@dataclass
class Task:
    """Training items in the seed's order, held-out eval items, and the data collator (``None``: default)."""

    train: list[dict[str, torch.Tensor]]
    eval: Any
    collator: Any = None


def _shuffled(items: list, seed: int) -> list:
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    return [items[i] for i in order]


@functools.lru_cache(maxsize=8)
def _blocks(s: Settings, package: str | None) -> tuple[ByteLMDataset, ByteLMDataset]:
    text = stdlib_text(s.train_bytes + s.eval_bytes, package=package)
    cut = len(text) * s.train_bytes // (s.train_bytes + s.eval_bytes)
    train = ByteLMDataset(text[:cut], block_size=s.block)
    held_out = ByteLMDataset(text[cut:], block_size=s.block, num_blocks=s.eval_blocks)
    return train, held_out


@functools.lru_cache(maxsize=4)
def _sft(s: Settings) -> tuple[list, list]:
    packages = ("http", "logging", "urllib", "concurrent", "asyncio", "xml", "multiprocessing")
    text = "".join(stdlib_text(s.train_bytes, package=p) for p in packages)
    examples = sft_examples(text, max_len=min(160, 2 * s.block + 32))
    n_eval = min(2 * s.eval_blocks, len(examples) // 4)
    return examples[:-n_eval], examples[-n_eval:]


def task_data(task: str, s: Settings, seed: int) -> Task:
    if task == "sft":
        train, held_out = _sft(s)
        return Task(_shuffled(train, seed), held_out, pad_collate)
    train, held_out = _blocks(s, "email" if task == "lora" else None)
    return Task(_shuffled([train[i] for i in range(len(train))], seed), held_out)


def _model_kwargs(s: Settings) -> dict[str, Any]:
    return dict(hidden_size=s.hidden, layers=s.layers, heads=4, max_position_embeddings=max(256, 2 * s.block + 32))


_BASES: dict[tuple[int, str], dict[str, torch.Tensor]] = {}


def base_model(s: Settings, seed: int):
    """The tiny Llama of ``seed`` after ``base_steps`` steps of the clean ``pretrain`` task with the stock
    Trainer (``max_grad_norm=1.0``); trained once per seed and settings in this process."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    from .faults import StepStream

    key = (seed, s.key())
    model = tiny_llama(seed, **_model_kwargs(s))
    if key not in _BASES:
        data = task_data("pretrain", s, seed)
        with tempfile.TemporaryDirectory(prefix="gradclip-base-") as tmp:
            args = TrainingArguments(**trainer_arguments(s, "pretrain", seed, tmp, steps=s.base_steps),
                                     max_grad_norm=1.0)
            trainer = Trainer(model=model, args=args, train_dataset=StepStream(data.train, s.batch))
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        _BASES[key] = copy.deepcopy(model.state_dict())
    model.load_state_dict(_BASES[key])
    return model


def task_model(task: str, s: Settings, seed: int):
    """A fresh model for one run of ``task`` (same weights for the same seed)."""
    if task == "pretrain":
        return tiny_llama(seed, **_model_kwargs(s))
    model = base_model(s, seed)
    if task == "sft":
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)


def trainer_arguments(s: Settings, task: str, seed: int, output_dir: str, steps: int | None = None,
                      **overrides: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords of a run (without ``max_grad_norm``, which the method sets)."""
    kwargs = dict(output_dir=output_dir, max_steps=steps or s.steps, per_device_train_batch_size=s.batch,
                  per_device_eval_batch_size=32, learning_rate=s.task_lr(task), lr_scheduler_type=s.schedule,
                  warmup_steps=s.warmup, weight_decay=0.0, logging_steps=1, logging_nan_inf_filter=False, seed=seed,
                  data_seed=seed, report_to="none", disable_tqdm=True, save_strategy="no", use_cpu=True,
                  dataloader_num_workers=0, optim=s.optim)
    kwargs.update(overrides)
    return kwargs
