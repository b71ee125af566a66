"""DeepSpeed worker: real ZeRO engines on CPU through the Hugging Face Trainer, launched by ``tests/deepspeed``.

``DS_ACCELERATOR=cpu torchrun --nproc_per_node 1 _worker.py OUT_DIR STAGE [RUN ...]`` runs each RUN (below, and
``_exact.RUNS``: skip, rollback, schedule, per-layer norms, fp16, W&B with AdamW; ``_gate.RUNS``: the micro-batch
gate) with ZeRO stage STAGE and writes ``OUT_DIR/stage<STAGE>.json``; the runs below use plain SGD and record:
per run and optimizer step the threshold the pack set on the engine (``engine.optimizer.clip_grad`` when the step ran), the engine's pre-clip norm, the post-clip norm
MEASURED from the weights (plain SGD: ``|w_after - w_before| / lr``, fp32 master weights gathered with
``deepspeed.utils.safe_get_full_fp32_param``), the run's report, and the logs. Errors raised by ``train()`` are
recorded (type and message), with the engine's ``clip_grad`` after the exit.
"""

from __future__ import annotations

import json
import math
import os
import sys
import traceback

import torch

torch.set_num_threads(1)

from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import _exact  # noqa: E402
import _gate  # noqa: E402
from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama  # noqa: E402
from gradclip_hf.integrations.transformers import (GradClipCallback,  # noqa: E402
                                                   GradClipTrainingArguments)

OUT, STAGE, RUNS = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
LR, STEPS, BATCH, SPIKE_STEP = 0.1, 8, 4, 6  # plain SGD: post-clip norm = |weight change| / LR
METRICS = ("loss", "grad_norm", "gradclip/norm_post", "gradclip/threshold", "gradclip/clip_rate", "gradclip/coef",
           "gradclip/spikes", "gradclip/spike_factor", "gradclip/nonfinite_steps", "gradclip/skipped_steps")


def _f(value):
    value = float(value)
    return None if math.isnan(value) else value


def ds_config(stage: int, **zero) -> dict:
    return {"zero_optimization": {"stage": stage, **zero}, "gradient_clipping": "auto",
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "zero_allow_untested_optimizer": True, "bf16": {"enabled": False}, "fp16": {"enabled": False}}


class Probe(TrainerCallback):
    """Weights before the step (``on_step_begin``) and after it (``on_pre_optimizer_step``: the engine has
    stepped inside backward); the engine's ``clip_grad`` the step ran with; the run's report."""

    def __init__(self, trainer, source):
        self.trainer, self.source, self.rows, self.before = trainer, source, [], None
        self.clip_grad_at_begin = None

    def _flat(self):
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        return torch.cat([safe_get_full_fp32_param(p).detach().reshape(-1).double() for p in params])

    def on_train_begin(self, args, state, control, **kwargs):
        self.clip_grad_at_begin = float(self.trainer.model_wrapped.optimizer.clip_grad)

    def on_step_begin(self, args, state, control, **kwargs):
        self.before = self._flat()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        engine = self.trainer.model_wrapped
        run = self.source.clip_run if hasattr(self.source, "clip_run") else self.source.run
        report = run.last_report.to_floats()
        delta = self._flat() - self.before
        row = {"step": state.global_step, "clip_grad": float(engine.optimizer.clip_grad),
               "engine_norm": _f(engine.get_global_grad_norm()), "measured_post": _f(delta.norm() / LR),
               "changed": bool(delta.abs().max() > 0), **{k: _f(v) for k, v in report.items()}}
        spike = run.last_report.spike
        if spike is not None:
            row.update(spike=bool(spike.spike), loss_spike=bool(spike.loss_spike), factor=_f(spike.factor))
        self.rows.append(row)


class RaiseAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


def build(name: str, options: dict, *, bare: bool = False, loss_at: dict | None = None,
          ds_zero: dict | None = None, resume: str | None = None, steps: int = STEPS, save_steps: int | None = None,
          max_grad_norm: float = 1.0, accum: int = 1):
    args = dict(output_dir=os.path.join(OUT, f"s{STAGE}_{name}"), max_steps=steps, per_device_train_batch_size=BATCH,
                learning_rate=LR, optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
                report_to="none", disable_tqdm=True, seed=0, data_seed=0, **_exact.ORDER,
                dataloader_num_workers=0, max_grad_norm=max_grad_norm, deepspeed=ds_config(STAGE, **(ds_zero or {})),
                save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                gradient_accumulation_steps=accum, clip_log_layers_top_k=0 if bare else 8)
    blocks = ByteLMDataset(stdlib_text(40_000), block_size=64)
    model = tiny_llama(seed=0)
    if loss_at:  # {optimizer step: loss multiplier} (1 micro-batch per step): a loss spike, or NaN
        counter = {"calls": 0}

        def hook(module, inputs, output):  # counts forward calls: micro-batches
            if module.training:
                factor = loss_at.get(counter["calls"])
                counter["calls"] += 1
                if factor is not None:
                    output.loss = output.loss * factor
            return output
        model.register_forward_hook(hook)
    if bare:
        callback = GradClipCallback(**options)
        trainer = _exact.in_order(Trainer)(model=model, args=GradClipTrainingArguments(**args), train_dataset=blocks,
                          callbacks=[callback])
        source = callback
    else:
        clip = {f"clip_{k}": v for k, v in options.items()}
        trainer = _exact.InOrder(model=model, args=GradClipTrainingArguments(**args, **clip), train_dataset=blocks)
        source = trainer
    probe = Probe(trainer, source)
    trainer.add_callback(probe)
    return trainer, probe, resume


