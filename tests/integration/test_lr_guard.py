"""The learning-rate guard through real Trainer runs (issue 25.6): a scheduler that jumps to 10x its rate for five
steps (a restarted or doubled schedule) is capped at 2x the running average, the same run as one whose schedule
held the capped rates; the Trainer's scheduler and its logged learning rate are untouched; the capped steps are
counted and said; the guard's averages survive a checkpoint and a resume; a run without a jump is bit-identical
to one without the guard."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import make_args, train_logs, weights

transformers = pytest.importorskip("transformers")
from transformers import Trainer  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipTrainer  # noqa: E402
from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow
JUMP, STEPS, LR = range(24, 29), 32, 0.02  # 0-based scheduler steps (global steps 25-29) at 10x
DATA = ByteLMDataset(stdlib_text(40_000), block_size=32)


def jump(k):
    return 10.0 if k in JUMP else 1.0


def capped(k):
    """The rates the guard applies (cap 2, mean 1.0 after 20 steps, each capped step entering at 2 x the mean)."""
    mean, out = 1.0, {}
    for j in JUMP:
        out[j] = 2.0 * mean
        mean = 0.9 * mean + 0.1 * out[j]
    return out.get(k, 1.0)


def run(tmp_path, schedule, guard=None, entry="mixin", resume=None, **extra):
    model = tiny_llama(0)
    args = make_args(tmp_path, max_steps=STEPS, learning_rate=LR, optim="sgd", **extra)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = ClipConfig(threshold=1e6, spike_detection="off", lr_guard=guard)
    kwargs = dict(model=model, args=args, train_dataset=DATA, optimizers=(optimizer, scheduler))
    if entry == "mixin":
        trainer = GradClipTrainer(clip_config=config, **kwargs)
    else:
        trainer = Trainer(callbacks=[GradClipCallback(config)], **kwargs)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("entry", ["mixin", "callback"])
def test_a_jump_is_capped_to_the_run_whose_schedule_held_the_capped_rates(tmp_path, entry, caplog):
    with caplog.at_level(logging.WARNING, logger="gradclip_hf"):
        guarded = run(tmp_path / "g", jump, guard=2.0, entry=entry)
    same = run(tmp_path / "s", capped)
    for name, value in weights(same.model).items():
        torch.testing.assert_close(weights(guarded.model)[name], value, rtol=1e-6, atol=1e-8, msg=name)
    logs = train_logs(guarded)
    assert sum(row.get("gradclip/lr_capped", 0) for row in logs) == len(JUMP)
    assert logs[25]["learning_rate"] == pytest.approx(10 * LR)  # the scheduler's rate, logged as it was
    assert guarded.lr_scheduler.get_last_lr() == [LR]
    said = [r.getMessage() for r in caplog.records if "learning rate capped" in r.getMessage()]
    assert len(said) == len(JUMP) and said[0].startswith("gradclip: step 25: 1 step with the learning rate capped")


def test_an_unguarded_jump_differs_and_no_jump_is_untouched(tmp_path):
    plain, guarded = run(tmp_path / "p", lambda k: 1.0), run(tmp_path / "g", lambda k: 1.0, guard=2.0)
    assert all(torch.equal(a, b) for a, b in zip(weights(plain.model).values(), weights(guarded.model).values()))
    assert not any("gradclip/lr_capped" in row and row["gradclip/lr_capped"] for row in train_logs(guarded))
    unguarded, capped_run = run(tmp_path / "u", jump), run(tmp_path / "c", capped)
    assert not all(torch.allclose(a, b) for a, b in zip(weights(unguarded.model).values(),
                                                        weights(capped_run.model).values()))


def test_the_averages_survive_a_checkpoint_and_a_resume(tmp_path):
    whole = run(tmp_path / "w", jump, guard=2.0)
    run(tmp_path / "r", jump, guard=2.0, save_strategy="steps", save_steps=26)
    resumed = run(tmp_path / "r", jump, guard=2.0, resume=str(tmp_path / "r" / "checkpoint-26"))
    for name, value in weights(whole.model).items():
        torch.testing.assert_close(weights(resumed.model)[name], value, rtol=1e-6, atol=1e-8, msg=name)


def test_an_optimizer_step_that_raises_leaves_no_capped_rate_behind(tmp_path):
    """A step that raises between the gate's hooks (here: the optimizer itself): train() fails, and the learning
    rate the guard capped for that step is the scheduler's again."""
    class Failing(torch.optim.SGD):
        def step(self, closure=None):
            if self.state.get("fail"):
                raise RuntimeError("optimizer failed")
            return super().step(closure)

    model = tiny_llama(0)
    optimizer = Failing(model.parameters(), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, jump)

    class FailAtTheJump(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            optimizer.state["fail"] = state.global_step == JUMP[0]

    trainer = GradClipTrainer(model=model, args=make_args(tmp_path, max_steps=STEPS, learning_rate=LR, optim="sgd"),
                              train_dataset=DATA, optimizers=(optimizer, scheduler), callbacks=[FailAtTheJump()],
                              clip_config=ClipConfig(threshold=1e6, spike_detection="off", lr_guard=2.0))
    with pytest.raises(RuntimeError, match="optimizer failed"):
        trainer.train()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(10 * LR)  # the scheduler's, not the cap (2x)


def test_a_missing_torch_optimizer_is_a_clear_error():
    from gradclip_hf.run import LocalStep
    from gradclip_hf.core import GradClipper, LRGuard, NormClip

    with pytest.raises(ValueError, match=r"lr_guard=2 needs a torch optimizer whose step\(\) the pack can hook, got "
                                         r"NoneType.*set lr_guard=None"):
        LocalStep(GradClipper(NormClip(1.0))).guard_lr(LRGuard(2.0))
