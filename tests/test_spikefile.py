"""The one reader of ``gradclip_spikes.jsonl`` (issue 21): a torn last line is skipped with a warning by the
report and by ``clip_skip_steps_from`` alike, any nesting depth is only a bad line, a pipe is read once."""

from __future__ import annotations

import json
import warnings

import pytest

from fifo import served_once
from gradclip_hf.config import ClipConfig
from gradclip_hf.core import OptionError
from gradclip_hf.spikefile import read_records as read_spike_file

SPIKE = {"event": "spike", "step": 7, "batch": {"indices": [[1, 2]], "fingerprint": "00000000000000ab", "text": "x"}}
NONFINITE = {"event": "nonfinite", "step": 9, "batch": {"indices": None, "fingerprint": None, "text": None}}
LISTED = {"event": "skip_listed", "step": 11}
STOP = {"event": "stop", "step": 12, "kind": "nonfinite", "reason": "r"}
GOOD = "".join(json.dumps(e) + "\n" for e in (SPIKE, NONFINITE, LISTED, STOP))


def write(tmp_path, text):
    path = tmp_path / "gradclip_spikes.jsonl"
    path.write_text(text)
    return str(path)


def test_steps_and_fingerprints_of_spike_and_nonfinite_events(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = ClipConfig(skip_steps_from=write(tmp_path, GOOD))
    assert config.steps_to_skip() == {7, 9} and config.skip_fingerprints() == {7: "00000000000000ab"}
    config = ClipConfig(skip_steps_from=write(tmp_path, GOOD), skip_steps=[3])
    assert config.steps_to_skip() == {3, 7, 9} and config.skip_fingerprints() == {7: "00000000000000ab"}


@pytest.mark.parametrize("torn", ['{"event": "spike", "step": 13, "ba', '{"event": "spi', "[" * 50_000])
def test_a_torn_last_line_is_skipped_with_a_warning_by_every_reader(tmp_path, torn):
    path = write(tmp_path, GOOD + torn)
    with pytest.warns(UserWarning, match=r"gradclip_spikes.jsonl:5: .*the last line.*line skipped") as caught:
        config = ClipConfig(skip_steps_from=path)
    assert config.steps_to_skip() == {7, 9}
    events, report_warnings = read_spike_file(path)
    assert [e.step for e in events] == [7, 9, 11, 12] and len(report_warnings) == 1
    assert [str(w.message) for w in caught] == [f"`skip_steps_from`: {report_warnings[0]}"]  # the same words


@pytest.mark.parametrize("bad", ["{not json", "[1, 2]", "[" * 50_000 + "]" * 50_000, '{"a": ' * 10_000, "9" * 5000])
def test_a_damaged_line_before_the_last_is_refused_for_skipping_and_skipped_by_the_report(tmp_path, bad):
    path = write(tmp_path, json.dumps(SPIKE) + "\n" + bad + "\n" + json.dumps(NONFINITE) + "\n")
    with pytest.raises(OptionError, match=r"skip_steps_from.* line 2 is not a gradclip spike record .*only a torn "
                                          r"last line is skipped"):
        ClipConfig(skip_steps_from=path)
    events, report_warnings = read_spike_file(path)
    assert [e.step for e in events] == [7, 9] and [w.split(": ", 1)[0] for w in report_warnings] == [f"{path}:2"]


def test_deep_nesting_never_raises_recursion_error(tmp_path):
    deep = "[" * 200_000 + "]" * 200_000
    events, report_warnings = read_spike_file(write(tmp_path, deep + "\n" + json.dumps(SPIKE) + "\n"))
    assert [e.step for e in events] == [7] and len(report_warnings) == 1
    assert report_warnings[0].endswith(":1: JSON nested too deeply; line skipped")


def test_a_step_that_is_not_an_int_is_refused(tmp_path):
    with pytest.raises(OptionError, match=r"line 1 is not a gradclip spike record \(`step` is '7'"):
        ClipConfig(skip_steps_from=write(tmp_path, '{"event": "spike", "step": "7"}\n'))


def test_a_pipe_is_read_once_and_its_steps_kept(tmp_path):
    with served_once(tmp_path / "spikes.pipe", GOOD):
        config = ClipConfig(skip_steps_from=str(tmp_path / "spikes.pipe"))
        again = ClipConfig(skip_steps_from=str(tmp_path / "spikes.pipe"))  # e.g. GradClipTrainingArguments again
        rebuilt = ClipConfig(**config.to_dict())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert config.steps_to_skip() == again.steps_to_skip() == rebuilt.steps_to_skip() == {7, 9}
        assert config.skip_fingerprints() == {7: "00000000000000ab"}


def test_the_batch_record_reads_a_batch_encoding_without_a_host_sync():
    """A tokenizer's collators return ``BatchEncoding`` (a Mapping, not a dict): fingerprints and first tokens
    are kept on the device, and the flagged step's batch read back with its padding left out."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from host_sync import no_host_sync

    from gradclip_hf.run.batches import BatchTracker, fingerprints

    ids = torch.tensor([[257, 104, 105, 256, 256], [257, 104, 101, 108, 108]])
    mask = (ids != 256).long()
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})
    tracker = BatchTracker(samples=2, capacity=4)
    tracker.add(batch)
    tracker.record(torch.tensor(True), step=1)  # the lazy rings exist now
    tracker.add(batch)
    with no_host_sync():
        tracker.record(torch.tensor(True), step=2)
    values = {k: v.reshape(-1).tolist() for k, v in tracker.tensors().items()}
    second = tracker.parse(values, since=1, total=2)[0]
    assert second["tokens"] == [257, 104, 105]
    assert second["prints"] == [int(fingerprints(ids[0, :3])[0]), int(fingerprints(ids[1])[0])]
