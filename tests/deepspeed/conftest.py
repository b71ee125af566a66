"""The DeepSpeed lane (``make test-deepspeed``: its own virtualenv ``.venv-deepspeed`` with deepspeed 0.19.8 on the CPU
torch). Every test here is marked ``deepspeed`` and ``slow``; the modules skip themselves where deepspeed is not
installed (the main ``.venv``). Each ZeRO stage is one ``torchrun --nproc_per_node 1`` launch of ``_worker.py``
(``DS_ACCELERATOR=cpu``) that runs every scenario of that stage (both test modules share it: the ``stage``
fixture), plus one 2-rank launch for what needs real partitions (``ranks``); each writes its results as JSON."""

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


def launch(out_dir: Path, stage: int, runs: list[str], ranks: int = 1) -> dict:
    """``torchrun --nproc_per_node RANKS _worker.py OUT_DIR STAGE RUNS...`` on CPU; the worker's JSON (with several
    ranks: ``{"ranks": [rank 0's, rank 1's, ...]}``)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(HERE / "_worker.py"), str(out_dir), str(stage), *runs]
    run_worker(cmd, f"ZeRO-{stage} worker ({ranks} rank{'s' if ranks > 1 else ''})", TIMEOUT_S, DS_ACCELERATOR="cpu",
               WANDB_MODE="disabled")
    files = [out_dir / (f"stage{stage}" + (f"_r{r}" if r else "") + ".json") for r in range(ranks)]
    results = [json.loads(f.read_text()) for f in files]
    return results[0] if ranks == 1 else {"ranks": results}


# the SGD scenarios (test_deepspeed.py), then the AdamW ones (_exact.py, test_deepspeed_skip.py), per stage
SGD_RUNS = ["schedule", "measure", "spike", "spike_bare", "accum", "stop", "zscore", "quantile", "nonfinite", "raise",
            "zero_clip", "crash", "refuse_skip", "refuse_nograd", "resume", "norm_spike",
            "norm_stop"]
EXACT_RUNS = {1: ["exact", "exact_bf16acc", "recommended", "rollback_bf16acc", "layers_bf16acc", "fp16_hysteresis",
                  "gate", "gate_refused_bf16acc"],
              2: ["exact", "recommended", "rollback", "layers", "schedule_lr", "fp16", "bench_layers", "gate", "lr_guard",
                  "gate_refused_fp16", "rollback_norm", "gate_ga4"],
              3: ["exact", "recommended", "rollback", "layers", "schedule_lr", "fp16", "wandb", "gate_bf16",
                  "rollback_norm", "exact_nocheck"]}
RANK_RUNS = ["layers@2", "layers@3", "layers_bf16acc@1", "exact_fp32_ga2@2", "exact_fp32_ga2@3", "gate@3"]


@pytest.fixture(scope="session", params=[2, 3, 1], ids=["zero2", "zero3", "zero1"])
def stage(request, tmp_path_factory):
    """Every scenario of one ZeRO stage, one launch (shared by the test modules)."""
    return launch(tmp_path_factory.mktemp(f"zero{request.param}"), request.param,
                  SGD_RUNS + EXACT_RUNS[request.param])


@pytest.fixture(scope="session")
def ranks(tmp_path_factory):
    """Two ranks (real partitions: parameters straddle the boundary): per-layer norms and the skip, ZeRO-1/2/3."""
    return launch(tmp_path_factory.mktemp("ranks"), 0, RANK_RUNS, ranks=2)["ranks"]