def run(name: str, options: dict, crash_at: int | None = None, **kwargs) -> dict:
    trainer, probe, resume = build(name, options, **kwargs)
    if crash_at is not None:
        trainer.add_callback(RaiseAt(crash_at))
    out: dict = {"name": name}
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Exception as error:  # recorded: the tests check refusals by type and message
        out["error"] = {"type": type(error).__name__, "message": str(error),
                        "trace": traceback.format_exc()[-2000:]}
    engine = trainer.model_wrapped
    optimizer = getattr(engine, "optimizer", None)
    out.update(rows=probe.rows, clip_grad_at_begin=probe.clip_grad_at_begin,
               clip_grad_after=float(optimizer.clip_grad) if hasattr(optimizer, "clip_grad") else None,
               logs=[{k: h[k] for k in METRICS if k in h} | {"step": h["step"]}
                     for h in trainer.state.log_history if "loss" in h],
               layer_keys=sorted({k for h in trainer.state.log_history for k in h if "/layer/" in k}))
    session_run = trainer.clip_run if hasattr(trainer, "clip_run") else None
    if session_run is not None:
        out["state"] = session_run.state_dict()
        out["events"] = [e.step for e in session_run.spike_events]
    return out


SPIKES = dict(spike_detection="loss", spike_warmup_steps=3, spike_z=4.0)
NORM = dict(SPIKES, spike_detection="norm")
ZSCORE = dict(strategy="zscore", threshold=5.0, zscore_warmup_steps=3, zscore_z=0.5)
SPIKY = {SPIKE_STEP: 30.0}  # the loss (and gradients) of one step x30
RUN_TABLE = {
    "schedule": lambda: run("schedule", dict(threshold=1.0, schedule="linear", threshold_final=0.1, schedule_steps=6)),
    "measure": lambda: run("measure", dict(strategy="none")),
    "spike": lambda: run("spike", dict(threshold=0.5, **SPIKES), loss_at=SPIKY),
    "spike_bare": lambda: run("spike_bare", dict(threshold=0.5, **SPIKES), loss_at=SPIKY, bare=True),
    "accum": lambda: run("accum", dict(threshold=0.5, **SPIKES), accum=2, loss_at={2 * SPIKE_STEP + 1: 30.0}),
    "stop": lambda: run("stop", dict(threshold=0.5, spike_action="stop", **SPIKES), loss_at=SPIKY),
    "norm_spike": lambda: run("norm_spike", dict(threshold=0.5, **NORM), loss_at=SPIKY),
    "norm_stop": lambda: run("norm_stop", dict(threshold=0.5, spike_action="stop", **NORM), loss_at=SPIKY),
    "zscore": lambda: run("zscore", ZSCORE, loss_at=SPIKY),
    "quantile": lambda: run("quantile", dict(strategy="quantile", quantile=0.5)),
    "nonfinite": lambda: run("nonfinite", dict(threshold=1.0), loss_at={3: float("nan")}, steps=5),
    "raise": lambda: run("raise", dict(threshold=1.0, nonfinite="raise"), loss_at={3: float("nan")}, steps=5),
    "zero_clip": lambda: run("zero_clip", dict(threshold=0.3), steps=3, max_grad_norm=0.0),
    "crash": lambda: run("crash", dict(threshold=0.3), crash_at=2),
    "refuse_skip": lambda: run("refuse_skip", dict(spike_detection="both", spike_action="skip")),
    "refuse_nograd": lambda: run("refuse_nograd", dict(threshold=0.3), ds_zero={"compute_grad_norm": False},
                                 max_grad_norm=0.0),
}


def resume_runs() -> dict:
    options = dict(ZSCORE, **SPIKES)
    full = run("resume_full", options, loss_at=SPIKY, save_steps=4)
    ckpt = os.path.join(OUT, f"s{STAGE}_resume_full", "checkpoint-4")
    resumed = run("resume_from4", options, loss_at={SPIKE_STEP - 4: SPIKY[SPIKE_STEP]}, resume=ckpt)
    saved = {}
    for root, _, files in os.walk(ckpt):
        for f in files:
            if f.endswith("optim_states.pt"):
                state = torch.load(os.path.join(root, f), map_location="cpu", weights_only=False)
                sd = state.get("optimizer_state_dict", state)
                saved[f] = float(sd["clip_grad"]) if isinstance(sd, dict) and "clip_grad" in sd else None
    return {"full": full, "resumed": resumed, "saved_clip_grad": saved}


def main() -> None:
    """Each RUN of this stage; ``NAME@S`` runs ``_exact``'s NAME on ZeRO stage S (several stages in one launch).
    With several ranks each writes its own file (``stage<STAGE>_r<RANK>.json``; rank 0 ``stage<STAGE>.json``)."""
    results = {"stage": STAGE}
    for name in RUNS:
        base, _, on = name.partition("@")
        runs = {**_exact.RUNS, **_gate.RUNS}
        if base in runs:
            results[name] = runs[base](OUT, int(on) if on else STAGE)
        else:
            results[name] = resume_runs() if name == "resume" else RUN_TABLE[name]()
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(OUT, f"stage{STAGE}" + (f"_r{rank}" if rank else "") + ".json"), "w") as f:
        json.dump(results, f)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
