"""The step path (issue 12): clip and skip inside the optimizer step, fp16 + skip, fused vs non-fused."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_args, train_logs
from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import SpikyByteStream, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from helpers import StepRecorder  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipTrainer  # noqa: E402

pytestmark = pytest.mark.slow
BATCH = 4
STEPS = 35
SPIKES = (24, 31)
RECOMMENDED_FAST = dict(strategy="zscore", spike_detection="loss", spike_action="skip", spike_warmup_steps=10)


def spiky(tmp_path, dataset, optim="adamw_torch", steps=STEPS, config=None, spikes=SPIKES, **args):
    stream = SpikyByteStream(dataset, spike_steps=spikes, samples_per_step=BATCH)
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=stream,
                              args=make_args(tmp_path, max_steps=steps, learning_rate=3e-3, optim=optim,
                                             per_device_train_batch_size=BATCH, **args),
                              clip_config=config or ClipConfig(**RECOMMENDED_FAST))
    recorder = StepRecorder(trainer, keep_state=True)
    trainer.add_callback(recorder)
    return trainer, recorder


def spikes_of(recorder):
    return [s for s, r in sorted(recorder.reports.items()) if r["spike"]]


def test_fp16_scaler_with_skip_unscales_every_step_once_and_keeps_norms(tmp_path, dataset):
    """A real CPU GradScaler on the accelerator (accelerate makes none on CPU): the skip goes through the
    optimizer's own step, so scaler.step/scaler.update keep running and every step is unscaled exactly once."""
    trainer, recorder = spiky(tmp_path, dataset)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    unscales, updates = [], []
    original_unscale, original_update = scaler.unscale_, scaler.update
    scaler.unscale_ = lambda opt: (unscales.append(trainer.state.global_step), original_unscale(opt))[1]
    scaler.update = lambda *a: (updates.append(trainer.state.global_step), original_update(*a))[1]
    trainer.accelerator.scaler = scaler
    trainer.train()
    assert spikes_of(recorder) == list(SPIKES)
    assert unscales == list(range(STEPS)) and updates == list(range(STEPS))  # once per step, skipped steps included
    norms = [recorder.reports[s]["norm"] for s in range(STEPS)]
    for s in SPIKES:  # the step after a skip is measured on unscaled gradients: within 2x of its neighbours
        neighbours = [norms[s - 1], norms[s + 2]]
        assert min(neighbours) / 2 <= norms[s + 1] <= 2 * max(neighbours), norms
        assert all(torch.equal(a, b) for a, b in zip(recorder.weights[s - 1], recorder.weights[s]))
    assert max(norms) < 100  # nothing measured at the loss scale (2**10)
    stats = trainer.clip_run.clipper.strategy.state_dict()
    assert 0 < stats["mean"] < 10  # the statistics saw unscaled, non-spike norms only


def test_fp16_scaler_with_listed_steps_computes_them_and_skips_their_updates(tmp_path, dataset):
    """Under a GradScaler a listed step is computed (the scaler's step needs its inf checks, which only a backward
    records), then its update skipped: no crash, the weights and Adam's state do not move across it."""
    listed = [3, 6]  # 0-based steps 2 and 5 (skip_steps counts from 1)
    trainer, recorder = spiky(tmp_path, dataset, spikes=(), config=ClipConfig(threshold=1.0, skip_steps=listed))
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    trainer.train()
    assert trainer.state.global_step == STEPS
    for s in (2, 5):
        assert all(torch.equal(a, b) for a, b in zip(recorder.weights[s - 1], recorder.weights[s]))
        assert recorder.reports[s]["norm"] > 0  # computed: its gradient was measured
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[0], recorder.weights[1]))
    assert sum(h.get("gradclip/skipped_steps", 0) for h in train_logs(trainer)) == 2


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_skip_is_bit_identical_and_the_lr_schedule_advances(tmp_path, dataset, optim):
    trainer, recorder = spiky(tmp_path / "skip", dataset, optim=optim, lr_scheduler_type="linear")
    trainer.train()
    assert spikes_of(recorder) == list(SPIKES)
    for s in SPIKES:
        assert all(torch.equal(a, b) for a, b in zip(recorder.weights[s - 1], recorder.weights[s]))
        for before, after in zip(recorder.optim_state[s - 1], recorder.optim_state[s]):
            assert all(torch.equal(before[k], after[k]) for k in before)
    # skipped steps advance the schedule: the learning rates are those of a run without any skip
    plain = Trainer(model=tiny_llama(0), train_dataset=dataset,
                    args=make_args(tmp_path / "plain", max_steps=STEPS, learning_rate=3e-3, optim=optim,
                                   lr_scheduler_type="linear", per_device_train_batch_size=BATCH))
    plain.train()
    assert [h["learning_rate"] for h in train_logs(trainer)] == [h["learning_rate"] for h in train_logs(plain)]


def test_fused_and_foreach_optimizers_decide_the_same_and_end_close(tmp_path, dataset):
    runs = {}
    for optim in ("adamw_torch", "adamw_torch_fused"):
        trainer, recorder = spiky(tmp_path / optim, dataset, optim=optim)
        trainer.train()
        runs[optim] = (trainer, recorder)
    (a, ra), (b, rb) = runs["adamw_torch"], runs["adamw_torch_fused"]
    assert spikes_of(ra) == spikes_of(rb) == list(SPIKES)
    assert [r["clipped"] for r in ra.reports.values()] == [r["clipped"] for r in rb.reports.values()]
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)
    assert b.clip_run.defer and not a.clip_run.defer  # the fused run handed the multiplier to the optimizer


class NaNGradients(TrainerCallback):
    def __init__(self, steps):
        self.steps = set(steps)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_bf16_nan_never_reaches_weights_or_optimizer_state(tmp_path, dataset, optim):
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset,
                              args=make_args(tmp_path, max_steps=8, bf16=True, optim=optim),
                              clip_config=ClipConfig.recommended())
    trainer.callback_handler.callbacks.insert(0, NaNGradients({3, 4}))
    recorder = StepRecorder(trainer, keep_state=True)
    trainer.add_callback(recorder)
    trainer.train()
    for s in (3, 4):
        assert all(torch.equal(a, b) for a, b in zip(recorder.weights[s - 1], recorder.weights[s]))
        for before, after in zip(recorder.optim_state[s - 1], recorder.optim_state[s]):
            assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    inner = trainer.optimizer.optimizer
    assert all(torch.isfinite(v).all() for state in inner.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))
    assert sum(h["gradclip/nonfinite_steps"] for h in train_logs(trainer)) == 2


def test_hooks_are_installed_once_and_removed(tmp_path, dataset):
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset,
                              args=make_args(tmp_path, max_steps=3, optim="adamw_torch_fused"),
                              clip_config=ClipConfig.recommended())
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            inner = optimizer.optimizer
            seen.append((len(inner._optimizer_step_pre_hooks), len(inner._optimizer_step_post_hooks),
                         hasattr(inner, "grad_scale"), hasattr(inner, "found_inf")))

    trainer.add_callback(Probe())
    trainer.train()
    assert seen == [(1, 1, False, False)] * 3
    inner = trainer.optimizer.optimizer
    assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
