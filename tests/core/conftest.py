"""Fixtures of the core tests (torch only: nothing here imports transformers or wandb)."""

import pytest
import torch
from torch import nn


class TinyLM(nn.Module):
    """Named like a small language model: embed, body, LoRA adapters, lm_head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.body = nn.Linear(4, 4)
        self.lora_A = nn.Linear(4, 2, bias=False)
        self.lora_B = nn.Linear(2, 4, bias=False)
        self.lm_head = nn.Linear(4, 11)


def fill_grads(module: nn.Module, scale: float = 1.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Give every parameter a deterministic gradient; return clones keyed by name."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, p) in enumerate(module.named_parameters()):
        p.grad = torch.randn(p.shape, generator=gen) * scale * (1 + i)
        out[name] = p.grad.clone()
    return out


@pytest.fixture
def tiny_lm():
    torch.manual_seed(0)
    return TinyLM()


@pytest.fixture
def grads_filler():
    return fill_grads
