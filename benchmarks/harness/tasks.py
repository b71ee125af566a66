"""The three tasks of the gallery: their data, models and learning rates, all from ``Settings``.

* ``pretrain``: the demo's (``gradclip_hf.demo.tasks``): a fresh tiny Llama on 64-byte blocks of the standard
  library's top-level modules.
* ``lora``: LoRA (peft) on the ``email`` package's source, on top of a tiny Llama pretrained here (the
  ``pretrain`` task with the stock Trainer for ``base_steps`` steps: ``gradclip_hf.standins.pretrained_tiny_llama``;
  cached per seed in memory).
* ``sft``: full fine-tuning of that pretrained model on prompt/response examples of variable length
  (:mod:`.sft`), padded per batch.
* ``pretrain_ga4``, ``pretrain_ga8``: ``pretrain`` with gradient accumulation: the same ``batch`` samples per
  optimizer step (so the data order, the fault steps and the number of samples per update are those of
  ``pretrain``), fed as 4 or 8 micro-batches of ``batch / 4`` or ``batch / 8`` samples. Micro-batch ``k`` of step
  ``t`` holds the step's samples ``k * micro ... (k + 1) * micro - 1`` (:func:`micro_batch_of`).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import torch

from gradclip_hf.demo import tasks as demo
from gradclip_hf.demo.tasks import Task, model_kwargs, trainer_arguments
from gradclip_hf.standins import pretrained_tiny_llama, shuffled, stdlib_blocks, stdlib_text, tiny_llama

from .sft import pad_collate, sft_examples

__all__ = ["Settings", "Task", "task_data", "task_model", "base_model", "trainer_arguments", "ACCUMULATION",
           "base_task", "accumulation", "micro_batch_size", "micro_batch_of", "accumulation_arguments"]

# tasks that are another task with gradient accumulation: name -> (base task, micro-batches per optimizer step)
ACCUMULATION: dict[str, tuple[str, int]] = {"pretrain_ga4": ("pretrain", 4), "pretrain_ga8": ("pretrain", 8)}

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Settings(demo.Settings):
    """The demo's settings and those of the fine-tuning tasks."""

    base_steps: int = 300
    lora_lr: float = 1e-2
    lora_rank: int = 8
    sft_lr: float = 1e-3

    def task_lr(self, task: str) -> float:
        return {"pretrain": self.lr, "lora": self.lora_lr, "sft": self.sft_lr}[base_task(task)]


def base_task(task: str) -> str:
    """The task ``task`` runs (``pretrain`` for ``pretrain_ga4``)."""
    return ACCUMULATION.get(task, (task, 1))[0]


def accumulation(task: str) -> int:
    """Micro-batches per optimizer step of ``task`` (1: no accumulation)."""
    return ACCUMULATION.get(task, (task, 1))[1]


def micro_batch_size(task: str, s: Settings) -> int:
    """Samples per micro-batch of ``task``: ``s.batch / accumulation``; ``ValueError`` if it does not divide."""
    ga = accumulation(task)
    if s.batch % ga:
        raise ValueError(f"task {task!r} accumulates {ga} micro-batches per step: `batch` must be a multiple of "
                         f"{ga}, got {s.batch!r}.")
    return s.batch // ga


def micro_batch_of(position: int, task: str, s: Settings) -> int:
    """The micro-batch (0-based, within its optimizer step) that holds the step's sample ``position``."""
    return position // micro_batch_size(task, s)


def accumulation_arguments(task: str, s: Settings) -> dict[str, int]:
    """``TrainingArguments`` keywords of ``task``'s accumulation (none without it)."""
    ga = accumulation(task)
    if ga == 1:
        return {}
    return {"per_device_train_batch_size": micro_batch_size(task, s), "gradient_accumulation_steps": ga}


@functools.lru_cache(maxsize=4)
def _sft(s: Settings) -> tuple[list, list]:
    packages = ("http", "logging", "urllib", "concurrent", "asyncio", "xml", "multiprocessing")
    text = "".join(stdlib_text(s.train_bytes, package=p) for p in packages)
    examples = sft_examples(text, max_len=min(160, 2 * s.block + 32))
    n_eval = min(2 * s.eval_blocks, len(examples) // 4)
    return examples[:-n_eval], examples[-n_eval:]


def task_data(task: str, s: Settings, seed: int) -> Task:
    task = base_task(task)
    if task == "sft":
        train, held_out = _sft(s)
        return Task(shuffled(train, seed), held_out, pad_collate)
    if task == "lora":
        train, held_out = stdlib_blocks(s.train_bytes, s.eval_bytes, s.block, s.eval_blocks, "email")
        return Task(shuffled([train[i] for i in range(len(train))], seed), held_out)
    return demo.task_data(task, s, seed)


_BASES: dict[tuple[int, str], dict[str, torch.Tensor]] = {}


def base_model(s: Settings, seed: int):
    """The tiny Llama of ``seed`` after ``base_steps`` steps of the clean ``pretrain`` task with the stock
    Trainer (``max_grad_norm=1.0``); trained once per seed and settings in this process."""
    key = (seed, s.key())
    if key not in _BASES:
        model = pretrained_tiny_llama(seed, steps=s.base_steps, hidden=s.hidden, layers=s.layers, block=s.block,
                                      batch=s.batch, lr=s.lr, warmup=s.warmup, schedule=s.schedule,
                                      train_bytes=s.train_bytes, eval_bytes=s.eval_bytes, optim=s.optim)
        _BASES[key] = copy.deepcopy(model.state_dict())
    model = tiny_llama(seed, **model_kwargs(s))
    model.load_state_dict(_BASES[key])
    return model


def task_model(task: str, s: Settings, seed: int):
    """A fresh model for one run of ``task`` (same weights for the same seed)."""
    task = base_task(task)
    if task == "pretrain":
        return demo.task_model(task, s, seed)
    model = base_model(s, seed)
    if task == "sft":
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=s.lora_rank, lora_alpha=2 * s.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS)
    return get_peft_model(model, config)
