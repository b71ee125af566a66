"""Every private (or unstable) torch / accelerate detail of the optimizer the per-run machinery relies on, in ONE
place (the Trainer's own are in :mod:`gradclip_hf.integrations.transformers.compat`).

Verified against torch 2.13 and accelerate 1.15 / 1.16; run by ``tests/integration`` (the Trainer) and
``tests/integration/test_accelerate.py`` (a hand-written accelerate loop) on every lane.

========================================  =========  ==================================================
name                                      versions   how we use it
========================================  =========  ==================================================
``AcceleratedOptimizer.optimizer``,       accel 1.x  the inner torch optimizer (it gets the step hooks);
``.scaler``                                          fp16: the ``GradScaler`` that unscales, once
``GradScaler._per_optimizer_states``      torch 2.x  ``[id(opt)]["stage"] is OptState.READY``: unscale only
                                                     while no one did in this step (a second ``unscale_``
                                                     raises)
``GradScaler._scale``                     torch 2.x  fp16 watchdog: the loss scale as a device tensor
                                                     (``get_scale()`` would read it on the host)
``Optimizer._step_supports_amp_scaling``  torch 2.x  fused optimizers: they read ``grad_scale``/``found_inf``
                                                     in ``step()`` (what ``GradScaler`` checks)
========================================  =========  ==================================================

Nothing here writes a private attribute: the skip goes through the optimizer's public step hooks
(:class:`~gradclip_hf.run.gate.StepGate`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["inner_optimizer", "scaler_enabled", "loss_scale", "unscale_once", "supports_grad_scale"]


def inner_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def supports_grad_scale(optimizer: Any) -> bool:
    """Whether ``optimizer`` reads ``grad_scale``/``found_inf`` in ``step()`` (torch's fused optimizers mark
    themselves with ``_step_supports_amp_scaling``, the attribute ``GradScaler`` checks)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def scaler_enabled(optimizer: Any) -> bool:
    scaler = getattr(optimizer, "scaler", None)
    return scaler is not None and getattr(scaler, "is_enabled", lambda: True)()


def loss_scale(optimizer: Any) -> Any:
    """The fp16 ``GradScaler``'s current scale as a device tensor (``None`` before its first ``scale()``)."""
    scale = getattr(getattr(optimizer, "scaler", None), "_scale", None)
    return scale if hasattr(scale, "reshape") else None


def unscale_once(optimizer: Any, unscale: Any = None) -> bool:
    """Unscale fp16 gradients exactly once per step; return whether this call unscaled.

    accelerate's ``AcceleratedOptimizer`` carries the ``GradScaler`` (``.scaler``). ``GradScaler.unscale_``
    raises if called twice in a step, and ``scaler.step()`` unscales only when the stage is still ``READY``.
    So: unscale when, and only when, the stage is ``READY`` (by state, not version); with ``unscale()`` when
    given (``accelerator.unscale_gradients``), else with the scaler itself."""
    if not scaler_enabled(optimizer):
        return False
    from torch.amp.grad_scaler import OptState

    scaler, inner = optimizer.scaler, inner_optimizer(optimizer)
    if scaler._per_optimizer_states[id(inner)]["stage"] is not OptState.READY:
        return False
    if unscale is not None:
        unscale()
    else:
        scaler.unscale_(inner)
    return True
