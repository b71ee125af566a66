"""``GradClipCallback``: configurable gradient clipping for any ``transformers.Trainer`` (and TRL's).

The callback is a thin view of a :class:`~.session.ClipSession` (the options, a user's clipper, the Trainer it is
bound to, the current run), so the copy the Trainer rebuilds when it restores callback states keeps everything.
Each ``train()`` gets a fresh :class:`~gradclip_hf.run.ClipRun`.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ...config import ClipConfig
from ...core import GradClipper, OptionError
from ...core._checks import UnknownOptionError
from ...run import ClipRun
from ...run.compat import inner_optimizer
from . import compat
from .console import ConsoleTrim
from .session import ClipSession, bind_session, bound_session, checkpoint_session, restore_state
from .wrappers import release, wrap

__all__ = ["GradClipCallback", "ClipSession", "ConsoleTrim", "release"]


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)  # Python shows it once per place by default


def _as_config(config: Any, options: dict[str, Any]) -> Optional[ClipConfig]:
    if options:
        if config is not None:
            raise OptionError("config", config, "None when ClipConfig options are given as keywords")
        for key in options:
            if key not in ClipConfig.field_names():
                raise UnknownOptionError(key, "GradClipCallback", ClipConfig.field_names())
        return ClipConfig(**options)
    if isinstance(config, dict):
        return ClipConfig.from_dict(config, owner="ClipConfig (GradClipCallback's config dict)")
    if config is not None and not isinstance(config, ClipConfig):
        raise OptionError("config", config, "a ClipConfig, a dict of its options, or None")
    return config


class GradClipCallback(TrainerCallback, ExportableState):
    """Clip gradients with a strategy and schedule before every ``optimizer.step()`` of a Trainer.

    Usage::

        trainer = Trainer(model=model, args=TrainingArguments(...),
                          callbacks=[GradClipCallback(strategy="zscore")])

    Args:
        config: a :class:`~gradclip_hf.config.ClipConfig` (or a dict of its options).
        clipper: a ready :class:`~gradclip_hf.core.GradClipper` (instead of ``config``).
        **options: ``ClipConfig`` fields (``strategy=``, ``threshold=``, ...) instead of ``config``.

    Behaviour:
        * Clips in ``on_pre_optimizer_step``, after backward, gradient reduction and (fp16) the unscale,
          once per optimizer step. The threshold defaults to ``max_grad_norm``. The Trainer's own clipping
          does nothing while the run is active; ``TrainingArguments`` are never changed.
        * At train begin it finds its Trainer on the call stack (a callback is never handed one; ``attach()``
          names it instead) and wraps that instance's ``training_step`` (the step loss), ``log`` (metrics into
          the logs before W&B/TensorBoard see them) and the Trainer's own clip and norm calls; the wrappers act
          only during that run and are removed at train end. If no Trainer is found it warns and logs through
          ``on_log`` (after the reporters).
        * With ``restore_callback_states_from_checkpoint`` the Trainer rebuilds the callback from its ``state()``
          (``args`` ``{"_restore": True}``: a stand-in) and appends it last; at train begin the stand-in takes
          over the session of its Trainer (``GradClipMixin``, ``attach()``, or a Trainer that trained before):
          your options win. Only a bare callback in a Trainer's first ``train()`` has none to take over: it runs
          with the options saved in the checkpoint, and says so (:func:`~.session.checkpoint_session`).
        * Skips go through the optimizer's step hooks; state is saved in checkpoints (``ExportableState``)
          and restored when resuming, also from checkpoints written without the pack (fresh statistics).
    """

    def __init__(self, config: Optional[ClipConfig | dict] = None, clipper: Optional[GradClipper] = None,
                 _restore: bool = False, **options: Any):
        self.restored = bool(_restore)  # the Trainer rebuilt it from a checkpoint: a stand-in until train begin
        if _restore:
            options, config, clipper = {}, None, None
        if clipper is not None and (config is not None or options):
            raise OptionError("clipper", clipper, "None when ClipConfig options are given")
        if clipper is not None and not isinstance(clipper, GradClipper):
            raise OptionError("clipper", clipper, "a GradClipper or None")
        config = _as_config(config, options)
        self.session = ClipSession(config if clipper is not None or config is not None else ClipConfig(), clipper,
                                   owner=type(self).__name__)
        self._fallback_logging = False

    @property
    def config(self) -> ClipConfig | None:
        return self.session.config

    @property
    def run(self) -> ClipRun | None:
        """The current (or last) run: ``num_clips``, ``last_report``, ``spike_events``, ``clipper``, ..."""
        return self.session.run

    def bind(self, trainer: Any) -> "GradClipCallback":
        """Bind to a ``GradClipMixin`` Trainer, whose class overrides do what the wrappers would."""
        bind_session(trainer, self.session, bound=True)
        return self

    def attach(self, trainer: Any) -> "GradClipCallback":
        """Name the Trainer this callback will run in (plugins that are handed it: Axolotl's
        ``add_callbacks_post_trainer``), instead of finding it on the call stack at train begin."""
        bind_session(trainer, self.session, named=True)
        return self

    # ------------------------------------------------------------------ ExportableState
    def state(self) -> dict:
        return {"args": {"_restore": True}, "attributes": {}, "run": self.session.state()}

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        """At the Trainer's construction: ``max_grad_norm`` with the options (NaN refused, naming it)."""
        if self.session.config is not None and self.session.user_clipper is None:
            self.session.config.resolved_threshold(getattr(args, "max_grad_norm", None) or 0.0)
        return control

    def on_train_begin(self, args, state, control, optimizer=None, train_dataloader=None, **kwargs):
        named = self.session.trainer if self.session.named else None
        trainer = named or compat.find_trainer() or self.session.trainer  # the one stack walk: callbacks=[...]
        if self.restored:  # rebuilt from a checkpoint: the session of its Trainer, else the checkpoint's options
            self.restored = False
            self.session = bound_session(trainer) or checkpoint_session(state, type(self).__name__)
        session = self.session
        if trainer is not None:
            bind_session(trainer, session)
            _check_single(trainer, session)
        self._fallback_logging = trainer is None
        if trainer is None:
            _warn("gradclip: GradClipCallback could not find its Trainer on the call stack: it "
                       "clips, but cannot see the step loss, and logs its metrics through on_log (after W&B and "
                       "TensorBoard). Use GradClipTrainer or GradClipMixin for the full integration.")
        if trainer is None and optimizer is not None and hasattr(inner_optimizer(optimizer), "clip_grad"):
            raise ValueError("gradclip: GradClipCallback under DeepSpeed needs its Trainer (not found on the call "
                             "stack): use GradClipTrainer / GradClipMixin, or callback.attach(trainer).")
        run = session.begin(trainer, args, state, optimizer, train_dataloader)
        if trainer is None and run.gate is not None:
            session.end()
            raise ValueError("gradclip: spike_gate='micro_batch' judges each micro-batch's loss before its backward, "
                             "through its Trainer, which GradClipCallback could not find on the call stack: use "
                             "GradClipTrainer / GradClipMixin, or callback.attach(trainer).")
        restore_state(run, state, type(self).__name__)
        run.check_skip_list(args, state)
        run.start(int(state.global_step))  # DeepSpeed: the engine's clip_grad is the checkpoint's: the pack's now
        state.stateful_callbacks[type(self).__name__] = self.state()  # a later save finds our entry
        if trainer is not None:
            wrap(trainer, session, methods=not session.bound)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        run = self.session.live()
        if run is not None:
            trainer = self.session.trainer
            run.clip_step(model if model is not None else getattr(trainer, "model", None), state)
            _apply_stop(run, control, args)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        run = self.session.live()
        if run is not None:
            run.end_step()
            _apply_stop(run, control, args)
        return control

    def on_save(self, args, state, control, **kwargs):
        run = self.session.live()
        if run is not None and run.stop_reason is not None:
            run.stop_saved = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        run = self.session.live()
        if run is None:
            return control
        if self._fallback_logging and logs is not None:
            run.inject(logs, state)
        if self.session.wandb is not None:
            self.session.wandb.after_log(state)
        _apply_stop(run, control, args)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        session = self.session
        if session.wandb is not None and session.live() is not None:
            session.wandb.finish(state)
        if session.trainer is not None:
            release(session.trainer)
        session.end()
        return control


def _check_single(trainer: Any, session: ClipSession) -> None:
    others = [cb for cb in trainer.callback_handler.callbacks
              if isinstance(cb, GradClipCallback) and cb.session is not session]
    if others:
        raise ValueError("gradclip: several gradient clippers on one Trainer (a GradClipTrainer and/or several "
                         "GradClipCallback): gradients would be clipped more than once. Keep one.")


def _apply_stop(run: ClipRun, control: Any, args: Any) -> None:
    """The pack stopped the run: training ends after this step, whose log row carries the reason and, with a
    ``save_strategy`` of ``steps`` or ``best``, a checkpoint is saved at it (as the Trainer saves at the end of
    training; with ``epoch`` the Trainer saves at the end of the stopped epoch itself)."""
    if run.stop_reason is None:
        return
    control.should_training_stop = True
    if not run.stop_logged:
        control.should_log = True
    strategy = getattr(getattr(args, "save_strategy", None), "value", getattr(args, "save_strategy", None))
    if not run.stop_saved and strategy in ("steps", "best"):
        control.should_save = True
