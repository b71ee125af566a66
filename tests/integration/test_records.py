"""The batch of every flagged step in ``gradclip_spikes.jsonl`` (issue 21): with a tokenizer and the Trainer's
default collators, with data-loader workers and any prefetch, with gradient accumulation, for an
``IterableDataset``, and for more flagged steps than the device rings hold between two logging steps.

Each flagged step's record is checked against what that step really trained on (``StepInputs``)."""

from __future__ import annotations

import collections
import sys

import pytest
import torch

from helpers import make_args
from recording import StepInputs, expected_batch, nan_at, spike_lines, tokenized
from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import tiny_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("datasets")
from transformers import (DataCollatorForLanguageModeling, LlamaForSequenceClassification, Trainer,  # noqa: E402
                          TrainerCallback)

from gradclip_hf.standins import tiny_llama_config  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipTrainer  # noqa: E402

pytestmark = pytest.mark.slow
FLAGGED = (2, 5, 9, 11)  # 1-based steps with a NaN gradient: recorded as non-finite steps, with their batches


class WatchedTrainer(StepInputs, Trainer):
    pass


class WatchedClipTrainer(StepInputs, GradClipTrainer):
    pass


def check_records(out_dir, trainer, flagged, dataset, decode):
    records = [r for r in spike_lines(out_dir) if r["event"] == "nonfinite"]
    assert [r["step"] for r in records] == list(flagged)
    for record in records:
        assert record["batch"] == expected_batch(trainer.rows_of_step[record["step"]], dataset, decode), record["step"]


@pytest.mark.parametrize("collator", ["default", "language_modeling"])
def test_a_tokenizer_and_the_default_collators_give_indices_fingerprint_and_text(tmp_path, collator):
    """``processing_class=tokenizer``: the collators return ``BatchEncoding`` (a Mapping, not a dict)."""
    data, tokenizer = tokenized(labels=collator == "default")
    if collator == "default":  # DataCollatorWithPadding, the Trainer's default with a tokenizer
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(tiny_llama_config(num_labels=2))
        kwargs = {}
    else:
        model = tiny_llama(0)
        kwargs = {"data_collator": DataCollatorForLanguageModeling(tokenizer, mlm=False)}
    trainer = WatchedTrainer(model=model, args=make_args(tmp_path, max_steps=12, logging_steps=4),
                             train_dataset=data, processing_class=tokenizer,
                             callbacks=[GradClipCallback(ClipConfig())], **kwargs)
    nan_at(trainer, FLAGGED)
    trainer.train()
    check_records(tmp_path, trainer, FLAGGED, data, tokenizer.decode)


# workers, prefetch_factor, gradient accumulation, dataset items (30: 12 steps of 6 samples go over 2 epochs)
WORKERS = [(0, None, 1, 96), (2, None, 1, 96), (2, None, 3, 30), (4, None, 1, 96), (4, 4, 1, 96), (4, 2, 3, 96)]


@pytest.mark.parametrize("workers, prefetch, accumulation, items", WORKERS,
                         ids=[f"workers{w}-prefetch{p}-ga{a}-items{n}" for w, p, a, n in WORKERS])
