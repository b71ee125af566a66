"""The micro-batch gate through real Trainer runs (issue 25.1): gradient accumulation 4, a bad micro-batch at a
known place (map-style dataset, sequential sampler). The update of its step is the gradient of the kept
micro-batches (by tokens, as the Trainer weights a causal LM's loss with ``num_items_in_batch``, and by count),
through the mixin and the bare callback, on a fused optimizer (``grad_scale``) and in place; before the drop the
run is bit-identical to one without the gate; the logged loss is the raw one; the spike file names the dropped
micro-batch; with one micro-batch per step the gate is today's step skip; fp16 under a real GradScaler and bf16."""

from __future__ import annotations

import math
import os

import pytest
import torch

from helpers import StepRecorder, assert_same_weights, make_args, train_logs
from recording import spike_lines

transformers = pytest.importorskip("transformers")
accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from transformers import Trainer  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.integrations.accelerate import AcceleratorClipper  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipMixin, GradClipTrainer, compat  # noqa: E402
from gradclip_hf.standins import SpikyByteStream, rare_byte_block, tiny_llama  # noqa: E402

pytestmark = pytest.mark.slow
GA, BATCH, STEP, POSITION, LR = 4, 2, 10, 1, 0.05  # the bad micro-batch: position 1 of step 10 (0-based)
BAD = [(STEP * GA + POSITION) * BATCH + i for i in range(BATCH)]
SHIFTED = int(transformers.__version__.split(".")[0]) >= 5  # 5.x counts a causal LM's tokens after the shift
GATE = dict(threshold=1e6, spike_detection="loss", spike_gate="micro_batch", spike_action="skip", spike_factor=1.0,
            spike_warmup_steps=3, spike_ratio=1.15)  # early training: the baseline still falls


class GarbageAt(torch.utils.data.Dataset):
    """``dataset`` with garbage labels (rare bytes after ordinary text: a mislabelled sample) at ``bad`` (a
    map-style dataset: the records can name indices)."""

    def __init__(self, dataset, bad):
        self.dataset, self.bad = dataset, set(bad)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        if index not in self.bad:
            return item
        labels = rare_byte_block(self.dataset.block_size, torch.Generator().manual_seed(index))
        return {**item, "labels": labels}


