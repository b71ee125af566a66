"""Fixtures of the Trainer integration tests: real stdlib text, a tiny Llama. The builders are in
``tests/helpers.py`` (import them from there: several test folders have a ``conftest``)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("transformers")

from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama  # noqa: E402
from helpers import BLOCK  # noqa: E402

os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def dataset():
    return ByteLMDataset(stdlib_text(80_000), block_size=BLOCK, num_blocks=128)


@pytest.fixture
def model():
    return tiny_llama(seed=0)
