"""Smoke test of the benchmark scripts: each runs a few steps with tiny settings and writes outputs that parse.

The numbers are meaningless at these sizes; benchmarks/README.md has the real runs.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("transformers")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def test_overhead(bench, tmp_path):
    out = str(tmp_path / "overhead")
    result = bench("overhead").main(["--steps", "4", "--warmup", "1", "--repeats", "1", "--configs", "norm,recommended",
                                     "--hidden", "32", "--layers", "1", "--block", "32", "--batch", "2",
                                     "--no-memory", "--no-warm_runs", "--text_bytes", "20000", "--threads", "1", "--out", out])
    saved = read_json(out + ".json")
    assert {"stock", "norm", "recommended"} <= set(saved["results"]) == set(result["results"])
    assert saved["results"]["stock"]["step_ratio"] == pytest.approx(1.0)
    assert all(math.isfinite(r["step_ratio"]) and r["step_ms"] > 0 for r in saved["results"].values())
    assert "| norm |" in open(out + ".md").read()


def test_clip_kernel(bench, tmp_path):
    out = str(tmp_path / "kernel")
    bench("clip_kernel").main(["--preset", "tiny", "--repeats", "2", "--warmup", "2", "--threads", "1", "--out", out])
    rows = read_json(out + ".json")["results"]
    assert rows["torch clip_grad_norm_"]["ratio"] == pytest.approx(1.0)
    for name in ("pack norm", "pack value", "pack agc", "pack zscore", "pack quantile", "pack zscore+spike",
                 "zclip 1.0.0"):
        assert rows[name]["ms"] > 0, name
    assert "| pack zscore |" in open(out + ".md").read()


def test_gpu_syncs(bench, tmp_path, capsys):
    module = bench("gpu_syncs")
    import torch

    if not torch.cuda.is_available():  # the plain call says it needs CUDA and does nothing
        assert module.main(["--out", str(tmp_path / "none")]) is None
        assert "needs a CUDA device" in capsys.readouterr().out
        assert not (tmp_path / "none.json").exists()
    out = str(tmp_path / "syncs")
    module.main(["--dry_run_cpu", "--steps", "3", "--threads", "1", "--out", out])
    saved = read_json(out + ".json")
    assert set(saved["core"]) == set(module.CORE_CONFIGS)
    assert all(r["raised"] is None for r in saved["core"].values())
    assert "torch clip_grad_norm_ (reference)" in saved["runner"]


def test_stability(bench, tmp_path):
    out = tmp_path / "stab"
    bench("stability").main(["--seeds", "1", "--steps", "12", "--methods", "none,zclip,recommended",
                             "--hidden", "32", "--injections", "1", "--window", "3", "--lr_warmup", "2",
                             "--eval_blocks", "8", "--train_bytes", "20000", "--eval_bytes", "4000", "--out", str(out)])
    saved = read_json(out / "stability.json")
    assert len(saved["table"]) == 3 and len(saved["runs"]) == 3
    assert all(len(r["loss"]) == 12 and math.isfinite(r["eval_loss"]) for r in saved["runs"])
    assert saved["injections"] == [3]
    md = (out / "stability.md").read_text()
    assert md.count("\n| ") >= 4 and "none" in md and "recommended" in md
    assert (out / "stability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
