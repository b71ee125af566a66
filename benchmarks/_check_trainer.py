"""gpu_check sections ``syncs`` and ``identity``: host syncs per step through the Trainer, and the drop-in
``GradClipCallback()`` against the stock Trainer."""

from __future__ import annotations

import collections
import os
from typing import Any

import torch

from _check_base import Checks, Context, HostReads, deadline_callback, max_abs_diff, quiet, small_model, text_blocks, \
    trainer_args


def _trainer(ctx: Context, kind: str, name: str, dataset, steps: int, precision: str = "bf16", **args: Any):
    """``stock``: Trainer(max_grad_norm=1.0); ``recommended``: GradClipTrainer(ClipConfig.recommended());
    ``callback``: the stock Trainer with a bare ``GradClipCallback()`` (the drop-in)."""
    from transformers import Trainer

    from gradclip_hf import ClipConfig
    from gradclip_hf.integrations.transformers import GradClipCallback, GradClipTrainer

    p = ctx.plan
    targs = trainer_args(ctx, os.path.join(ctx.tmp, name), precision=precision, max_steps=steps,
                         per_device_train_batch_size=p.small_batch, max_grad_norm=1.0, **args)
    common = dict(model=small_model(ctx), args=targs, train_dataset=dataset)
    if kind == "recommended":
        trainer = GradClipTrainer(**common, clip_config=ClipConfig.recommended())
    else:
        trainer = Trainer(**common, callbacks=[GradClipCallback()] if kind == "callback" else None)
    trainer.add_callback(deadline_callback(ctx))
    return quiet(trainer)


# ---------------------------------------------------------------------------------------------- syncs
def _per_step_reads(ctx: Context, trainer) -> list[list[dict[str, Any]]]:
    """The host reads of each optimizer step, from one ``on_step_end`` to the next: the batch fetch, forward,
    backward, clipping, optimizer step, and the log of the step before when that was a logging step."""
    from transformers import TrainerCallback

    steps: list[list[dict[str, Any]]] = []

    class PerStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(reads.take())

    trainer.add_callback(PerStep())
    with HostReads(ctx.cuda) as reads:
        trainer.train()
    return steps


def _summary(steps: list[list[dict[str, Any]]]) -> dict[str, Any]:
    counts = [len(s) for s in steps]
    pack = [sum(e["pack"] for e in s) for s in steps]
    sites = collections.Counter(e["site"] for s in steps for e in s)
    return {"per_step": counts, "max": max(counts, default=0), "min": min(counts, default=0),
            "pack_max": max(pack, default=0), "sites_per_step": {k: v / max(len(steps), 1) for k, v in sites.items()},
            "pack_sites": sorted({e["site"] for s in steps for e in s if e["pack"]})}


def _run_reads(ctx: Context, kind: str, dataset, nan_filter: bool, logging_steps: int) -> list[list[dict[str, Any]]]:
    p = ctx.plan
    trainer = _trainer(ctx, kind, f"syncs-{kind}-{nan_filter}-{logging_steps}", dataset, p.sync_steps,
                       logging_steps=logging_steps, logging_nan_inf_filter=nan_filter)
    return _per_step_reads(ctx, trainer)


def syncs(ctx: Context) -> dict[str, Any]:
    """Per non-logging step, bf16, fused AdamW: host syncs with ``recommended()`` and with the stock Trainer,
    with the Trainer's own per-micro-step loss check (``logging_nan_inf_filter``) on and off; then the pack's
    reads at logging steps (its one transfer)."""
    p, checks = ctx.plan, Checks()
    dataset = text_blocks(p.small_block, p.small_batch * p.sync_steps)
    rows: dict[str, Any] = {}
    for nan_filter in (True, False):
        for kind in ("stock", "recommended"):
            steps = _run_reads(ctx, kind, dataset, nan_filter, logging_steps=10 * p.sync_steps)
            rows[f"{kind}, logging_nan_inf_filter={nan_filter}"] = _summary(steps[p.sync_skip:])
        stock, pack = (rows[f"{k}, logging_nan_inf_filter={nan_filter}"] for k in ("stock", "recommended"))
        label = f"recommended(), nan filter {'on' if nan_filter else 'off'}"
        checks.check(f"{label}: 0 host syncs made by the pack in every counted step", pack["pack_max"] == 0,
                     f"most in a step: {pack['pack_max']} ({', '.join(pack['pack_sites']) or 'none'})")
        checks.check(f"{label}: as many per step as the stock Trainer",
                     (pack["min"], pack["max"]) == (stock["min"], stock["max"]),
                     f"stock {stock['min']}-{stock['max']}, recommended {pack['min']}-{pack['max']}")
    every = 2
    steps = _run_reads(ctx, "recommended", dataset, True, logging_steps=every)[p.sync_skip:]
    logged = [s for i, s in enumerate(steps, start=p.sync_skip + 1) if (i - 1) % every == 0]
    rows[f"recommended, logging every {every} steps: steps with a log"] = _summary(logged)
    most = rows[f"recommended, logging every {every} steps: steps with a log"]["pack_max"]
    checks.check("recommended(): at most one host read by the pack per logging step (its one transfer)", most <= 1,
                 f"most in a logging step: {most}")
    on, off = rows["stock, logging_nan_inf_filter=True"], rows["stock, logging_nan_inf_filter=False"]
    how = ("torch.cuda.set_sync_debug_mode('warn'): every synchronizing call" if ctx.cuda else
           "CPU: Python-level reads (Tensor.item/__bool__/tolist/__float__/__int__/__index__), the calls that are "
           "syncs on a GPU; CUDA's sync debug mode: skipped on cpu")
    return {"checks": checks.items, "counted_with": how, "rows": rows, "steps_counted": p.sync_steps - p.sync_skip,
            "trainer_loss_check_per_step": on["max"] - off["max"]}


# ---------------------------------------------------------------------------------------------- identity
def _run_identity(ctx: Context, kind: str, precision: str, dataset) -> dict[str, Any]:
    trainer = _trainer(ctx, kind, f"ident-{kind}-{precision}", dataset, ctx.plan.ident_steps, precision=precision,
                       logging_steps=1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return {"loss": [h["loss"] for h in logs], "grad_norm": [h.get("grad_norm") for h in logs],
            "weights": [w.detach().clone() for w in trainer.model.parameters()]}


def _diffs(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    return {"loss": max((abs(x - y) for x, y in zip(a["loss"], b["loss"])), default=0.0),
            "grad_norm": max((abs(x - y) for x, y in zip(a["grad_norm"], b["grad_norm"])), default=0.0),
            "weights": max_abs_diff(a["weights"], b["weights"]), "same_length": len(a["loss"]) == len(b["loss"])}


def identity(ctx: Context) -> dict[str, Any]:
    """``GradClipCallback()`` with plain ``TrainingArguments(max_grad_norm=1.0)`` against the stock Trainer,
    same seed, fp32 and bf16; a second stock run measures the device's own run-to-run differences."""
    p, checks, rows = ctx.plan, Checks(), {}
    dataset = text_blocks(p.small_block, p.small_batch * p.ident_steps)
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        for precision in ("fp32", "bf16"):
            runs = {kind: _run_identity(ctx, kind, precision, dataset) for kind in ("stock", "stock again", "callback")}
            pack, control = _diffs(runs["callback"], runs["stock"]), _diffs(runs["stock again"], runs["stock"])
            rows[precision] = {"GradClipCallback() vs stock": pack, "stock vs stock": control,
                               "losses": {k: v["loss"] for k, v in runs.items()}}
            exact = pack["loss"] == pack["grad_norm"] == pack["weights"] == 0.0
            cause = ("bit-identical" if exact else "the same as two stock runs differ (the device's run-to-run "
                     "nondeterminism)" if all(pack[k] <= control[k] for k in ("loss", "grad_norm", "weights"))
                     else "MORE than two stock runs differ: the pack changed the run")
            rows[precision]["cause"] = cause
            checks.check(f"{precision}: losses, grad norms and final weights equal to the stock Trainer's",
                         pack["same_length"] and all(pack[k] <= control[k] for k in ("loss", "grad_norm", "weights")),
                         f"max |diff| loss {pack['loss']:.3g}, grad_norm {pack['grad_norm']:.3g}, weights "
                         f"{pack['weights']:.3g} (stock vs stock: {control['loss']:.3g}, {control['grad_norm']:.3g}, "
                         f"{control['weights']:.3g}): {cause}")
    finally:
        torch.use_deterministic_algorithms(deterministic)
    return {"checks": checks.items, "rows": rows, "steps": p.ident_steps}
