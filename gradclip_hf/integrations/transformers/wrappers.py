"""The bare callback's reach into its Trainer instance, for one run: wrappers set on that instance (and on its
accelerator) in place of ``training_step``, ``log``, the Trainer's own clip and norm calls and, where the run
needs each loss before its backward (the micro-batch gate; DeepSpeed, which steps inside the last one),
``accelerator.backward``. A wrapper acts only while its run is live for this Trainer: left behind by a crash, it
calls the original. ``GradClipMixin`` overrides the Trainer's methods instead (only the accelerator's are wrapped
for it); both go through :func:`before_training_step`."""

from __future__ import annotations

from typing import Any

import torch

from ...run import ClipRun
from . import compat
from .console import ConsoleTrim
from .session import ClipSession

__all__ = ["wrap", "unwrap", "release", "before_training_step"]

_WRAPPED = "__gradclip_original__"


class _InstanceWrapper:
    """``make(original, *args)`` set on one instance in place of its method ``original``."""

    def __init__(self, make: Any, original: Any, was_instance_attribute: bool):
        self.make, self.original, self.was_instance_attribute = make, original, was_instance_attribute

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.make(self.original, *args, **kwargs)


def before_training_step(trainer: Any, run: ClipRun, inputs: Any, num_items_in_batch: Any) -> Any:
    """Before a micro-batch's ``training_step``: a zero loss to return instead of computing it when its step is
    listed (``skip_steps``: the batch is consumed, not computed; the Trainer still counts its tokens), else
    ``None``; with the micro-batch gate, its share of the step is noted for its backward (no host read)."""
    if run.skip_batch(int(trainer.state.global_step)):
        return torch.zeros((), device=trainer.args.device)
    if run.gate is not None:
        run.share = compat.micro_batch_share(trainer, inputs, num_items_in_batch)
    return None


def wrap(trainer: Any, session: ClipSession, methods: bool = True) -> None:
    """Wrap this Trainer instance's methods (``methods``: a bare callback; the mixin overrides them) and, on
    transformers 4.x, its accelerator's ``clip_grad_norm_``, for this run. A wrapper acts only while its run
    is live for this Trainer (``session.live(trainer)``): left behind by a crash, it calls the original."""
    unwrap(trainer)

    def training_step(original, *a, **kw):
        inputs = a[1] if len(a) > 1 else kw.get("inputs")
        run = session.live(trainer)
        if run is not None:
            skipped = before_training_step(trainer, run, inputs, a[2] if len(a) > 2 else kw.get("num_items_in_batch"))
            if skipped is not None:
                run.add_micro_batch(skipped, inputs)
                return skipped
        loss = original(*a, **kw)
        if run is not None and session.live(trainer) is run:
            run.add_micro_batch(loss, inputs)
        return loss

    def backward(original, loss, *a, **kw):  # the loss before its backward (the gate; DeepSpeed steps in the last)
        run = session.live(trainer)
        if run is not None:
            share, run.share = run.share, None
            loss = run.before_backward(loss, bool(trainer.accelerator.sync_gradients), int(trainer.state.global_step),
                                       share)
        return original(loss, *a, **kw)

    def log(original, logs, *a, **kw):
        run = session.live(trainer)
        if run is not None:
            ConsoleTrim.place(trainer)
            run.inject(logs, trainer.state)
        return original(logs, *a, **kw)

    def no_op(original, *a, **kw):  # the Trainer's own clip / norm pass: ours replaces it
        return None if session.live(trainer) is not None else original(*a, **kw)

    targets = [(trainer, "training_step", training_step), (trainer, "log", log)] if methods else []
    if compat.has_grad_norm_hooks():
        targets += [(trainer, "_clip_grad_norm", no_op), (trainer, "_get_grad_norm", no_op)] if methods else []
    else:  # transformers 4.x clips inline with the accelerator
        targets.append((trainer.accelerator, "clip_grad_norm_", no_op))
    if session.run is not None and session.run.sees_backward:
        targets.append((trainer.accelerator, "backward", backward))
    for owner, name, make in targets:
        setattr(owner, name, _InstanceWrapper(make, getattr(owner, name), name in owner.__dict__))


def unwrap(trainer: Any) -> None:
    for owner in (trainer, getattr(trainer, "accelerator", None)):
        for name, value in list(getattr(owner, "__dict__", {}).items()):
            if isinstance(value, _InstanceWrapper):
                if value.was_instance_attribute:
                    setattr(owner, name, value.original)
                else:
                    del owner.__dict__[name]


def release(trainer: Any) -> None:
    """Undo what a run set up on ``trainer``: instance wrappers and the console filter."""
    unwrap(trainer)
    ConsoleTrim.remove(trainer)
