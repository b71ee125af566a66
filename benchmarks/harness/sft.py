"""SFT-like byte-level examples: variable lengths, prompt and padding masked out of the labels.

Each function or method of the standard library's source is one example: its ``def`` line is the
prompt, the dedented body (cut at ``max_len`` bytes) the response. Lengths vary from a few bytes to ``max_len``, so the
number of label tokens per batch, and with it the noise of the batch loss, varies a lot: the loss
stream of real supervised fine-tuning, without any fault.
"""

from __future__ import annotations

import math
import re
import textwrap
from typing import Sequence

import torch

from gradclip_hf.standins import BOS_ID, PAD_ID

__all__ = ["sft_examples", "pad_collate", "IGNORE"]

IGNORE = -100


def _example(prompt: bytes, response: bytes, max_len: int) -> dict[str, torch.Tensor]:
    data = list(prompt + response)[: max_len - 1]
    ids = torch.tensor([BOS_ID] + data, dtype=torch.long)
    labels = ids.clone()
    labels[: 1 + min(len(prompt), len(data))] = IGNORE
    return {"input_ids": ids, "labels": labels}


def sft_examples(text: str, max_len: int = 160, min_response: int = 4) -> list[dict[str, torch.Tensor]]:
    """One example per ``def`` in ``text`` (prompt: the ``def`` line; response: the dedented body). Each
    example is cut at its own length, drawn log-uniformly from ``[16, max_len]`` (fixed generator): a
    long-tailed mix of short and long answers, as in real SFT data."""
    if max_len < 16:
        raise ValueError(f"`max_len` must be >= 16, got {max_len!r}.")
    out = []
    g = torch.Generator().manual_seed(0)
    for chunk in re.split(r"\n(?=[ \t]*def )", text)[1:]:
        head, _, body = chunk.strip(" \t").partition("\n")
        body = textwrap.dedent(body.split("\n\n\n")[0])
        cut = int(math.exp(math.log(16) + float(torch.rand((), generator=g)) * math.log(max_len / 16)))
        if len(body.strip()) < min_response:
            continue
        example = _example((head + "\n").encode(), body.encode(), cut)
        if (example["labels"] != IGNORE).any():
            out.append(example)
    return out


def pad_collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example of the batch: ``PAD_ID`` inputs, ``-100`` labels, mask 0."""
    n = max(len(item["input_ids"]) for item in items)
    ids = torch.full((len(items), n), PAD_ID, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for row, item in enumerate(items):
        k = len(item["input_ids"])
        ids[row, :k], labels[row, :k], mask[row, :k] = item["input_ids"], item["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
