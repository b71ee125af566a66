"""After the spike (issue 17): which batch did it, skip it on a rerun, the loss watchdog."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import BLOCK, make_args, train_logs
from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import rare_byte_block, tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from helpers import StepRecorder  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipTrainer  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5,
                                                   reason="train_sampling_strategy='sequential' is transformers 5")]
BATCH = 4
SPIKE_STEP = 24  # 0-based: the batch of the 25th optimizer step


class GarbageAt(torch.utils.data.Dataset):
    """``dataset`` with rare-byte blocks at the given indices (an indexable dataset: the record names them)."""

    def __init__(self, dataset, indices):
        self.dataset, self.garbage = dataset, set(indices)
        generator = torch.Generator().manual_seed(7)
        self.blocks = {i: rare_byte_block(BLOCK, generator) for i in sorted(self.garbage)}

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if index in self.garbage:
            ids = self.blocks[index]
            return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        return self.dataset[index]


BAD = list(range(SPIKE_STEP * BATCH, (SPIKE_STEP + 1) * BATCH))


def run(tmp_path, dataset, config, entry="trainer", steps=30, resume=None, **args):
    data = GarbageAt(dataset, BAD)
    args = make_args(tmp_path, max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=BATCH,
                     train_sampling_strategy="sequential", **args)
    if entry == "trainer":
        trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=data, clip_config=config)
    else:
        trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=data, callbacks=[GradClipCallback(config)])
    recorder = StepRecorder(trainer, keep_state=True)
    trainer.add_callback(recorder)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def records(out_dir):
    path = out_dir / "gradclip_spikes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


SPIKES = ClipConfig(spike_detection="loss", spike_warmup_steps=10)


@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_the_spike_record_names_the_injected_indices_and_the_text(tmp_path, dataset, entry):
    trainer, _ = run(tmp_path, dataset, SPIKES, entry=entry)
    spikes = [r for r in records(tmp_path) if r["event"] == "spike"]
    assert [r["step"] for r in spikes] == [SPIKE_STEP + 1]
    record = spikes[0]
    assert record["batch"]["indices"] == [BAD]  # one process: one list, every sample of the step
    assert record["batch"]["fingerprint"] and record["loss_z"] > 6 and record["top_layers"]
    assert record["kind"] == "loss" and record["action"] == "tighten" and record["skipped"] is False
    # the same record reaches the run's memory (W&B table)
    clip_run = trainer.clip_run if entry == "trainer" else next(
        cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradClipCallback)).run
    assert [r["step"] for r in clip_run.recorder.records] == [SPIKE_STEP + 1]


def test_text_is_decoded_with_the_processing_class(tmp_path, dataset):
    class ByteDecoder:
        def decode(self, ids):
            return bytes(i for i in ids if i < 256).decode("latin-1")

    data = GarbageAt(dataset, BAD)
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=data, clip_config=SPIKES,
                              processing_class=ByteDecoder(),
                              args=make_args(tmp_path, max_steps=30, learning_rate=3e-3,
                                             per_device_train_batch_size=BATCH,
                                             train_sampling_strategy="sequential"))
    trainer.train()
    record = next(r for r in records(tmp_path) if r["event"] == "spike")
    expected = bytes(int(b) for b in data[BAD[0]]["input_ids"][1:48] if b < 256).decode("latin-1")
    assert record["batch"]["text"].startswith(expected[:20])


def test_nonfinite_steps_are_recorded_too(tmp_path, dataset):
    from test_defects import NaNAt

    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, clip_config=ClipConfig(),
                              args=make_args(tmp_path, max_steps=6, train_sampling_strategy="sequential"))
    trainer.callback_handler.callbacks.insert(0, NaNAt(3))
    trainer.train()
    nonfinite = [r for r in records(tmp_path) if r["event"] == "nonfinite"]
    assert [(r["step"], r["skipped"]) for r in nonfinite] == [(4, True)]
    assert nonfinite[0]["batch"]["indices"] == [list(range(12, 16))]


def test_rerun_from_a_checkpoint_skips_the_recorded_steps(tmp_path, dataset):
    first = tmp_path / "first"
    run(first, dataset, SPIKES, save_strategy="steps", save_steps=20)
    spike_file = first / "gradclip_spikes.jsonl"
    assert [r["step"] for r in records(first)] == [SPIKE_STEP + 1]
    rerun = ClipConfig(spike_detection="loss", spike_warmup_steps=10, skip_steps_from=str(spike_file))
    trainer, recorder = run(first, dataset, rerun, resume=str(first / "checkpoint-20"))
    # the batch of step 25 was consumed (data order unchanged) but never applied
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[SPIKE_STEP - 1], recorder.weights[SPIKE_STEP]))
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[SPIKE_STEP], recorder.weights[SPIKE_STEP + 1]))
    listed = [r for r in records(first) if r["event"] == "skip_listed"]
    assert [r["step"] for r in listed] == [SPIKE_STEP + 1]
    assert sum(h["gradclip/skipped_steps"] for h in train_logs(trainer) if h["step"] > 20) == 1
    # a rerun listing the step by number does exactly the same
    again = ClipConfig(spike_detection="loss", spike_warmup_steps=10, skip_steps=[SPIKE_STEP + 1])
    other, _ = run(first, dataset, again, resume=str(first / "checkpoint-20"), output_dir=str(tmp_path / "again"))
    for a, b in zip(trainer.model.parameters(), other.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused"])
def test_loss_watchdog_stops_at_the_expected_step(tmp_path, dataset, optim):
    # the first losses are about 5.6 and fall: a cap of 5.45 holds for the first steps only
    probe = Trainer(model=tiny_llama(0), train_dataset=dataset, args=make_args(tmp_path / "probe", max_steps=8))
    probe.train()
    losses = [h["loss"] for h in train_logs(probe)]
    cap = (losses[2] + losses[3]) / 2  # steps 1..3 above, step 4 below: a patience of 3 stops at step 3
    assert losses[0] > cap and losses[1] > cap and losses[2] > cap and losses[3] < cap
    trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset,
                              clip_config=ClipConfig(loss_cap=cap, loss_cap_patience=3),
                              args=make_args(tmp_path, max_steps=8, optim=optim))
    trainer.train()
    assert trainer.state.global_step == 3
    reasons = [h["gradclip/stop_reason"] for h in trainer.state.log_history if "gradclip/stop_reason" in h]
    assert len(reasons) == 1 and "clip_loss_cap" in reasons[0] and "3 steps in a row" in reasons[0]
    saved = trainer.clip_run.stop_reason
    assert saved == reasons[0]
    # patience 4 never trips: the loss came back under the cap at step 4
    calm = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset,
                           clip_config=ClipConfig(loss_cap=cap, loss_cap_patience=4),
                           args=make_args(tmp_path / "calm", max_steps=8, optim=optim))
    calm.train()
    assert calm.state.global_step == 8 and calm.clip_run.stop_reason is None
