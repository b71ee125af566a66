"""What a burst of bad batches prints (issue 23): one console line per run of consecutive spike steps, a few
report lines, one spike-file line per step; a rerun that skips the listed steps. Real Trainer runs."""

from __future__ import annotations

import json
import logging

import pytest

from helpers import make_args
from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import SpikyByteStream, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from gradclip_hf.integrations.transformers import GradClipCallback  # noqa: E402
from gradclip_hf.report import build_report, render_text  # noqa: E402

pytestmark = pytest.mark.slow
GRADCLIP_LOGGER = "transformers.gradclip_hf"
BATCH = 4
BURST = tuple(range(60, 80))  # 0-based optimizer steps: train/global_step 61-80
# recommended(), at a threshold the tiny model's clean norms (1-3.3 after step 10) never reach; the bad
# batches' norms (about 10) are above it: the logged clip rate counts them
CONFIG = ClipConfig.recommended(threshold=5.0)


def burst_run(out, dataset, caplog, logging_steps, steps=100, config=CONFIG, resume=None, level=logging.WARNING):
    args = make_args(out, max_steps=steps, logging_steps=logging_steps, learning_rate=3e-3,
                     per_device_train_batch_size=BATCH, save_strategy="steps", save_steps=50)
    trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=SpikyByteStream(dataset, BURST, BATCH),
                      callbacks=[GradClipCallback(config)])
    caplog.clear()
    with caplog.at_level(level, logger=GRADCLIP_LOGGER):
        trainer.train(resume_from_checkpoint=resume)
    return [r.getMessage() for r in caplog.records if r.name == GRADCLIP_LOGGER]


def spike_lines(out):
    return [json.loads(line) for line in (out / "gradclip_spikes.jsonl").read_text().splitlines()]


def test_a_burst_of_20_bad_batches_is_one_console_line_and_a_few_report_lines(tmp_path, dataset, caplog):
    messages = burst_run(tmp_path, dataset, caplog, logging_steps=20, steps=160)  # the burst in one window
    assert len(messages) == 1, messages
    assert messages[0].startswith("gradclip: steps 61-80: 20 loss spikes, loss ")
    assert " sigma); updates skipped" in messages[0]
    records = spike_lines(tmp_path)
    assert [r["step"] for r in records] == list(range(61, 81))  # the file keeps one line per event
    report = build_report(str(tmp_path))
    assert [(x["first"], x["last"], x["count"]) for x in report["spikes"]["runs"]] == [(61, 80, 20)]
    text = render_text(report)
    section = text[text.index("\nspikes:"):text.index("\nskipped updates:")].strip().splitlines()
    assert len(section) == 5 and section[2] == "  " + messages[0].removeprefix("gradclip: ")
    # clean norms never reach 5; the 20 skipped steps (norms about 10) are left out: the threshold never acted
    assert report["left_out"]["steps"] == 20 and report["steady"]["clip_rate"] == 0
    assert report["advice"][0]["rule"] == "never_acted"


def test_with_frequent_logging_a_burst_is_said_again_only_when_it_doubled(tmp_path, dataset, caplog):
    messages = burst_run(tmp_path, dataset, caplog, logging_steps=5)
    ranges = [m.split(":")[1].strip() for m in messages]
    assert ranges == ["steps 61-65", "steps 61-70", "steps 61-80"], messages


def test_a_rerun_that_skips_the_listed_steps_says_so_once(tmp_path, dataset, caplog):
    burst_run(tmp_path, dataset, caplog, logging_steps=20)
    config = ClipConfig.recommended(threshold=5.0, spike_action="tighten",
                                    skip_steps_from=str(tmp_path / "gradclip_spikes.jsonl"))
    said = burst_run(tmp_path, dataset, caplog, logging_steps=20, config=config, resume=str(tmp_path / "checkpoint-50"),
                     level=logging.INFO)
    messages = [m for m in said if "skip list" in m]
    assert not [m for m in said if "spike" in m], said
    # the listed steps' batches are consumed without being computed (issue 25.4): no spike to say per step, the
    # skip list is said once at train begin; the file has a line per listed step
    assert len(messages) == 1 and "skips the updates of steps 61-80 (20 in all)" in messages[0], messages
    assert "consumed without being computed" in messages[0]
    listed = [r["step"] for r in spike_lines(tmp_path) if r["event"] == "skip_listed"]
    assert listed == list(range(61, 81))
