"""The micro-batch gate (``spike_gate="micro_batch"``) on real ZeRO engines (CPU) through ``GradClipTrainer`` with
AdamW, gradient accumulation 2 (``_gate.gate``; launched with the other runs of each stage by ``conftest.py``).

A x30 micro-batch (the second of step 6) is dropped before its backward (``loss * 0``), and the engine makes the
update the mean of the kept micro-batch through its loss scale (the rescale, 2: a power of two, so exact): the run
ends bit-identical to one without the pack where that micro-batch's loss is multiplied by 0 and the other's by 2.
With both micro-batches of step 6 x30 nothing is kept: the step is skipped through the engine's overflow path and
the run ends bit-identical to one that never saw those batches. Where the engine has no loss scale to carry the
rescale (ZeRO-1's ``BF16_Optimizer``) or fp16's dynamic scaler owns it, the gate is refused at train start.
"""

from __future__ import annotations

import importlib.util

import pytest

_SPEC = importlib.util.find_spec("deepspeed")
if _SPEC is None or _SPEC.origin is None:
    pytest.skip("deepspeed is not installed: `make test-deepspeed` runs this lane in its own virtualenv "
                "(.venv-deepspeed)", allow_module_level=True)

GATE_STEP = 6  # as in _gate.py


def _check_gate(r, world=1):
    """``world``: processes (the gate counts over every one; in this lane each rank sees the same batches)."""
    # one micro-batch dropped: the update applied, made of the kept one, as the reference's (bit for bit)
    assert r["final_equal_reference"] and r["gated_step_moved"] and r["engine_skipped"] == 0
    assert r["events"] == [GATE_STEP]
    dropped = {"count": world, "micro_batches": 2 * world, "positions": [1]}
    assert r["file"] in (None, [{"event": "spike", "step": GATE_STEP, "action": "drop", "skipped": False,
                                 "dropped": dropped}])
    logs = {h["step"]: h for h in r["logs"]}
    assert [logs[s]["gradclip/dropped_micro_batches"] for s in sorted(logs)] == [0] * 5 + [world, 0, 0]
    assert all(h["gradclip/skipped_steps"] == 0 for h in r["logs"])
    ref = {h["step"]: h for h in r["ref_logs"]}
    assert logs[GATE_STEP]["grad_norm"] == ref[GATE_STEP]["grad_norm"]  # the engine's norm is the kept mean's
    # nothing kept: a skip, bit-identical across it and at the end to a run without the step's batches
    assert r["all_across_equal"] and r["all_final_equal_dropped_run"] and r["all_engine_skipped"] == 1
    dropped = {"count": 2 * world, "micro_batches": 2 * world, "positions": [0, 1]}
    assert r["all_file"] in (None, [{"event": "spike", "step": GATE_STEP, "action": "skip", "skipped": True,
                                     "dropped": dropped}])
    row = {h["step"]: h for h in r["all_logs"]}[GATE_STEP]
    assert row["gradclip/dropped_micro_batches"] == 2 * world and row["gradclip/skipped_steps"] == 1
    assert row["gradclip/nonfinite_steps"] == 0 and row["grad_norm"] is None  # not measured (NaN)


def test_the_gate_drops_a_micro_batch_exactly_and_skips_a_step_with_none_kept(stage):
    """ZeRO-1 and 2 (``DeepSpeedZeroOptimizer``) in fp32, ZeRO-3 in fp32 and bf16."""
    runs = stage.get("gate") or stage["gate_bf16"]
    assert sorted(runs) == (["bf16", "fp32"] if stage["stage"] == 3 else ["fp32"])
    for dtype, r in runs.items():
        _check_gate(r)


def test_the_gate_on_two_ranks(ranks):
    """ZeRO-3 on 2 ranks (real partitions; the gate's one all-reduce per step): the same on both ranks (rank 0
    writes the spike file)."""
    r0, r1 = (results["gate@3"]["fp32"] for results in ranks)
    assert r0["file"] is not None and r1["file"] is None
    _check_gate(r0, world=2)
    _check_gate(r1, world=2)
    assert r0["logs"] == r1["logs"]


@pytest.mark.parametrize("stage", [2], indirect=True, ids=["zero2"])
def test_a_rescale_that_is_not_a_power_of_two_is_one_rounding_away(stage):
    """Gradient accumulation 4, one micro-batch dropped: the rescale 4/3, through the loss scale 3/4, against a run
    that multiplies the three kept losses by 4/3 (no clipping, which would normalize the scale away): the fp32
    weights end within rounding (measured 5.8e-9 relative), where dropping without the rescale is 1e5 times
    further (8.5e-4)."""
    r = stage["gate_ga4"]
    assert r["events"] == [GATE_STEP] and r["file"][0]["dropped"] == {"count": 1, "micro_batches": 4, "positions": [1]}
    assert r["rel_to_reference"] < 1e-7 and r["rel_without_rescale"] > 1e-4


@pytest.mark.parametrize("stage", [1, 2], indirect=True, ids=["zero1", "zero2"])
def test_the_gate_is_refused_where_the_engine_cannot_rescale(stage):
    """ZeRO-1 bf16 with fp32 gradient accumulation (``BF16_Optimizer``: no loss scale) and fp16 (the dynamic
    scaler owns it; DeepSpeed's CPU fp16 check patched): ``ValueError`` at train start, naming the option and the
    fix."""
    if stage["stage"] == 1:
        error = stage["gate_refused_bf16acc"]["error"]
        assert "BF16_Optimizer (ZeRO-1 with bf16 weights and fp32 gradient accumulation) has no loss scale" in error
    else:
        error = stage["gate_refused_fp16"]["error"]
        assert "fp16: the dynamic loss scaler owns the scale" in error
    assert error.split(": ", 1)[1].startswith("under DeepSpeed spike_gate='micro_batch' cannot be served here")
    assert "Use bf16 (without data_types.grad_accum_dtype='fp32' on ZeRO-1) or fp32, or spike_gate='step'" in error
