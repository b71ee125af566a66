"""Helpers of the spike-record tests (issue 21): tokenized real text, a record of what each step trained on
(the ground truth the spike file is checked against), NaN gradients at chosen steps, the file's lines."""

from __future__ import annotations

import json
import math

import torch
from transformers import TrainerCallback

from gradclip_hf.standins import byte_tokenizer, stdlib_text
from gradclip_hf.run.batches import fingerprints

FIRST_TOKENS = 48


def texts(n: int = 96) -> list[str]:
    """``n`` distinct pieces of standard-library source, 12 to 70 characters long (so batches need padding)."""
    out, seen = [], set()
    for line in stdlib_text(200_000).splitlines():
        line = line.strip()
        if 12 <= len(line) <= 70 and line not in seen:
            seen.add(line)
            out.append(line)
        if len(out) == n:
            return out
    raise RuntimeError("not enough distinct lines")


def tokenized(n: int = 96, labels: bool = False):
    """A ``datasets.Dataset`` of tokenized lines (``input_ids``, ``attention_mask``; ``label`` 0/1 when asked),
    as a user's ``dataset.map(tokenizer)`` gives it; and the tokenizer."""
    import datasets

    tokenizer = byte_tokenizer()
    lines = texts(n)
    columns = dict(tokenizer(lines))
    if labels:
        columns["label"] = [len(line) % 2 for line in lines]
    return datasets.Dataset.from_dict(columns), tokenizer


class StepInputs:
    """Mixin for a Trainer class: keeps the rows (non-padding token ids) each optimizer step trained on,
    keyed by the 1-based step (test only: reads on the host)."""

    def training_step(self, model, inputs, *args, **kwargs):
        rows = getattr(self, "rows_of_step", None)
        if rows is None:
            rows = self.rows_of_step = {}
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        rows.setdefault(self.state.global_step + 1, []).extend(
            [row[m.bool()].tolist() for row, m in zip(ids, mask)])
        return super().training_step(model, inputs, *args, **kwargs)


def expected_batch(rows: list[list[int]], dataset=None, decode=None) -> dict:
    """What the record of a step that trained on ``rows`` must say: the dataset indices of those rows (``None``
    without an indexable dataset), the fingerprint, the decoded first tokens of the first row."""
    indices = None
    if dataset is not None:
        where = {tuple(item): i for i, item in enumerate(dataset["input_ids"])}
        indices = [sorted(where[tuple(row)] for row in rows)]
    total = sum(int(fingerprints(torch.tensor(row))[0]) for row in rows)
    return {"indices": indices, "fingerprint": format(total & (2 ** 64 - 1), "016x"),
            "text": None if decode is None else decode(rows[0][:FIRST_TOKENS])}


class NaNGradients(TrainerCallback):
    """A NaN in one gradient at the given 1-based steps (placed before the pack's callback)."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 in self.steps:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan


def nan_at(trainer, steps) -> None:
    trainer.callback_handler.callbacks.insert(0, NaNGradients(steps))


def spike_lines(out_dir) -> list[dict]:
    path = out_dir / "gradclip_spikes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
