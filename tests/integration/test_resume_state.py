"""Resuming from a checkpoint whose gradclip state is hostile or no longer fits (issues 22.3 and 22.8).

A state that cannot be loaded raises the same ``StateError`` as every other refusal: the field, the value, the
checkpoint, and the supported way to start the statistics fresh (``reset_statistics`` /
``clip_reset_statistics``), which then resumes without touching the checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from helpers import make_args, train_logs
from gradclip_hf.config import ClipConfig
from gradclip_hf.core import StateError
from gradclip_hf.standins import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from gradclip_hf.integrations.transformers import (GradClipCallback, GradClipTrainer,  # noqa: E402
                                                   GradClipTrainingArguments)

pytestmark = pytest.mark.slow
SAVED = ClipConfig(strategy="zscore", zscore_warmup_steps=3, spike_detection="loss", spike_warmup_steps=2)
FIX = "set reset_statistics=True (clip_reset_statistics in GradClipTrainingArguments"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """A run of 4 steps with a checkpoint at step 4 (zscore statistics and a loss detector), trained once."""
    out = tmp_path_factory.mktemp("trained")
    GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=SAVED,
                    args=make_args(out, max_steps=4, save_strategy="steps", save_steps=4)).train()
    return out / "checkpoint-4"


@pytest.fixture
def checkpoint(tmp_path, trained):
    """A copy of that checkpoint in this test's output_dir."""
    return Path(shutil.copytree(trained, tmp_path / "checkpoint-4"))


def _edit(checkpoint, edit):
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    edit(state["stateful_callbacks"])
    path.write_text(json.dumps(state))


def _resume(tmp_path, dataset, checkpoint, config=SAVED, entry="trainer"):
    args = make_args(tmp_path, max_steps=6)
    if entry == "trainer":
        trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=config, args=args)
    else:
        trainer = Trainer(model=tiny_llama(0), train_dataset=dataset, args=args,
                          callbacks=[GradClipCallback(config=config)])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def _set(path, value):
    def edit(callbacks):
        node = callbacks["GradClipCallback"]
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


# ---------------------------------------------------------------- 3. huge integers, wrong containers, a string
@pytest.mark.parametrize("edit, field", [
    (_set(("run", "clipper", "strategies", "default", "count"), 10**400), "run.clipper.strategies.default.count"),
    (_set(("run", "clipper", "strategies", "default", "mean"), 10**400), "run.clipper.strategies.default.mean"),
    (_set(("run", "clipper", "spikes", "loss_detector", "run"), 2**63), "run.clipper.spikes.loss_detector.run"),
    (_set(("run", "clipper", "spikes"), [1, 2]), "run.clipper.spikes"),
    (_set(("run", "clipper", "strategies"), "zscore"), "run.clipper.strategies"),
    (_set(("run", "skipped_steps"), 10**400), "run.skipped_steps"),
    (_set(("run", "watchdogs", "nonfinite_run"), 10**400), "run.watchdogs.nonfinite_run"),
    (_set(("run", "watchdogs", "loss_cap_run"), -1), "run.watchdogs.loss_cap_run"),
    (_set(("run", "watchdogs"), [0, 0]), "run.watchdogs"),
    (_set(("run",), "fresh"), "GradClipCallback.run"),
    (lambda callbacks: callbacks.update(GradClipCallback="fresh"), "GradClipCallback"),
    (lambda callbacks: callbacks.update(GradClipCallback=[7]), "GradClipCallback"),
], ids=["huge-count", "huge-mean", "int64-overflow", "spikes-list", "strategies-str", "huge-counter",
        "huge-watchdog", "negative-watchdog", "watchdogs-list", "run-str", "entry-str", "entry-list-of-int"])
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_a_hostile_state_raises_state_error_with_field_checkpoint_and_fix(tmp_path, dataset, checkpoint, edit, field,
                                                                          entry):
    _edit(checkpoint, edit)
    with pytest.raises(StateError) as error:
        _resume(tmp_path, dataset, checkpoint, entry=entry)
    message = str(error.value)
    assert error.value.field == field and f"`{field}` must be" in message
    assert "the checkpoint at step 4" in message and FIX in message
    assert len(message) < 1000  # a huge value is shortened, not printed whole


