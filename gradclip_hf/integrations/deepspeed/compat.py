"""Every private (or undocumented) DeepSpeed detail the pack relies on, in ONE place; the public ones it uses are
listed too. Nothing here imports deepspeed at module load: the helpers take the engine (or its optimizer).

Verified against DeepSpeed 0.19.8 (read in its source; run on CPU by ``tests/deepspeed``, ZeRO-1, 2 and 3, fp32
and bf16, gradient accumulation 1 and 2, the skip and the per-layer norms also on 2 ranks; fp16 with the CPU's
fp16 capability check patched, as this CPU has none). :func:`missing` checks at train start that the reaches a
run needs are there, so a DeepSpeed that moved one fails with the fix instead of mid-run.

``zero`` below is ``engine.optimizer``: ``DeepSpeedZeroOptimizer`` (ZeRO-1/2), ``DeepSpeedZeroOptimizer_Stage3``
(ZeRO-3) or ``BF16_Optimizer`` (ZeRO-1 with bf16 weights and fp32 gradient accumulation).

=========================================  ======================================================================
name                                       how the pack uses it
=========================================  ======================================================================
``zero.clip_grad`` (public attribute)      the threshold, read in every ``step()``; written before each step
``engine.get_global_grad_norm()``          public: the pre-clip norm after the step; ``inf`` after an overflow
                                           step on every stage (ZeRO-3 too: ``_global_grad_norm = inf``)
``zero.overflow``                          host bool: the step was skipped (non-finite norm, fp16 overflow, or
                                           the pack's own skip)
``engine.lr_scheduler`` (public)           the scheduler the engine steps (None: the Trainer's): stepped once
                                           after a step the pack skipped, as the Trainer does on the local path
``engine.step`` (public method)            wrapped on the instance for the run (``del`` puts the class's back):
                                           accelerate calls it right after ``engine.backward`` of the step's
                                           last micro-batch, where the reduced gradients are readable
``zero._update_scale(has_overflow)``       fp16: wrapped on the instance for the run; a step the pack skipped
(private, ZeRO-1/2 and 3)                  does not reach the dynamic loss scaler (no halving, no hysteresis,
                                           no "already at minimum" error)
``zero.loss_scale`` (property)             fp16: the current scale (a Python number): per-layer norms unscaled.
(a setter on ZeRO-1/2 and ZeRO-3:          The micro-batch gate (bf16, fp32): set to ``1 / rescale`` for the
``loss_scaler.cur_scale``)                 engine's step, put back after it: the step divides the gradients (and
                                           the norm it clips by and reports) by it, so the kept micro-batches'
                                           sum becomes their mean (exact where the rescale is a power of two);
                                           ``BF16_Optimizer`` has no such setter (refused there)
``zero.dp_process_group``                  the group the partitions are split over: the one all-reduce of the
                                           per-layer sums of squares
``param._hp_mapping``,                     ZeRO-1/2, BF16_Optimizer: this rank's fragment of a parameter's
``param._index_in_param_group``,           reduced gradient, as DeepSpeed's own ``get_full_hp_grad`` reads it
``_hp_mapping.get_lp_grad_fragment(i)``,   (``None`` mapping: no fragment here); BF16_Optimizer keeps the whole
``_hp_mapping.lp_fragment_address``        buffer: narrowed to the fragment
``deepspeed.utils.safe_get_local_grad``    public, ZeRO-3: this rank's partition of a parameter's gradient
``zero.single_partition_of_fp32_groups``   the fp32 master partitions (ZeRO-1/2 / ZeRO-3 / BF16_Optimizer):
``zero.fp32_partitioned_groups_flat``      rollback snapshots clone them and ``copy_()`` them back (same tensors:
``zero.fp32_groups_flat_partition``        DeepSpeed's fragment links stay valid)
``zero.optimizer.state``                   the base torch optimizer's state (moments, ``step``): cloned and
                                           copied back the same way
``zero.update_lp_params()``                ZeRO-1/2, BF16_Optimizer: master -> low-precision weights, gathered
``zero.fp16_partitioned_groups_flat``,     ZeRO-3: master -> low-precision partitions, then the persistent
``zero.persistent_parameters``             (small, kept gathered) parameters re-gathered, as ``_post_step`` does
=========================================  ======================================================================

Not used on purpose: ``safe_get_full_optimizer_state`` and ``optimizer.load_state_dict`` for an in-memory restore
(the latter unlinks the optimizer-state fragments on ZeRO-1/2, after which the former raises on the ranks that hold
a fragment while the others wait in its collective), and ``safe_get_full_grad`` for per-layer norms (one
collective per parameter, model-size traffic).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["VERIFIED", "master_partitions", "refresh_low_precision", "base_state", "local_grad_squares",
           "dp_group", "loss_scale", "rescalable", "rescaled", "hold_scaler", "missing"]

VERIFIED = "0.19.8"
_MASTER = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


def master_partitions(zero: Any) -> list[Tensor]:
    """This rank's fp32 master partitions (the live tensors)."""
    for name in _MASTER:
        parts = getattr(zero, name, None)
        if parts is not None:
            return list(parts)
    raise AttributeError(f"{type(zero).__name__} has none of {', '.join(_MASTER)}")


