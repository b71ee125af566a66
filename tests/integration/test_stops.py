"""A run the pack stops leaves its trace on disk (issue 21): a checkpoint at the stop, the reason in
``trainer_state.json`` (in the stop step's own log row, which has its ``loss``, and in the callback's saved
state), a ``stop`` line in ``gradclip_spikes.jsonl``, and ``gradclip-hf report`` shows it. Also the non-finite
watchdog under a real fp16 ``GradScaler``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import make_args
from recording import nan_at, spike_lines
from gradclip_hf.config import ClipConfig
from gradclip_hf.standins import SpikyByteStream, tiny_llama

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from gradclip_hf.integrations.accelerate import AcceleratorClipper  # noqa: E402
from transformers import Trainer  # noqa: E402

from gradclip_hf.integrations.transformers import GradClipCallback, GradClipTrainer  # noqa: E402
from gradclip_hf.report import build_report  # noqa: E402

pytestmark = pytest.mark.slow
BATCH = 4

# cause: (options, optimizer, logging_steps, NaN steps, the step it stops at, a phrase of the reason)
CAUSES = {
    "spike": (dict(spike_detection="loss", spike_warmup_steps=10, spike_action="stop"), "adamw_torch", 5, (), 25,
              "spike_action='stop'"),
    "loss_cap": (dict(loss_cap=0.1, loss_cap_patience=3), "adamw_torch_fused", 5, (), 5, "clip_loss_cap=0.1"),
    "nonfinite": (dict(nonfinite_max_consecutive=3), "adamw_torch_fused", 4, range(3, 40), 8,
                  "clip_nonfinite_max_consecutive=3"),
}


def stopped_run(tmp_path, dataset, cause, save_strategy="steps", entry="trainer", **extra):
    options, optim, logging_steps, nans, _, _ = CAUSES[cause]
    stream = SpikyByteStream(dataset, spike_steps=(24,), samples_per_step=BATCH)
    args = make_args(tmp_path, max_steps=40, learning_rate=3e-3, optim=optim, per_device_train_batch_size=BATCH,
                     logging_steps=logging_steps, save_strategy=save_strategy, save_steps=100, **extra)
    if entry == "trainer":
        trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=stream, clip_config=ClipConfig(**options),
                                  args=args)
    else:
        trainer = Trainer(model=tiny_llama(0), train_dataset=stream, args=args,
                          callbacks=[GradClipCallback(ClipConfig(**options))])
    nan_at(trainer, nans)
    trainer.train()
    if entry != "trainer":
        trainer.clip_run = next(cb for cb in trainer.callback_handler.callbacks
                                if isinstance(cb, GradClipCallback)).run
    return trainer


@pytest.mark.parametrize("cause, entry", [(cause, "trainer") for cause in CAUSES] + [("loss_cap", "callback")])
def test_a_stop_saves_a_checkpoint_with_the_reason_and_writes_a_stop_line(tmp_path, dataset, cause, entry):
    *_, step, phrase = CAUSES[cause]
    trainer = stopped_run(tmp_path, dataset, cause, entry=entry)
    reason = trainer.clip_run.stop_reason
    assert trainer.state.global_step == step and phrase in reason and f"at step {step}:" in reason
    # the checkpoint at the stop, whose trainer_state.json says why
    saved = json.loads((tmp_path / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert saved["global_step"] == step
    rows = saved["log_history"]
    assert rows[-1]["step"] == step and rows[-1]["gradclip/stop_reason"] == reason and math.isfinite(rows[-1]["loss"])
    run_state = saved["stateful_callbacks"]["GradClipCallback"]["run"]
    assert run_state["stop_reason"] == reason and run_state["stop_step"] == step
    # the spike file ends with the stop, after the events before it
    lines = spike_lines(tmp_path)
    assert lines[-1]["event"] == "stop" and lines[-1]["step"] == step and lines[-1]["reason"] == reason
    assert lines[-1]["kind"] == cause and all(line["step"] <= step for line in lines)
    if cause == "spike":
        assert [(line["event"], line["step"]) for line in lines] == [("spike", 25), ("stop", 25)]
    # the report reads the newest checkpoint: the stop
    report = build_report(str(tmp_path), chart=None)
    assert report["stop"] == [{"step": step, "reason": reason}]


def test_a_run_resumed_from_the_stop_goes_on_and_the_saved_reason_is_checked(tmp_path, dataset):
    stopped_run(tmp_path, dataset, "spike")
    checkpoint = tmp_path / "checkpoint-25"
    options = dict(spike_detection="loss", spike_warmup_steps=10, spike_action="skip")  # the fix: skip, not stop
    stream = SpikyByteStream(dataset, spike_steps=(24,), samples_per_step=BATCH)

    def resumed():
        return GradClipTrainer(model=tiny_llama(0), train_dataset=stream, clip_config=ClipConfig(**options),
                               args=make_args(tmp_path / "again", max_steps=40, learning_rate=3e-3,
                                              per_device_train_batch_size=BATCH, logging_steps=5))
    trainer = resumed()
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert trainer.state.global_step == 40 and trainer.clip_run.stop_reason is None
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state["stateful_callbacks"]["GradClipCallback"]["run"]["stop_reason"] = 5
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"`run.stop_reason` must be a str or absent, got 5.*checkpoint at step 25"):
        resumed().train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize("strategy", ["epoch", "best"])
def test_the_other_save_strategies_save_at_the_stop_too(tmp_path, dataset, strategy):
    extra = {"metric_for_best_model": "loss"} if strategy == "best" else {}  # never evaluated: no best to save
    trainer = stopped_run(tmp_path, dataset, "spike", save_strategy=strategy, **extra)
    saved = json.loads((tmp_path / "checkpoint-25" / "trainer_state.json").read_text())
    assert saved["log_history"][-1]["gradclip/stop_reason"] == trainer.clip_run.stop_reason
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-25"]


@pytest.mark.parametrize("cause", list(CAUSES))
def test_every_log_row_but_the_last_has_a_loss(tmp_path, dataset, cause):
    """As the Trainer's own test_logging_inf_nan_filter reads the log: no extra row without ``loss``."""
    trainer = stopped_run(tmp_path, dataset, cause, save_strategy="no")
    history = trainer.state.log_history
    losses = [row["loss"] for row in history[:-1]]
    assert len(losses) == len(history) - 1 and "train_runtime" in history[-1]
    assert sum("gradclip/stop_reason" in row for row in history) == 1
    assert not list(tmp_path.glob("checkpoint-*"))  # no save strategy: nothing saved


