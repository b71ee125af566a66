"""What the pack refuses under DeepSpeed ZeRO, at train start, with the fix: only what no faithful mechanism serves
(docs/distributed.md, "What works, per ZeRO stage")."""

from __future__ import annotations

from typing import Any, Callable

from ...config import ClipConfig
from ...core import GradClipper, SpikeAction
from ...core.external import ExternalClip
from . import compat

__all__ = ["check_deepspeed", "check_engine"]

_INSTEAD = "or train without DeepSpeed (DDP or FSDP2), where the pack clips and skips inside the optimizer step"


def check_deepspeed(config: ClipConfig | None, clipper: GradClipper | None, ds_config: dict, stage: int,
                    owner: str) -> None:
    """Refuse, with the fix, what the pack cannot do faithfully under this DeepSpeed configuration."""
    def refuse(what: str, fix: str) -> None:
        raise ValueError(f"{owner}: under DeepSpeed (ZeRO stage {stage}) {what}. {fix}")

    if stage not in (1, 2, 3):
        refuse("the engine clips with its own configuration (ZeRO stage 0 has no per-step clip_grad)",
               "Use zero_optimization.stage 1, 2 or 3, or train without DeepSpeed.")
    zero = ds_config.get("zero_optimization") or {}
    if zero.get("compute_grad_norm", True) is False:
        refuse("zero_optimization.compute_grad_norm=false leaves no gradient norm to clip by (and ZeRO-1/2 would "
               "apply a step with NaN gradients instead of skipping it)",
               "Set zero_optimization.compute_grad_norm to true (the default).")
    c = config or ClipConfig()
    if config is not None:
        _check_config(c, refuse)
    if clipper is not None:
        try:
            ExternalClip.check(clipper)
        except ValueError as error:
            refuse(f"the GradClipper cannot be driven ({error})", "Pass a clipper as described, or ClipConfig options.")
    spikes = clipper.spikes if clipper is not None else c.build_spikes()
    action = spikes.action if spikes is not None else SpikeAction.TIGHTEN
    if action is SpikeAction.SKIP and spikes.norm_detector is not None:
        refuse("spike_action='skip' cannot skip a gradient-norm spike: its norm is known only after the engine "
               "stepped (a loss spike is known before, and is skipped)",
               "Use spike_detection='loss' (as ClipConfig.recommended()), or spike_action='rollback' (it restores "
               "the last snapshot, which undoes a norm spike's update too), " + _INSTEAD + ".")
    nonfinite = clipper.nonfinite.value if clipper is not None else c.nonfinite
    pack_skips = bool(c.steps_to_skip()) if clipper is None else False
    pack_skips |= spikes is not None and spikes.loss_detector is not None and action is not SpikeAction.TIGHTEN
    bf16 = ds_config.get("bf16") or ds_config.get("bfloat16") or {}
    if (stage < 3 and bf16.get("enabled") in (True, "auto") and bf16.get("check_grad_overflow", True) is False
            and (nonfinite == "skip" or pack_skips)):
        what = "nonfinite='skip'" if nonfinite == "skip" else "the pack's skip (spike_action, skip_steps)"
        refuse(f"bf16.check_grad_overflow=false makes ZeRO-1/2 apply steps with NaN/Inf gradients, so {what} "
               f"cannot hold (the engine's overflow path is how a step is skipped)",
               "Set bf16.check_grad_overflow to true (the default), or nonfinite='ignore' with "
               "spike_action='tighten' and no skip_steps.")


def _check_config(c: ClipConfig, refuse: Callable[[str, str], None]) -> None:
    if c.strategy in ("value", "agc"):
        refuse(f"strategy={c.strategy!r} cannot be applied: the engine clips by ONE global-norm threshold",
               "Use strategy 'norm', 'zscore', 'quantile' or 'none'.")
    if c.norm_type != 2.0:
        refuse(f"norm_type={c.norm_type!r} cannot be applied: the engine measures the L2 norm", "Use norm_type=2.0.")
    if c.exclude or c.include is not None:
        refuse(f"exclude={c.exclude!r} / include={c.include!r} cannot be applied: the engine measures and clips "
               f"every gradient", "Leave exclude and include unset.")
    if c.nonfinite == "zero":
        refuse("nonfinite='zero' cannot be done: the engine checks its gradients for NaN/Inf inside its step and "
               "skips such a step itself (zeroing them would take a write into its gradient partitions every step)",
               "Use nonfinite='skip' (DeepSpeed skips non-finite steps: its overflow check), 'raise' or 'ignore'.")


def _check_gate(engine: Any, owner: str) -> None:
    """The micro-batch gate makes the kept sum the kept mean through the ZeRO optimizer's loss scale (a setter):
    not where there is none (``BF16_Optimizer``) or where fp16's dynamic scaler owns it."""
    if engine.fp16_enabled():
        why = ("fp16: the dynamic loss scaler owns the scale the rescale would ride on, and changes it inside the "
               "same step (a raise or a back-off), so the rescale cannot be put on and taken off exactly")
    elif not compat.rescalable(engine.optimizer):
        why = (f"{type(engine.optimizer).__name__} (ZeRO-1 with bf16 weights and fp32 gradient accumulation) has no "
               f"loss scale to carry the rescale of the kept micro-batches")
    else:
        return
    raise ValueError(f"{owner}: under DeepSpeed spike_gate='micro_batch' cannot be served here: {why}. Use bf16 "
                     f"(without data_types.grad_accum_dtype='fp32' on ZeRO-1) or fp32, or spike_gate='step' (a loss "
                     f"spike then skips the whole step, exactly), {_INSTEAD}.")


def check_engine(engine: Any, config: ClipConfig | None, owner: str, clipper: GradClipper | None = None) -> None:
    """The DeepSpeed internals this run needs (rollback, per-layer norms, fp16, the micro-batch gate's rescale) are
    where the pack reaches for them (:mod:`.compat`); else ``ValueError`` naming them, with the fix."""
    c = config or ClipConfig()
    spikes = clipper.spikes if clipper is not None else None
    if (spikes is not None and spikes.gate is not None) or (clipper is None and c.gates_micro_batches):
        _check_gate(engine, owner)
    rollback = c.spike_detection != "off" and c.spike_action == "rollback"
    layers = c.log_layers_top_k > 0 or bool(c.log_layer_patterns) or c.wandb_histogram_every > 0
    gone = compat.missing(engine, rollback=rollback, layers=layers, fp16=bool(engine.fp16_enabled()))
    if gone:
        import deepspeed

        raise ValueError(f"{owner}: this DeepSpeed ({deepspeed.__version__}) lacks {', '.join(gone)}, which the pack "
                         f"reads (verified with DeepSpeed {compat.VERIFIED}: gradclip_hf/integrations/deepspeed/"
                         f"compat.py). Install deepspeed=={compat.VERIFIED}, or turn off what needs it (spike_action "
                         f"'rollback'; per-layer norms: log_layers_top_k=0, log_layer_patterns=[], "
                         f"wandb_histogram_every=0).")
