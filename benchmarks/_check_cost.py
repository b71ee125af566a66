"""gpu_check section ``cost``: clip + fused AdamW step against ``clip_grad_norm_`` + the same step on a
0.5 B-parameter gradient set (``clip_kernel.py``'s methods and interleaved timing), and the Trainer's
step time with ``recommended()`` against the stock Trainer on a ~100 M-parameter model in bf16."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import clip_kernel
import overhead
from _check_base import Context, deadline_callback, llama, parameters, quiet, text_blocks, trainer_args
from _common import median

BASE = "torch clip_grad_norm_ + AdamW(fused)"
FLOOR = "norm pass alone + AdamW(fused) (floor)"


def kernel(ctx: Context) -> dict[str, Any]:
    p = ctx.plan
    shapes = clip_kernel.model_shapes(**clip_kernel.PRESETS[p.kernel_preset])
    grads = clip_kernel.Grads(shapes, ctx.device)
    fns = clip_kernel.step_methods(grads)
    opts = argparse.Namespace(warmup=p.kernel_warmup, repeats=p.kernel_repeats)
    rows = clip_kernel.rows_of(clip_kernel.time_interleaved(fns, grads, opts, ctx.cuda), BASE)
    for row in rows.values():
        row["vs_floor"] = row["ms"] / rows[FLOOR]["ms"]
    return {"preset": p.kernel_preset, "parameters": parameters(grads), "tensors": len(shapes),
            "repeats": p.kernel_repeats, "warmup": p.kernel_warmup, "rows": rows}


def _throughput(ctx: Context, untimed: int):
    """Wall time per step from the end of step ``untimed`` to the end of the run (device synchronised at
    both ends only)."""
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        start = end = None

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in (untimed, args.max_steps):
                ctx.sync()
                if state.global_step == untimed:
                    self.start = time.perf_counter()
                else:
                    self.end = time.perf_counter()

    return Throughput()


def _model(ctx: Context):
    """A fresh ~100 M-parameter model per run (accelerate wraps a prepared model's forward: never reused)."""
    p = ctx.plan
    return llama(ctx, 0, p.trainer_hidden, p.trainer_layers, heads=p.trainer_heads, intermediate=p.trainer_intermediate,
                 positions=p.trainer_block)


def _timed_run(ctx: Context, name: str, dataset, steps: int) -> dict[str, Any]:
    from transformers import Trainer

    from gradclip_hf import ClipConfig
    from gradclip_hf.integrations.transformers import GradClipTrainer

    p = ctx.plan
    model = _model(ctx)
    args = trainer_args(ctx, os.path.join(ctx.tmp, f"cost-{name}"), max_steps=steps, max_grad_norm=1.0,
                        per_device_train_batch_size=p.trainer_batch)
    if name == "stock":
        trainer = Trainer(model=model, args=args, train_dataset=dataset)
    else:
        trainer = GradClipTrainer(model=model, args=args, train_dataset=dataset, clip_config=ClipConfig.recommended())
    throughput, cycles = _throughput(ctx, min(p.trainer_untimed, steps - 1)), overhead.step_timer()
    for callback in (throughput, cycles, deadline_callback(ctx)):
        trainer.add_callback(callback)
    quiet(trainer).train()
    timed = steps - min(p.trainer_untimed, steps - 1)
    per_step = (throughput.end - throughput.start) / timed if throughput.end else float("nan")
    return {"per_step_s": per_step, "cycle_s": median(cycles.cycle[p.trainer_untimed:]), "params": parameters(model)}


def trainer_ratio(ctx: Context) -> dict[str, Any]:
    """stock / recommended / recommended / stock ... (order alternated per repeat), each run a fresh
    model of the same seed (the same initial weights)."""
    p = ctx.plan
    dataset = text_blocks(p.trainer_block, p.trainer_batch * p.trainer_steps)
    names = ["stock", "recommended"]
    for name in names:  # untimed: kernels, allocator and imports warm
        _timed_run(ctx, name, dataset, min(p.trainer_untimed, p.trainer_steps - 1) + 1)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(p.trainer_repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            runs[name].append(_timed_run(ctx, name, dataset, p.trainer_steps))
    ratios = [b["per_step_s"] / a["per_step_s"] for a, b in zip(runs["stock"], runs["recommended"])]
    cycle = [b["cycle_s"] / a["cycle_s"] for a, b in zip(runs["stock"], runs["recommended"])]
    return {"parameters": runs["stock"][0]["params"], "hidden": p.trainer_hidden, "layers": p.trainer_layers,
            "block": p.trainer_block, "batch": p.trainer_batch, "steps": p.trainer_steps,
            "untimed": p.trainer_untimed, "repeats": p.trainer_repeats, "runs": runs,
            "ms_per_step": {n: 1e3 * median([x["per_step_s"] for x in runs[n]]) for n in names},
            "ratio": median(ratios), "ratios": ratios, "cycle_ratio": median(cycle)}


def cost(ctx: Context) -> dict[str, Any]:
    out: dict[str, Any] = {"checks": [], "note": "timings: recorded, not pass/fail (ratios of interleaved runs)"}
    out["kernel"] = kernel(ctx)
    ctx.release()
    out["trainer"] = trainer_ratio(ctx)
    return out
