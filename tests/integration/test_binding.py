"""How the pack finds its Trainer (issue 24.5): handed over (``GradClipMixin``, ``attach()``) or found on the call
stack at train begin (``callbacks=[...]``, the one stack walk); a callback the Trainer rebuilds from a checkpoint
(``restore_callback_states_from_checkpoint``) takes over its Trainer's session; the console filter sits right
before the printer through the Trainer's public ``pop_callback``/``add_callback`` and leaves the callback order as
it found it."""

from __future__ import annotations

import logging

import pytest

from helpers import make_args, train_logs
from gradclip_hf.config import ClipConfig
from gradclip_hf.core import NormClip
from gradclip_hf.standins import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from gradclip_hf.core import GradClipper  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipTrainer, compat  # noqa: E402
from gradclip_hf.integrations.transformers.console import ConsoleTrim  # noqa: E402

pytestmark = pytest.mark.slow
SAVED = ClipConfig(threshold=5.0, spike_detection="loss", spike_warmup_steps=2)
MINE = ClipConfig(threshold=0.25, spike_detection="loss", spike_warmup_steps=2)


@pytest.fixture
def walks(monkeypatch):
    """The stack walks made (``compat.find_trainer`` calls)."""
    calls = []
    original = compat.find_trainer

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compat, "find_trainer", counting)
    return calls


@pytest.fixture
def checkpoint(tmp_path, dataset):
    """A run saved with SAVED's options: its checkpoint at step 4."""
    Trainer(model=tiny_llama(0), train_dataset=dataset, callbacks=[GradClipCallback(SAVED)],
            args=make_args(tmp_path / "saved", max_steps=4, save_strategy="steps", save_steps=4)).train()
    return str(tmp_path / "saved" / "checkpoint-4")


def resumed(tmp_path, dataset, callback, attach=False):
    trainer = Trainer(model=tiny_llama(0), train_dataset=dataset, callbacks=[callback],
                      args=make_args(tmp_path / "resumed", max_steps=6, restore_callback_states_from_checkpoint=True))
    if attach:
        callback.attach(trainer)
    return trainer


def thresholds(trainer):
    return [h["gradclip/threshold"] for h in train_logs(trainer) if h["step"] > 4]


def test_the_mixin_and_attach_hand_the_trainer_over_and_callbacks_find_it_once_per_train(tmp_path, dataset,
                                                                                        walks):
    GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, args=make_args(tmp_path / "a", max_steps=2)).train()
    callback = GradClipCallback()
    attached = Trainer(model=tiny_llama(0), train_dataset=dataset, args=make_args(tmp_path / "b", max_steps=2),
                       callbacks=[callback])
    callback.attach(attached)
    attached.train()
    assert walks == [] and callback.run.num_clips == 2  # handed over: no stack walk
    bare = Trainer(model=tiny_llama(0), train_dataset=dataset, args=make_args(tmp_path / "c", max_steps=2),
                   callbacks=[GradClipCallback()])
    bare.train()
    bare.train()
    assert len(walks) == 2  # callbacks=[...]: once per train(), at train begin


def test_the_mixin_callback_is_first_and_the_console_filter_right_before_the_printer(tmp_path, dataset, capsys):
    class Late(TrainerCallback):
        seen: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "loss" in logs:
                Late.seen.append(any("/layer/" in k for k in logs))

    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=ClipConfig(log_layers_top_k=2),
                              args=make_args(tmp_path, max_steps=3))
    trainer.add_callback(Late())  # after the printer
    before = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert before[0] is GradClipCallback and before[-2:] == [PrinterCallback, Late]
    during = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            during.append([type(cb) for cb in trainer.callback_handler.callbacks])

    trainer.add_callback(Probe())
    trainer.train()
    at = during[-1].index(PrinterCallback)
    assert during[-1][at - 1] is ConsoleTrim and during[-1].count(ConsoleTrim) == 1
    assert [type(cb) for cb in trainer.callback_handler.callbacks] == before + [Probe]  # as it was
    printed = capsys.readouterr().out
    assert "'loss'" in printed and "gradclip/layer/" not in printed  # the console has no per-layer keys
    assert all(any("gradclip/layer/" in k for k in h) for h in train_logs(trainer))  # trainer_state keeps them
    assert Late.seen == [False, False, False]  # a callback after the printer sees the trimmed row, as before


@pytest.mark.parametrize("how", ["attached", "trained_before"])
def test_a_rebuilt_callback_takes_over_its_trainers_session_and_your_options_win(tmp_path, dataset, checkpoint,
                                                                                 how):
    callback = GradClipCallback(MINE)
    trainer = resumed(tmp_path, dataset, callback, attach=how == "attached")
    if how == "trained_before":  # a Trainer that trained before holds its session
        trainer.train()
    trainer.train(resume_from_checkpoint=checkpoint)
    rebuilt = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradClipCallback)]
    assert len(rebuilt) == 1 and rebuilt[0] is not callback and rebuilt[0].session is callback.session
    assert thresholds(trainer) == pytest.approx([0.25, 0.25])


def test_a_bare_callback_rebuilt_in_a_first_train_runs_with_the_checkpoints_options_and_says_so(
        tmp_path, dataset, checkpoint, caplog, walks):
    trainer = resumed(tmp_path, dataset, GradClipCallback(MINE))
    with caplog.at_level(logging.WARNING, logger="transformers.gradclip_hf"):
        trainer.train(resume_from_checkpoint=checkpoint)
    assert thresholds(trainer) == pytest.approx([5.0, 5.0])  # SAVED's threshold
    said = [r.getMessage() for r in caplog.records if "rebuilt GradClipCallback" in r.getMessage()]
    assert len(said) == 1 and "threshold=5.0" in said[0] and "restore_callback_states_from_checkpoint unset" in said[0]
    assert "spike_detection='loss'" in said[0]
    assert len(walks) == 1  # the rebuilt callback's, at train begin: no other (none while it was rebuilt)


def test_a_rebuilt_callback_whose_checkpoint_holds_no_options_is_refused_with_the_fixes(tmp_path, dataset):
    callback = GradClipCallback(clipper=GradClipper(NormClip(1.0)))
    Trainer(model=tiny_llama(0), train_dataset=dataset, callbacks=[callback],
            args=make_args(tmp_path / "saved", max_steps=4, save_strategy="steps", save_steps=4)).train()
    trainer = resumed(tmp_path, dataset, GradClipCallback(clipper=GradClipper(NormClip(1.0))))
    with pytest.raises(ValueError, match=r"holds no options of the pack .*leave "
                                         r"restore_callback_states_from_checkpoint unset.*attach\(trainer\)"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "saved" / "checkpoint-4"))
