"""The pack's skip, rollback, learning-rate schedule, per-layer norms and fp16 scaler on real ZeRO engines through
``GradClipTrainer`` (imported by ``_worker.py``, which launches one stage per process).

Every run trains the tiny Llama with AdamW (weight decay 0.1: a step that is not skipped always moves Adam's
moments and step counts) on data in order. The state a probe records is what a step can change: the fp32 master
weights (public ``safe_get_full_fp32_param``), the base torch optimizer's ``exp_avg``, ``exp_avg_sq`` and ``step``
of each flat partition (the whole optimizer state on one rank; DeepSpeed's public ``safe_get_full_optimizer_state``
raises until its fragments are linked, inside a later step) and the low-precision weights (gathered under ZeRO-3). Comparisons are ``torch.equal`` (bit-identical), made here; the tests assert on the booleans, next to
checks that the compared states did move where they must (so an equality cannot hold by doing nothing).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from transformers import TrainerCallback, TrainingArguments

from gradclip_hf.config import ClipConfig
from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments
from gradclip_hf.spikefile import FILE_NAME, read_records
from gradclip_hf.standins import ByteLMDataset, stdlib_text, tiny_llama

BATCH, LR = 4, 1e-3
SEQUENTIAL = "train_sampling_strategy" in {f.name for f in dataclasses.fields(TrainingArguments)}


def _patch_capabilities(dtype: str) -> None:
    """This CPU runs bf16 and fp16, but transformers' bf16 check asks for a GPU and DeepSpeed's fp16 check asks the
    CPU for AVX512-FP16/AMX (mkldnn): both answer no here. Patched for the run, as the research did (fp16 is thus
    verified here only with DeepSpeed's capability check patched)."""
    if dtype in ("bf16", "bf16acc"):
        import transformers.training_args as training_args
        training_args.is_torch_bf16_gpu_available = lambda: True
    if dtype == "fp16":
        from deepspeed.accelerator import get_accelerator
        get_accelerator().is_fp16_supported = lambda: True


def in_order(cls: type) -> type:
    """``cls`` (a Trainer class) with its data in order on transformers 4.57 too (5.x: the arguments'
    ``train_sampling_strategy="sequential"``, :data:`ORDER`)."""
    if SEQUENTIAL:
        return cls

    class InOrder(cls):
        def _get_train_sampler(self, *args: Any, **kwargs: Any):
            return torch.utils.data.SequentialSampler(self.train_dataset)
    return InOrder


InOrder = in_order(GradClipTrainer)
ORDER = {"train_sampling_strategy": "sequential"} if SEQUENTIAL else {}  # the arguments' part of in_order


def engine_state(trainer) -> dict[str, list[torch.Tensor]] | None:
    """Everything an optimizer step changes (``None`` before the optimizer has state)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    engine = trainer.model_wrapped
    base = engine.optimizer.optimizer.state  # per flat partition: this rank's whole optimizer state
    params = [p for p in engine.module.parameters() if p.requires_grad]
    out = {"fp32": [safe_get_full_fp32_param(p).detach().clone() for p in params]}
    for key in ("exp_avg", "exp_avg_sq", "step"):
        if base:
            out[key] = [torch.as_tensor(state[key]).detach().clone() for state in base.values()]
    with deepspeed.zero.GatheredParameters(params, enabled=int(engine.zero_optimization_stage()) == 3):
        out["low"] = [p.detach().clone() for p in params]
    return out


def equal(a, b) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in a)


def moved(a, b) -> bool:
    """Weights AND optimizer state changed (``b`` after ``a``; state that appeared counts as changed)."""
    return all(k not in a or any(not torch.equal(x, y) for x, y in zip(a[k], b[k]))
               for k in ("fp32", "exp_avg", "exp_avg_sq"))


SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class StateProbe(TrainerCallback):
    """Per step (numbered from 1): the state before it and after the engine stepped (the pack's callback runs first
    in ``on_pre_optimizer_step``), the learning rate it used, whether its report had per-layer norms, fp16's
    scaler fields."""

    def __init__(self, trainer, states: bool = True):
        self.trainer, self.states = trainer, states
        self.before, self.after, self.lr, self.layers, self.scaler, self.norm = {}, {}, {}, {}, {}, {}

    def on_step_begin(self, args, state, control, **kwargs):
        step = state.global_step + 1
        self.lr[step] = self.trainer.optimizer.param_groups[0]["lr"]
        if self.states:
            self.before[step] = engine_state(self.trainer)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if self.states:
            self.after[step] = engine_state(self.trainer)
        norm = self.trainer.model_wrapped.get_global_grad_norm()
        self.norm[step] = None if norm is None else float(norm)
        report = self.trainer.clip_run.last_report
        self.layers[step] = list(report.per_tensor_norms.tolist()) if report is not None and report.names else None
        scaler = getattr(self.trainer.model_wrapped.optimizer, "loss_scaler", None)
        if scaler is not None:
            self.scaler[step] = {k: getattr(scaler, k, None) for k in SCALER_FIELDS}


class LRAt(TrainerCallback):
    """Multiplies the learning rate the scheduler set for the given steps (a learning-rate mistake), at step begin:
    the engine steps (and its or the Trainer's scheduler sets the next rate) inside the step's last backward."""

    def __init__(self, trainer, factors: dict):
        self.trainer, self.factors = trainer, factors

    def on_step_begin(self, args, state, control, **kwargs):
        factor = self.factors.get(state.global_step + 1)
        if factor is not None:
            for group in self.trainer.optimizer.param_groups:
                group["lr"] *= factor


def ds_config(stage: int, dtype: str, engine_optimizer: bool = False, bf16: dict | None = None, **fp16: Any) -> dict:
    config = {"zero_optimization": {"stage": stage}, "gradient_clipping": "auto",
              "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
              "zero_allow_untested_optimizer": True, "bf16": {"enabled": "auto", **(bf16 or {})},
              "fp16": {"enabled": "auto", **fp16}}
    if dtype == "bf16acc":  # ZeRO-1: DeepSpeed's BF16_Optimizer (bf16 weights, fp32 gradient accumulation)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if engine_optimizer:  # the engine builds the optimizer and owns the Trainer's scheduler (DummyScheduler)
        config["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto",
                                                          "eps": "auto", "torch_adam": True}}
    return config


def train(out: str, name: str, stage: int, *, steps: int, options: dict, dtype: str = "fp32", accum: int = 1,
          drop: tuple[int, ...] = (), loss_at: dict | None = None, states: bool = True, fp16: dict | None = None,
          engine_optimizer: bool = False, bf16: dict | None = None, lr_at: dict | None = None,
          **overrides: Any) -> dict:
    """One GradClipTrainer run; ``drop``: steps (from 1) whose samples are removed from the data (a run that never
    saw those batches); ``loss_at``: {micro-batch index: loss factor}; ``lr_at``: {step (from 1): factor of the
    learning rate the scheduler set for it}."""
    _patch_capabilities(dtype)
    per_step = BATCH * accum
    blocks = ByteLMDataset(stdlib_text(40_000), block_size=64)
    removed = {i for s in drop for i in range((s - 1) * per_step, s * per_step)}
    data = torch.utils.data.Subset(blocks, [i for i in range(len(blocks)) if i not in removed])
    args = dict(output_dir=os.path.join(out, f"x{stage}_{name}"), max_steps=steps - len(drop),
                per_device_train_batch_size=BATCH, gradient_accumulation_steps=accum, learning_rate=LR,
                optim="adamw_torch", weight_decay=0.1, lr_scheduler_type="constant", warmup_steps=0, logging_steps=1,
                report_to="none", disable_tqdm=True, seed=0, data_seed=0, save_strategy="no", max_grad_norm=1.0,
                dataloader_num_workers=0, bf16=dtype in ("bf16", "bf16acc"), fp16=dtype == "fp16",
                deepspeed=ds_config(stage, dtype, engine_optimizer, bf16, **(fp16 or {})),
                # on CPU under torchrun the Trainer's accelerator counts one process per rank (docs/distributed.md),
                # so transformers 4.57's gather of the token count mismatches the real 2-rank group: not gathered
                average_tokens_across_devices=False, **ORDER)
    args.update(overrides)
    clip = {f"clip_{k}": v for k, v in options.items()}
    model = tiny_llama(seed=0)
    if loss_at:
        calls = {"n": 0}

        def hook(module, inputs, output):
            if module.training:
                factor = loss_at.get(calls["n"])
                calls["n"] += 1
                if factor is not None:
                    output.loss = output.loss * factor
            return output
        model.register_forward_hook(hook)
    trainer = InOrder(model=model, args=GradClipTrainingArguments(**args, **clip), train_dataset=data)
    if lr_at:
        trainer.add_callback(LRAt(trainer, lr_at))
    probe = StateProbe(trainer, states)
    trainer.add_callback(probe)
    trainer.train()
    engine = trainer.model_wrapped
    return {"trainer": trainer, "probe": probe, "final": engine_state(trainer) if states else None,
            "logs": [h for h in trainer.state.log_history if "loss" in h], "engine_skipped": engine.skipped_steps,
            "run": trainer.clip_run}


def _floats(logs: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in h.items()
             if isinstance(v, (int, float))} for h in logs]


# ---------------------------------------------------------------------------------------------------- the runs
SKIP, SKIP_STEPS = 2, 4  # step 2 of 4 listed; the run that drops its batches trains 3 steps


def exact(out: str, stage: int, configs: tuple = (("fp32", 1), ("fp32", 2), ("bf16", 1), ("bf16", 2)),
          bf16: dict | None = None) -> dict:
    """``clip_skip_steps`` (listed, on the host): across the skipped step nothing changes; the end equals a run that
    never saw its batches. fp32 and bf16, gradient accumulation 1 and 2; ``bf16``: DeepSpeed's bf16 section."""
    results = {}
    for dtype, accum in configs:
        key = f"{dtype}_ga{accum}"
        a = train(out, f"skip_{key}", stage, steps=SKIP_STEPS, options=dict(skip_steps=[SKIP]), dtype=dtype,
                  accum=accum, bf16=bf16)
        b = train(out, f"drop_{key}", stage, steps=SKIP_STEPS, options={}, dtype=dtype, accum=accum, drop=(SKIP,),
                  bf16=bf16)
        p = a["probe"]
        results[key] = {
            "across_skip_equal": equal(p.before[SKIP], p.after[SKIP]),
            "other_steps_moved": [moved(p.before[s], p.after[s]) for s in range(1, SKIP_STEPS + 1) if s != SKIP],
            "final_equal_dropped_run": equal(a["final"], b["final"]), "final_moved": moved(p.after[SKIP], a["final"]),
            "engine_skipped": a["engine_skipped"], "logs": _floats(a["logs"])}
    return results


SPIKE_AT = 6  # 0-based micro-batch of a x30 loss: step 7 of 8 (accumulation 1)
SPIKES = dict(spike_warmup_steps=3, spike_z=4.0)


def recommended(out: str, stage: int) -> dict:
    """``ClipConfig.recommended()`` as is: the loss-spike step is skipped; the end equals a run without its batch."""
    options = {k: v for k, v in ClipConfig.recommended(**SPIKES).non_default().items()}
    a = train(out, "recommended", stage, steps=8, options=options, loss_at={SPIKE_AT: 30.0})
    b = train(out, "recommended_drop", stage, steps=8, options={}, drop=(SPIKE_AT + 1,))
    p, spike = a["probe"], SPIKE_AT + 1
    records, _ = read_records(os.path.join(a["trainer"].args.output_dir, FILE_NAME))
    return {"spike_file": [{"step": r.step, "skipped": r.skipped, "norm": r.norm, "action": r.action,
                            "kind": r.kind} for r in records],
            "across_skip_equal": equal(p.before[spike], p.after[spike]),
            "final_equal_dropped_run": equal(a["final"], b["final"]), "engine_skipped": a["engine_skipped"],
            "events": [e.step for e in a["run"].spike_events], "logs": _floats(a["logs"])}


def schedule(out: str, stage: int) -> dict:
    """Linear schedule: the learning rates of a run with a skipped step are those of a run without any skip (as on
    the local path), with the Trainer's scheduler and with one the engine owns."""
    results = {}
    for owner in ("trainer", "engine") if stage == 2 else ("trainer",):
        common = dict(steps=6, states=False, lr_scheduler_type="linear", engine_optimizer=owner == "engine")
        skip = train(out, f"lr_skip_{owner}", stage, options=dict(skip_steps=[3]), **common)
        plain = train(out, f"lr_plain_{owner}", stage, options={}, **common)
        results[owner] = {"used_skip": list(skip["probe"].lr.values()), "used_plain": list(plain["probe"].lr.values()),
                          "logged_skip": [h["learning_rate"] for h in skip["logs"]],
                          "logged_plain": [h["learning_rate"] for h in plain["logs"]],
                          "engine_skipped": skip["engine_skipped"]}
    return results


def lr_guard(out: str, stage: int) -> dict:
    """``lr_guard=2`` (as ``recommended()``): a learning rate 10x the scheduler's at step 22 (after the guard's 20
    steps) is capped at 2x for that step; the run equals one whose rate was 2x there; the scheduler's next rate is
    its own (with the Trainer's scheduler and with one the engine owns)."""
    results = {}
    for owner in ("trainer", "engine"):
        common = dict(steps=24, lr_scheduler_type="constant", engine_optimizer=owner == "engine")
        guarded = train(out, f"lrg_{owner}", stage, options=dict(lr_guard=2.0), lr_at={22: 10.0}, **common)
        capped = train(out, f"lrg_capped_{owner}", stage, options={}, lr_at={22: 2.0}, **common)
        wild = train(out, f"lrg_wild_{owner}", stage, options={}, lr_at={22: 10.0}, **common)
        results[owner] = {"equal_capped": equal(guarded["final"], capped["final"]),
                          "equal_wild": equal(guarded["final"], wild["final"]),
                          "lr_23": guarded["probe"].lr[23], "lr_23_plain": capped["probe"].lr[23],
                          "capped": sum(h.get("gradclip/lr_capped", 0) for h in guarded["logs"])}
    return results


def rollback(out: str, stage: int, dtype: str = "fp32", detection: str = "loss") -> dict:
    """A loss spike at step 7 rolls back to the last snapshot (``spike_snapshot_every=3``: taken after the clean
    steps 1 and 5; under DeepSpeed the engine has stepped when the pack decides, so the snapshot of step s holds
    the state before step s + 1): right after the rollback the state is the one before step 6, bit for bit; the
    end equals a run without the batches of steps 6 and 7. ``detection="norm"``: a gradient-norm spike, known
    after the engine applied step 7: the rollback undoes that update too, with the same end."""
    options = dict(SPIKES, spike_detection=detection, spike_action="rollback", spike_snapshot_every=3, spike_factor=1.0)
    a = train(out, f"rollback_{detection}", stage, steps=8, options=options, loss_at={SPIKE_AT: 30.0}, dtype=dtype)
    b = train(out, "rollback_drop", stage, steps=8, options={}, drop=(6, 7), dtype=dtype)
    p = a["probe"]
    return {"optimizer": type(a["trainer"].model_wrapped.optimizer).__name__,
            "restored_equal_before_6": equal(p.after[7], p.before[6]), "step_6_moved": moved(p.before[6], p.before[7]),
            "events": [e.step for e in a["run"].spike_events], "engine_skipped": a["engine_skipped"],
            "final_equal_dropped_run": equal(a["final"], b["final"]), "rollbacks": a["run"].rollbacks,
            "snapshot_bytes": a["run"].actions.snapshot.nbytes(),
            "params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                          for p in a["trainer"].model_wrapped.module.parameters())}


def fp16(out: str, stage: int, at_min: bool = True) -> dict:
    """fp16 (DeepSpeed's CPU capability check patched): a listed skip leaves the weights, Adam and the dynamic loss
    scaler as a run that never saw the batch; at the scaler's minimum (scale 1, hysteresis 1) it does not raise."""
    results = {}
    scalers = {"hysteresis2": dict(initial_scale_power=8, hysteresis=2, min_loss_scale=1),
               "at_min": dict(initial_scale_power=0, hysteresis=1, min_loss_scale=1)}
    for name, scaler in list(scalers.items())[:2 if at_min else 1]:
        a = train(out, f"fp16_{name}", stage, steps=SKIP_STEPS, options=dict(skip_steps=[SKIP]), dtype="fp16",
                  fp16=scaler)
        b = train(out, f"fp16_{name}_drop", stage, steps=SKIP_STEPS, options={}, dtype="fp16", fp16=scaler,
                  drop=(SKIP,))
        pa, pb = a["probe"], b["probe"]
        results[name] = {"across_skip_equal": equal(pa.before[SKIP], pa.after[SKIP]),
                         "final_equal_dropped_run": equal(a["final"], b["final"]),
                         "scaler_end": pa.scaler[SKIP_STEPS], "scaler_end_dropped": pb.scaler[SKIP_STEPS - 1],
                         "engine_skipped": a["engine_skipped"], "logs": _floats(a["logs"])}
    return results


def layers(out: str, stage: int, dtype: str = "fp32") -> dict:
    """Per-layer norms at logging steps (every 2nd) and at a loss-spike step whose update is applied (tighten);
    their root sum of squares against the engine's norm; what the logs carry."""
    options = dict(spike_detection="loss", log_layers_top_k=1000, **SPIKES)
    a = train(out, "layers", stage, steps=8, options=options, loss_at={SPIKE_AT: 30.0}, states=False, logging_steps=2,
              dtype=dtype)
    rows = a["trainer"].state.log_history
    records, _ = read_records(os.path.join(a["trainer"].args.output_dir, FILE_NAME))
    return {"optimizer": type(a["trainer"].model_wrapped.optimizer).__name__,
            "spike_file": [{"step": r.step, "top_layers": r.top_layers, "norm": r.norm} for r in records]
            if int(os.environ.get("RANK", "0")) == 0 else None,  # rank 0 writes it (another could read it too early)
            "read_at": [s for s, v in a["probe"].layers.items() if v is not None], "engine_norm": a["probe"].norm,
            "root_sum_squares": {s: math.sqrt(sum(x * x for x in v)) for s, v in a["probe"].layers.items() if v},
            "logs": _floats([h for h in rows if "loss" in h]), "n_params": len(a["run"].backend.names),
            "spike_layer_keys": sorted({k for h in rows for k in h if "/spike_layer/" in k}),
            "layer_keys": sorted({k for h in rows for k in h if "/layer/" in k})}


def wandb_extras(out: str, stage: int) -> dict:
    """W&B (offline) under DeepSpeed: per-layer keys, the histogram (every 2nd logging step), the spike table and a
    spike alert; the test reads the run back with wandb's own reader (tests/logging/wandb_records.py)."""
    import wandb

    root = os.path.join(out, f"wandb_s{stage}")
    os.makedirs(root, exist_ok=True)
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=root, WANDB_SILENT="true", WANDB_PROJECT="gradclip-ds",
                      WANDB_CONSOLE="off")
    options = dict(spike_detection="loss", log_layers_top_k=3, wandb_histogram_every=2, **SPIKES)
    try:
        a = train(out, "wandb", stage, steps=8, options=options, loss_at={SPIKE_AT: 30.0}, states=False,
                  logging_steps=2, report_to=["wandb"])
    finally:
        wandb.finish()
        os.environ["WANDB_MODE"] = "disabled"
    return {"root": root, "logs": _floats(a["logs"]), "layers": len(a["run"].backend.names),
            "last_layer_norms": len(a["run"].last_layer_norms), "events": [e.step for e in a["run"].spike_events]}


def bench_layers(out: str, stage: int) -> dict:
    """benchmarks/deepspeed_layers.py for a few tiny steps (its smoke test: it runs and writes what parses)."""
    from benchmarks import deepspeed_layers
    from gradclip_hf.integrations.deepspeed.engine import EngineStep

    before = EngineStep.__dict__["_read_layers"]
    result = deepspeed_layers.main(["--stages", str(stage), "--steps", "3", "--warmup", "1", "--repeats", "1",
                                    "--hidden", "32", "--layers", "1", "--block", "32", "--text_bytes", "20000",
                                    "--out", os.path.join(out, "bench_layers")])
    with open(os.path.join(out, "bench_layers.md")) as f:
        return {"results": result["results"], "md": f.read(),
                "read_restored": EngineStep.__dict__["_read_layers"] is before}


RUNS = {"bench_layers": bench_layers, "exact": exact, "lr_guard": lr_guard,
        "rollback_norm": lambda out, stage: rollback(out, stage, detection="norm"),
        "exact_nocheck": lambda out, stage: exact(out, stage, (("bf16", 2),), bf16={"check_grad_overflow": False}),
        "exact_fp32_ga2": lambda out, stage: exact(out, stage, (("fp32", 2),)),
        "exact_bf16acc": lambda out, stage: exact(out, stage, (("bf16acc", 1), ("bf16acc", 2))),
        "recommended": recommended, "schedule_lr": schedule, "rollback": rollback,
        "rollback_bf16acc": lambda out, stage: rollback(out, stage, "bf16acc"),
        "layers": layers, "layers_bf16acc": lambda out, stage: layers(out, stage, "bf16acc"),
        "fp16": fp16, "fp16_hysteresis": lambda out, stage: fp16(out, stage, at_min=False), "wandb": wandb_extras}
