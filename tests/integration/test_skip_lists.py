"""Skip lists checked against the run that applies them (issue 21): a pipe read once, the recorded batch
fingerprint compared with the batch of the step, listed steps the run cannot reach, and a rerun that set
``--resume_from_checkpoint`` but never passed it to ``train()``."""

from __future__ import annotations

import logging

import pytest
import torch

from fifo import served_once
from helpers import StepRecorder, make_args
from recording import nan_at, spike_lines

transformers = pytest.importorskip("transformers")
from gradclip_hf.standins import tiny_llama  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments  # noqa: E402

pytestmark = pytest.mark.slow
LOGGER = "transformers.gradclip_hf"
NAN_STEP = 7  # 1-based: recorded as a non-finite step, with its batch


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.fixture
def first_run(tmp_path, dataset):
    """A run with a NaN gradient at step 7 and a checkpoint at step 5: its spike file lists step 7."""
    out = tmp_path / "first"
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset,
                              args=make_args(out, max_steps=10, save_strategy="steps", save_steps=5))
    nan_at(trainer, [NAN_STEP])
    trainer.train()
    assert [(r["event"], r["step"]) for r in spike_lines(out)] == [("nonfinite", NAN_STEP)]
    return out


def rerun(out, dataset, resume=True, **options):
    args = make_args(out, cls=GradClipTrainingArguments, max_steps=10, **options)
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, args=args)
    recorder = StepRecorder(trainer, keep_state=True)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=str(out / "checkpoint-5") if resume else None)
    return trainer, recorder


def skipped(recorder, step):
    """The update of ``step`` (1-based) left the weights as they were."""
    return all(torch.equal(a, b) for a, b in zip(recorder.weights[step - 2], recorder.weights[step - 1]))


@pytest.mark.timeout(300)
def test_a_pipe_given_to_clip_skip_steps_from_is_read_once_and_applied(first_run, dataset, caplog):
    pipe = first_run.parent / "spikes.pipe"
    with served_once(pipe, (first_run / "gradclip_spikes.jsonl").read_text()):
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            trainer, recorder = rerun(first_run, dataset, clip_skip_steps_from=str(pipe))
    assert skipped(recorder, NAN_STEP) and not skipped(recorder, NAN_STEP + 1)
    assert [r["step"] for r in spike_lines(first_run) if r["event"] == "skip_listed"] == [NAN_STEP]
    assert not [m for m in messages(caplog) if "batch" in m]  # same data order: the batch is the recorded one


def test_a_spike_file_of_another_data_order_warns_at_the_step(first_run, dataset, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        rerun(first_run, dataset, clip_skip_steps_from=str(first_run / "gradclip_spikes.jsonl"), data_seed=1,
              output_dir=str(first_run.parent / "other"))
    warned = [m for m in messages(caplog) if "is not the batch the spike file recorded" in m]
    assert len(warned) == 1 and warned[0].startswith(f"gradclip: step {NAN_STEP}: this step's batch")
    assert "another data order" in warned[0] and "trainer.train(resume_from_checkpoint=" in warned[0]


def test_listed_steps_the_run_cannot_reach_are_named(first_run, dataset, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _, recorder = rerun(first_run, dataset, clip_skip_steps=[3, 5, NAN_STEP, 12])
    said = messages(caplog)
    assert any("names step(s) 3, 5, at or before step 5 where this run starts" in m and "N < 3" in m for m in said)
    assert any("names step(s) 12, after max_steps=10" in m for m in said)
    assert skipped(recorder, NAN_STEP)


def test_resume_from_checkpoint_set_but_not_passed_to_train_warns(first_run, dataset, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        trainer, _ = rerun(first_run, dataset, resume=False, clip_skip_steps=[NAN_STEP],
                           resume_from_checkpoint=str(first_run / "checkpoint-5"),
                           output_dir=str(first_run.parent / "fresh"))
    warned = [m for m in messages(caplog) if "training starts at step 0" in m]
    assert len(warned) == 1 and "trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)" in warned[0]
    assert trainer.state.global_step == 10
