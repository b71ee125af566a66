"""gpu_check section ``scale``: the gallery's evidence at one real scale.

A byte-level Llama of >= 50 M parameters trains ``scale_steps`` steps on standard-library text (bf16, fused
AdamW, cosine schedule), stock ``Trainer(max_grad_norm=1.0)`` against ``ClipConfig.recommended()``, one seed,
each with and without a fault, for two faults:

* ``corrupt_shard``: the gallery's fault (``scenarios.SCENARIOS["corrupt_shard"]``): ``scale_fault_length``
  consecutive steps from half-way whose batches are the same text in UTF-16;
* ``corrupt_microbatch``: gradient accumulation over ``scale_ga`` micro-batches (4; halved while its four runs
  would not fit the time left), the same steps, but only the LAST micro-batch of each is in UTF-16 (a bad
  shard mixed into the stream: the step loss sees a quarter of it).

Damage = eval loss with the fault minus without (same method, seed, data order and steps; the clean run trains
on the batches the bad ones displaced): :func:`metrics.damage`, the gallery's definition. Removed share =
1 - damage / stock's damage. False-positive cost = the clean run's eval loss minus stock's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

from _check_base import Checks, Context, deadline_callback, faults, llama, methods, metrics, parameters, quiet, \
    scenarios, tasks

SEED = 0
METHODS = ("stock", "recommended")


def settings(ctx: Context) -> "tasks.Settings":
    p = ctx.plan
    return tasks.Settings(steps=p.scale_steps, lr=p.scale_lr, warmup=p.scale_warmup, schedule="cosine",
                          hidden=p.scale_hidden, layers=p.scale_layers, block=p.scale_block, batch=p.scale_batch,
                          train_bytes=min(p.scale_steps * p.scale_batch * p.scale_block, 4_000_000),
                          eval_bytes=4 * p.scale_eval_blocks * p.scale_block, eval_blocks=p.scale_eval_blocks,
                          optim="adamw_torch_fused")


def last_microbatch(micro: int) -> Callable:
    """A batch fault on the last ``micro`` items of a step (its last micro-batch) only."""
    def fault(clean, step, seed):
        return list(clean[:-micro]) + faults.utf16_shard(clean[-micro:], step, seed)
    return fault


def fault_plan(ctx: Context) -> dict[str, dict[str, Any]]:
    p = ctx.plan
    shard = dataclasses.replace(scenarios.scenario("corrupt_shard"), length=p.scale_fault_length)
    steps = shard.fault_steps(p.scale_steps)
    return {"corrupt_shard": {"ga": 1, "fault": faults.utf16_shard, "steps": steps},
            "corrupt_microbatch": {"ga": p.scale_ga, "fault": None, "steps": steps}}


def fitting_ga(ctx: Context, one_run_s: float) -> tuple[int, str]:
    """The largest accumulation (``scale_ga``, halved down to 2) whose four runs fit the time left, from the
    time of a run without accumulation (run time taken as growing with the micro-batches: x 0.85 per one)."""
    ga = ctx.plan.scale_ga
    while ga > 2 and 4 * 1.1 * 0.85 * ga * one_run_s > ctx.left():
        ga //= 2
    return ga, f"{ctx.left():.0f} s left, a run without accumulation took {one_run_s:.0f} s"


def train(ctx: Context, s, data, method: str, fault: dict[str, Any], faulted: bool) -> dict[str, Any]:
    p, ga = ctx.plan, fault["ga"]
    stream = faults.StepStream(data.train, s.batch, fault["steps"] if faulted else (),
                               fault["fault"] if faulted else None, SEED)
    kwargs = tasks.trainer_arguments(s, "pretrain", SEED, os.path.join(ctx.tmp, "scale"), use_cpu=not ctx.cuda,
                                     bf16=True, logging_steps=10, per_device_train_batch_size=s.batch // ga,
                                     gradient_accumulation_steps=ga, dataloader_pin_memory=ctx.cuda)
    model = llama(ctx, SEED, p.scale_hidden, p.scale_layers, heads=p.scale_heads, positions=2 * p.scale_block)
    trainer = methods.method(method).build(kwargs, model=model, train_dataset=stream, eval_dataset=data.eval)
    deadline = deadline_callback(ctx)
    trainer.add_callback(deadline)
    start = time.perf_counter()
    quiet(trainer).train()
    ctx.sync()
    seconds = time.perf_counter() - start
    run = getattr(trainer, "clip_run", None)
    spikes = sorted(e.step - 1 for e in run.spike_events) if run is not None else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"eval_loss": float(trainer.evaluate()["eval_loss"]), "train_s": seconds, "params": parameters(model),
            "steps_done": trainer.state.global_step, "cut_short": deadline.hit,
            "last_train_loss": losses[-1] if losses else None,
            "skipped_steps": run.skipped_steps if run is not None else None, "spike_steps": spikes}


def _summarise(runs: dict[str, dict[str, Any]], fault_steps: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in METHODS:
        clean, faulted = runs.get(f"{m} clean"), runs.get(f"{m} faulted")
        if clean and faulted:
            out[m] = {"damage": metrics.damage(faulted, clean), "clean_eval": clean["eval_loss"],
                      "faulted_eval": faulted["eval_loss"]}
            if faulted["spike_steps"] is not None:
                out[m]["fault_steps_flagged"] = len(set(faulted["spike_steps"]) & set(fault_steps))
                out[m]["clean_steps_flagged"] = len(set(clean["spike_steps"]))
    if "stock" in out and "recommended" in out:
        stock = out["stock"]["damage"]
        out["removed"] = 1 - out["recommended"]["damage"] / stock if stock > 0 else float("nan")
        out["fp_cost"] = out["recommended"]["clean_eval"] - out["stock"]["clean_eval"]
    return out


def _runs(ctx: Context, s, data, fault: dict[str, Any], seconds: dict[int, float]) -> dict[str, dict[str, Any]]:
    """The four runs of one fault; one that would not end before the deadline is not started."""
    runs: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        for faulted in (False, True):
            key = f"{method} {'faulted' if faulted else 'clean'}"
            need = 1.05 * seconds.get(fault["ga"], 0.0)
            if ctx.left() < need:
                runs[key] = {"skipped": f"not started: {ctx.left():.0f} s left, a run takes about {need:.0f} s"}
                continue
            start = time.perf_counter()
            runs[key] = train(ctx, s, data, method, fault, faulted)
            seconds[fault["ga"]] = time.perf_counter() - start
    return runs


def scale(ctx: Context) -> dict[str, Any]:
    s, checks, plan = settings(ctx), Checks(), fault_plan(ctx)
    data = tasks.task_data("pretrain", s, SEED)
    result: dict[str, Any] = {"checks": checks.items, "settings": dataclasses.asdict(s), "faults": {}}
    seconds: dict[int, float] = {}  # accumulation steps -> wall time of the last such run
    for name, fault in plan.items():
        if fault["fault"] is None:  # the accumulation fault: as many micro-batches as the time left allows
            fault["ga"], result["ga_choice"] = fitting_ga(ctx, seconds.get(1, 0.0))
            fault["fault"] = last_microbatch(s.batch // fault["ga"])
        runs = _runs(ctx, s, data, fault, seconds)
        done = {k: v for k, v in runs.items() if "eval_loss" in v and not v["cut_short"]}
        result["faults"][name] = {"ga": fault["ga"], "fault_steps": fault["steps"], "runs": runs,
                                  "summary": _summarise(done, fault["steps"])}
        checks.check(f"{name}: all four runs trained {s.steps} steps with a finite eval loss",
                     len(done) == 4 and all(math.isfinite(r["eval_loss"]) for r in done.values()),
                     f"{len(done)} of 4 complete")
        clean = done.get("stock clean")
        if clean:
            checks.check(f"{name}: the stock clean run learned (eval loss below the uniform "
                         f"{metrics.DIVERGED_LOSS:.2f} by 1 nat)", clean["eval_loss"] < metrics.DIVERGED_LOSS - 1,
                         f"eval loss {clean['eval_loss']:.4f}")
    result["parameters"] = next((r["params"] for f in result["faults"].values() for r in f["runs"].values()
                                 if "params" in r), None)
    return result
