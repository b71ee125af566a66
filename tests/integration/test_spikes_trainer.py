"""The loss-spike controller in real tiny-Llama Trainer runs with injected rare-byte batches."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_args
from gradclip_hf.standins import SpikyByteStream, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from helpers import StepRecorder  # noqa: E402

from gradclip_hf.integrations.transformers import (GradClipCallback, GradClipTrainer,  # noqa: E402
                                                   GradClipTrainingArguments)

pytestmark = pytest.mark.slow
BATCH = 4
SPIKES = (24, 33)


def spiky_trainer(tmp_path, dataset, spike_steps=SPIKES, steps=40, keep_state=False, **options):
    defaults = dict(clip_strategy="norm", clip_threshold=1.0, clip_spike_detection="loss", clip_spike_warmup_steps=10)
    defaults.update(options)
    args = make_args(tmp_path, cls=GradClipTrainingArguments, max_steps=steps, learning_rate=3e-3,
                     per_device_train_batch_size=BATCH, **defaults)
    stream = SpikyByteStream(dataset, spike_steps=spike_steps, samples_per_step=BATCH)
    trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=stream)
    recorder = StepRecorder(trainer, keep_state=keep_state)
    trainer.add_callback(recorder)
    return trainer, recorder


def spike_steps_of(recorder):
    return [s for s, r in sorted(recorder.reports.items()) if r["spike"]]


def test_spikes_detected_exactly_at_injected_steps_and_nowhere_in_a_clean_run(tmp_path, dataset):
    trainer, recorder = spiky_trainer(tmp_path / "spiky", dataset)
    trainer.train()
    assert spike_steps_of(recorder) == list(SPIKES)
    clean, clean_recorder = spiky_trainer(tmp_path / "clean", dataset, spike_steps=())
    clean.train()
    assert len(clean_recorder.reports) == 40 and spike_steps_of(clean_recorder) == []
    # what was logged says so too
    logged = [h for h in trainer.state.log_history if "gradclip/spikes" in h]
    assert [h["step"] for h in logged if h["gradclip/spikes"]] == [s + 1 for s in SPIKES]  # log step = step + 1
    assert [e.step for e in trainer.clip_run.spike_events] == [s + 1 for s in SPIKES]  # numbered as logged


def test_threshold_drops_at_once_and_relaxes_with_half_life(tmp_path, dataset):
    trainer, recorder = spiky_trainer(tmp_path, dataset, spike_steps=(24,), steps=38, clip_spike_factor=0.5,
                                      clip_spike_relax_half_life=10.0)
    trainer.train()
    thresholds = {s: r["threshold"] for s, r in recorder.reports.items()}
    assert spike_steps_of(recorder) == [24]
    assert thresholds[23] == pytest.approx(1.0)
    assert thresholds[24] == pytest.approx(0.5)   # the spike step itself is clipped harder
    assert thresholds[34] == pytest.approx(0.75)  # half-way back after one half-life
    assert thresholds[25] < thresholds[29] < thresholds[34] < thresholds[37] < 1.0
    assert recorder.reports[24]["norm_post"] <= 0.5 + 1e-5


def test_skip_leaves_weights_and_optimizer_state_bit_identical(tmp_path, dataset):
    trainer, recorder = spiky_trainer(tmp_path, dataset, spike_steps=(24,), steps=27, keep_state=True,
                                      clip_spike_action="skip")
    trainer.train()
    assert spike_steps_of(recorder) == [24]
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[23], recorder.weights[24]))
    for before, after in zip(recorder.optim_state[23], recorder.optim_state[24]):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[24], recorder.weights[25]))
    assert trainer.clip_run.skipped_steps == 1
    assert [h["gradclip/skipped_steps"] for h in trainer.state.log_history if "gradclip/skipped_steps" in h
            and h["step"] == 25] == [1]


def test_rollback_restores_the_snapshot(tmp_path, dataset):
    trainer, recorder = spiky_trainer(tmp_path, dataset, spike_steps=(24,), steps=27, keep_state=True,
                                      clip_spike_action="rollback", clip_spike_snapshot_every=5)
    trainer.train()
    assert spike_steps_of(recorder) == [24]
    # snapshots are taken before the updates of steps 0, 5, 10, 15, 20: the one of step 20 holds the
    # weights after step 19; the spike at 24 puts them back and skips its own update
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[19], recorder.weights[24]))
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[19], recorder.weights[23]))
    for before, after in zip(recorder.optim_state[19], recorder.optim_state[24]):
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert trainer.clip_run.rollbacks == 1
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[24], recorder.weights[25]))


def test_stop_ends_training_with_the_reason(tmp_path, dataset):
    trainer, recorder = spiky_trainer(tmp_path, dataset, spike_steps=(24,), steps=36, keep_state=True,
                                      clip_spike_action="stop")
    trainer.train()
    assert trainer.state.global_step == 25
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[23], recorder.weights[24]))
    reasons = [h["gradclip/stop_reason"] for h in trainer.state.log_history if "gradclip/stop_reason" in h]
    assert len(reasons) == 1 and "loss spike at step 25" in reasons[0] and "spike_action='stop'" in reasons[0]
    assert trainer.clip_run.stop_reason == reasons[0]


class NaNGradients(TrainerCallback):
    """Poison the gradients at given steps (as an fp overflow would), before the clipper sees them."""

    def __init__(self, steps):
        self.steps = set(steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            next(model.parameters()).grad[0, 0] = math.nan


@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_nonfinite_gradients_never_reach_the_weights_and_stop_after_n(tmp_path, dataset, entry):
    bad = (5, 9, 10, 11)
    steps = 16
    if entry == "trainer":
        args = make_args(tmp_path, cls=GradClipTrainingArguments, max_steps=steps, clip_threshold=1.0,
                         clip_nonfinite_max_consecutive=3)
        trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset)
        trainer.callback_handler.callbacks.insert(0, NaNGradients(bad))  # before the clipper
    else:
        trainer = Trainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=steps, max_grad_norm=0.0),
                          train_dataset=dataset,
                          callbacks=[NaNGradients(bad), GradClipCallback(threshold=1.0, nonfinite_max_consecutive=3)])
    recorder = StepRecorder(keep_state=True)
    trainer.add_callback(recorder)
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    for step in bad[:-1]:
        assert all(torch.equal(a, b) for a, b in zip(recorder.weights[step - 1], recorder.weights[step]))
    # 9, 10, 11 are three non-finite steps in a row: training stops after step 11
    assert trainer.state.global_step == 12
    reasons = [h["gradclip/stop_reason"] for h in trainer.state.log_history if "gradclip/stop_reason" in h]
    assert len(reasons) == 1 and "3 consecutive steps with non-finite gradients" in reasons[0]
    assert "clip_nonfinite_max_consecutive=3" in reasons[0]


def test_resume_mid_recovery_continues_identically(tmp_path, dataset):
    options = dict(spike_steps=(24,), steps=36, save_strategy="steps", save_steps=27)
    full, full_recorder = spiky_trainer(tmp_path / "full", dataset, **options)
    full.train()
    first, _ = spiky_trainer(tmp_path / "resumed", dataset, spike_steps=(24,), steps=27, save_strategy="steps",
                             save_steps=27)
    first.train()
    # a fresh process would rebuild the trainer: a new model, a new clipper, the same stream
    resumed, resumed_recorder = spiky_trainer(tmp_path / "resumed", dataset, **options)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-27"))
    assert spike_steps_of(full_recorder) == [24]
    assert full_recorder.reports[27]["scale"] < 1.0  # still recovering from the spike at 24
    for step in range(27, 36):
        assert resumed_recorder.reports[step]["threshold"] == pytest.approx(full_recorder.reports[step]["threshold"],
                                                                            rel=1e-6), step
        assert resumed_recorder.reports[step]["spike"] == full_recorder.reports[step]["spike"]
