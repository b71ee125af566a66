"""``GradClipCallback``: configurable gradient clipping for any ``transformers.Trainer`` (and TRL's).

A :class:`ClipSession` is what one entry point keeps across runs (the options, a user's clipper, the Trainer
it is bound to, the current run); each ``train()`` gets a fresh :class:`~.run.ClipRun`. Callbacks are thin
views of a session, so the copy the Trainer rebuilds when it restores callback states keeps everything.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback

from ...config import ClipConfig
from ...core import GradClipper, OptionError, StateError
from ...core._checks import UnknownOptionError
from . import compat
from .batches import IndexRecord
from .reporting import is_layer_key, logger
from .run import RESET_HINT, ClipRun, check_trainer, deepspeed_engine
from .wandb_glue import WandbGlue

__all__ = ["GradClipCallback", "ClipSession", "ConsoleTrim", "release"]

def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)  # Python shows it once per place by default


class ClipSession:
    """Options, binding and the current run of one entry point (see the module docstring)."""

    def __init__(self, config: Optional[ClipConfig], clipper: Optional[GradClipper], owner: str):
        self.config, self.user_clipper, self.owner = config, clipper, owner
        self.user_clipper_state = clipper.state_dict() if clipper is not None else None
        self.trainer_ref: Any = None
        self.bound = False  # GradClipMixin: the Trainer class overrides; no instance wrapping
        self.run: ClipRun | None = None
        self.wandb: WandbGlue | None = None
        self.pending_state: dict[str, Any] | None = None

    @property
    def trainer(self) -> Any:
        return self.trainer_ref() if self.trainer_ref is not None else None

    def live(self, trainer: Any = None) -> ClipRun | None:
        """The run in progress for ``trainer`` (``None`` between runs, after a crash, or for another state)."""
        run = self.run
        if run is None or not run.open or (trainer is not None and getattr(trainer, "state", None) is not run.state):
            return None
        return run

    def begin(self, trainer: Any, args: Any, state: Any, optimizer: Any, dataloader: Any = None) -> ClipRun:
        self.end()
        check_trainer(trainer, self.owner)
        clipper = self.user_clipper
        if clipper is not None:  # training twice starts from the same statistics
            clipper.load_state_dict(self.user_clipper_state)
        processing = getattr(trainer, "processing_class", None)
        engine = deepspeed_engine(trainer, self.config, clipper, self.owner)
        self.run = ClipRun(self.config, clipper, args=args, state=state, optimizer=optimizer, owner=self.owner,
                           decode=getattr(processing, "decode", None), engine=engine,
                           max_grad_norm=compat.deepspeed_clipping(trainer) if engine is not None else None)
        batches = self.run.recorder.batches
        batches.sampler = IndexRecord.attach(compat.train_sampler(dataloader))
        batches.dataset = getattr(trainer, "train_dataset", None)
        self._say_threshold(args)
        self.wandb = WandbGlue.create(args, self.run)
        return self.run

    def _say_threshold(self, args: Any) -> None:
        max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        where = ("DeepSpeed's engine clips at it (its clip_grad, set before each step)" if self.run.engine is not None
                 else "the Trainer's own clipping is off for this run")
        logger.info("gradclip: %s: %s; %s.", self.owner, self.run.threshold_source, where)
        explicit = self.config is not None and self.config.threshold is not None
        if explicit and max_grad_norm > 0 and self.config.threshold != max_grad_norm:
            _warn(f"gradclip: {self.owner} clips with {self.run.threshold_source}; "
                       f"TrainingArguments.max_grad_norm={max_grad_norm:g} is not used (the Trainer's own clipping is "
                       f"off for this run). Leave the threshold unset to clip at max_grad_norm.")

    def end(self) -> None:
        """Close the run in progress (train end, or any exit of ``train()``); idempotent."""
        if self.run is not None and self.run.open:
            self.run.open = False
            self.run.close()
            if self.run.recorder.batches.sampler is not None:
                self.run.recorder.batches.sampler.release()

    def state(self) -> dict[str, Any]:
        if self.run is not None:
            return self.run.state_dict()
        return dict(self.pending_state or {})


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
        * At train begin it finds its Trainer on the call stack and wraps that instance's ``training_step``
          (the step loss), ``log`` (metrics into the logs before W&B/TensorBoard see them) and the Trainer's
          own clip and norm calls; the wrappers act only during that run and are removed at train end. If
          no Trainer is found it warns and logs through ``on_log`` (after the reporters).
        * Skips go through the optimizer's step hooks; state is saved in checkpoints (``ExportableState``)
          and restored when resuming, also from checkpoints written without the pack (fresh statistics).
    """

    def __init__(self, config: Optional[ClipConfig | dict] = None, clipper: Optional[GradClipper] = None,
                 _restore: bool = False, **options: Any):
        session = self._replaced_session() if _restore else None
        if session is None:
            if _restore:  # rebuilt from a checkpoint outside a Trainer: only the defaults are known
                options, config = {}, None
            if clipper is not None and (config is not None or options):
                raise OptionError("clipper", clipper, "None when ClipConfig options are given")
            if clipper is not None and not isinstance(clipper, GradClipper):
                raise OptionError("clipper", clipper, "a GradClipper or None")
            config = _as_config(config, options)
            session = ClipSession(config if clipper is not None or config is not None else ClipConfig(), clipper,
                                  owner=type(self).__name__)
        self.session = session
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
        self.session.trainer_ref, self.session.bound = weakref.ref(trainer), True
        return self

    def attach(self, trainer: Any) -> "GradClipCallback":
        """Name the Trainer this callback will run in (plugins that are handed it: Axolotl's
        ``add_callbacks_post_trainer``), instead of finding it on the call stack at train begin."""
        self.session.trainer_ref, self.session.bound = weakref.ref(trainer), False
        return self

    @classmethod
    def _replaced_session(cls) -> ClipSession | None:
        trainer = compat.find_trainer()
        current = [cb for cb in trainer.callback_handler.callbacks if type(cb) is cls] if trainer else []
        return current[0].session if current else None

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
        session = self.session
        trainer = session.trainer if session.bound else (compat.find_trainer() or session.trainer)
        if trainer is not None:
            session.trainer_ref = weakref.ref(trainer)
            _check_single(trainer, session)
        self._fallback_logging = trainer is None
        if trainer is None:
            _warn("gradclip: GradClipCallback could not find its Trainer on the call stack: it "
                       "clips, but cannot see the step loss, and logs its metrics through on_log (after W&B and "
                       "TensorBoard). Use GradClipTrainer or GradClipMixin for the full integration.")
        if trainer is None and optimizer is not None and hasattr(compat.inner_optimizer(optimizer), "clip_grad"):
            raise ValueError("gradclip: GradClipCallback under DeepSpeed needs its Trainer (not found on the call "
                             "stack): use GradClipTrainer / GradClipMixin, or callback.attach(trainer).")
        run = session.begin(trainer, args, state, optimizer, train_dataloader)
        _restore_state(run, state, type(self).__name__)
        run.check_skip_list(args, state)
        if run.engine is not None:  # after a resume the engine's clip_grad is the checkpoint's: the pack's now
            run.engine.sync(int(state.global_step))
        state.stateful_callbacks[type(self).__name__] = self.state()  # a later save finds our entry
        if trainer is not None:
            _wrap(trainer, session, methods=not session.bound)
            ConsoleTrim.place(trainer)
        return control

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        run = self.session.live()
        if run is not None:
            trainer = self.session.trainer
            run.step(model if model is not None else getattr(trainer, "model", None), state, optimizer)
            _apply_stop(run, control, args)
        return control

    def on_step_end(self, args, state, control, **kwargs):
        run = self.session.live()
        if run is not None:
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


