"""Real tiny-Llama Trainer runs on stdlib text: drop-in identity, clip placement, GA, resume, LoRA, bf16."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from helpers import assert_same_weights, make_args, train_logs, weights
from gradclip_hf.config import ClipConfig
from gradclip_hf.core import GradClipper
from gradclip_hf.standins import tiny_llama

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from gradclip_hf.run.metrics import SPIKE_KEYS  # noqa: E402
from gradclip_hf.integrations.transformers import (METRIC_KEYS, GradClipCallback, GradClipMixin,  # noqa: E402
                                                   GradClipTrainer, GradClipTrainingArguments)
from gradclip_hf.integrations.transformers.session import check_trainer  # noqa: E402

pytestmark = pytest.mark.slow


def run(trainer):
    trainer.train()
    return [h["loss"] for h in train_logs(trainer)], weights(trainer.model)


# ---------------------------------------------------------------- drop-in: bit-identical to the stock Trainer
@pytest.mark.parametrize("entry", ["trainer", "trainer_plain_args", "callback"])
def test_norm_constant_is_bit_identical_to_stock(tmp_path, dataset, entry):
    max_norm = 0.5  # below the natural norm (~2): clipping is active at every step
    stock = Trainer(model=tiny_llama(0), args=make_args(tmp_path / "stock", max_grad_norm=max_norm),
                    train_dataset=dataset)
    stock_losses, stock_weights = run(stock)
    stock_norms = [h["grad_norm"] for h in train_logs(stock)]
    if entry == "trainer":
        args = make_args(tmp_path / "ours", cls=GradClipTrainingArguments, clip_strategy="norm",
                         clip_threshold=max_norm)
        ours = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset)
    elif entry == "trainer_plain_args":
        ours = GradClipTrainer(model=tiny_llama(0), args=make_args(tmp_path / "ours", max_grad_norm=max_norm),
                               train_dataset=dataset)
    else:
        ours = Trainer(model=tiny_llama(0), args=make_args(tmp_path / "ours", max_grad_norm=0.0),
                       train_dataset=dataset, callbacks=[GradClipCallback(strategy="norm", threshold=max_norm)])
    losses, final = run(ours)
    assert losses == stock_losses
    assert_same_weights(final, stock_weights)
    logs = train_logs(ours)
    assert [h["grad_norm"] for h in logs] == stock_norms  # pre-clip norm, as the Trainer logs it
    assert all(h["gradclip/clip_rate"] == 1.0 for h in logs)
    assert set(METRIC_KEYS) - set(SPIKE_KEYS) <= set(logs[0])
    assert not set(SPIKE_KEYS) & set(logs[0])  # spike keys only with the spike controller on


def test_mixin_with_another_trainer_subclass(tmp_path, dataset):
    class MyTrainer(Trainer):
        def training_step(self, model, inputs, *args, **kwargs):
            self.seen = getattr(self, "seen", 0) + 1
            return super().training_step(model, inputs, *args, **kwargs)

    class MyClipTrainer(GradClipMixin, MyTrainer):
        pass

    trainer = MyClipTrainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=3, max_grad_norm=0.5),
                            train_dataset=dataset)
    trainer.train()
    assert trainer.seen == 3 and trainer.clip_run.num_clips == 3
    assert trainer.args.max_grad_norm == 0.5  # restored after the run


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE trained on stdlib text at test time (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gradclip_hf.standins import stdlib_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([stdlib_text(60_000)], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def test_trl_sft_trainer_with_callback_and_mixin(tmp_path, bpe_tokenizer):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from gradclip_hf.standins import stdlib_text

    text = stdlib_text(60_000)
    data = datasets.Dataset.from_dict({"text": [text[i:i + 200] for i in range(0, 40_000, 200)]})

    def sft(cls, out, max_grad_norm, **kwargs):
        config = trl.SFTConfig(output_dir=str(tmp_path / out), max_steps=6, per_device_train_batch_size=4,
                               max_length=64, report_to="none", use_cpu=True, logging_steps=1, disable_tqdm=True,
                               save_strategy="no", packing=False, max_grad_norm=max_grad_norm, seed=0)
        trainer = cls(model=tiny_llama(0, vocab_size=len(bpe_tokenizer)), args=config, train_dataset=data,
                      processing_class=bpe_tokenizer, **kwargs)
        trainer.train()
        return trainer

    stock = sft(trl.SFTTrainer, "stock", 0.5)
    callback = GradClipCallback(strategy="norm", threshold=0.5)
    ours = sft(trl.SFTTrainer, "callback", 0.0, callbacks=[callback])
    assert callback.run.num_clips == 6
    assert [h["loss"] for h in train_logs(ours)] == [h["loss"] for h in train_logs(stock)]  # drop-in on TRL too
    assert [h["grad_norm"] for h in train_logs(ours)] == [h["grad_norm"] for h in train_logs(stock)]

    class GradClipSFTTrainer(GradClipMixin, trl.SFTTrainer):
        pass

    mixed = sft(GradClipSFTTrainer, "mixin", 1.0, clip_config=ClipConfig(strategy="zscore", threshold=1.0))
    assert mixed.clip_run.num_clips == 6
    assert all(h["gradclip/threshold"] <= 1.0 and h["grad_norm"] > 0 for h in train_logs(mixed))


# ---------------------------------------------------------------- clip BEFORE optimizer.step()
class WeightProbe(TrainerCallback):
    """Records ||w_after - w_before|| of every optimizer step."""

    def __init__(self):
        self.deltas, self._before = [], None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        self.deltas.append(torch.linalg.vector_norm(after - self._before).item())


@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_weight_update_is_bounded_by_threshold(tmp_path, dataset, entry):
    threshold = 0.05
    model = tiny_llama(0)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)
    probe = WeightProbe()
    args = make_args(tmp_path, max_steps=4, max_grad_norm=1.0, weight_decay=0.0)  # user's 1.0 must not win
    if entry == "trainer":
        trainer = GradClipTrainer(model=model, args=args, train_dataset=dataset, optimizers=(sgd, None),
                                  callbacks=[probe], clip_config=None)
        trainer.clip_session.config.threshold = threshold
        trainer.clip_session.config.strategy = "zscore"  # adaptive strategy, cap = threshold during warmup
    else:
        trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(sgd, None),
                          callbacks=[GradClipCallback(strategy="zscore", threshold=threshold), probe])
    if entry == "callback":
        with pytest.warns(UserWarning, match="max_grad_norm"):
            trainer.train()
    else:
        trainer.train()
    logs = train_logs(trainer)
    assert all(h["grad_norm"] > 10 * threshold for h in logs)  # clipping was needed
    assert len(probe.deltas) == 4
    assert all(d <= threshold * (1 + 1e-5) for d in probe.deltas), probe.deltas
    assert args.max_grad_norm == 1.0


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("entry", ["trainer", "callback"])
def test_grad_accumulation_one_clip_per_step_and_step_loss(tmp_path, dataset, entry, monkeypatch):
    seen = []
    original = GradClipper.plan  # what the integrations call (then apply_, or the fused optimizer)

    def recording_clip(self, model, step, *, loss=None, **kwargs):
        seen.append((step, None if loss is None else loss.item()))
        return original(self, model, step, loss=loss, **kwargs)

    monkeypatch.setattr(GradClipper, "plan", recording_clip)
    args = make_args(tmp_path, max_steps=4, gradient_accumulation_steps=2, max_grad_norm=0.5)
    if entry == "trainer":
        trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset)
    else:
        args.max_grad_norm = 0.0
        trainer = Trainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                          callbacks=[GradClipCallback(threshold=0.5)])
    trainer.train()
    assert [s for s, _ in seen] == [0, 1, 2, 3]  # one clip per optimizer step, at the step's index
    logged = [h["loss"] for h in train_logs(trainer)]
    # mean over the 2 micro-batches (4.57 rounds the logged loss to 4 digits)
    assert [loss for _, loss in seen] == pytest.approx(logged, rel=1e-6, abs=6e-5)


# ---------------------------------------------------------------- checkpoint and resume
def zscore_args(tmp_path, **overrides):
    return make_args(tmp_path, cls=GradClipTrainingArguments, max_steps=12, save_strategy="steps", save_steps=6,
                     clip_strategy="zscore", clip_threshold=5.0, clip_zscore_warmup_steps=3, clip_zscore_z=1.0,
                     clip_schedule="cosine", clip_threshold_final=2.0, **overrides)


def thresholds(trainer, first_step=7):
    return {h["step"]: h["gradclip/threshold"] for h in train_logs(trainer) if h["step"] >= first_step}


@pytest.mark.parametrize("restore_flag", [False, True])
def test_resume_gives_same_thresholds(tmp_path, dataset, restore_flag):
    full = GradClipTrainer(model=tiny_llama(0), args=zscore_args(tmp_path / "full"), train_dataset=dataset)
    full.train()
    expected = thresholds(full)
    assert len(expected) == 6 and len(set(expected.values())) > 1
    stats = full.clip_run.clipper.strategy.state_dict()
    assert stats["count"] == 3 and stats["var"] > 0  # the EMA is live

    resumed = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, args=zscore_args(
        tmp_path / "full", restore_callback_states_from_checkpoint=restore_flag))
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-6"))
    assert thresholds(resumed) == pytest.approx(expected, rel=1e-6)

    # without the saved state (the entry deleted, as the docs say to start fresh) the thresholds differ
    import json
    import shutil

    fresh_dir = tmp_path / "fresh"
    shutil.copytree(tmp_path / "full" / "checkpoint-6", fresh_dir / "checkpoint-6")
    state_file = fresh_dir / "checkpoint-6" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    del saved["stateful_callbacks"]["GradClipCallback"]
    state_file.write_text(json.dumps(saved))
    fresh = GradClipTrainer(model=tiny_llama(0), train_dataset=dataset, args=zscore_args(fresh_dir))
    fresh.train(resume_from_checkpoint=str(fresh_dir / "checkpoint-6"))
    assert thresholds(fresh) != pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------- PEFT / LoRA
def test_lora_only_trainable_parameters(tmp_path, dataset):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              task_type="CAUSAL_LM"))
    grads_seen = {}

    class GradProbe(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads_seen.update({n: p.grad is not None for n, p in model.named_parameters()})

    trainer = GradClipTrainer(model=model, args=make_args(tmp_path, max_steps=3, max_grad_norm=0.01),
                              train_dataset=dataset, callbacks=[GradProbe()])
    trainer.train()
    report = trainer.clip_run.last_report
    assert report.names and all("lora_" in n for n in report.names)
    assert {n for n, has in grads_seen.items() if has} == set(report.names)
    assert all(not has for n, has in grads_seen.items() if "lora_" not in n)
    assert all(h["gradclip/clip_rate"] == 1.0 for h in train_logs(trainer))


# ---------------------------------------------------------------- mixed precision
def test_bf16_on_cpu(tmp_path, dataset):
    args = make_args(tmp_path, cls=GradClipTrainingArguments, max_steps=3, bf16=True, clip_strategy="quantile",
                     clip_quantile=0.5)
    trainer = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset)
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in logs)


def test_fp16_unscaled_exactly_once(tmp_path, dataset):
    """accelerate creates no GradScaler on CPU (fp16 needs a GPU there): install a real CPU GradScaler on the
    accelerator before train(), so the AcceleratedOptimizer and backward() use it. A second unscale_ in a
    step would raise RuntimeError; a missing one would log norms 2**10 times too large."""
    for entry in ("trainer", "callback"):
        runs = {}
        for scaled in (False, True):
            args = make_args(tmp_path / f"{entry}{scaled}", max_steps=3, max_grad_norm=0.0)
            if entry == "trainer":
                t = GradClipTrainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                                    clip_config=ClipConfig(threshold=0.5))
            else:
                t = Trainer(model=tiny_llama(0), args=args, train_dataset=dataset,
                            callbacks=[GradClipCallback(threshold=0.5)])
            calls = []
            if scaled:
                scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
                original = scaler.unscale_
                scaler.unscale_ = lambda opt: (calls.append(1), original(opt))[1]
                t.accelerator.scaler = scaler
            t.train()
            runs[scaled] = (train_logs(t), len(calls))
        (plain, _), (fp16, unscales) = runs[False], runs[True]
        assert unscales == 3  # exactly once per optimizer step
        assert [h["grad_norm"] for h in fp16] == pytest.approx([h["grad_norm"] for h in plain], rel=1e-6)


def test_unscale_once_respects_scaler_stage():
    from gradclip_hf.run.compat import unscale_once

    param = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(param.sum()).backward()
    optimizer = SimpleNamespace(scaler=scaler, optimizer=inner)
    assert unscale_once(optimizer) is True and torch.equal(param.grad, torch.ones(3))
    assert unscale_once(optimizer) is False  # already unscaled this step: no RuntimeError, no second division
    assert torch.equal(param.grad, torch.ones(3))


# ---------------------------------------------------------------- compatibility checked at train start
def fake_deepspeed_trainer(clipping):
    from accelerate.utils import DistributedType

    plugin = SimpleNamespace(deepspeed_config={"gradient_clipping": clipping})
    accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(
        deepspeed_plugin=plugin, fsdp_plugin=None))
    return SimpleNamespace(is_deepspeed_enabled=True, accelerator=accelerator,
                           args=SimpleNamespace(max_grad_norm=clipping))


@pytest.mark.parametrize("version, distributed, raises", [(1, "FSDP", True), (2, "FSDP", False),
                                                           (1, "MULTI_CPU", False)])
def test_fsdp1_rejected_at_train_start(version, distributed, raises):
    # FSDP1 gradients are flat local shards: per-rank norms would differ. A plugin accelerate did not
    # apply (MULTI_CPU: it runs plain DDP) is not FSDP.
    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(distributed_type=DistributedType(distributed),
                                  state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))
    trainer = SimpleNamespace(is_deepspeed_enabled=False, accelerator=accelerator)
    if raises:
        with pytest.raises(ValueError, match=r"FSDP1 .*Use FSDP2: fsdp_config=\{'version': 2\}"):
            check_trainer(trainer, "GradClipTrainer")
    else:
        check_trainer(trainer, "GradClipTrainer")


def test_two_clippers_on_one_trainer_rejected(tmp_path, dataset):
    trainer = GradClipTrainer(model=tiny_llama(0), args=make_args(tmp_path, max_steps=1), train_dataset=dataset,
                              callbacks=[GradClipCallback()])
    with pytest.raises(ValueError, match="clipped more than once"):
        trainer.train()


# ---------------------------------------------------------------- non-finite gradients
class NaNAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_nonfinite_step(tmp_path, dataset, policy):
    probe = WeightProbe()
    model = tiny_llama(0)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model=model, args=make_args(tmp_path, max_steps=3, max_grad_norm=0.0),
                      train_dataset=dataset, optimizers=(sgd, None),
                      callbacks=[NaNAtStep(1), GradClipCallback(threshold=1.0, nonfinite=policy), probe])
    trainer.train()
    logs = train_logs(trainer)
    assert [h["gradclip/nonfinite_steps"] for h in logs] == [0, 1, 0]
    assert probe.deltas[1] == 0.0 and probe.deltas[0] > 0 and probe.deltas[2] > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