def base_state(zero: Any) -> dict:
    """The base torch optimizer's per-partition state (``exp_avg``, ``exp_avg_sq``, ``step``, ...)."""
    return zero.optimizer.state


@torch.no_grad()
def refresh_low_precision(engine: Any) -> None:
    """After the fp32 master partitions were written: the low-precision weights the model runs on, from them."""
    zero = engine.optimizer
    if int(engine.zero_optimization_stage()) == 3:
        for low, master in zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat):
            low.data.copy_(master.data)
        if len(zero.persistent_parameters) > 0:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
    else:
        zero.update_lp_params()


def local_grad_squares(param: Any, device: Any) -> Tensor:
    """The sum of squares (fp32, 0-dim, on ``device``) of this rank's part of ``param``'s reduced gradient; NaN
    where DeepSpeed has none to give (never raises: every rank must reach the all-reduce that follows)."""
    zero = torch.zeros((), device=device)
    try:
        if hasattr(param, "ds_id"):  # ZeRO-3
            from deepspeed.utils import safe_get_local_grad

            grad = safe_get_local_grad(param)
            return zero if grad is None else grad.float().pow(2).sum().to(device)
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:  # no fragment of it on this rank
            return zero
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group).reshape(-1)
        if grad.numel() == param.numel():  # BF16_Optimizer keeps the whole buffer: this rank's fragment only
            address = mapping.lp_fragment_address
            grad = grad.narrow(0, address.start, address.numel)
        return grad.float().pow(2).sum().to(device)
    except (AttributeError, KeyError, ValueError):
        return torch.full((), math.nan, device=device)


def dp_group(zero: Any) -> Any:
    return getattr(zero, "dp_process_group", None)


def loss_scale(zero: Any) -> float:
    """The gradients' loss scale (fp16: the dynamic scaler's; else 1)."""
    scale = getattr(zero, "loss_scale", 1.0)
    return float(scale) if isinstance(scale, (int, float)) else 1.0


def rescalable(zero: Any) -> bool:
    """Whether the ZeRO optimizer's loss scale can be set (a property with a setter: ZeRO-1/2 and ZeRO-3; not
    ``BF16_Optimizer``)."""
    attribute = getattr(type(zero), "loss_scale", None)
    return isinstance(attribute, property) and attribute.fset is not None


def rescaled(zero: Any, rescale: float) -> Callable[[], None]:
    """Divide the loss scale by ``rescale`` for the coming step (a Python float; the gradients were accumulated
    with the scale as it was); returns the undo (the scale as it was)."""
    before = zero.loss_scale
    zero.loss_scale = before / rescale

    def undo() -> None:
        zero.loss_scale = before
    return undo


def hold_scaler(zero: Any, held: Callable[[], bool]) -> Callable[[], None]:
    """fp16: an overflow step for which ``held()`` is true (the pack skipped it) does not reach the loss scaler.
    Returns the undo (the class's method back)."""
    original = zero._update_scale

    def _update_scale(has_overflow: bool = False) -> Any:
        if has_overflow and held():
            return None
        return original(has_overflow)

    zero._update_scale = _update_scale
    return lambda: zero.__dict__.pop("_update_scale", None)


def missing(engine: Any, *, rollback: bool, layers: bool, fp16: bool) -> list[str]:
    """The private reaches this run needs that this DeepSpeed lacks (empty: all there)."""
    zero, out = engine.optimizer, []
    stage3 = int(engine.zero_optimization_stage()) == 3
    if rollback:
        if not any(hasattr(zero, n) for n in _MASTER):
            out.append("the fp32 master partitions (" + " / ".join(_MASTER) + ")")
        if not isinstance(getattr(getattr(zero, "optimizer", None), "state", None), dict):
            out.append("engine.optimizer.optimizer.state")
        needed = ("fp16_partitioned_groups_flat", "persistent_parameters") if stage3 else ("update_lp_params",)
        out += [f"engine.optimizer.{n}" for n in needed if not hasattr(zero, n)]
    if layers and not stage3:
        params = [p for p in engine.module.parameters() if p.requires_grad]
        if params and not any(hasattr(p, "_hp_mapping") and hasattr(p, "_index_in_param_group") for p in params):
            out.append("param._hp_mapping / param._index_in_param_group")
    if fp16 and not callable(getattr(zero, "_update_scale", None)):
        out.append("engine.optimizer._update_scale")
    return out
