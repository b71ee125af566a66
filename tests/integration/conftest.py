"""Shared builders for the Trainer integration tests: real stdlib text, a tiny Llama, fast runs."""

from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradclip_hf.experiments.bytelm import ByteLMDataset, stdlib_text, tiny_llama  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")
BLOCK = 64


@pytest.fixture(scope="session")
def dataset():
    return ByteLMDataset(stdlib_text(80_000), block_size=BLOCK, num_blocks=128)


def make_args(tmp_path, cls=None, **overrides):
    cls = cls or transformers.TrainingArguments
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=8, learning_rate=1e-3,
                   logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                   seed=0, data_seed=0, lr_scheduler_type="constant", dataloader_num_workers=0,
                   optim="adamw_torch")
    options.update(overrides)
    return cls(**options)


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.fixture
def model():
    return tiny_llama(seed=0)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