class InOrder(Trainer):
    """The dataset in its order (``train_sampling_strategy="sequential"`` is transformers 5 only)."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


class GradClipInOrder(GradClipMixin, InOrder):
    pass


@pytest.fixture
def fresh_accelerate_state(monkeypatch):
    """A fresh accelerate state, and after the test the one before: transformers 4.57's TrainingArguments(bf16=True)
    sets ACCELERATE_MIXED_PRECISION in the process environment, which every later Accelerator reads."""
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", os.environ.get("ACCELERATE_MIXED_PRECISION", "no"))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def gated_run(tmp_path, data, entry="mixin", by="tokens", fused=True, gate=True, **extra):
    """A run of ``STEP + 2`` steps (SGD, no clipping); returns the Trainer and a recorder of its weights."""
    model = tiny_llama(0)
    options = dict(GATE, **({} if gate else {"spike_gate": "step", "spike_action": "tighten"}))
    args = make_args(tmp_path, max_steps=STEP + 2, per_device_train_batch_size=BATCH, gradient_accumulation_steps=GA,
                     learning_rate=LR, **extra)
    optimizers = (torch.optim.SGD(model.parameters(), lr=LR, fused=fused), None)
    if entry == "mixin":
        trainer = GradClipInOrder(model=model, args=args, train_dataset=data, optimizers=optimizers,
                                  clip_config=ClipConfig(**options))
    else:
        trainer = InOrder(model=model, args=args, train_dataset=data, optimizers=optimizers,
                          callbacks=[GradClipCallback(ClipConfig(**options))])
    if by == "count":
        trainer.model_accepts_loss_kwargs = False  # the Trainer then divides each micro-batch's mean loss by GA
    recorder = StepRecorder(keep_state=True)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def kept_gradient(weights, data, by):
    """The gradient, at ``weights``, of step ``STEP`` made of its kept micro-batches only: their token-weighted
    mean loss (counted as the Trainer counts ``num_items_in_batch``), or the mean of their mean losses."""
    model = tiny_llama(0)
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights):
            p.copy_(w)
    micro_batches = []
    for position in range(GA):
        if position != POSITION:
            items = [data[(STEP * GA + position) * BATCH + i] for i in range(BATCH)]
            micro_batches.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    if by == "tokens":
        tokens = sum(int((b["labels"][..., 1 if SHIFTED else 0:] != -100).sum()) for b in micro_batches)
        loss = sum(model(**b, num_items_in_batch=tokens).loss for b in micro_batches)
    else:
        loss = sum(model(**b).loss for b in micro_batches) / len(micro_batches)
    loss.backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("entry, by, fused", [("mixin", "tokens", True), ("callback", "tokens", False),
                                              ("mixin", "count", False), ("callback", "count", True)])
def test_the_update_of_a_gated_step_is_the_gradient_of_its_kept_micro_batches(tmp_path, dataset, entry, by, fused):
    data = GarbageAt(dataset, BAD)
    gated, recorder = gated_run(tmp_path / "gated", data, entry, by, fused)
    plain, plain_recorder = gated_run(tmp_path / "plain", data, entry, by, fused, gate=False)
    # before the drop: bit-identical to the run without the gate (nothing dropped is a rescale of exactly 1)
    for step in range(STEP):
        assert all(torch.equal(a, b) for a, b in zip(recorder.weights[step], plain_recorder.weights[step])), step
    # the drop step: w - lr * (the gradient of the kept micro-batches), by tokens or by count
    grads = kept_gradient(recorder.weights[STEP - 1], data, by)
    for before, after, grad in zip(recorder.weights[STEP - 1], recorder.weights[STEP], grads):
        torch.testing.assert_close(after, before - LR * grad, rtol=1e-4, atol=2e-6)
    run = getattr(gated, "clip_run", None) or next(cb.run for cb in gated.callback_handler.callbacks
                                                   if isinstance(cb, GradClipCallback))
    assert run.skipped_steps == 0 and [e.step for e in run.spike_events] == [STEP + 1]
    # the logged loss is the raw one (what the data did): the same as the run without the gate at that step
    logged = {h["step"]: h for h in train_logs(gated)}
    assert logged[STEP + 1]["loss"] == {h["step"]: h for h in train_logs(plain)}[STEP + 1]["loss"]
    assert logged[STEP + 1]["gradclip/dropped_micro_batches"] == 1
    assert sum(h["gradclip/dropped_micro_batches"] for h in logged.values()) == 1
    # the spike file names the dropped micro-batch: its position in the step and its dataset indices
    (record,) = spike_lines(tmp_path / "gated")
    assert (record["step"], record["kind"], record["action"], record["skipped"]) == (STEP + 1, "loss", "drop", False)
    assert record["dropped"] == {"count": 1, "micro_batches": GA, "positions": [POSITION]}
    assert record["batch"]["indices"] == [BAD]


@pytest.mark.parametrize("strategy", ["norm", "zscore"])
def test_with_one_micro_batch_per_step_the_gate_is_the_step_skip(tmp_path, dataset, strategy):
    """GA 1: a micro-batch is a step; dropping it is skipping it, bit for bit (weights, counts, spike steps)."""
    stream = SpikyByteStream(dataset, spike_steps=(24, 31), samples_per_step=4)
    runs = {}
    for gate in ("step", "micro_batch"):
        config = ClipConfig.recommended(spike_gate=gate, spike_warmup_steps=10, strategy=strategy,
                                        **({"threshold": 1.0} if strategy == "zscore" else {}))
        trainer = GradClipTrainer(model=tiny_llama(0), train_dataset=stream, clip_config=config,
                                  args=make_args(tmp_path / gate, max_steps=40, learning_rate=3e-3, logging_steps=5,
                                                 optim="adamw_torch_fused"))
        trainer.train()
        runs[gate] = trainer
    step, gate = runs["step"], runs["micro_batch"]
    assert_same_weights({k: v for k, v in step.model.state_dict().items()},
                        {k: v for k, v in gate.model.state_dict().items()})
    assert step.clip_run.skipped_steps == gate.clip_run.skipped_steps == 2
    assert [e.step for e in step.clip_run.spike_events] == [e.step for e in gate.clip_run.spike_events] == [25, 32]
    assert [r["action"] for r in spike_lines(tmp_path / "micro_batch")] == ["skip", "skip"]


def test_bf16_drops_the_micro_batch_and_stays_identical_before_it(tmp_path, dataset, fresh_accelerate_state):
    data = GarbageAt(dataset, BAD)
    gated, recorder = gated_run(tmp_path / "gated", data, bf16=True)
    _, plain_recorder = gated_run(tmp_path / "plain", data, bf16=True, gate=False)
    assert all(torch.equal(a, b) for a, b in zip(recorder.weights[STEP - 1], plain_recorder.weights[STEP - 1]))
    assert not all(torch.equal(a, b) for a, b in zip(recorder.weights[STEP], plain_recorder.weights[STEP]))
    (record,) = spike_lines(tmp_path / "gated")
    assert record["action"] == "drop" and record["dropped"]["positions"] == [POSITION]
    assert record["batch"]["indices"] == [BAD] and gated.clip_run.skipped_steps == 0


# ---------------------------------------------------------------- fp16: a hand-written loop, a real GradScaler
def fp16_loop(data, gate: bool):
    """An accelerate loop with GA 4 and a real CPU GradScaler (handed to accelerate before prepare, as
    test_stops does), fused AdamW. ``gate``: the pack drops the bad micro-batch; else the loop leaves it out
    itself (no backward) and weights the other three as their mean (x 4/3): the reference."""
    acc = accelerate.Accelerator(cpu=True, mixed_precision="fp16", gradient_accumulation_steps=GA)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=10_000)
    model = tiny_llama(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model, optimizer = acc.prepare(model, optimizer)
    acc.native_amp = True
    config = ClipConfig(**GATE) if gate else ClipConfig(threshold=1e6)
    clipper = AcceleratorClipper(acc, config, model, optimizer)
    for step in range(STEP + 2):
        for position in range(GA):
            items = [data[(step * GA + position) * BATCH + i] for i in range(BATCH)]
            batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
            with acc.accumulate(model):
                loss = model(**batch).loss
                if gate:
                    acc.backward(clipper.gate(loss))
                elif step != STEP or position != POSITION:
                    acc.backward(loss * (GA / (GA - 1) if step == STEP else 1.0))
                clipper.clip_(loss)
                optimizer.step()
                optimizer.zero_grad()
    clipper.close()
    return acc.unwrap_model(model), clipper


def test_fp16_with_a_grad_scaler_drops_the_micro_batch_as_leaving_it_out(dataset, fresh_accelerate_state):
    data = GarbageAt(dataset, BAD)
    gated, clipper = fp16_loop(data, gate=True)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    reference, _ = fp16_loop(data, gate=False)
    assert [(e.step, e.dropped, e.outcome) for e in clipper.spike_events] == [(STEP + 1, 1, "drop")]
    assert clipper.run.skipped_steps == 0
    for a, b in zip(gated.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_loss_that_never_reaches_the_gate_is_an_error_with_the_fix(tmp_path, dataset):
    class OwnBackward(GradClipTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = self.compute_loss(model, inputs) / GA
            loss.backward()  # not through accelerator.backward: the gate cannot see it
            return loss.detach()

    trainer = OwnBackward(model=tiny_llama(0), train_dataset=dataset, clip_config=ClipConfig(**GATE),
                          args=make_args(tmp_path, max_steps=2, gradient_accumulation_steps=GA))
    with pytest.raises(RuntimeError, match=r"step 1: spike_gate='micro_batch' saw no micro-batch loss before its "
                                           r"backward.*self\.accelerator\.backward\(loss\)"):
        trainer.train()


def test_a_bare_callback_without_its_trainer_refuses_the_gate(tmp_path, dataset, monkeypatch):
    monkeypatch.setattr(compat, "find_trainer", lambda *a, **k: None)
    trainer = Trainer(model=tiny_llama(0), train_dataset=dataset, args=make_args(tmp_path, max_steps=2),
                      callbacks=[GradClipCallback(ClipConfig(**GATE))])
    with pytest.raises(ValueError, match=r"spike_gate='micro_batch'.*could not find.*callback\.attach\(trainer\)"):
        trainer.train()
    assert math.isfinite(sum(float(p.sum()) for p in trainer.model.parameters()))
