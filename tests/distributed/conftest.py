"""Launch a 2-rank torchrun job on CPU (gloo) from pytest and load each rank's JSON results."""

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
WORLD = 2
TIMEOUT_S = 150


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_unless_gloo() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")


def launch(worker: str, out_dir: Path, name: str) -> list[dict]:
    """Run ``worker`` under ``torch.distributed.run`` with 2 processes; return the per-rank results."""
    _skip_unless_gloo()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(HERE / worker), str(out_dir)]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{worker} timed out after {TIMEOUT_S}s:\n{(error.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{worker} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
    return [json.loads((out_dir / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    return launch("_worker_fsdp.py", tmp_path_factory.mktemp("fsdp"), "fsdp")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    return launch("_worker_ddp.py", tmp_path_factory.mktemp("ddp"), "ddp")


def _worker_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")


def _run_worker(cmd: list[str], what: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_worker_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{what} timed out after {TIMEOUT_S}s:\n{(error.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")


def accelerate_launch(worker: str, out_dir: Path, name: str, *args: str) -> list[dict]:
    """Run ``worker OUT_DIR *args`` under ``accelerate launch`` with 2 processes (gloo on CPU); return the
    per-rank results ``OUT_DIR/<name>.rank<r>.json``.

    ``--multi_gpu`` is accelerate's torchrun-based launcher; with ``--cpu`` accelerate 1.x starts ONE
    process (its multi-CPU path needs mpirun). Without CUDA (or with ``use_cpu=True`` in the worker's
    TrainingArguments) the processes join a gloo group: accelerate's ``MULTI_CPU`` distributed type.
    """
    _skip_unless_gloo()
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(WORLD),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(HERE / worker), str(out_dir), *args]
    _run_worker(cmd, f"accelerate launch {worker} {' '.join(args)}")
    return [json.loads((out_dir / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]


def run_single(worker: str, out_dir: Path, name: str, *args: str) -> dict:
    """Run ``worker OUT_DIR *args`` as one plain process (no launcher); return ``<name>.single.json``."""
    _run_worker([sys.executable, str(HERE / worker), str(out_dir), *args], f"python {worker} {' '.join(args)}")
    return json.loads((out_dir / f"{name}.single.json").read_text())
