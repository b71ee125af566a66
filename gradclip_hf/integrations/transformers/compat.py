"""Every private Trainer / accelerate / torch detail the integration relies on, in ONE place.

Verified against transformers 5.23.0 and 4.57.6 (accelerate 1.15, torch 2.13): read in both sources, and
``tests/integration`` and ``tests/logging`` run on both in CI (``make test``: ``.venv`` and ``.venv-tf4``).

=====================================  ==========  =========  =================================================
name                                   5.23.0      4.57.6     how we use it
=====================================  ==========  =========  =================================================
``Trainer.training_step(model, inputs,  yes         yes        overridden (mixin) / wrapped on the instance
num_items_in_batch=None)``                                      (callback): sum of its returns over one optimizer
                                                                step = the step's mean loss (GA-normalised)
``Trainer.log(logs, start_time=None)``  yes         yes        overridden / wrapped: metrics are put into ``logs``
                                                                before reporters (W&B, TensorBoard) see them
``Trainer._get_grad_norm(model,         yes         absent     overridden / wrapped to return ``None`` while we
grad_norm=None)``                                               clip: skips 5.x's extra ``clip_grad_norm_(inf)``
                                                                pass (the norm is computed once, by us)
``Trainer._clip_grad_norm(model)``      yes         absent     same (only called when ``max_grad_norm > 0``)
``args.max_grad_norm``                  ``> 0``     ``> 0``    set to ``0.0`` for the run (never ``None``: 5.x
                                        (None:      (None ok)  compares it with ``>``), restored at train end
                                        TypeError)
``callback on_pre_optimizer_step``      yes         yes        where we clip: after backward/grad reduction,
                                                                before ``optimizer.step()``, once per step
``Trainer.is_deepspeed_enabled``,       yes         yes        DeepSpeed detection (DeepSpeed steps inside
``accelerator.distributed_type``                                ``backward``: we cannot clip, only its engine)
``TrainerState.stateful_callbacks``     yes         yes        our state is read back at train begin (resume)
``AcceleratedOptimizer.scaler``,        yes         yes        fp16: unscale once, by the scaler's stage
``.optimizer``, ``._is_overflow``                               ``_is_overflow``: marks a step we skipped so the
                                                                Trainer does not advance the LR scheduler
``GradScaler._per_optimizer_states``    torch 2.x   torch 2.x  ``[id(opt)]["stage"] is OptState.READY``
=====================================  ==========  =========  =================================================
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

__all__ = ["find_trainer", "unscale_once", "is_deepspeed", "fsdp_version", "HAS_GRAD_NORM_HOOKS",
           "inner_optimizer", "scaler_enabled"]


def _trainer_cls():
    from transformers import Trainer
    return Trainer


def _has_hooks() -> bool:
    trainer = _trainer_cls()
    return hasattr(trainer, "_get_grad_norm") and hasattr(trainer, "_clip_grad_norm")


HAS_GRAD_NORM_HOOKS = None  # computed lazily (importing transformers is slow)


def has_grad_norm_hooks() -> bool:
    """5.x has ``_clip_grad_norm``/``_get_grad_norm``; 4.57 clips inline in ``_inner_training_loop``."""
    global HAS_GRAD_NORM_HOOKS
    if HAS_GRAD_NORM_HOOKS is None:
        HAS_GRAD_NORM_HOOKS = _has_hooks()
    return HAS_GRAD_NORM_HOOKS


def find_trainer(max_depth: int = 32) -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack (callbacks get no reference)."""
    trainer_cls = _trainer_cls()
    frame = sys._getframe(1)
    depth = 0
    try:
        while frame is not None and depth < max_depth:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, trainer_cls):
                return candidate
            frame, depth = frame.f_back, depth + 1
    finally:
        del frame
    return None


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def scaler_enabled(optimizer: Any) -> bool:
    scaler = getattr(optimizer, "scaler", None)
    return scaler is not None and getattr(scaler, "is_enabled", lambda: True)()


def unscale_once(optimizer: Any) -> bool:
    """Unscale fp16 gradients exactly once per step; return whether this call unscaled.

    accelerate's ``AcceleratedOptimizer`` carries the ``GradScaler`` (``.scaler``). In 5.x the
    Trainer's ``_get_grad_norm``/``_clip_grad_norm`` pass unscales before ``on_pre_optimizer_step``
    (unless our hooks replaced it); 4.57 with ``max_grad_norm=0`` does not. ``GradScaler.unscale_``
    raises if called twice in a step, and ``scaler.step()`` unscales again only when the stage is
    still ``READY``. So: unscale when, and only when, the stage is ``READY`` (by state, not version).
    """
    if not scaler_enabled(optimizer):
        return False
    from torch.amp.grad_scaler import OptState

    scaler, inner = optimizer.scaler, inner_optimizer(optimizer)
    stage = scaler._per_optimizer_states[id(inner)]["stage"]
    if stage is OptState.READY:
        scaler.unscale_(inner)
        return True
    return False


def is_deepspeed(trainer: Any) -> bool:
    if getattr(trainer, "is_deepspeed_enabled", False):
        return True
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is None:
        return False
    from accelerate.utils import DistributedType
    return getattr(accelerator, "distributed_type", None) == DistributedType.DEEPSPEED


def deepspeed_clipping(trainer: Any) -> float | None:
    """DeepSpeed's ``gradient_clipping`` (the engine's threshold), else ``args.max_grad_norm``."""
    try:
        plugin = trainer.accelerator.state.deepspeed_plugin
        value = plugin.deepspeed_config.get("gradient_clipping")
        if isinstance(value, (int, float)):
            return float(value)
    except AttributeError:
        pass
    value = getattr(getattr(trainer, "args", None), "max_grad_norm", None)
    return float(value) if isinstance(value, (int, float)) else None


def fsdp_version(trainer: Any) -> int | None:
    """1 or 2 when the Trainer's model is sharded by accelerate's FSDP plugin, else ``None`` (accelerate
    keeps a given plugin but runs plain DDP where it cannot shard, e.g. on CPU: that is not FSDP)."""
    from accelerate.utils import DistributedType

    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None or getattr(accelerator, "distributed_type", None) != DistributedType.FSDP:
        return None
    return int(getattr(plugin, "fsdp_version", 1))


def call_accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
