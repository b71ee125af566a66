"""Launch a 2-rank torchrun job on CPU (gloo) from pytest and load each rank's JSON results."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from launching import free_port, run_worker

HERE = Path(__file__).resolve().parent
WORLD = 2
TIMEOUT_S = 150


def _skip_unless_gloo() -> None:
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")


def launch(worker: str, out_dir: Path, name: str) -> list[dict]:
    """Run ``worker`` under ``torch.distributed.run`` with 2 processes; return the per-rank results."""
    _skip_unless_gloo()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(HERE / worker), str(out_dir)]
    run_worker(cmd, worker, TIMEOUT_S)
    return [json.loads((out_dir / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory) -> list[dict]:
    return launch("_worker_fsdp.py", tmp_path_factory.mktemp("fsdp"), "fsdp")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> list[dict]:
    return launch("_worker_ddp.py", tmp_path_factory.mktemp("ddp"), "ddp")


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
           "--main_process_port", str(free_port()), str(HERE / worker), str(out_dir), *args]
    run_worker(cmd, f"accelerate launch {worker} {' '.join(args)}", TIMEOUT_S)
    return [json.loads((out_dir / f"{name}.rank{r}.json").read_text()) for r in range(WORLD)]


def run_single(worker: str, out_dir: Path, name: str, *args: str) -> dict:
    """Run ``worker OUT_DIR *args`` as one plain process (no launcher); return ``<name>.single.json``."""
    run_worker([sys.executable, str(HERE / worker), str(out_dir), *args], f"python {worker} {' '.join(args)}", TIMEOUT_S)
    return json.loads((out_dir / f"{name}.single.json").read_text())
