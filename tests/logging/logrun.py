"""Tiny real Trainer runs for the logging tests (no conftest here: tests/integration owns `conftest`)."""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: helpers

import torch
from helpers import StepRecorder

from gradclip_hf.standins import ByteLMDataset, SpikyByteStream, stdlib_text, tiny_llama
from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments

BATCH = 4


@functools.lru_cache(maxsize=1)
def dataset() -> ByteLMDataset:
    return ByteLMDataset(stdlib_text(60_000), block_size=64, num_blocks=96)


def make_trainer(tmp_path, steps=12, logging_steps=4, spike_steps=(), record=False, **options):
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=BATCH, max_steps=steps,
                learning_rate=3e-3, logging_steps=logging_steps, report_to="none", use_cpu=True,
                disable_tqdm=True, save_strategy="no", seed=0, data_seed=0, lr_scheduler_type="constant",
                dataloader_num_workers=0, optim="adamw_torch", clip_strategy="norm", clip_threshold=1.0)
    args.update(options)
    train = SpikyByteStream(dataset(), spike_steps=spike_steps, samples_per_step=BATCH)
    trainer = GradClipTrainer(model=tiny_llama(0), args=GradClipTrainingArguments(**args), train_dataset=train)
    recorder = None
    if record:
        recorder = StepRecorder(trainer)
        trainer.add_callback(recorder)
    return trainer, recorder


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


torch.set_num_threads(min(torch.get_num_threads(), 2))
