"""The micro-batch gate on real ZeRO engines through ``GradClipTrainer`` (imported by ``_worker.py``; the runs'
common parts are ``_exact.py``'s; the tests: ``test_deepspeed_gate.py``)."""

from __future__ import annotations

import json
import math
import os

from _exact import SPIKES, _floats, equal, moved, train
from gradclip_hf.config import ClipConfig
from gradclip_hf.spikefile import FILE_NAME

GATE_AT, GATE_STEP = 11, 6  # 0-based micro-batch of a x30 loss: the second of step 6 (gradient accumulation 2)


def _gate_file(trainer) -> list[dict] | None:
    """The spike file's records (rank 0: it writes them; ``None`` on the others, which could read it too early)."""
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    with open(os.path.join(trainer.args.output_dir, FILE_NAME)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{k: r.get(k) for k in ("event", "step", "action", "skipped", "dropped")} for r in rows]


def gate(out: str, stage: int, dtypes: tuple = ("fp32",)) -> dict:
    """The micro-batch gate (``recommended(spike_gate="micro_batch")``, gradient accumulation 2): a x30 micro-batch is
    dropped and the update is the other one's alone; the end equals a run without the pack where that micro-batch's
    loss is multiplied by 0 and the other's by 2 (the rescale, a power of two: exact). With both micro-batches x30
    nothing is kept: the step is skipped, the end equals a run without that step's batches."""
    options = ClipConfig.recommended(spike_gate="micro_batch", **SPIKES).non_default()
    results = {}
    for dtype in dtypes:
        common = dict(steps=8, dtype=dtype, accum=2)
        a = train(out, f"gate_{dtype}", stage, options=options, loss_at={GATE_AT: 30.0}, **common)
        ref = train(out, f"gate_ref_{dtype}", stage, options={}, loss_at={GATE_AT - 1: 2.0, GATE_AT: 0.0}, **common)
        both = train(out, f"gate_all_{dtype}", stage, options=options, loss_at={GATE_AT - 1: 30.0, GATE_AT: 30.0},
                     **common)
        drop = train(out, f"gate_drop_{dtype}", stage, options={}, drop=(GATE_STEP,), **common)
        pa, pb = a["probe"], both["probe"]
        results[dtype] = {
            "final_equal_reference": equal(a["final"], ref["final"]), "gated_step_moved": moved(
                pa.before[GATE_STEP], pa.after[GATE_STEP]), "engine_skipped": a["engine_skipped"],
            "events": [e.step for e in a["run"].spike_events], "file": _gate_file(a["trainer"]),
            "logs": _floats(a["logs"]), "all_across_equal": equal(pb.before[GATE_STEP], pb.after[GATE_STEP]),
            "all_final_equal_dropped_run": equal(both["final"], drop["final"]),
            "all_engine_skipped": both["engine_skipped"], "all_logs": _floats(both["logs"]),
            "all_file": _gate_file(both["trainer"]), "ref_logs": _floats(ref["logs"])}
    return results


def gate_ga4(out: str, stage: int) -> dict:
    """Gradient accumulation 4, the second micro-batch of step 6 x30 and dropped: the rescale 4/3 is not a power of
    two, so the engine's divide by the loss scale 3/4 and a reference that multiplies the kept losses by 4/3 round
    differently: the end is compared to it as a relative L2 distance of the fp32 weights (fp32), next to a run
    that drops the micro-batch without the rescale. No clipping (``max_grad_norm=100``): a clip would normalize
    the scale away."""
    options = ClipConfig.recommended(spike_gate="micro_batch", **SPIKES).non_default()
    at, common = 4 * (GATE_STEP - 1) + 1, dict(steps=8, accum=4, max_grad_norm=100.0)
    a = train(out, "gate_ga4", stage, options=options, loss_at={at: 30.0}, **common)
    ref = train(out, "gate_ga4_ref", stage, options={}, loss_at={at - 1: 4 / 3, at: 0.0, at + 1: 4 / 3, at + 2: 4 / 3},
                **common)
    start = train(out, "gate_ga4_none", stage, options={}, loss_at={at: 0.0}, **common)
    return {"rel_to_reference": rel_distance(a["final"], ref["final"]),
            "rel_without_rescale": rel_distance(a["final"], start["final"]),
            "events": [e.step for e in a["run"].spike_events], "file": _gate_file(a["trainer"])}


def rel_distance(a, b) -> float:
    """||a - b|| / ||b|| over the fp32 master weights."""
    diff = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a["fp32"], b["fp32"]))
    return math.sqrt(diff / sum(float(y.double().pow(2).sum()) for y in b["fp32"]))


def gate_refused(out: str, stage: int, dtype: str) -> dict:
    """The gate where the engine has no loss scale to carry its rescale (BF16_Optimizer) or fp16's scaler owns it:
    refused at train start, nothing trained."""
    options = ClipConfig.recommended(spike_gate="micro_batch", **SPIKES).non_default()
    try:
        train(out, f"gate_refused_{dtype}", stage, steps=2, options=options, dtype=dtype, accum=2, states=False)
    except ValueError as error:
        return {"error": str(error)}
    return {"error": None}


RUNS = {"gate": gate, "gate_bf16": lambda out, stage: gate(out, stage, ("fp32", "bf16")), "gate_ga4": gate_ga4,
        "gate_refused_bf16acc": lambda out, stage: gate_refused(out, stage, "bf16acc"),
        "gate_refused_fp16": lambda out, stage: gate_refused(out, stage, "fp16")}
