"""Run the real ``axolotl train`` CLI as a subprocess of the lane's virtualenv (``sys.executable``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
TIMEOUT_S = 300


def axolotl_env() -> dict:
    """Offline, no telemetry, CPU; the venv's ``bin`` first on PATH (the CLI execs ``accelerate launch``)."""
    bin_dir = os.path.dirname(sys.executable)
    return dict(os.environ, PATH=os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                AXOLOTL_DO_NOT_TRACK="1", DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TRANSFORMERS_OFFLINE="1", WANDB_MODE="disabled", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                TOKENIZERS_PARALLELISM="false")


class Run:
    def __init__(self, proc: subprocess.CompletedProcess, wall_s: float):
        self.returncode, self.output, self.wall_s = proc.returncode, proc.stdout + proc.stderr, wall_s


def axolotl_train(config: Path, *args: str) -> Run:
    """``axolotl train CONFIG [args]`` from the config's directory; stdout and stderr together."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "axolotl"), "train", str(config), *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=config.parent, env=axolotl_env(), capture_output=True, text=True,
                              timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"axolotl train timed out after {TIMEOUT_S}s:\n{str(error.stderr or '')[-4000:]}")
    run = Run(proc, time.monotonic() - start)
    (config.parent / "train.log").write_text(run.output)
    return run
