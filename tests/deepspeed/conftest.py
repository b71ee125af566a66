"""The DeepSpeed lane (``make test-deepspeed``: its own virtualenv ``.venv-deepspeed`` with deepspeed 0.19.8 on the CPU
torch). Every test here is marked ``deepspeed`` and ``slow``; the modules skip themselves where deepspeed is not
installed (the main ``.venv``). Each ZeRO stage is one ``torchrun --nproc_per_node 1`` launch of ``_worker.py``
(``DS_ACCELERATOR=cpu``) that runs every scenario and writes its results as JSON."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
TIMEOUT_S = 400


def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.deepspeed)
            item.add_marker(pytest.mark.slow)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path, stage: int, runs: list[str]) -> dict:
    """``torchrun --nproc_per_node 1 _worker.py OUT_DIR STAGE RUNS...`` on CPU; the worker's JSON."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(HERE / "_worker.py"), str(out_dir), str(stage), *runs]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"ZeRO-{stage} worker timed out after {TIMEOUT_S}s:\n{(error.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"ZeRO-{stage} worker exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return json.loads((out_dir / f"stage{stage}.json").read_text())
