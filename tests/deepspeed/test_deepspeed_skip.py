"""The pack's skip, rollback, learning-rate schedule, per-layer norms, fp16 loss scaler and W&B extras on real ZeRO
engines (CPU) through ``GradClipTrainer`` with AdamW (``_exact.py`` runs them; ``conftest.py`` launches one process
per stage, shared with test_deepspeed.py, and one with 2 ranks).

"Bit-identical" is ``torch.equal`` on the fp32 master weights, Adam's ``exp_avg``/``exp_avg_sq``/``step`` and the
low-precision weights; each equality is asserted next to a check that the same state does move on the steps
that are not skipped.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

_SPEC = importlib.util.find_spec("deepspeed")
if _SPEC is None or _SPEC.origin is None:
    pytest.skip("deepspeed is not installed: `make test-deepspeed` runs this lane in its own virtualenv "
                "(.venv-deepspeed)", allow_module_level=True)

SKIP, SKIP_STEPS, SPIKE = 2, 4, 7  # as in _exact.py (the spike: step 7 of 8)
CONFIGS = {1: ["fp32_ga1", "fp32_ga2", "bf16_ga1", "bf16_ga2", "bf16acc_ga1", "bf16acc_ga2"],
           2: ["fp32_ga1", "fp32_ga2", "bf16_ga1", "bf16_ga2"], 3: ["fp32_ga1", "fp32_ga2", "bf16_ga1", "bf16_ga2"]}


def exact_runs(stage):
    return {**stage["exact"], **stage.get("exact_bf16acc", {})}


def test_a_listed_step_is_skipped_bit_identically_and_ends_as_a_run_without_its_batches(stage):
    """``clip_skip_steps=[2]`` on ZeRO-1/2/3, fp32 and bf16 (ZeRO-1 also DeepSpeed's BF16_Optimizer: bf16 with fp32
    gradient accumulation), gradient accumulation 1 and 2."""
    runs = exact_runs(stage)
    assert sorted(runs) == sorted(CONFIGS[stage["stage"]])
    for name, r in runs.items():
        assert r["across_skip_equal"], name  # weights, moments, step counts, low-precision weights
        assert r["other_steps_moved"] == [True] * (SKIP_STEPS - 1) and r["final_moved"], name
        assert r["final_equal_dropped_run"], name  # bit-identical to a run that never saw the batches
        assert r["engine_skipped"] == 1, name  # the engine's own overflow path
        logs = {h["step"]: h for h in r["logs"]}
        assert [logs[s]["gradclip/skipped_steps"] for s in range(1, SKIP_STEPS + 1)] == [0, 1, 0, 0], name
        assert all(h["gradclip/nonfinite_steps"] == 0 for h in logs.values()), name  # the pack's skip, not a NaN
        assert logs[SKIP]["grad_norm"] is None, name  # NaN: not measured (the engine saw NaN gradients by design)
        assert all(math.isfinite(logs[s]["grad_norm"]) and math.isfinite(logs[s]["loss"])
                   for s in logs if s != SKIP), name
        assert math.isfinite(logs[SKIP]["loss"])  # the Trainer's loss is the real one


def test_two_ranks_skip_bit_identically(ranks):
    for rank, results in enumerate(ranks):
        for stage in (2, 3):
            r = results[f"exact_fp32_ga2@{stage}"]["fp32_ga2"]
            assert r["across_skip_equal"] and r["final_equal_dropped_run"] and r["final_moved"], (rank, stage)
            assert r["other_steps_moved"] == [True] * (SKIP_STEPS - 1) and r["engine_skipped"] == 1, (rank, stage)


def test_recommended_runs_as_is_and_skips_the_loss_spike(stage):
    """``ClipConfig.recommended()`` (with a short warmup): a x30 loss at step 7 is skipped before the engine steps;
    the end equals a run without that batch."""
    r = stage["recommended"]
    assert r["events"] == [SPIKE] and r["engine_skipped"] == 1
    assert r["across_skip_equal"] and r["final_equal_dropped_run"]
    logs = {h["step"]: h for h in r["logs"]}
    assert [logs[s]["gradclip/skipped_steps"] for s in range(1, 9)] == [0] * 6 + [1, 0]
    assert logs[SPIKE]["gradclip/spikes"] == 1 and logs[SPIKE]["gradclip/nonfinite_steps"] == 0
    assert logs[SPIKE]["loss"] > 20 * logs[SPIKE - 1]["loss"]  # the spike itself, logged as it was
    assert r["spike_file"] == [{"step": SPIKE, "skipped": True, "norm": None, "action": "skip", "kind": "loss"}]


def test_rollback_restores_the_snapshot_exactly(stage):
    """A loss spike at step 7 under ``spike_action="rollback"``: the state right after is the one before step 6
    (the last snapshot, taken after step 5), bit for bit, and the end equals a run without steps 6 and 7."""
    r = stage.get("rollback") or stage["rollback_bf16acc"]
    assert r["optimizer"] == {1: "BF16_Optimizer", 2: "DeepSpeedZeroOptimizer",
                              3: "DeepSpeedZeroOptimizer_Stage3"}[stage["stage"]]
    assert r["rollbacks"] == 1 and r["step_6_moved"]
    assert r["restored_equal_before_6"] and r["final_equal_dropped_run"]
    # 12 bytes per parameter on one rank (fp32 master, exp_avg, exp_avg_sq), plus the step counters
    assert 12 * r["params"] <= r["snapshot_bytes"] <= 12 * r["params"] + 64


@pytest.mark.parametrize("stage", [2, 3], indirect=True, ids=["zero2", "zero3"])  # ZeRO-1: ZeRO-2's class
def test_rollback_of_a_norm_spike_restores_the_snapshot(stage):
    """A gradient-norm spike at step 7 (known after the engine applied it) under ``rollback``: the snapshot is
    restored, undoing that update too; the same state and end as the loss spike's rollback."""
    r = stage["rollback_norm"]
    assert r["events"] == [SPIKE] and r["rollbacks"] == 1 and r["engine_skipped"] == 0 and r["step_6_moved"]
    assert r["restored_equal_before_6"] and r["final_equal_dropped_run"]


