"""The DeepSpeed lane (``make test-deepspeed``: its own virtualenv ``.venv-deepspeed`` with deepspeed 0.19.8 on the CPU
torch). Every test here is marked ``deepspeed`` and ``slow``; the modules skip themselves where deepspeed is not
installed (the main ``.venv``). Each ZeRO stage is one ``torchrun --nproc_per_node 1`` launch of ``_worker.py``
(``DS_ACCELERATOR=cpu``) that runs every scenario and writes its results as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launching import free_port, run_worker

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 400


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.deepspeed)
            item.add_marker(pytest.mark.slow)


def launch(out_dir: Path, stage: int, runs: list[str]) -> dict:
    """``torchrun --nproc_per_node 1 _worker.py OUT_DIR STAGE RUNS...`` on CPU; the worker's JSON."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "_worker.py"), str(out_dir), str(stage), *runs]
    run_worker(cmd, f"ZeRO-{stage} worker", TIMEOUT_S, DS_ACCELERATOR="cpu", WANDB_MODE="disabled")
    return json.loads((out_dir / f"stage{stage}.json").read_text())
