"""Real QLoRA on CPU: a tiny Llama saved and reloaded in 4-bit nf4 with double quantization (bitsandbytes),
``prepare_model_for_kbit_training`` + LoRA, and ``GradClipTrainer``.

Hidden size 512 and r=8 give adapters of >= 4096 elements, so bitsandbytes' 8-bit optimizers keep 8-bit
(uint8) state for them (below ``min_8bit_size=4096`` they fall back to fp32 state). Those optimizers are not
torch fused optimizers: the pack clips in place and skips by hiding the gradients (one host read per step).
"""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainerCallback  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.standins import ByteLMDataset, SpikyByteStream, stdlib_text, tiny_llama  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipTrainer  # noqa: E402

from helpers import make_args, train_logs  # noqa: E402

pytestmark = pytest.mark.slow
HIDDEN, STEPS, SPIKE = 512, 14, 10  # SPIKE: 0-based optimizer step of the rare-byte batch (global_step 11)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama_512")
    tiny_llama(0, hidden_size=HIDDEN).save_pretrained(str(path))
    return path


def qlora(path):
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(path), quantization_config=config, device_map="cpu")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.model.layers[0].self_attn.q_proj.weight.quant_state.quant_type == "nf4"
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=TARGETS)
    return peft.get_peft_model(model, lora)


def _state(optimizer, params):
    return [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()} for p in params
            if p in optimizer.state]


class Recorder(TrainerCallback):
    """After each step (test only: host reads): the report's names and flags, the trainable weights and the
    optimizer state (bitsandbytes keeps int step counters next to its tensors)."""

    def __init__(self, trainer):
        self.trainer, self.reports, self.weights, self.states = trainer, {}, {}, {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step, run = state.global_step - 1, self.trainer.clip_run
        r = run.last_report
        self.reports[step] = {**r.to_floats(), "names": list(r.names),
                              "spike": bool(r.spike.spike) if r.spike is not None else False}
        params = [p for p in model.parameters() if p.requires_grad]
        self.weights[step] = [p.detach().clone() for p in params]
        self.states[step] = _state(getattr(optimizer, "optimizer", optimizer), params)


def train(tmp_path, saved_model, optim, config, spike_steps=(SPIKE,)):
    data = SpikyByteStream(ByteLMDataset(stdlib_text(60_000), 64, 96), spike_steps=spike_steps, samples_per_step=4)
    args = make_args(tmp_path, max_steps=STEPS, learning_rate=1e-2, optim=optim)
    trainer = GradClipTrainer(model=qlora(saved_model), args=args, train_dataset=data, clip_config=config)
    recorder = Recorder(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    return trainer, recorder


def equal(a, b):
    if isinstance(a, list):
        return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def spike_config(action):
    rollback = {"spike_snapshot_every": 4} if action == "rollback" else {}
    return ClipConfig(spike_detection="loss", spike_action=action, spike_warmup_steps=5, spike_ratio=1.3, **rollback)


def test_only_the_adapters_are_measured_and_clipped(tmp_path, saved_model):
    trainer, recorder = train(tmp_path, saved_model, "adamw_torch", ClipConfig(threshold=0.05), spike_steps=())
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS) * 2 and all("lora_" in n for n in trainable)
    for step, r in recorder.reports.items():
        assert r["names"] == trainable, step  # no 4-bit base weight, embedding or lm_head among them
        assert r["clipped"] and r["norm_post"] == pytest.approx(0.05, rel=1e-4), step
    base = trainer.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.dtype == torch.uint8 and not base.requires_grad


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "paged_adamw_8bit"])
@pytest.mark.parametrize("action", ["tighten", "skip", "rollback", "stop"])
def test_bnb_8bit_optimizers_with_every_spike_action(tmp_path, saved_model, optim, action):
    trainer, recorder = train(tmp_path, saved_model, optim, spike_config(action))
    inner = trainer.optimizer.optimizer
    assert type(inner).__module__.startswith("bitsandbytes") and getattr(inner, "is_paged", False) == (
        optim == "paged_adamw_8bit")
    assert {s["state1"].dtype for s in recorder.states[SPIKE]} == {torch.uint8}  # the 8-bit state path
    assert [s for s, r in recorder.reports.items() if r["spike"]] == [SPIKE]
    w, st = recorder.weights, recorder.states
    logs = {h["step"]: h for h in train_logs(trainer)}
    assert logs[SPIKE + 1]["gradclip/spike_factor"] == pytest.approx(0.5)  # tightened in every action
    if action == "tighten":
        assert not equal(w[SPIKE - 1], w[SPIKE]) and logs[SPIKE + 1]["gradclip/skipped_steps"] == 0
    elif action == "skip":
        assert equal(w[SPIKE - 1], w[SPIKE]) and equal(st[SPIKE - 1], st[SPIKE])  # bit-identical around it
        assert not equal(w[SPIKE], w[SPIKE + 1])  # the next update is applied
    elif action == "rollback":
        earlier = [s for s in range(SPIKE - 1) if equal(w[s], w[SPIKE])]
        assert earlier and not equal(w[SPIKE - 1], w[SPIKE]), "not rolled back to an earlier snapshot"
        assert equal(st[earlier[0]], st[SPIKE]) and trainer.clip_run.rollbacks == 1
    else:
        assert trainer.state.global_step == SPIKE + 1 and equal(w[SPIKE - 1], w[SPIKE])
        assert any("gradclip/stop_reason" in h for h in trainer.state.log_history)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters() if p.requires_grad)