# ---------------------------------------------------------------- fp16: the non-finite limit under a GradScaler
@pytest.fixture
def fresh_accelerate_state():
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fp16_loop(dataset, init_scale, poison_from, steps, limit=10, loss_factor=1.0):
    """A hand-written accelerate loop with a real CPU GradScaler (accelerate makes none on CPU: it is handed one
    before prepare); the loss is NaN from step ``poison_from`` (1-based) on. The metrics are read every step.
    Returns the steps taken, the scaler's skipped steps and the clipper."""
    acc = accelerate.Accelerator(cpu=True, mixed_precision="fp16")
    scaler = acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=10_000)
    model = tiny_llama(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, optimizer = acc.prepare(model, optimizer)
    acc.native_amp = True  # after prepare (no fp16 autocast of the forward): backward scales, step unscales
    clipper = AcceleratorClipper(acc, ClipConfig(nonfinite_max_consecutive=limit), model, optimizer)
    overflows = []
    for step in range(1, steps + 1):
        items = [dataset[(step * BATCH + j) % len(dataset)] for j in range(BATCH)]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        loss = model(**batch).loss * loss_factor
        if poison_from is not None and step >= poison_from:
            loss = loss * math.nan
        acc.backward(loss)
        clipper.clip_(loss)
        scale = scaler.get_scale()
        optimizer.step()
        optimizer.zero_grad()
        overflows.append(scaler.get_scale() < scale)  # the scaler halved its scale: it skipped this step
        clipper.metrics()
        if clipper.should_stop:
            break
    clipper.close()
    return step, overflows, clipper


def test_fp16_scaler_finding_its_scale_is_not_a_stop(dataset, fresh_accelerate_state):
    # gradients of about 2**60 (a loss summed, not averaged) overflow fp32 at a loss scale of 2**80: the scaler
    # halves it step after step until they fit
    steps, overflows, clipper = fp16_loop(dataset, init_scale=2.0 ** 80, poison_from=None, steps=40,
                                          loss_factor=2.0 ** 60)
    assert overflows.index(False) > 10 and not any(overflows[20:])  # more overflows in a row than the limit
    assert steps == 40 and clipper.stop_reason is None and clipper.run.nonfinite_steps == sum(overflows)


def test_fp16_overflowing_for_ever_stops_once_the_scale_is_down_to_one(dataset, fresh_accelerate_state):
    # from step 5 every step overflows: the scale (16) halves to 8, 4, 2, 1 (steps 5-8); steps 9 .. 18 are the
    # 10 overflows in a row at a scale of 1 or below that make the limit
    steps, overflows, clipper = fp16_loop(dataset, init_scale=16.0, poison_from=5, steps=200)
    assert all(overflows[4:]) and not any(overflows[:4])
    assert steps == 18 and clipper.should_stop
    assert "10 consecutive fp16 overflow steps at a loss scale of 1 or below" in clipper.stop_reason
