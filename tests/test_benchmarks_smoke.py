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


TINY = ["--steps", "20", "--hidden", "32", "--block", "32", "--batch", "4", "--eval-blocks", "8", "--train-bytes",
        "20000", "--eval-bytes", "4000", "--base-steps", "6", "--warmup", "2", "--plot-seed", "0"]


def test_stability(bench, tmp_path):
    out = tmp_path / "stab"
    result = bench("stability").main(["--scenario", "garbage_batches", "--seeds", "2", "--methods", "none", "stock",
                                      "olmo", "recommended", "--cache", "none", "--out", str(out), *TINY])
    saved = read_json(out / "stability_garbage_batches.json")
    assert saved["scenarios"]["garbage_batches"]["fault_steps"] == [8, 11, 13, 16]
    assert len(saved["runs"]) == 8 and all(math.isfinite(r["faulted"]["eval_loss"]) for r in saved["runs"])
    rows = saved["table"]["garbage_batches"]
    assert set(rows) == {"none", "stock", "olmo", "recommended"} == set(result["table"]["garbage_batches"])
    assert rows["stock"]["ratio"]["mean"] == pytest.approx(1.0) and rows["stock"]["fp_cost"]["mean"] == 0.0
    for m in ("none", "olmo", "recommended"):
        assert rows[m]["damage"]["n"] == 2 and math.isfinite(rows[m]["vs_stock"]["mean"])
    md = (out / "stability_garbage_batches.md").read_text()
    assert "| garbage_batches |" in md and "## Targets for `recommended`" in md
    assert (out / "stability_garbage_batches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stability_cache_resumes_and_other_tasks_run(bench, tmp_path):
    cache = tmp_path / "runs.jsonl"
    args = ["--scenario", "lora_garbage,sft_clean", "--seeds", "1", "--methods", "stock", "pack:strategy=norm,"
            "spike_detection=loss,spike_action=skip", "--cache", str(cache), "--out", str(tmp_path), *TINY]
    first = bench("stability").main(args)
    lines = cache.read_text().splitlines()
    assert len(lines) == 2 * 2 + 2 * 1  # per method: lora faulted + clean, sft clean
    second = bench("stability").main(args)  # everything from the cache: same numbers, nothing trained
    assert cache.read_text().splitlines() == lines
    assert json.dumps(second["table"], sort_keys=True) == json.dumps(first["table"], sort_keys=True)
    assert "fp_cost" in second["table"]["sft_clean"]["stock"] and "damage" not in second["table"]["sft_clean"]["stock"]


def test_stability_accumulation_with_oracles_and_the_readme_table(bench, tmp_path):
    out = tmp_path / "acc"
    tiny8 = [*TINY]
    tiny8[tiny8.index("--batch") + 1] = "8"
    bench("stability").main(["--scenario", "ga4_garbage_micro,corrupt_shard", "--seeds", "2", "--methods", "stock",
                             "recommended", "oracle", "oracle_micro", "--cache", "none", "--out", str(out),
                             "--name", "acc", *tiny8])
    saved = read_json(out / "acc.json")
    rows = saved["table"]["ga4_garbage_micro"]
    assert rows["oracle"]["caught"] == 1.0 and rows["oracle_micro"]["caught"] == 1.0
    assert rows["oracle_micro"]["avoidable_micro"]["mean"] == pytest.approx(1.0)
    assert saved["table"]["corrupt_shard"]["oracle"]["avoidable"]["mean"] == pytest.approx(1.0)
    assert all("avoidable_gap" in r for r in rows.values())
    md = (out / "acc.md").read_text()
    assert "against `oracle_micro`" in md and "pretrain_ga4`: 4 micro-batches of 2" in md
    table = bench("stability_report").main([str(out / "acc.json"), "--readme"])
    assert "| GA 4: 1 garbage micro-batch of 4, at 4 steps |" in table and "false-positive cost (clean" in table


def test_lr_guard_schedules(bench, tmp_path):
    out = tmp_path / "lrg"
    result = bench("lr_guard_schedules").main(["--seeds", "2", "--steps", "30", "--out", str(out)])
    rows = result["schedules"]
    assert all(r["capped_per_run"] == 0 for r in rows.values())  # restarts to the peak, smooth rises: never capped
    assert all(math.isfinite(r["cost"]["mean"]) for r in rows.values())
    assert read_json(out / "lr_guard_schedules.json")["seeds"] == 2
    assert "| cosine, 3 hard restarts |" in (out / "lr_guard_schedules.md").read_text()


def test_early_detection_records_replays_and_resumes_from_its_cache(bench, tmp_path):
    cache, out = tmp_path / "early.jsonl", tmp_path / "early"
    args = ["--seeds", "1", "--positions", "8", "12", "--lengths", "1", "2", "--after", "4", "--cache", str(cache),
            "--out", str(out), *TINY[:TINY.index("--plot-seed")]]
    first = bench("early_detection").main(args)
    lines = cache.read_text().splitlines()
    assert len(lines) == 3  # one clean stock run per task
    second = bench("early_detection").main(args)  # from the cache: nothing trained, the same table
    assert cache.read_text().splitlines() == lines
    assert json.dumps(second["table"], sort_keys=True) == json.dumps(first["table"], sort_keys=True)
    saved = read_json(out / "early_detection.json")
    for task in ("pretrain", "lora", "sft"):
        row = saved["table"]["before"][task]
        assert row["clean_values"] == 20 and row["clean_flags"] == 0  # the running statistics' warmup: 20 steps
        assert all(share == 0.0 for by_position in row["detect"].values() for share in by_position.values())
        assert set(saved["table"]["early"][task]["detect"]) == {"1.5", "2.0", "3.0"}
    md = (out / "early_detection.md").read_text()
    assert "## False positives on the clean series" in md and "| mean of the tasks | early |" in md


def test_clean_runs(bench, tmp_path):
    result = bench("clean_runs").main(["--scenario", "garbage_batches", "--methods", "stock", "recommended", "--seeds",
                                       "2", "--steps", "12", "--cache", "none", "--out", str(tmp_path)])
    rows = result["tasks"]["pretrain"]
    assert rows["stock"]["fp_cost"]["mean"] == 0.0 and math.isfinite(rows["recommended"]["fp_cost"]["mean"])
    assert len(rows["recommended"]["flagged"]) == 2
    assert "| pretrain | recommended |" in (tmp_path / "clean_runs.md").read_text()