@pytest.mark.parametrize("stage", [3], indirect=True, ids=["zero3"])
def test_zero3_skips_without_the_bf16_overflow_check(stage):
    """``bf16.check_grad_overflow: false`` (accepted on ZeRO-3, refused on ZeRO-1/2 where the engine then applies
    NaN steps): ZeRO-3 still takes its overflow path on a non-finite norm, so a listed step is skipped exactly."""
    r = stage["exact_nocheck"]["bf16_ga2"]
    assert r["across_skip_equal"] and r["final_equal_dropped_run"] and r["engine_skipped"] == 1
    assert all(r["other_steps_moved"]) and r["final_moved"]


@pytest.mark.parametrize("stage", [2, 3], indirect=True, ids=["zero2", "zero3"])  # ZeRO-1: ZeRO-2's class
def test_the_lr_schedule_advances_on_a_skip_as_on_the_local_path(stage):
    """Linear schedule, step 3 listed: the learning rate each step used, and the one logged, equal a run without any
    skip (the local path's behaviour: tests/integration/test_step_path.py). DeepSpeed alone would pause the
    schedule on the skipped step; with the Trainer's scheduler and with one the engine owns (ZeRO-2)."""
    owners = stage["schedule_lr"]
    assert sorted(owners) == (["engine", "trainer"] if stage["stage"] == 2 else ["trainer"])
    for owner, r in owners.items():
        assert r["engine_skipped"] == 1, owner
        assert r["used_skip"] == r["used_plain"], owner
        assert r["logged_skip"] == r["logged_plain"], owner
        assert len(set(r["used_plain"])) == len(r["used_plain"]) == 6, owner  # a schedule that does move


def test_fp16_skip_leaves_the_loss_scaler_alone(stage):
    """fp16 (DeepSpeed's CPU fp16 check patched: this CPU has none): a listed step is skipped bit-identically and
    the dynamic loss scaler ends as in a run without the batch (DeepSpeed alone would spend its hysteresis, or
    halve its scale); at the minimum scale (1, hysteresis 1) DeepSpeed alone raises, the pack's skip does not."""
    runs = stage.get("fp16") or stage["fp16_hysteresis"]
    assert sorted(runs) == (["hysteresis2"] if stage["stage"] == 1 else ["at_min", "hysteresis2"])
    for name, r in runs.items():
        assert r["across_skip_equal"] and r["final_equal_dropped_run"] and r["engine_skipped"] == 1, name
        assert r["scaler_end"] == r["scaler_end_dropped"], name
        assert r["scaler_end"]["cur_scale"] == (1 if name == "at_min" else 256), name
        assert [h["gradclip/skipped_steps"] for h in r["logs"]] == [0, 1, 0, 0], name


