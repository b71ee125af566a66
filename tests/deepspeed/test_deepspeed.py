"""The pack on real DeepSpeed ZeRO engines (CPU, ``torchrun --nproc_per_node 1``) through the Hugging Face Trainer.

Plain SGD (no momentum, no weight decay, constant LR) makes the post-clip norm of every step MEASURABLE:
``|w_after - w_before| / lr`` over the fp32 master weights (``safe_get_full_fp32_param``, all stages). Each
test checks that this measured norm is ``min(engine norm, threshold)`` for the threshold the pack computed
(schedule, spike tightening, zscore, quantile), and what was logged. ZeRO-1, ZeRO-2 and ZeRO-3 run every
scenario (one launch per stage, shared with test_deepspeed_skip.py: conftest.py).
"""

from __future__ import annotations

import importlib.util
import math
import statistics

import pytest

_SPEC = importlib.util.find_spec("deepspeed")
if _SPEC is None or _SPEC.origin is None:  # None: only this test folder, a namespace package named deepspeed
    pytest.skip("deepspeed is not installed: `make test-deepspeed` runs this lane in its own virtualenv "
                "(.venv-deepspeed)", allow_module_level=True)

SPIKE_STEP, STEPS = 6, 8  # as in _worker.py
REL = 2e-5  # fp32 weights: the measured norm to ~1e-6 relative


def close(a, b, rel=REL):
    return a is not None and b is not None and (a == b or abs(a - b) <= rel * max(abs(a), abs(b), 1e-12))


def assert_engine_clipped_at(rows):
    """The weights moved by exactly min(norm, threshold): the threshold the pack set is the one the engine used."""
    for row in rows:
        threshold = row["clip_grad"] if row["clip_grad"] > 0 else math.inf
        assert close(row["threshold"], threshold, 1e-9), row
        assert close(row["measured_post"], min(row["engine_norm"], threshold)), row
        assert close(row["norm_post"], row["measured_post"]), row
        assert close(row["norm"], row["engine_norm"], 1e-9), row


def test_schedule_sets_each_steps_threshold(stage):
    r = stage["schedule"]
    assert "error" not in r
    expected = [1.0 - 0.15 * t for t in range(6)] + [0.1, 0.1]  # linear 1.0 -> 0.1 over 6 steps
    assert [round(row["clip_grad"], 9) for row in r["rows"]] == [round(v, 9) for v in expected]
    assert all(row["engine_norm"] > row["clip_grad"] for row in r["rows"])  # every step clipped
    assert_engine_clipped_at(r["rows"])
    assert r["clip_grad_after"] == r["clip_grad_at_begin"] == 1.0  # put back at train end


def test_metrics_come_from_the_engine(stage):
    r = stage["schedule"]
    assert [h["step"] for h in r["logs"]] == list(range(1, STEPS + 1))
    for h, row in zip(r["logs"], r["rows"]):
        assert close(h["grad_norm"], row["engine_norm"], 1e-6)
        assert close(h["gradclip/norm_post"], row["measured_post"])
        assert close(h["gradclip/threshold"], row["clip_grad"], 1e-6)
        assert h["gradclip/clip_rate"] == 1.0 and h["gradclip/skipped_steps"] == 0
        assert close(h["gradclip/coef"], row["measured_post"] / row["engine_norm"])
    assert 8 <= len(r["layer_keys"]) <= 21  # the top 8 of each logging step, kept (test_deepspeed_skip.py)


@pytest.mark.parametrize("run", ["spike", "spike_bare", "accum"])
def test_loss_spike_tightens_the_same_step(stage, run):
    rows = stage[run]["rows"]
    assert [row["spike"] for row in rows] == [t == SPIKE_STEP for t in range(STEPS)]
    assert [row["clip_grad"] for row in rows[:SPIKE_STEP + 1]] == [0.5] * SPIKE_STEP + [0.25]  # x spike_factor 0.5
    assert rows[SPIKE_STEP]["engine_norm"] > 20 and close(rows[SPIKE_STEP]["measured_post"], 0.25)
    relaxed = 1 - 0.5 * 0.5 ** (1 / 20)  # the factor relaxes towards 1 (half-life 20)
    assert close(rows[-1]["clip_grad"], 0.5 * relaxed, 1e-9)
    assert_engine_clipped_at(rows)
    logs = stage[run]["logs"]
    assert [h["gradclip/spikes"] for h in logs] == [int(t == SPIKE_STEP) for t in range(STEPS)]
    assert close(logs[SPIKE_STEP]["gradclip/spike_factor"], 0.5, 1e-9)


