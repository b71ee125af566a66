"""Every private (or unstable) Trainer / accelerate / DeepSpeed detail the Trainer integration relies on, in ONE
place. The optimizer's (``AcceleratedOptimizer``, ``GradScaler``, fused optimizers), shared with
``AcceleratorClipper``, are in :mod:`gradclip_hf.run.compat`.

Verified against transformers 5.23.0 and 4.57.6 (accelerate 1.15, torch 2.13): read in both sources, and
``tests/integration`` and ``tests/logging`` run on both in CI (``make test``: ``.venv`` and ``.venv-tf4``).

=====================================  ==========  =========  =================================================
name                                   5.23.0      4.57.6     how we use it
=====================================  ==========  =========  =================================================
``Trainer._clip_grad_norm(model)``      yes         absent     overridden (mixin) / wrapped on the instance
``Trainer._get_grad_norm(model,                                (callback) to do nothing while our run is
grad_norm=None)``                                              active: the Trainer neither clips nor measures
                                                               (no extra norm pass); ``args`` are never changed
``Accelerator.clip_grad_norm_``         (used)      yes        4.57 clips inline with it when ``max_grad_norm
                                                               > 0``: wrapped on the Trainer's accelerator
                                                               instance to do nothing while our run is active
``callback on_pre_optimizer_step``      yes         yes        where we clip: after backward, gradient
                                                               reduction and (our) fp16 unscale, before
                                                               ``optimizer.step()``, once per step
``Trainer.is_deepspeed_enabled``,       yes         yes        DeepSpeed detection (its engine steps inside
``accelerator.distributed_type``                                ``backward``)
``accelerator.state.fsdp_plugin``       yes         yes        FSDP1 refusal (flat local shards)
``TrainerState.stateful_callbacks``     yes         yes        our entry is added at train begin, so a resume
                                                                from a checkpoint written without us can save
``Trainer.pop_callback``,               yes         yes        public; with ``callback_handler.callbacks``
``Trainer.add_callback``,                                       (read only) a callback is placed before another
``callback_handler.callbacks`` (read)                           one (:func:`insert_callback`): first for the
                                                                mixin, the console filter before the printer
``Trainer._load_callback_state``        yes         yes        not called: with ``restore_callback_states_from_
(``restore_callback_states_from_                                checkpoint`` it rebuilds each stored callback as
checkpoint``)                                                   ``type(cb)(**state["args"])``, drops the old one
                                                                and appends the new one last (a stand-in that
                                                                takes over its Trainer's session at train begin)
``DataLoaderShard.batch_sampler``,      1.15        1.15       the train dataloader's index sampler: its
``BatchSamplerShard.batch_sampler``                             instance's class is swapped for a recording
                                                                subclass for the run (records name the indices)
``Accelerator.backward``,               (1.16)      (1.16)     DeepSpeed: wrapped on the Trainer's accelerator
``Accelerator.sync_gradients``                                  instance for the run; at the step's last micro-
                                                                batch (``sync_gradients``) the engine's threshold
                                                                is set before the original runs (it steps there)
``Trainer.model_wrapped`` (the engine)  (5.25)      (yes)      DeepSpeed: the ``DeepSpeedEngine`` of the run
``deepspeed_plugin.deepspeed_config``   (1.16)      (1.16)     DeepSpeed: the config dict ("auto" filled in)
``Trainer.lr_scheduler``                (5.25)      (yes)      DeepSpeed: stepped once after a step the pack
                                                                skipped when the engine has no scheduler of its
                                                                own (the Trainer skips it on an overflow step)
``DefaultFlowCallback``'s logging       (5.25)      (yes)      DeepSpeed: which steps log (``logging_first_step``,
rule, ``TrainerState.logging_steps``                            ``logging_strategy`` steps/epoch): per-layer norms
                                                                are read before the engine frees the gradients
``Trainer.loss_is_scaled_for_ga``,      5.25        absent     the micro-batch gate (:func:`micro_batch_share`):
``model_accepts_loss_kwargs``,          yes         yes        whether ``training_step`` divides the loss by
``compute_loss_func``,                                         ``current_gradient_accumulation_steps`` or
``current_gradient_accumulation_steps``                        ``compute_loss`` divides it by the step's
                                                               ``num_items_in_batch`` (times the processes with
                                                               ``average_tokens_across_devices``), as the
                                                               Trainer decides it
``Trainer._loss_shifts_labels``         5.25        absent     the gate counts a micro-batch's label tokens as
                                                               ``_get_num_items_in_batch`` does: ``shift_labels``,
                                                               else ``labels[..., 1:]`` where the loss shifts
                                                               (5.25), else ``labels`` (4.57)
=====================================  ==========  =========  =================================================

The DeepSpeed rows (in parentheses) are verified with transformers 5.25.0 and accelerate 1.16.0, the versions
of ``.venv-deepspeed`` (``make test-deepspeed``), and with transformers 4.57.6 (tests/deepspeed run in a venv
with it: docs/distributed.md).

DeepSpeed 0.19.8 (read in its source, and run on CPU by ``tests/deepspeed``, ZeRO-1, ZeRO-2 and ZeRO-3):

=====================================  =================================================================
``engine.optimizer.clip_grad``          ZeRO-1/2 ``DeepSpeedZeroOptimizer`` and ZeRO-3
                                        ``DeepSpeedZeroOptimizer_Stage3``: read in every ``step()``
                                        (``unscale_and_clip_grads``), 0 = no clip. ZeRO-1/2 save it in the
                                        optimizer's ``state_dict`` (``CLIP_GRAD``) and restore it on load;
                                        ZeRO-3 does not save it. Written before each step and at train begin
                                        (after a resume); the value found at train begin is put back at the end
``zero_optimization.compute_grad_norm`` must stay true (the default): false leaves no norm (refused)
``engine.get_global_grad_norm()``       public: the unscaled pre-clip norm of the last step (a device tensor);
                                        ``inf`` (a float) after an overflow step, on every stage
``engine.optimizer.overflow``           the step was skipped (non-finite norm, fp16 loss-scale overflow, or
                                        the pack's own skip)
``engine.zero_optimization_stage()``,   public
``engine.fp16_enabled()``
=====================================  =================================================================

The engine's internals the DeepSpeed backend reaches for (the skip, rollback, per-layer norms, fp16) are listed
in :mod:`gradclip_hf.integrations.deepspeed.compat`.

Nothing here writes a private attribute: the skip goes through the optimizer's public step hooks
(:class:`~gradclip_hf.run.gate.StepGate`), and the LR scheduler advances on a skipped step (the Trainer steps it
unless a GradScaler reports an overflow; under DeepSpeed the pack steps it after a step it skipped).
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["train_sampler", "find_trainer", "insert_callback", "is_deepspeed", "fsdp_version", "has_grad_norm_hooks",
           "deepspeed_clipping", "deepspeed_engine", "deepspeed_config", "logging_steps", "micro_batch_share"]


def _trainer_cls():
    from transformers import Trainer
    return Trainer


def has_grad_norm_hooks() -> bool:
    """5.x has ``_clip_grad_norm``/``_get_grad_norm``; 4.57 clips inline with ``accelerator.clip_grad_norm_``."""
    trainer = _trainer_cls()
    return hasattr(trainer, "_get_grad_norm") and hasattr(trainer, "_clip_grad_norm")


def find_trainer(max_depth: int = 32) -> Any | None:
    """The ``transformers.Trainer`` whose method is on the call stack: a callback passed in ``callbacks=[...]`` is
    never handed its Trainer, so ``GradClipCallback`` looks for it here at train begin (the pack's one stack walk;
    ``GradClipMixin`` and ``attach()`` hand it over instead)."""
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


def insert_callback(trainer: Any, callback: Any, before: Any = None) -> None:
    """Add ``callback`` right before the first of ``trainer``'s callbacks for which ``before(cb)`` holds (first of
    all without ``before``; last when none does), with the public ``pop_callback``/``add_callback`` only: the
    callbacks from that one on are popped and added back after it, in their order. Not while a callback event
    is being dispatched (the handler iterates over the list)."""
    callbacks = trainer.callback_handler.callbacks  # read only
    at = next((i for i, cb in enumerate(callbacks) if before is None or before(cb)), len(callbacks))
    tail = list(callbacks[at:])
    for cb in tail:
        trainer.pop_callback(cb)
    trainer.add_callback(callback)
    for cb in tail:
        trainer.add_callback(cb)


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
        value = trainer.accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
        if isinstance(value, (int, float)):
            return float(value)
    except AttributeError:
        pass
    value = getattr(getattr(trainer, "args", None), "max_grad_norm", None)
    return float(value) if isinstance(value, (int, float)) else None


def deepspeed_engine(trainer: Any) -> Any | None:
    """The ``DeepSpeedEngine`` the Trainer trains (``model_wrapped``; at train begin it exists), else ``None``."""
    engine = getattr(trainer, "model_wrapped", None)
    return engine if hasattr(engine, "get_global_grad_norm") and hasattr(engine, "optimizer") else None


def deepspeed_config(trainer: Any) -> dict:
    """The DeepSpeed config dict accelerate holds ("auto" values filled in by the Trainer)."""
    try:
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
    except AttributeError:
        return {}
    return config if isinstance(config, dict) else {}


def fsdp_version(trainer: Any) -> int | None:
    """1 or 2 when the Trainer's model is sharded by accelerate's FSDP plugin, else ``None`` (accelerate keeps a
    given plugin but runs plain DDP where it cannot shard, e.g. on CPU: that is not FSDP)."""
    from accelerate.utils import DistributedType

    accelerator = getattr(trainer, "accelerator", None)
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is None or getattr(accelerator, "distributed_type", None) != DistributedType.FSDP:
        return None
    return int(getattr(plugin, "fsdp_version", 1))


def train_sampler(dataloader: Any) -> Any | None:
    """The index sampler under accelerate's prepared train dataloader (``None`` for an iterable dataset):
    ``dataloader.batch_sampler``, unwrapped through accelerate's ``BatchSamplerShard.batch_sampler``, then its
    ``.sampler``."""
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    for _ in range(4):  # BatchSamplerShard -> BatchSampler -> sampler
        if batch_sampler is None:
            return None
        if hasattr(batch_sampler, "batch_sampler") and not hasattr(batch_sampler, "sampler"):
            batch_sampler = batch_sampler.batch_sampler
            continue
        return getattr(batch_sampler, "sampler", None)
    return None


def logging_steps(args: Any, state: Any, dataloader: Any = None) -> Any:
    """Whether the Trainer logs at step ``s`` (numbered from 1), as ``DefaultFlowCallback`` decides it:
    ``logging_first_step``; every ``state.logging_steps`` steps (strategy ``steps``); the last step of each epoch
    (strategy ``epoch``: the update steps per epoch from the train dataloader's length, as the Trainer counts
    them). Known before the step, where DeepSpeed's gradients must be read."""
    strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
    every = int(getattr(state, "logging_steps", 0) or 0)
    first = bool(getattr(args, "logging_first_step", False))
    per_epoch = 0
    if strategy == "epoch":
        try:
            batches, accumulate = len(dataloader), max(int(args.gradient_accumulation_steps), 1)
            per_epoch = max(batches // accumulate + int(batches % accumulate > 0), 1)
        except TypeError:  # no length: no epoch boundary known ahead
            per_epoch = 0

    def logs(step: int) -> bool:
        if step == 1 and first:
            return True
        if strategy == "steps" and every > 0:
            return step % every == 0
        return per_epoch > 0 and step % per_epoch == 0

    return logs


def _label_tokens(trainer: Any, inputs: Any) -> Any:
    """The label tokens of one micro-batch as ``_get_num_items_in_batch`` counts them (a device-free tensor op)."""
    if not hasattr(inputs, "get"):
        return None
    labels = inputs.get("shift_labels") if hasattr(trainer, "_loss_shifts_labels") else None
    if labels is None:
        labels = inputs.get("labels")
        if labels is not None and getattr(trainer, "_loss_shifts_labels", False):
            labels = labels[..., 1:]
    return labels.ne(-100).sum() if hasattr(labels, "ne") else None


def micro_batch_share(trainer: Any, inputs: Any, num_items_in_batch: Any) -> tuple[Any, Any]:
    """``(scale, weight)`` of a micro-batch for the micro-batch gate, as ``training_step`` scales its loss before
    ``accelerator.backward``: a mean per micro-batch divided by the accumulation steps (``scale`` = those steps,
    ``weight`` 1), or, with ``num_items_in_batch``, a sum over label tokens divided by the step's count (times the
    processes with ``average_tokens_across_devices``): ``scale`` = count / (tokens x processes), ``weight`` = the
    micro-batch's tokens (device tensors, no host read)."""
    import torch

    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
            trainer.compute_loss_func is not None
    if not scaled:
        return float(trainer.current_gradient_accumulation_steps), 1.0
    tokens = _label_tokens(trainer, inputs) if num_items_in_batch is not None else None
    if tokens is None:  # a loss function of the user's without a count: its own scale, equal shares
        return 1.0, 1.0
    tokens = tokens.to(torch.float64)
    total = (num_items_in_batch.to(tokens.device, torch.float64) if isinstance(num_items_in_batch, torch.Tensor)
             else torch.full((), float(num_items_in_batch), dtype=torch.float64, device=tokens.device))
    processes = 1
    if trainer.args.average_tokens_across_devices and (trainer.model_accepts_loss_kwargs or trainer.compute_loss_func):
        processes = trainer.accelerator.num_processes // (trainer.get_tp_size() if hasattr(trainer, "get_tp_size")
                                                          else 1)
    return total / (tokens * processes), tokens
