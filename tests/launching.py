"""Running a test worker in a subprocess (``torchrun``, ``accelerate launch`` or plain ``python``) with the test
environment: the repository on ``PYTHONPATH``, one thread, nothing from the hub. Shared by the distributed and
DeepSpeed lanes (``tests/`` is on ``sys.path`` through its conftest)."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(cmd: list[str], what: str, timeout_s: float, **env: str) -> None:
    """Run ``cmd`` from the repository root; ``pytest.fail`` with the output's tail on a timeout or a non-zero exit.
    ``env`` adds variables to the worker environment."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", **env)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{what} timed out after {timeout_s}s:\n{(error.stderr or '')[-4000:]}")
    if proc.returncode != 0:
        pytest.fail(f"{what} exited with {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}")