def test_norm_spike_tightens_from_the_next_step(stage):
    """A gradient-norm spike is known after the engine stepped: its own step is clipped at the threshold as it was
    (measured from the weights), the next one at the tightened threshold."""
    rows = stage["norm_spike"]["rows"]
    assert [row["spike"] for row in rows[:SPIKE_STEP + 1]] == [False] * SPIKE_STEP + [True]
    assert [row["clip_grad"] for row in rows[:SPIKE_STEP + 1]] == [0.5] * (SPIKE_STEP + 1)
    relaxed = 1 - 0.5 * 0.5 ** (1 / 20)  # tightened x0.5 after the spike step, relaxing from the next one on
    assert close(rows[SPIKE_STEP + 1]["clip_grad"], 0.5 * relaxed, 1e-9)
    assert rows[SPIKE_STEP]["engine_norm"] > 20 and close(rows[SPIKE_STEP]["measured_post"], 0.5)
    assert_engine_clipped_at(rows)
    assert stage["norm_spike"]["events"][0] == SPIKE_STEP + 1


def test_norm_spike_stops_after_its_update(stage):
    """``stop`` on a gradient-norm spike: the step's update is applied (clipped) and training stops after it."""
    r = stage["norm_stop"]
    assert "error" not in r and [row["step"] for row in r["rows"]] == list(range(SPIKE_STEP + 1))
    assert [row["changed"] for row in r["rows"]] == [True] * (SPIKE_STEP + 1)
    assert close(r["rows"][SPIKE_STEP]["measured_post"], 0.5)
    assert [h["gradclip/skipped_steps"] for h in r["logs"]] == [0] * (SPIKE_STEP + 1)


def test_gradient_accumulation_one_threshold_per_engine_step(stage):
    r = stage["accum"]  # 2 micro-batches per step; the second one of step 6 has the x30 loss
    assert len(r["rows"]) == STEPS and [h["step"] for h in r["logs"]] == list(range(1, STEPS + 1))
    assert r["rows"][SPIKE_STEP]["engine_norm"] > 5 * r["rows"][SPIKE_STEP - 1]["engine_norm"]


def test_stop_ends_training_at_the_spike_step_without_its_update(stage):
    r = stage["stop"]
    assert [row["step"] for row in r["rows"]] == list(range(SPIKE_STEP + 1))
    assert [row["changed"] for row in r["rows"]] == [True] * SPIKE_STEP + [False]  # a loss spike: skipped, as locally
    assert "error" not in r and [h["gradclip/skipped_steps"] for h in r["logs"]] == [0] * SPIKE_STEP + [1]


def test_zscore_threshold_from_the_norms_before(stage):
    rows = stage["zscore"]["rows"]
    norms = [row["engine_norm"] for row in rows]
    assert [row["clip_grad"] for row in rows[:3]] == [5.0] * 3  # warmup: the cap
    mean = sum(norms[:3]) / 3  # ZClip's warmup statistics (population variance)
    std = math.sqrt(sum((n - mean) ** 2 for n in norms[:3]) / 3)
    assert close(rows[3]["clip_grad"], mean + 0.5 * (std + 1e-6), 1e-6)  # one-step lag: steps 0-2 only
    assert norms[SPIKE_STEP] > 20 and rows[SPIKE_STEP]["clip_grad"] < 5.0
    assert close(rows[SPIKE_STEP]["measured_post"], rows[SPIKE_STEP]["clip_grad"])  # the spike clipped at the boundary
    assert_engine_clipped_at(rows)


def test_zscore_threshold_is_the_cores_replayed(stage):
    """Replaying the engine's norms through the core gives the thresholds the engine ran with."""
    import torch

    from gradclip_hf.config import ClipConfig
    from gradclip_hf.core.external import ExternalClip

    external = ExternalClip(ClipConfig(strategy="zscore", threshold=5.0, zscore_warmup_steps=3, zscore_z=0.5).build(8))
    for row in stage["zscore"]["rows"]:
        assert close(float(external.before(row["step"], torch.tensor(1.0))), row["clip_grad"], 1e-9)
        external.after(row["engine_norm"])


def test_quantile_threshold_is_the_median_of_earlier_norms(stage):
    rows = stage["quantile"]["rows"]
    assert rows[0]["clip_grad"] == 0.0 and rows[0]["threshold"] == math.inf  # no history: no clip
    for t in range(1, len(rows)):
        assert close(rows[t]["clip_grad"], statistics.median(row["engine_norm"] for row in rows[:t]), 1e-6)
    assert_engine_clipped_at(rows)


def test_measure_only_never_clips(stage):
    rows = stage["measure"]["rows"]
    assert all(row["clip_grad"] == 0.0 for row in rows)
    assert all(close(row["measured_post"], row["engine_norm"]) for row in rows)
    assert stage["measure"]["logs"][0]["gradclip/threshold"] == math.inf


def test_nonfinite_step_is_skipped_by_the_engine(stage):
    r = stage["nonfinite"]
    assert [row["changed"] for row in r["rows"]] == [True, True, True, False, True]  # weights unchanged at step 3
    assert [h["gradclip/nonfinite_steps"] for h in r["logs"]] == [0, 0, 0, 1, 0]
    assert [h["gradclip/skipped_steps"] for h in r["logs"]] == [0, 0, 0, 1, 0]
    assert_engine_clipped_at([row for row in r["rows"] if row["changed"]])


def test_nonfinite_raise_stops_after_the_engine_skipped_the_step(stage):
    r = stage["raise"]
    assert r["error"]["type"] == "NonFiniteGradientError"
    assert r["error"]["message"].startswith("step 4: a gradient holds NaN or Inf (DeepSpeed's overflow check found it")
    assert [row["changed"] for row in r["rows"]] == [True, True, True]  # the NaN step never reached a probe
    assert r["clip_grad_after"] == 1.0


def test_engine_built_without_clipping_clips_at_the_packs_threshold(stage):
    r = stage["zero_clip"]  # max_grad_norm=0: gradient_clipping "auto" -> 0 when the engine was built
    assert all(row["clip_grad"] == 0.3 and close(row["measured_post"], 0.3) for row in r["rows"])
    assert r["clip_grad_after"] == 0.0  # the engine's own value, back


def test_clip_grad_put_back_after_a_crash(stage):
    r = stage["crash"]
    assert r["error"]["message"] == "crash at step 2"
    assert [row["clip_grad"] for row in r["rows"]] == [0.3, 0.3]
    assert r["clip_grad_after"] == 1.0


def test_skip_of_a_norm_spike_is_refused_at_train_start(stage):
    r = stage["refuse_skip"]
    assert r["error"]["type"] == "ValueError" and r["rows"] == []
    assert "spike_action='skip' cannot skip a gradient-norm spike" in r["error"]["message"]
    assert "Use spike_detection='loss' (as ClipConfig.recommended())" in r["error"]["message"]
    assert r["clip_grad_after"] == 1.0


def test_compute_grad_norm_false_is_refused(stage):
    r = stage["refuse_nograd"]
    assert r["rows"] == []
    if stage["stage"] == 3:  # DeepSpeed refuses it itself for ZeRO-3 (a pydantic ValidationError, a ValueError)
        assert r["error"]["type"] == "ValidationError"
        assert "compute_grad_norm=false is supported only with ZeRO Stage 1 or 2" in r["error"]["message"]
    else:
        assert r["error"]["type"] == "ValueError"
        assert "Set zero_optimization.compute_grad_norm to true" in r["error"]["message"]


def test_resume_engine_threshold_agrees_with_the_pack(stage):
    r = stage["resume"]
    full, resumed = r["full"], r["resumed"]
    assert "error" not in full and "error" not in resumed
    assert full["events"] == resumed["events"] == [SPIKE_STEP + 1]
    # ZeRO-1/2 save clip_grad in the optimizer state (the last step's threshold); ZeRO-3 does not save it
    saved = list(r["saved_clip_grad"].values())
    assert saved == ([None] if stage["stage"] == 3 else [pytest.approx(full["rows"][3]["clip_grad"], rel=1e-12)])
    # after the load, train begin sets it from the pack's restored statistics: step 4's threshold
    assert close(resumed["clip_grad_at_begin"], full["rows"][4]["clip_grad"], 1e-9)
    for a, b in zip(full["rows"][4:], resumed["rows"]):
        assert a["step"] == b["step"] and close(a["clip_grad"], b["clip_grad"], 1e-9)
    assert_engine_clipped_at(resumed["rows"])
    assert resumed["state"]["clipper"]["spikes"]["factor"] == pytest.approx(full["state"]["clipper"]["spikes"]["factor"])
