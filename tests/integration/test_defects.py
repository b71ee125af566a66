"""Regression tests of the defects found by adversarial testing (issue 11), Trainer side: each failed before."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from helpers import make_args, train_logs
from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from gradclip_hf.integrations.transformers import (GradClipCallback, GradClipTrainer,  # noqa: E402
                                                   GradClipTrainingArguments)

pytestmark = pytest.mark.slow
GRADCLIP_LOGGER = "transformers.gradclip_hf"


def grad_clip_messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == GRADCLIP_LOGGER]


# ---------------------------------------------------------------- 2. resume from a checkpoint written without us
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_resume_from_a_stock_checkpoint_starts_fresh_and_saves(tmp_path, dataset, entry, caplog):
    out = tmp_path / "run"
    Trainer(model=tiny_llama(0), train_dataset=dataset,
            args=make_args(out, max_steps=3, save_strategy="steps", save_steps=3)).train()
    args = make_args(out, max_steps=6, save_strategy="steps", save_steps=3)
    if entry == "trainer":
        trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                                  clip_config=ClipConfig(strategy="zscore", zscore_warmup_steps=2))
    else:
        trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                          callbacks=[GradClipCallback(strategy="zscore", zscore_warmup_steps=2)])
    with caplog.at_level(logging.WARNING, logger=GRADCLIP_LOGGER):
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert sum("holds no gradclip state" in m for m in grad_clip_messages(caplog)) == 1
    saved = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())
    assert saved["stateful_callbacks"]["GradClipCallback"]["run"]["clipper"]["strategies"]["default"]["count"] == 2


# ---------------------------------------------------------------- 4. nothing the pack changes outlives train()
class Boom(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise RuntimeError("boom at step 3")


@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_an_exception_inside_training_leaves_args_trainer_and_optimizer_as_they_were(tmp_path, dataset, entry):
    args = make_args(tmp_path, max_steps=6, max_grad_norm=0.5, optim="adamw_torch_fused")
    if entry == "trainer":
        trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset, callbacks=[Boom()],
                                  clip_config=ClipConfig.recommended())
    else:
        trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                          callbacks=[Boom(), GradClipCallback(**ClipConfig.recommended().non_default())])
    callbacks_before = [type(cb) for cb in trainer.callback_handler.callbacks]
    with pytest.raises(RuntimeError, match="boom at step 3"):
        trainer.train()
    assert args.max_grad_norm == 0.5  # never changed
    inner = trainer.optimizer.optimizer
    session = trainer.clip_session if entry == "trainer" else next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradClipCallback)).session
    if entry == "trainer":  # try/finally: everything undone
        assert not inner._optimizer_step_pre_hooks and not inner._optimizer_step_post_hooks
        assert [type(cb) for cb in trainer.callback_handler.callbacks] == callbacks_before
        assert not [k for k in trainer.__dict__ if k in ("training_step", "log", "_clip_grad_norm")]
    assert session.live() is None or entry == "callback"
    # the same args in a stock Trainer clip as before: bit-identical to a fresh stock run
    def stock(out):
        t = Trainer(model=tiny_llama(0), args=make_args(out, max_steps=3, max_grad_norm=0.5), train_dataset=dataset)
        t.train()
        return [h["grad_norm"] for h in train_logs(t)], [p.detach().clone() for p in t.model.parameters()]
    reused = Trainer(model=tiny_llama(0), args=args, train_dataset=dataset)
    reused.args.max_steps, reused.args.optim = 3, "adamw_torch"
    reused.train()
    fresh_norms, fresh_weights = stock(tmp_path / "fresh")
    assert [h["grad_norm"] for h in train_logs(reused)] == fresh_norms
    assert all(torch.equal(a, b) for a, b in zip(reused.model.parameters(), fresh_weights))


def test_a_crashed_bare_callback_leaves_inert_wrappers_and_the_next_run_clips_once(tmp_path, dataset):
    callback = GradClipCallback(threshold=0.5)
    boom = Boom()
    trainer = Trainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=5, max_grad_norm=0.0),
                      train_dataset=dataset, callbacks=[boom, callback])
    with pytest.raises(RuntimeError):
        trainer.train()
    trainer.remove_callback(boom)
    trainer.train()  # a new run: the old wrappers are replaced, one clip per step
    assert callback.run.num_clips == 5
    assert all(h["gradclip/threshold"] == 0.5 for h in train_logs(trainer))
    assert "training_step" not in trainer.__dict__ and "log" not in trainer.__dict__


# ---------------------------------------------------------------- 5. checkpoint state checked field by field
@pytest.mark.parametrize("path, value, field", [
    (("spikes", "factor"), math.nan, "run.clipper.spikes.factor"),
    (("spikes", "factor"), -1, "run.clipper.spikes.factor"),
    (("spikes", "loss_detector", "mean"), math.nan, "run.clipper.spikes.loss_detector.mean"),
    (("strategies", "default", "var"), -1.0, "run.clipper.strategies.default.var"),
])
def test_corrupt_checkpoint_state_raises_naming_field_value_and_checkpoint(tmp_path, dataset, path, value, field):
    config = ClipConfig(strategy="zscore", zscore_warmup_steps=2, spike_detection="loss", spike_warmup_steps=2)
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset, clip_config=config).train()
    state_file = tmp_path / "checkpoint-4" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    node = saved["stateful_callbacks"]["GradClipCallback"]["run"]["clipper"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    state_file.write_text(json.dumps(saved))
    resumed = GradClipTrainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=6), train_dataset=dataset,
                              clip_config=config)
    with pytest.raises(ValueError, match=rf"`{field}` must be .* checkpoint at step 4 .* set reset_statistics=True"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


# ---------------------------------------------------------------- 8/9. bad and conflicting entry options
def test_wrong_types_and_double_options_fail_at_construction(tmp_path, dataset):
    with pytest.raises(ValueError, match="`config` must be a ClipConfig, a dict of its options, or None, got 'norm'"):
        GradClipCallback(config="norm")
    with pytest.raises(ValueError, match="`clip_config` must be a ClipConfig or None, got 'zscore'"):
        GradClipTrainer(model=tiny_llama(0), args=make_args(tmp_path), train_dataset=dataset, clip_config="zscore")
    args = make_args(tmp_path, cls=GradClipTrainingArguments, clip_strategy="zscore")
    with pytest.raises(ValueError, match="options given twice: .* clip_strategy"):
        GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset, clip_config=ClipConfig())


# ---------------------------------------------------------------- 10. the callback defaults to max_grad_norm
def test_callback_threshold_defaults_to_max_grad_norm_and_says_so(tmp_path, dataset, caplog):
    callback = GradClipCallback()
    trainer = Trainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=2, max_grad_norm=0.3),
                      train_dataset=dataset, callbacks=[callback])
    with caplog.at_level(logging.INFO, logger=GRADCLIP_LOGGER):
        trainer.train()
    assert [h["gradclip/threshold"] for h in train_logs(trainer)] == pytest.approx([0.3, 0.3])
    assert any("threshold 0.3 (from max_grad_norm=0.3)" in m for m in grad_clip_messages(caplog))
    # max_grad_norm=0: no clipping, as the stock Trainer (tests/integration/test_max_grad_norm.py)


# ---------------------------------------------------------------- 11. resume: the user's config wins
def test_restored_callback_keeps_the_users_config_and_a_misfit_state_says_where_it_came_from(tmp_path, dataset):
    saved_with = ClipConfig(strategy="zscore", threshold=5.0, zscore_warmup_steps=2)
    GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=saved_with,
                    args=make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)).train()
    mine = ClipConfig(strategy="zscore", threshold=0.25, zscore_warmup_steps=2)
    resumed = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=mine,
                              args=make_args(tmp_path, max_steps=6, restore_callback_states_from_checkpoint=True))
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))
    assert [h["gradclip/threshold"] for h in train_logs(resumed) if h["step"] > 4] == pytest.approx([0.25, 0.25])
    other = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=ClipConfig(strategy="norm"),
                            args=make_args(tmp_path, max_steps=6))
    with pytest.raises(ValueError, match=r"`run.clipper.strategies.default` must be a state of NormClip .*checkpoint "
                                         r"at step 4.*to start the statistics fresh"):
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


# ---------------------------------------------------------------- 12. messages
class NaNAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = math.nan


def test_a_nan_step_prints_one_line_and_does_not_tighten(tmp_path, dataset, caplog):
    config = ClipConfig(spike_detection="both", spike_warmup_steps=2, spike_z=50.0)  # no spike on clean steps
    trainer = GradClipTrainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=8), train_dataset=dataset,
                              clip_config=config)
    trainer.callback_handler.callbacks.insert(0, NaNAt(5))
    with caplog.at_level(logging.WARNING, logger=GRADCLIP_LOGGER):
        trainer.train()
    messages = grad_clip_messages(caplog)
    assert messages == ["gradclip: step 6: 1 step with NaN/Inf gradients since the last log, their updates "
                        "skipped (nonfinite='skip')."]
    factors = [h["gradclip/spike_factor"] for h in train_logs(trainer)]
    assert factors == [1.0] * 8 and [h["gradclip/spikes"] for h in train_logs(trainer)] == [0] * 8
