"""``ClipSession``: what one entry point (a ``GradClipCallback``, and through it ``GradClipMixin``) keeps across
runs: the options, a user's clipper, the Trainer it is bound to, the current :class:`~gradclip_hf.run.ClipRun`.
Each ``train()`` gets a fresh run, on the step backend its Trainer needs (DeepSpeed's engine, or the local one).

A session is registered by the Trainer it is bound to as soon as that Trainer is known (:func:`bind_session`:
``GradClipMixin`` and ``attach()`` at construction, a bare callback at its first train begin): a callback the
Trainer rebuilds from a checkpoint (``restore_callback_states_from_checkpoint``) takes it over
(:func:`bound_session`), so the user's options win over the checkpoint's.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Optional

from ...config import ClipConfig
from ...core import GradClipper, StateError
from ...run import RESET_HINT, ClipRun
from ...run.batches import IndexRecord
from ...run.messages import logger
from ..deepspeed import EngineStep, check_deepspeed, check_engine
from . import compat
from .wandb_glue import WandbGlue

__all__ = ["ClipSession", "check_trainer", "deepspeed_engine", "restore_state", "bind_session", "bound_session",
           "checkpoint_session"]

_BOUND: "weakref.WeakKeyDictionary[Any, ClipSession]" = weakref.WeakKeyDictionary()  # Trainer -> its session


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=4)  # Python shows it once per place by default


def check_trainer(trainer: Any, owner: str) -> None:
    """Compatibility checked at train start, with the fix spelled out."""
    if trainer is not None and compat.fsdp_version(trainer) == 1:
        raise ValueError(
            f"{owner}: FSDP1 (fsdp_version 1) shards flattened parameters into plain tensors, so each rank would "
            f"measure only its own shard and ranks would clip differently. Use FSDP2: fsdp_config={{'version': 2}} "
            f"in TrainingArguments (transformers 5.x), or fsdp_version: 2 in the accelerate config "
            f"(FSDP_VERSION=2), whose DTensor gradients give the global norm; DDP works too.")


def deepspeed_engine(trainer: Any, config: ClipConfig | None, clipper: GradClipper | None, owner: str) -> Any:
    """Under DeepSpeed, the engine, once the configuration is checked (``ValueError`` with the fix); else ``None``."""
    if trainer is None or not compat.is_deepspeed(trainer):
        return None
    engine = compat.deepspeed_engine(trainer)
    if engine is None or not hasattr(engine.optimizer, "clip_grad"):
        raise ValueError(f"{owner}: DeepSpeed is on but its engine (Trainer.model_wrapped) or the ZeRO optimizer's "
                         f"clip_grad was not found at train begin; use ZeRO stage 1, 2 or 3 (docs/distributed.md).")
    check_deepspeed(config if clipper is None else None, clipper, compat.deepspeed_config(trainer),
                    int(engine.zero_optimization_stage()), owner)
    check_engine(engine, config if clipper is None else None, owner, clipper)
    return engine


def engine_step(trainer: Any, engine: Any) -> Any:
    """The backend factory of a run on ``engine``: after a step the pack skipped, the scheduler the engine paused
    is stepped (the engine's own, else the Trainer's, which the Trainer skips when the engine overflowed)."""
    return lambda clipper: EngineStep(clipper, engine, scheduler=lambda: trainer.lr_scheduler)


def wire_engine(run: ClipRun, args: Any, state: Any, dataloader: Any) -> None:
    """What the DeepSpeed backend reads from the run: the listed steps, and the steps whose per-layer norms are
    logged (the Trainer's logging steps, and loss-spike steps when ``spike_layer/*`` is on)."""
    backend = run.backend
    backend.listed = frozenset(run.actions.listed)
    if run.ship_layers:
        backend.layers_at = compat.logging_steps(args, state, dataloader)
        backend.layers_at_spikes = run.layers.top_k > 0


class ClipSession:
    """Options, binding and the current run of one entry point (see the module docstring)."""

    def __init__(self, config: Optional[ClipConfig], clipper: Optional[GradClipper], owner: str):
        self.config, self.user_clipper, self.owner = config, clipper, owner
        self.user_clipper_state = clipper.state_dict() if clipper is not None else None
        self.trainer_ref: Any = None
        self.bound = False  # GradClipMixin: the Trainer class overrides; no instance wrapping
        self.named = False  # the Trainer was handed to us (GradClipMixin, attach()): no stack walk for it
        self.run: ClipRun | None = None
        self.wandb: WandbGlue | None = None

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
        """A fresh run for this ``train()``, on the step backend its Trainer needs (chosen here, once)."""
        self.end()
        check_trainer(trainer, self.owner)
        clipper = self.user_clipper
        if clipper is not None:  # training twice starts from the same statistics
            clipper.load_state_dict(self.user_clipper_state)
        processing = getattr(trainer, "processing_class", None)
        engine = deepspeed_engine(trainer, self.config, clipper, self.owner)
        backend = None if engine is None else engine_step(trainer, engine)
        self.run = ClipRun(self.config, clipper, args=args, state=state, optimizer=optimizer, backend=backend,
                           owner=self.owner, decode=getattr(processing, "decode", None),
                           max_grad_norm=compat.deepspeed_clipping(trainer) if engine is not None else None)
        batches = self.run.recorder.batches
        batches.sampler = IndexRecord.attach(compat.train_sampler(dataloader))
        batches.dataset = getattr(trainer, "train_dataset", None)
        self._say_threshold(args)
        self.wandb = WandbGlue.create(args, self.run)
        if engine is not None:
            wire_engine(self.run, args, state, dataloader)
        return self.run

    def _say_threshold(self, args: Any) -> None:
        max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
        where = ("DeepSpeed's engine clips at it (its clip_grad, set before each step)"
                 if self.run.backend.name == "deepspeed" else "the Trainer's own clipping is off for this run")
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
        return {}


def bind_session(trainer: Any, session: ClipSession, *, bound: bool = False, named: bool = False) -> None:
    """``session`` runs in ``trainer``, from now on held by it (weakly: nothing outlives the Trainer). ``named``:
    the Trainer was handed to us (``attach()``; ``bound``: ``GradClipMixin``, whose class overrides do what the
    instance wrappers would); else it was found on the call stack at train begin."""
    session.trainer_ref = weakref.ref(trainer)
    session.bound, session.named = session.bound or bound, session.named or named or bound
    _BOUND[trainer] = session


def bound_session(trainer: Any) -> ClipSession | None:
    """The session bound to ``trainer`` (:func:`bind_session`), else ``None``."""
    return _BOUND.get(trainer) if trainer is not None else None


def checkpoint_session(state: Any, name: str) -> ClipSession:
    """For a callback the Trainer rebuilt from a checkpoint when no session is bound to its Trainer (a bare
    ``GradClipCallback`` resumed with ``restore_callback_states_from_checkpoint`` in a Trainer's first
    ``train()``): the options of the run that saved the checkpoint, as the Trainer restores
    ``EarlyStoppingCallback``'s, said once; ``ValueError`` with the fixes where they were not saved."""
    owner = name
    saved = (state.stateful_callbacks or {}).get(name) if isinstance(state.stateful_callbacks, dict) else None
    saved = saved[-1] if isinstance(saved, list) and saved else saved
    run = saved.get("run") if isinstance(saved, dict) else None
    options = run.get("config") if isinstance(run, dict) else None
    fixes = (f"leave restore_callback_states_from_checkpoint unset (the pack restores its statistics either "
             f"way), or use GradClipTrainer / GradClipMixin, or {owner}(...).attach(trainer)")
    if not isinstance(options, dict):
        raise ValueError(f"gradclip: the Trainer rebuilt {owner} from the checkpoint at step {state.global_step} "
                         f"(restore_callback_states_from_checkpoint=True), which holds no options of the pack (a "
                         f"GradClipper was passed in): the callback you passed cannot be reached. To resume, "
                         f"{fixes}.")
    config = ClipConfig.from_dict(options, owner=f"the options saved in the checkpoint at step {state.global_step}")
    logger.warning("gradclip: the Trainer rebuilt %s from the checkpoint at step %d (restore_callback_states_from_"
                   "checkpoint=True): it runs with the options saved there (%s), not with those of the callback you "
                   "passed, which the rebuilt one cannot reach. To resume with other options, %s.", owner,
                   state.global_step, ", ".join(f"{k}={v!r}" for k, v in config.non_default().items()) or "defaults",
                   fixes)
    return ClipSession(config, None, owner)


def restore_state(run: ClipRun, state: Any, name: str) -> None:
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