def test_data_loader_workers_prefetch_and_accumulation_lose_no_sample(tmp_path, workers, prefetch, accumulation,
                                                                      items):
    data, tokenizer = tokenized(items)
    args = make_args(tmp_path, max_steps=12, logging_steps=10, per_device_train_batch_size=2,
                     gradient_accumulation_steps=accumulation, dataloader_num_workers=workers,
                     dataloader_prefetch_factor=prefetch)
    trainer = WatchedClipTrainer(model=tiny_llama(0), args=args, train_dataset=data, processing_class=tokenizer,
                                 data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    nan_at(trainer, FLAGGED)
    trainer.train()
    check_records(tmp_path, trainer, FLAGGED, data, tokenizer.decode)


def test_a_resumed_run_records_the_indices_of_its_steps(tmp_path):
    data, tokenizer = tokenized()
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    trainers = {}
    for out, resume in (("first", None), ("resumed", tmp_path / "first" / "checkpoint-6")):
        args = make_args(tmp_path / out, max_steps=12, logging_steps=10, per_device_train_batch_size=2,
                         dataloader_num_workers=2, save_strategy="steps", save_steps=6)
        trainer = trainers[out] = WatchedClipTrainer(model=tiny_llama(0), args=args, train_dataset=data,
                                                     processing_class=tokenizer, data_collator=collator)
        nan_at(trainer, FLAGGED)
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    resumed = trainers["resumed"]
    assert sorted(resumed.rows_of_step) == list(range(7, 13))  # the batches of steps 1-6 were skipped, not trained
    assert resumed.rows_of_step[9] == trainers["first"].rows_of_step[9]  # the same data order
    check_records(tmp_path / "resumed", resumed, (9, 11), data, tokenizer.decode)


class Stream(torch.utils.data.IterableDataset):
    """The tokenized lines as a stream (no index to name)."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        while True:
            yield from self.data


def test_an_iterable_dataset_gets_fingerprints_and_text_and_no_indices(tmp_path):
    data, tokenizer = tokenized()
    trainer = WatchedClipTrainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=12, logging_steps=5),
                                 train_dataset=Stream(data), processing_class=tokenizer,
                                 data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    nan_at(trainer, FLAGGED)
    trainer.train()
    check_records(tmp_path, trainer, FLAGGED, None, tokenizer.decode)


class Count(TrainerCallback):
    def __init__(self):
        self.logs = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs += 1


def test_more_flagged_steps_than_the_rings_hold_between_two_logs_all_reach_the_file(tmp_path, dataset):
    flagged = list(range(5, 295))  # 290 flagged steps, no logging step among them
    trainer = GradClipTrainer(model=tiny_llama(0, hidden_size=16, layers=1), train_dataset=dataset,
                              clip_config=ClipConfig(nonfinite_max_consecutive=10_000),
                              args=make_args(tmp_path, max_steps=300, logging_steps=1000,
                                             per_device_train_batch_size=1))
    nan_at(trainer, flagged)
    counter = Count()
    trainer.add_callback(counter)
    trainer.train()
    records = spike_lines(tmp_path)
    assert [r["step"] for r in records] == flagged
    assert all(r["event"] == "nonfinite" and r["skipped"] and r["batch"]["fingerprint"] for r in records)
    assert trainer.clip_run.nonfinite_steps == 290 and counter.logs == 1  # only the end-of-training summary


def kept_by_the_pack(run) -> int:
    """Bytes of the host objects a ClipRun keeps (its own objects, containers and values; not tensors, not the
    Trainer's objects such as its state and log_history)."""
    seen, size, todo = set(), 0, [run]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (torch.Tensor, torch.nn.Module, torch.optim.Optimizer, type)):
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, dict):
            todo += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset, collections.deque)):
            todo += list(obj)
        elif type(obj).__module__.startswith("gradclip_hf") and hasattr(obj, "__dict__"):
            todo += list(vars(obj).values())
    return size


def test_what_a_run_keeps_does_not_grow_with_the_logged_steps(tmp_path, dataset):
    kept = {}
    for steps in (50, 250):
        trainer = GradClipTrainer(model=tiny_llama(0, hidden_size=16, layers=1), train_dataset=Stream(dataset),
                                  clip_config=ClipConfig(log_layers_top_k=8),
                                  args=make_args(tmp_path / str(steps), max_steps=steps, logging_steps=1,
                                                 per_device_train_batch_size=1))
        trainer.train()
        assert len([h for h in trainer.state.log_history if "gradclip/layer/lm_head.weight" in h]) == steps
        kept[steps] = kept_by_the_pack(trainer.clip_run)
    assert abs(kept[250] - kept[50]) < 2_000, kept  # 200 more logged rows: nothing more kept by the pack
