"""``GradClipCallback``: configurable gradient clipping for any ``transformers.Trainer`` (and TRL's)."""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ...config import ClipConfig
from ...core import GradClipper
from . import compat
from .runner import ClipRunner, warn_once

logger = logging.getLogger(__name__)

__all__ = ["GradClipCallback"]

_WRAPPED = "__gradclip_original__"


class GradClipCallback(TrainerCallback, ExportableState):
    """Clip gradients with a strategy and schedule before every ``optimizer.step()`` of a Trainer.

    Usage::

        trainer = Trainer(model=model, args=TrainingArguments(..., max_grad_norm=0),
                          callbacks=[GradClipCallback(strategy="zscore", threshold=1.0)])

    Args:
        config: a :class:`~gradclip_hf.config.ClipConfig`.
        clipper: a ready :class:`~gradclip_hf.core.GradClipper` (instead of ``config``).
        **options: ``ClipConfig`` fields (``strategy=``, ``threshold=``, ...) instead of ``config``.

    Behaviour:
        * Clips in ``on_pre_optimizer_step``: gradients are accumulated, reduced and (fp16) unscaled
          exactly once by then; the unscale is done here when nothing did it yet (checked on the
          GradScaler's per-optimizer stage, so it is never done twice).
        * ``max_grad_norm``: the Trainer would clip a second time. It is set to 0 for the run (and
          restored at train end) with a one-time warning; pass ``TrainingArguments(max_grad_norm=0)``
          to silence it.
        * At train begin the callback finds its Trainer on the call stack and wraps that instance's
          ``training_step`` (to get the step loss), ``log`` (to put ``grad_norm`` and ``gradclip/*``
          metrics into the logs before W&B/TensorBoard see them) and, on transformers 5.x,
          ``_get_grad_norm`` (so the norm is computed once). All are unwrapped at train end. If no
          Trainer is found it warns once and logs through ``on_log`` (after the reporters).
        * State (ZScore EMA, Quantile history) is saved in checkpoints (``ExportableState``) and
          restored at train begin when resuming, whatever ``restore_callback_states_from_checkpoint`` is.
        * DeepSpeed: only ``strategy="norm"`` with a constant schedule equal to DeepSpeed's
          ``gradient_clipping`` is accepted (the engine clips; a warning says so); else ``ValueError``.
    """

    def __init__(self, config: Optional[ClipConfig | dict] = None, clipper: Optional[GradClipper] = None,
                 _restore: bool = False, **options: Any):
        if options and (config is not None or clipper is not None):
            raise ValueError("Pass ClipConfig options as keywords, or `config`, or `clipper`: not several.")
        # Rebuilt by the Trainer's own restore (`restore_callback_states_from_checkpoint=True` calls
        # `type(cb)(**state["args"])` inside Trainer._load_callback_state): take over the runner (and any
        # custom clipper, binding) of the instance being replaced, found on that Trainer.
        runner = self._replaced_runner() if _restore else None
        if runner is None:
            if isinstance(config, dict):
                config = ClipConfig(**config)
            if options:
                unknown = sorted(set(options) - set(ClipConfig.field_names()))
                if unknown:
                    raise TypeError(f"GradClipCallback got unknown options {unknown}; allowed: "
                                    f"{ClipConfig.field_names()}.")
                config = ClipConfig(**options)
            runner = ClipRunner(config=config, clipper=clipper, owner=type(self).__name__)
        self.runner = runner
        self._fallback_logging = False

    @property
    def config(self) -> ClipConfig | None:
        return self.runner.config

    # The binding lives on the shared runner, so a copy rebuilt by the Trainer's callback restore keeps it.
    @property
    def _bound(self) -> bool:
        return getattr(self.runner, "bound", False)

    @property
    def trainer(self) -> Any:
        ref = getattr(self.runner, "trainer_ref", None)
        return ref() if ref is not None else None

    def bind(self, trainer: Any) -> "GradClipCallback":
        """Attach to ``trainer`` explicitly (``GradClipMixin`` does this; no stack walk, no wrapping)."""
        self.runner.trainer_ref = weakref.ref(trainer)
        self.runner.bound = True
        return self

    @classmethod
    def _replaced_runner(cls) -> ClipRunner | None:
        trainer = compat.find_trainer()
        if trainer is None:
            return None
        current = [cb for cb in trainer.callback_handler.callbacks if type(cb) is cls]
        return current[0].runner if current else None

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        config = self.runner.config
        args: dict[str, Any] = {"_restore": True}
        if config is not None:
            args["config"] = config.to_dict()
        return {"args": args, "attributes": {}, "runner": self.runner.state_dict()}

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer if self._bound else compat.find_trainer()
        if trainer is not None:
            if not self._bound:
                self.runner.trainer_ref = weakref.ref(trainer)
            others = [cb for cb in trainer.callback_handler.callbacks
                      if isinstance(cb, GradClipCallback) and cb.runner is not self.runner]
            if others:
                raise ValueError("Several gradient clippers on one Trainer (a GradClipTrainer and/or several "
                                 "GradClipCallback): gradients would be clipped more than once. Keep one.")
        self._fallback_logging = trainer is None
        if trainer is None:
            warn_once("no_trainer", "GradClipCallback could not find its Trainer on the call stack: it clips, "
                      "but cannot see the step loss, and logs its metrics through on_log (after W&B/TensorBoard "
                      "callbacks). Use GradClipTrainer or GradClipMixin for full integration.")
        self.runner.setup(trainer, args, state, warn_max_grad_norm=not self._bound)
        if self.runner.active and state.global_step > 0:  # resume: our state was read from the checkpoint
            saved = (state.stateful_callbacks or {}).get(type(self).__name__)
            if isinstance(saved, list):
                saved = saved[-1] if saved else None
            if isinstance(saved, dict) and saved.get("runner"):
                self.runner.load_state_dict(saved["runner"])
        if trainer is not None and not self._bound and self.runner.active:
            self._wrap(trainer)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        trainer = self.trainer
        model = model if model is not None else getattr(trainer, "model", None)
        self.runner.clip_step(model, state.global_step, optimizer, control=control, state=state)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._fallback_logging and logs is not None:
            self.runner.inject(logs)
        self.runner.report(state)  # W&B extras (histogram, spike table, alerts) when W&B is active
        return control

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        if trainer is not None and not self._bound:
            self._unwrap(trainer)
        self.runner.finish_report(state)  # W&B end-of-run chart
        self.runner.teardown(args)
        return control

    # ------------------------------------------------------------------ instance wrapping
    def _wrap(self, trainer: Any) -> None:
        runner = self.runner
        self._unwrap(trainer)  # a crashed earlier run may have left wrappers

        def wrap(name: str, make):
            original = getattr(trainer, name)
            wrapper = make(original)
            setattr(wrapper, _WRAPPED, (original, name in trainer.__dict__))
            setattr(trainer, name, wrapper)

        def make_training_step(original):
            @functools.wraps(original)
            def training_step(*a, **kw):
                loss = original(*a, **kw)
                runner.add_loss(loss)
                return loss
            return training_step

        def make_log(original):
            @functools.wraps(original)
            def log(logs, *a, **kw):
                runner.inject(logs)
                return original(logs, *a, **kw)
            return log

        def make_no_norm(original):
            @functools.wraps(original)
            def no_norm(*a, **kw):
                return None if runner.active else original(*a, **kw)
            return no_norm

        wrap("training_step", make_training_step)
        wrap("log", make_log)
        if compat.has_grad_norm_hooks():
            wrap("_get_grad_norm", make_no_norm)

    def _unwrap(self, trainer: Any) -> None:
        for name in ("training_step", "log", "_get_grad_norm"):
            current = trainer.__dict__.get(name)
            info = getattr(current, _WRAPPED, None)
            if info is None:
                continue
            original, was_instance_attr = info
            if was_instance_attr:
                setattr(trainer, name, original)
            else:
                del trainer.__dict__[name]