def _check_layers(r, rel):
    assert r["read_at"] == [2, 4, 6, SPIKE, 8]  # logging steps (every 2nd) and the loss spike (tighten) only
    for step, total in r["root_sum_squares"].items():
        engine = r["engine_norm"][step]
        assert abs(total - engine) <= rel * engine, (step, total, engine)
    logs = {h["step"]: h for h in r["logs"]}
    assert sorted(logs) == [2, 4, 6, 8]
    assert len(r["layer_keys"]) == len(r["spike_layer_keys"]) == r["n_params"] == 21  # top_k above the count
    for step, h in logs.items():
        layers = [v for k, v in h.items() if k.startswith("gradclip/layer/")]
        assert len(layers) == 21 and abs(math.sqrt(sum(v * v for v in layers)) - h["grad_norm"]) <= rel * h["grad_norm"]
    if r["spike_file"] is not None:  # rank 0's run: one record, written by one process only
        (record,) = r["spike_file"]  # the spike step's record names its largest layers (read at that step)
        assert record["step"] == SPIKE and len(record["top_layers"]) >= 3
        assert abs(record["norm"] - r["engine_norm"][str(SPIKE)]) <= rel * record["norm"]
    spike = [v for k, v in logs[8].items() if k.startswith("gradclip/spike_layer/")]
    assert abs(math.sqrt(sum(v * v for v in spike)) - r["engine_norm"][str(SPIKE)]) <= rel * r["engine_norm"][str(SPIKE)]


def test_per_layer_norms_at_logging_and_spike_steps(stage):
    """Each parameter's gradient norm read between the engine's backward and its step: their root sum of squares is
    the engine's own norm; ``gradclip/layer/*`` at logging steps, ``spike_layer/*`` of the spike step."""
    r = stage.get("layers") or stage["layers_bf16acc"]
    _check_layers(r, 1e-5)


def test_per_layer_norms_on_two_ranks(ranks):
    """Two ranks: each parameter's squares summed over the partitions (some straddle the boundary) in one
    all-reduce; ZeRO-2 (DeepSpeedZeroOptimizer), ZeRO-3 (safe_get_local_grad), ZeRO-1 BF16_Optimizer."""
    for rank, results in enumerate(ranks):
        for key in ("layers@2", "layers@3", "layers_bf16acc@1"):
            assert (results[key]["spike_file"] is None) == (rank > 0)
            _check_layers(results[key], 1e-5)
    assert ranks[0]["layers@3"]["root_sum_squares"] == ranks[1]["layers@3"]["root_sum_squares"]  # the same decision


@pytest.mark.parametrize("stage", [3], indirect=True, ids=["zero3"])  # one wandb process per lane
def test_wandb_extras_under_deepspeed(stage):
    """W&B offline under ZeRO-3, read back with wandb's own reader: per-layer keys, the histogram every 2nd logging
    step, the spike table and the spike alert."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "logging"))
    from wandb_records import read_run

    r = stage["wandb"]
    run = read_run(r["root"])
    rows = {h["train/global_step"]: h for h in run["history"] if "train/gradclip/threshold" in h}
    assert sorted(rows) == [2, 4, 6, 8]
    assert all(sum(k.startswith("train/gradclip/layer/") for k in h) >= 3 for h in rows.values())
    assert any(k.startswith("train/gradclip/spike_layer/") for k in rows[8])
    histograms = [h for h in run["history"] if h.get("gradclip/layer_norms._type") == "histogram"]
    assert [h["train/global_step"] for h in histograms] == [2, 6]
    assert sum(histograms[-1]["gradclip/layer_norms.values"]) == r["layers"] == r["last_layer_norms"] == 21
    tables = [h for h in run["history"] if h.get("gradclip/spike_events._type") == "table-file"]
    assert len(tables) == 1 and tables[0]["gradclip/spike_events.nrows"] == 1 and tables[0]["train/global_step"] == 8
    assert [a["level"] for a in run["alerts"]] == ["WARN"] and run["alerts"][0]["text"].startswith(f"step {SPIKE}:")


@pytest.mark.parametrize("stage", [2], indirect=True, ids=["zero2"])
def test_the_per_layer_cost_benchmark_runs(stage):
    """benchmarks/deepspeed_layers.py with tiny settings (its numbers mean nothing at this size)."""
    r = stage["bench_layers"]
    row = r["results"]["zero2"]
    assert row["read_ms"] > 0 and row["step_ms_off"] > 0 and row["step_ms_on"] > 0 and math.isfinite(row["ratio"])
    assert "| zero2 |" in r["md"]
    assert r["read_restored"]  # its timing patch is gone after it: the later runs of the worker read as users do


@pytest.mark.parametrize("stage", [2], indirect=True, ids=["zero2"])
def test_lr_guard_caps_a_learning_rate_jump_inside_the_engine_step(stage):
    """``lr_guard`` under DeepSpeed (ZeRO-2): the step whose rate is 10x the scheduler's ends as the run whose rate
    was 2x there, bit for bit; the next step's rate is the scheduler's own; one step counted as capped."""
    for owner, r in stage["lr_guard"].items():
        assert r["equal_capped"] and not r["equal_wild"], owner
        assert r["lr_23"] == r["lr_23_plain"], owner
        assert r["capped"] == 1, owner
