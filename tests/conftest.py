"""Shared test settings: a modest, deadline-free hypothesis profile and a fixed torch seed per test."""

import pytest
import torch
from hypothesis import settings

settings.register_profile("gradclip", max_examples=50, deadline=None, derandomize=False)
settings.load_profile("gradclip")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield
