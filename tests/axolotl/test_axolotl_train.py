"""``axolotl train`` (the real CLI, Axolotl 0.19.0, CPU) with ``GradClipPlugin``: a 30-step full fine-tune of a
tiny Llama with garbage lines at optimizer step 25, read back from the checkpoints' ``trainer_state.json``,
model and optimizer files, and TensorBoard. Plus configs that must fail before the model loads."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

_SPEC = importlib.util.find_spec("axolotl")
if _SPEC is None or _SPEC.origin is None:  # None: only this test folder, a namespace package named axolotl
    pytest.skip("axolotl is not installed: `make test-axolotl` runs this lane in its own virtualenv",
                allow_module_level=True)

from axolotl_cli import ROOT, axolotl_train  # noqa: E402
from fixture import make_run  # noqa: E402

STEPS, SPIKE = 30, 24  # the garbage batch is read by the 25th optimizer step (0-based 24): global_step 25
CLIP_KEYS = ("gradclip/norm_mean", "gradclip/norm_max", "gradclip/norm_post", "gradclip/threshold",
             "gradclip/coef", "gradclip/clip_rate", "gradclip/nonfinite_steps", "gradclip/skipped_steps")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl_spike")
    config = make_run(root, steps=STEPS, spike_steps=(SPIKE,), clip_spike_detection="loss", clip_spike_action="skip",
                      clip_spike_warmup_steps=10, save_strategy="steps", save_steps=1, save_total_limit=STEPS + 1,
                      use_tensorboard=True)
    result = axolotl_train(config)
    assert result.returncode == 0, result.output[-6000:]
    out = root / "output"
    history = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["log_history"]
    return result, out, {h["step"]: h for h in history if "loss" in h}


def test_every_log_carries_the_metrics_and_the_spike_is_skipped_at_its_step(run):
    result, _, logs = run
    assert sorted(logs) == list(range(1, STEPS + 1))
    for step, h in logs.items():
        assert all(k in h for k in CLIP_KEYS), f"step {step}: {sorted(h)}"
        assert "ppl" in h  # AxolotlTrainer.log's own keys are still there: its log() ran after ours
    spikes = {s: h["gradclip/spikes"] for s, h in logs.items() if h.get("gradclip/spikes")}
    assert spikes == {SPIKE + 1: 1}
    assert {s for s, h in logs.items() if h["gradclip/skipped_steps"]} == {SPIKE + 1}
    calm = [h["loss"] for s, h in logs.items() if SPIKE - 4 <= s <= SPIKE]
    assert logs[SPIKE + 1]["loss"] > 1.5 * max(calm)  # the injected garbage really was a spike
    assert f"gradclip: step {SPIKE + 1}: loss" in result.output and "update skipped" in result.output


def test_threshold_is_max_grad_norm_and_the_trainer_does_not_clip_first(run):
    _, out, logs = run
    before = [logs[s] for s in range(1, SPIKE + 1)]
    assert all(h["gradclip/threshold"] == 1.0 for h in before)  # Axolotl's default max_grad_norm (1.0)
    assert max(h["grad_norm"] for h in before) > 2.0  # pre-clip norms: the Trainer's own clip did not run first
    for h in before:
        assert h["gradclip/norm_post"] == pytest.approx(min(h["grad_norm"], 1.0), rel=1e-5)
    assert logs[SPIKE + 1]["gradclip/threshold"] == pytest.approx(0.5)  # tightened on the spike
    args = torch.load(out / f"checkpoint-{STEPS}" / "training_args.bin", weights_only=False)
    assert args.max_grad_norm == 1.0  # the arguments were not changed


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_the_skipped_update_left_weights_and_optimizer_state_bit_identical(run):
    _, out, _ = run
    ckpt = {s: out / f"checkpoint-{s}" for s in (SPIKE - 1, SPIKE, SPIKE + 1)}
    before, at, after = (_weights(ckpt[s]) for s in (SPIKE - 1, SPIKE, SPIKE + 1))
    assert all(torch.equal(at[k], after[k]) for k in at)
    assert not all(torch.equal(before[k], at[k]) for k in at)  # an applied update changes them
    opt_at, opt_after = (torch.load(ckpt[s] / "optimizer.pt", weights_only=False)["state"] for s in (SPIKE, SPIKE + 1))
    assert all(torch.equal(opt_at[i][k], opt_after[i][k]) for i in opt_at for k in opt_at[i])


def test_the_reporters_see_the_metrics(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = run
    files = glob.glob(str(out / "runs" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    acc = EventAccumulator(files[0])
    acc.Reload()
    spikes = {e.step: e.value for e in acc.Scalars("train/gradclip/spikes")}
    assert spikes[SPIKE + 1] == 1 and sum(spikes.values()) == 1
    assert len(acc.Scalars("train/gradclip/threshold")) == STEPS


def _fails_early(tmp_path, **keys):
    config = make_run(tmp_path, steps=2, **keys)
    result = axolotl_train(config, "--launcher", "python")
    assert result.returncode != 0
    assert not os.path.exists(tmp_path / "output" / "model.safetensors")
    for later in ("Loading raw datasets", "Loading weights", "Starting trainer"):  # all in a run that trains
        assert later not in result.output, later
    return result.output


EARLY_FAILURES = {
    "bad_value": ({"clip_strategy": "bogus"},
                  ["`clip_strategy` must be one of 'none', 'norm', 'value', 'agc', 'zscore', 'quantile', got 'bogus'"]),
    "unknown_key": ({"clip_stratgy": "zscore"}, ["unknown option(s) clip_stratgy", "clip_spike_action"]),
    "no_threshold": ({"max_grad_norm": 0.0, "clip_schedule": "cosine", "clip_threshold_final": 0.3},
                     ["`clip_threshold` must be a number > 0 with schedule 'cosine', got None. It defaults to "
                      "max_grad_norm"]),
    "nan_max_grad_norm": ({"max_grad_norm": float("nan")}, ["`max_grad_norm` must be a number", "NaN"]),
}


@pytest.mark.parametrize("case", sorted(EARLY_FAILURES))
def test_a_bad_config_fails_before_the_model_loads_naming_the_key(tmp_path, case):
    keys, expected = EARLY_FAILURES[case]
    output = _fails_early(tmp_path, **keys)
    for text in expected:
        assert text in output


def test_import_gradclip_hf_does_not_import_axolotl():
    code = ("import sys, gradclip_hf, gradclip_hf.integrations.transformers, gradclip_hf.integrations.axolotl_args\n"
            "assert 'axolotl' not in sys.modules, 'axolotl imported'\n"
            "import gradclip_hf.integrations.axolotl\n"
            "assert 'axolotl' in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "AXOLOTL_DO_NOT_TRACK": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
