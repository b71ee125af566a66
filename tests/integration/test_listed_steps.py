"""Listed steps without compute (issue 25.4): a step that ``skip_steps`` lists consumes its batches without a
forward or a backward (as Megatron's ``--iterations-to-skip``), through the mixin and the bare callback: the data
order is unchanged, the rerun is bit-identical to the original up to the listed steps, the weights do not move at
them, and the log says so (``gradclip/listed_steps``; the row's loss is the mean of the steps that were computed,
NaN when none was)."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import StepRecorder, make_args, train_logs
from recording import spike_lines

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipMixin  # noqa: E402
from gradclip_hf.standins import tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow
LISTED, STEPS, GA = (5, 6), 12, 2


class Watched(Trainer):
    """Notes, per optimizer step (1-based), the batches the Trainer fetched and how many forwards ran."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.fetched[self.state.global_step + 1] = [b["input_ids"].clone() for b in batches]
        return batches, num_items


class WatchedMixin(GradClipMixin, Watched):
    pass


def run(tmp_path, dataset, entry, listed=(), logging_steps=1):
    model = tiny_llama(0)
    args = make_args(tmp_path, max_steps=STEPS, gradient_accumulation_steps=GA, logging_steps=logging_steps)
    config = ClipConfig(skip_steps=list(listed))
    if entry == "mixin":
        trainer = WatchedMixin(model=model, args=args, train_dataset=dataset, clip_config=config)
    else:
        trainer = Watched(model=model, args=args, train_dataset=dataset, callbacks=[GradClipCallback(config)])
    trainer.fetched, forwards = {}, {}
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(trainer.state.global_step + 1,
                                                                    forwards.get(trainer.state.global_step + 1, 0) + 1))
    recorder = StepRecorder(keep_state=True)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder, forwards


@pytest.mark.parametrize("entry", ["mixin", "callback"])
def test_a_listed_step_consumes_its_batches_without_computing_them(tmp_path, dataset, entry):
    original, original_weights, original_forwards = run(tmp_path / "original", dataset, entry)
    rerun, weights, forwards = run(tmp_path / "rerun", dataset, entry, listed=LISTED)
    # no forward (and so no backward) at the listed steps; every other step computes its GA micro-batches
    assert forwards == {s: GA for s in range(1, STEPS + 1) if s not in LISTED}
    assert original_forwards == {s: GA for s in range(1, STEPS + 1)}
    # the data order is unchanged: every step fetched the same batches, the listed ones included
    assert original.fetched.keys() == rerun.fetched.keys() == set(range(1, STEPS + 1))
    for step in original.fetched:
        assert all(torch.equal(a, b) for a, b in zip(original.fetched[step], rerun.fetched[step])), step
    # bit-identical to the original up to the listed steps; the weights do not move at them
    first = min(LISTED)
    for index in range(first - 1):
        assert all(torch.equal(a, b) for a, b in zip(original_weights.weights[index], weights.weights[index])), index
    for step in LISTED:
        assert all(torch.equal(a, b) for a, b in zip(weights.weights[first - 2], weights.weights[step - 1])), step
    assert not all(torch.equal(a, b) for a, b in zip(weights.weights[max(LISTED) - 1], weights.weights[max(LISTED)]))
    # the log says it: no loss was computed at a listed step (NaN), one listed and skipped step per row
    rows = {h["step"]: h for h in train_logs(rerun)}
    for step in range(1, STEPS + 1):
        if step in LISTED:
            assert math.isnan(rows[step]["loss"]) and "grad_norm" not in rows[step], rows[step]
            assert rows[step]["gradclip/listed_steps"] == 1 and rows[step]["gradclip/skipped_steps"] == 1
        else:
            assert math.isfinite(rows[step]["loss"]) and "gradclip/listed_steps" not in rows[step]
    run_of = getattr(rerun, "clip_run", None) or next(cb.run for cb in rerun.callback_handler.callbacks
                                                      if isinstance(cb, GradClipCallback))
    assert run_of.skipped_steps == len(LISTED)
    assert [(r["event"], r["step"]) for r in spike_lines(tmp_path / "rerun")] == [("skip_listed", s) for s in LISTED]


def test_a_logged_window_with_a_listed_step_shows_the_mean_of_its_computed_steps(tmp_path, dataset):
    every, _, _ = run(tmp_path / "every", dataset, "mixin", listed=LISTED)
    window, _, _ = run(tmp_path / "window", dataset, "mixin", listed=LISTED, logging_steps=4)
    per_step = {h["step"]: h["loss"] for h in train_logs(every)}
    rows = {h["step"]: h for h in train_logs(window)}
    assert sorted(rows) == [4, 8, 12]
    near = dict(rel=1e-6, abs=2e-4)  # transformers 4.57 logs the loss rounded to 4 decimals
    assert rows[4]["loss"] == pytest.approx(sum(per_step[s] for s in (1, 2, 3, 4)) / 4, **near)
    assert rows[8]["loss"] == pytest.approx((per_step[7] + per_step[8]) / 2, **near)  # steps 5 and 6 listed
    assert rows[8]["gradclip/listed_steps"] == 2 and rows[8]["gradclip/skipped_steps"] == 2
    assert "gradclip/listed_steps" not in rows[4] and "gradclip/listed_steps" not in rows[12]
