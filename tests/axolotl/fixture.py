"""A local Axolotl run directory: a tiny Llama saved with ``save_pretrained``, a byte-level tokenizer built with
``tokenizers``, a JSONL dataset with garbage lines at known optimizer steps, and the YAML. Nothing downloaded.

With ``sample_packing: false``, ``curriculum_sampling: true`` (a SequentialSampler), ``shuffle_merged_datasets:
false``, gradient accumulation 1 and every line shorter than ``sequence_len`` (one line, one sample), optimizer
step ``k`` (0-based) reads lines ``k*B .. k*B+B-1``. Garbage lines are 30 characters from U+0100..U+07FF: 60
UTF-8 bytes, all >= 0x80, which never occur in the ASCII source the model learns from: a loss spike.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import yaml

from byte_tokenizer import save_tokenizer

from gradclip_hf.standins import stdlib_text, tiny_llama

PLUGIN = "gradclip_hf.integrations.axolotl.GradClipPlugin"
LINE_BYTES = 60


def write_data(path: Path, steps: int, batch: int, spike_steps: tuple[int, ...]) -> None:
    text = stdlib_text(200_000).encode("ascii", "ignore").decode()
    rng, pos, lines = random.Random(0), 0, []
    for i in range((steps + 2) * batch):
        if i // batch in spike_steps:
            lines.append("".join(chr(rng.randint(0x100, 0x7FF)) for _ in range(LINE_BYTES // 2)))
        else:
            lines.append(text[pos:pos + LINE_BYTES])
            pos += LINE_BYTES
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")


def make_run(root: Path, steps: int = 30, batch: int = 4, spike_steps: tuple[int, ...] = (), **keys) -> Path:
    """Write the model, tokenizer, data and ``config.yml`` under ``root``; ``keys`` are more YAML keys (a
    ``None`` value removes a key). Returns the config path."""
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    if not (model_dir / "config.json").exists():
        torch.manual_seed(0)
        tiny_llama(0).save_pretrained(str(model_dir))
        save_tokenizer(model_dir)
    write_data(root / "data.jsonl", steps, batch, spike_steps)
    cfg = {
        "base_model": str(model_dir), "tokenizer_type": "PreTrainedTokenizerFast", "plugins": [PLUGIN],
        "datasets": [{"path": str(root / "data.jsonl"), "ds_type": "json", "type": "completion"}],
        "dataset_prepared_path": str(root / "prepared"), "val_set_size": 0, "sequence_len": 64,
        "sample_packing": False, "pad_to_sequence_len": True, "curriculum_sampling": True,
        "shuffle_merged_datasets": False, "micro_batch_size": batch, "gradient_accumulation_steps": 1,
        "max_steps": steps, "num_epochs": 1, "learning_rate": 3e-3, "optimizer": "adamw_torch_fused",
        "lr_scheduler": "constant", "warmup_steps": 0, "output_dir": str(root / "output"), "logging_steps": 1,
        "save_strategy": "no", "bf16": False, "fp16": False, "tf32": False, "seed": 0,
        "dataloader_num_workers": 0, "train_on_inputs": True,
    }
    cfg.update(keys)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
