"""gpu_check section ``fp16``: fp16 + GradScaler + skip through the Trainer, with ``recommended()``.

On CUDA the Trainer makes its own GradScaler (``fp16=True``: autocast and a real ``torch.amp.GradScaler``); on
the CPU (where accelerate makes none) a CPU ``GradScaler`` is put on the accelerator before training, as the
tests do: the same Trainer, scaler and pack code, without fp16 autocast. The stream has garbage batches at
``fp16_spikes`` (loss spikes the pack skips); at ``fp16_overflow`` and over the ``fp16_burst`` the scale is set
to the fp32 maximum before the step (``GradScaler.update(new_scale)``, public), so the scaled loss overflows
and the scaler finds Inf, as a real fp16 overflow.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import torch

from _check_base import Checks, Context, deadline_callback, faults, quiet, small_model, text_blocks, trainer_args

F32_MAX = float(torch.finfo(torch.float32).max)


def _forced(p) -> list[int]:
    first, length = p.fp16_burst
    return [p.fp16_overflow, *range(first, first + length)]


def _count_calls(trainer) -> tuple[collections.Counter, collections.Counter, Any]:
    """Count the scaler's ``unscale_`` and ``update`` calls per step (its own methods, wrapped on the
    instance); returns the counts and the unwrapped ``update`` (to set a scale without counting)."""
    scaler = trainer.accelerator.scaler
    unscales, updates = collections.Counter(), collections.Counter()
    original_unscale, original_update = scaler.unscale_, scaler.update

    def unscale_(optimizer):
        unscales[trainer.state.global_step] += 1
        return original_unscale(optimizer)

    def update(new_scale=None):
        if new_scale is None:  # the Trainer's call (the probe's pass a scale)
            updates[trainer.state.global_step] += 1
        return original_update(new_scale)

    scaler.unscale_, scaler.update = unscale_, update
    return unscales, updates, original_update


def _probe(trainer, forced: set[int]):
    """Per step: the pack's report and decision, the scaler's scale before and after, unscale_/update calls,
    whether the weights moved, and whether accelerate reported the step skipped (read at every step: the
    host reads of this probe are the test's, not the pack's). Forces the overflow of the ``forced`` steps."""
    from transformers import TrainerCallback

    from gradclip_hf.run import skip_update

    scaler = trainer.accelerator.scaler
    unscales, updates, set_scale = _count_calls(trainer)

    class Probe(TrainerCallback):
        def __init__(self):
            self.rows: list[dict[str, Any]] = []
            self.saved: float | None = None

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step in forced:
                self.saved = scaler.get_scale() if self.saved is None else self.saved
                set_scale(F32_MAX)
            elif self.saved is not None:
                set_scale(self.saved)
                self.saved = None
            self.scale_before = scaler.get_scale()
            self.before = [w.detach().clone() for w in model.parameters()]

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step, run = state.global_step - 1, trainer.clip_run
            report = run.last_report
            values = report.to_floats()
            self.rows.append({"step": step, "norm": values["norm"], "nonfinite": bool(values["nonfinite"]),
                              "spike": bool(report.spike.spike) if report.spike is not None else False,
                              "pack_skip": bool(skip_update(report, run.backend, step + 1 in run.actions.listed)),
                              "scale_before": self.scale_before, "scale_after": scaler.get_scale(),
                              "unscales": unscales[step], "updates": updates[step],
                              "moved": any(not torch.equal(a, b) for a, b in zip(self.before, model.parameters())),
                              "accelerate_skipped": bool(trainer.accelerator.optimizer_step_was_skipped)})

    return Probe()


def _run(ctx: Context, optim: str) -> tuple[Any, list[dict[str, Any]]]:
    from gradclip_hf import ClipConfig
    from gradclip_hf.integrations.transformers import GradClipTrainer

    p = ctx.plan
    blocks = text_blocks(p.small_block, p.small_batch * p.fp16_steps)
    items = [blocks[i] for i in range(len(blocks))]
    stream = faults.StepStream(items, p.small_batch, p.fp16_spikes, faults.garbage, seed=0)
    args = trainer_args(ctx, os.path.join(ctx.tmp, f"fp16-{optim}"), precision="fp16", optim=optim,
                        max_steps=p.fp16_steps, per_device_train_batch_size=p.small_batch, learning_rate=p.fp16_lr,
                        logging_steps=5, max_grad_norm=1.0)
    trainer = GradClipTrainer(model=small_model(ctx), args=args, train_dataset=stream,
                              clip_config=ClipConfig.recommended())
    if not ctx.cuda:  # accelerate makes no GradScaler on the CPU: a real CPU one, as tests/integration do
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    probe = _probe(trainer, set(_forced(p)))
    trainer.add_callback(probe)
    trainer.add_callback(deadline_callback(ctx))
    quiet(trainer).train()
    return trainer, probe.rows


def _in_clean_range(rows: list[dict[str, Any]], after: int, clean: list[float]) -> tuple[bool, str]:
    """The norm of step ``after`` within the range of the clean steps' norms (with a factor 2 of slack: what
    it catches is a norm off by the loss scale, 65536, or NaN)."""
    norm = rows[after]["norm"]
    ok = math.isfinite(norm) and min(clean) / 2 <= norm <= 2 * max(clean)
    return ok, f"step {after}: {norm:.3g}"


def _check_skips(checks: Checks, label: str, rows: list[dict[str, Any]], p) -> None:
    """Who skipped what: the pack its loss spikes (scale untouched), the scaler the overflows (scale backed off)."""
    checks.check(f"{label}: every step unscaled exactly once, scaler.update once",
                 all(r["unscales"] == 1 and r["updates"] == 1 for r in rows),
                 f"unscale_ calls per step {sorted({r['unscales'] for r in rows})}, update "
                 f"{sorted({r['updates'] for r in rows})}")
    s = [rows[t] for t in p.fp16_spikes]
    checks.check(f"{label}: loss spikes skipped by the pack, the scale left alone",
                 all(r["spike"] and r["pack_skip"] and not r["moved"] and r["scale_after"] == r["scale_before"]
                     for r in s), "; ".join(f"step {r['step']}: spike {r['spike']}, skip {r['pack_skip']}, moved "
                                           f"{r['moved']}, scale {r['scale_before']:g}->{r['scale_after']:g}" for r in s))
    o = [rows[t] for t in _forced(p)]
    checks.check(f"{label}: overflow steps skipped by the scaler (not the pack), scale backed off",
                 all(r["nonfinite"] and not r["pack_skip"] and not r["moved"] and r["scale_after"] < r["scale_before"]
                     for r in o), f"{len(o)} forced overflows: nonfinite {sum(r['nonfinite'] for r in o)}, pack skips "
                                  f"{sum(r['pack_skip'] for r in o)}, moved {sum(r['moved'] for r in o)}")


def _check_after(checks: Checks, label: str, trainer, rows: list[dict[str, Any]], p) -> None:
    """The steps after the skips, the norms, the watchdog, the weights."""
    forced, spikes = _forced(p), list(p.fp16_spikes)
    first, length = p.fp16_burst
    after = [*(t + 1 for t in [*spikes, p.fp16_overflow]), first + length]
    natural = [r["step"] for r in rows if r["nonfinite"] and r["step"] not in forced]  # the scaler's own overflows
    clean = [r["norm"] for r in rows[10:] if r["step"] not in {*forced, *spikes, *after, *natural}]
    results = [_in_clean_range(rows, t, clean) for t in after]
    checks.check(f"{label}: the step after each skip measured in the clean range (unscaled)",
                 all(ok for ok, _ in results), f"clean steps from 10: {min(clean):.3g} to {max(clean):.3g}; "
                 + "; ".join(text for _, text in results))
    checks.check(f"{label}: no norm at the loss scale", max(clean) < 100,
                 f"largest clean norm {max(clean):.3g} (scale {rows[0]['scale_before']:g}); overflows of the "
                 f"scaler's own at steps {natural or 'none'}")
    run = trainer.clip_run
    checks.check(f"{label}: the non-finite watchdog leaves overflow to the scaler ({length} in a row > "
                 f"nonfinite_max_consecutive={run.config.nonfinite_max_consecutive}: no stop), the pack skipped "
                 f"its spikes only", run.stop_reason is None and trainer.state.global_step == p.fp16_steps
                 and run.skipped_steps == len(spikes) and run.nonfinite_steps == len(forced) + len(natural),
                 f"stop_reason {run.stop_reason!r}, steps done {trainer.state.global_step}; logged "
                 f"nonfinite_steps {run.nonfinite_steps}, skipped_steps {run.skipped_steps} (spikes {len(spikes)})")
    weights_ok = all(torch.isfinite(w).all() for w in trainer.model.parameters())
    checks.check(f"{label}: weights finite at the end", bool(weights_ok), "")


def fp16(ctx: Context) -> dict[str, Any]:
    p, checks, out = ctx.plan, Checks(), {}
    if not ctx.cuda:
        checks.skip("fp16 autocast and the Trainer's own CUDA GradScaler", "skipped on cpu (a CPU GradScaler is "
                    "installed on the accelerator instead; no fp16 autocast)")
    for optim in ("adamw_torch_fused", "adamw_torch"):
        trainer, rows = _run(ctx, optim)
        if checks.check(f"{optim}: the run trained all its steps", len(rows) == p.fp16_steps,
                        f"{len(rows)} of {p.fp16_steps} steps"):
            _check_skips(checks, optim, rows, p)
            _check_after(checks, optim, trainer, rows, p)
        forced = _forced(p)
        out[optim] = {"rows": rows, "final_scale": trainer.accelerator.scaler.get_scale(),
                      "lr_scheduler_stepped_on_overflow": [not rows[t]["accelerate_skipped"] for t in forced],
                      "nonfinite_steps": trainer.clip_run.nonfinite_steps,
                      "skipped_steps": trainer.clip_run.skipped_steps}
        del trainer
    return {"checks": checks.items, "runs": out, "spikes": list(p.fp16_spikes), "forced_overflow": _forced(p)}