# ---------------------------------------------------------------- 8. a supported way to start fresh
@pytest.mark.parametrize("changed", [dict(zscore_warmup_steps=2), dict(spike_method="mad")])
def test_changed_statistics_options_are_refused_naming_the_fix_and_the_fix_resumes(tmp_path, dataset, checkpoint,
                                                                                    changed, caplog):
    options = {**SAVED.non_default(), **changed}
    with pytest.raises(StateError, match="clip_reset_statistics"):
        _resume(tmp_path, dataset, checkpoint, ClipConfig(**options))
    before = (checkpoint / "trainer_state.json").read_text()
    args = make_args(tmp_path, cls=GradClipTrainingArguments, max_steps=6, save_strategy="steps", save_steps=6,
                     clip_reset_statistics=True, **{"clip_" + k: v for k, v in options.items()})
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, args=args)
    with caplog.at_level(logging.WARNING, logger="transformers.gradclip_hf"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    assert [h["step"] for h in train_logs(trainer) if h["step"] > 4] == [5, 6]
    assert sum("reset_statistics is set" in r.getMessage() for r in caplog.records) == 1
    assert (checkpoint / "trainer_state.json").read_text() == before  # the checkpoint is not touched
    saved = json.loads((tmp_path / "checkpoint-6" / "trainer_state.json").read_text())
    fresh = saved["stateful_callbacks"]["GradClipCallback"]["run"]["clipper"]
    assert fresh["strategies"]["default"]["count"] == 2  # two steps since the resume, not 3 + 2


# ---------------------------------------------------------------- issue 24.6: the watchdogs go on after a resume
@pytest.mark.parametrize("watchdog", ["nonfinite", "loss_cap"])
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_the_watchdogs_count_on_across_a_resume(tmp_path, dataset, watchdog, entry):
    """A run of non-finite steps (or of steps above loss_cap) that a checkpoint cuts in two is one run: the
    resumed run stops where the run without the checkpoint stops, not a whole limit later."""
    from recording import nan_at

    options = (dict(nonfinite_max_consecutive=3) if watchdog == "nonfinite"
               else dict(loss_cap=0.01, loss_cap_patience=3))  # every step's loss is above 0.01
    nans = range(2, 9) if watchdog == "nonfinite" else ()  # steps 2, 3, 4, ... (train/global_step) are NaN

    def trainer(out, steps):
        args = make_args(out, max_steps=steps, save_strategy="steps", save_steps=2)
        if entry == "trainer":
            t = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=ClipConfig(**options),
                                args=args)
        else:
            t = Trainer(model=tiny_llama(0), train_dataset=dataset, args=args,
                        callbacks=[GradClipCallback(ClipConfig(**options))])
        nan_at(t, nans)
        return t

    whole = trainer(tmp_path, 8)
    whole.train()
    stop = whole.state.global_step
    assert stop == (4 if watchdog == "nonfinite" else 3)  # the third consecutive step
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    runs = saved["stateful_callbacks"]["GradClipCallback"]["run"]["watchdogs"]
    assert runs == ({"nonfinite_run": 1, "loss_cap_run": 0} if watchdog == "nonfinite"
                    else {"nonfinite_run": 0, "loss_cap_run": 2})
    resumed = trainer(tmp_path / "resumed", 8)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.state.global_step == stop
    reason = next(h["gradclip/stop_reason"] for h in resumed.state.log_history if "gradclip/stop_reason" in h)
    assert f"at step {stop}:" in reason and ("3 consecutive" in reason or "for 3 steps in a row" in reason)
