"""Shared helpers of the benchmark scripts (not a public API): machine info, Trainer arguments, timing."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from gradclip_hf.demo.machine import load_now, machine_info  # noqa: E402,F401  (one definition)

RESULTS = os.path.join(HERE, "results")


def trainer_args(output_dir: str, cls=None, **overrides: Any):
    """Quiet, deterministic, CPU-friendly TrainingArguments (no saving, no reporting)."""
    import transformers

    cls = cls or transformers.TrainingArguments
    options = dict(output_dir=output_dir, per_device_train_batch_size=8, max_steps=20, learning_rate=1e-3,
                   logging_steps=10, report_to="none", disable_tqdm=True, save_strategy="no", seed=0, data_seed=0,
                   lr_scheduler_type="constant", dataloader_num_workers=0, optim="adamw_torch",
                   use_cpu=not torch.cuda.is_available())
    options.update(overrides)
    return cls(**options)


def quiet_transformers() -> None:
    import logging
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers.gradclip_hf").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def median(values: Sequence[float]) -> float:
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def write_json(path: str, data: Any) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2, default=str)


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def command_line() -> str:
    return " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv and sys.argv[0].endswith(".py") else "?",
                     *sys.argv[1:]])


class Stopwatch:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