def _restore_state(run: ClipRun, state: Any, name: str) -> None:
    """On resume, our statistics from the checkpoint's ``trainer_state.json`` (checked field by field; an entry
    that is not the pack's raises ``StateError``; ``reset_statistics``: not loaded)."""
    if not state.global_step:
        return
    source = f"the trainer_state.json of the checkpoint at step {state.global_step} (stateful_callbacks['{name}'])"
    callbacks = state.stateful_callbacks or {}
    saved = callbacks.get(name) if isinstance(callbacks, dict) else None
    if isinstance(saved, list):
        saved = saved[-1] if saved else None
    if saved is not None and not isinstance(saved, dict):
        raise StateError(name, saved, "a dict (the entry the pack saves)", f"{source}; {RESET_HINT}")
    run_state = saved.get("run", saved.get("runner")) if saved is not None else None
    if run_state is not None and not isinstance(run_state, dict):
        raise StateError(f"{name}.run", run_state, "a dict", f"{source}; {RESET_HINT}")
    if run.config.reset_statistics and run_state:
        logger.warning("gradclip: reset_statistics is set: the gradclip state of the checkpoint at step %d is not "
                       "loaded; the clipping statistics start fresh.", state.global_step)
        return
    if not run_state:
        logger.warning("gradclip: the checkpoint at step %d holds no gradclip state (written without the pack, or "
                       "before its first step): the clipping statistics start fresh.", state.global_step)
        return
    run.load_state_dict(run_state, source=source)


# ---------------------------------------------------------------------- instance wrapping (bare callback)
_WRAPPED = "__gradclip_original__"


class _InstanceWrapper:
    """``make(original, *args)`` set on one instance in place of its method ``original``."""

    def __init__(self, make: Any, original: Any, was_instance_attribute: bool):
        self.make, self.original, self.was_instance_attribute = make, original, was_instance_attribute

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.make(self.original, *args, **kwargs)


def _wrap(trainer: Any, session: ClipSession, methods: bool = True) -> None:
    """Wrap this Trainer instance's methods (``methods``: a bare callback; the mixin overrides them) and, on
    transformers 4.x, its accelerator's ``clip_grad_norm_``, for this run. A wrapper acts only while its run
    is live for this Trainer (``session.live(trainer)``): left behind by a crash, it calls the original."""
    _unwrap(trainer)

    def training_step(original, *a, **kw):
        inputs = a[1] if len(a) > 1 else kw.get("inputs")
        run = session.live(trainer)
        if run is not None:
            run.engine_inputs(inputs)
        loss = original(*a, **kw)
        run = session.live(trainer)
        if run is not None:
            run.add_micro_batch(loss, inputs)
        return loss

    def backward(original, loss, *a, **kw):  # DeepSpeed: the engine steps inside; its threshold first
        run = session.live(trainer)
        if run is not None:
            run.engine_backward(loss, bool(trainer.accelerator.sync_gradients), int(trainer.state.global_step))
        return original(loss, *a, **kw)

    def log(original, logs, *a, **kw):
        run = session.live(trainer)
        if run is not None:
            run.inject(logs, trainer.state)
        return original(logs, *a, **kw)

    def no_op(original, *a, **kw):  # the Trainer's own clip / norm pass: ours replaces it
        return None if session.live(trainer) is not None else original(*a, **kw)

    targets = [(trainer, "training_step", training_step), (trainer, "log", log)] if methods else []
    if compat.has_grad_norm_hooks():
        targets += [(trainer, "_clip_grad_norm", no_op), (trainer, "_get_grad_norm", no_op)] if methods else []
    else:  # transformers 4.x clips inline with the accelerator
        targets.append((trainer.accelerator, "clip_grad_norm_", no_op))
    if compat.is_deepspeed(trainer):
        targets.append((trainer.accelerator, "backward", backward))
    for owner, name, make in targets:
        setattr(owner, name, _InstanceWrapper(make, getattr(owner, name), name in owner.__dict__))


def _unwrap(trainer: Any) -> None:
    for owner in (trainer, getattr(trainer, "accelerator", None)):
        for name, value in list(getattr(owner, "__dict__", {}).items()):
            if isinstance(value, _InstanceWrapper):
                if value.was_instance_attribute:
                    setattr(owner, name, value.original)
                else:
                    del owner.__dict__[name]


def release(trainer: Any) -> None:
    """Undo what a run set up on ``trainer``: instance wrappers and the console filter."""
    _unwrap(trainer)
    ConsoleTrim.remove(trainer)


class ConsoleTrim(TrainerCallback):
    """Drops the per-layer keys from the logs right before the console printer: W&B, TensorBoard and the
    other reporters (earlier in the callback list) and ``trainer_state.json`` keep them."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs:
            for key in [k for k in logs if is_layer_key(k)]:
                del logs[key]
        return control

    @classmethod
    def place(cls, trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        if any(isinstance(cb, cls) for cb in callbacks):
            return
        printers = [i for i, cb in enumerate(callbacks) if isinstance(cb, (PrinterCallback, ProgressCallback))]
        callbacks.insert(printers[0] if printers else len(callbacks), cls())

    @classmethod
    def remove(cls, trainer: Any) -> None:
        callbacks = trainer.callback_handler.callbacks
        callbacks[:] = [cb for cb in callbacks if not isinstance(cb, cls)]
