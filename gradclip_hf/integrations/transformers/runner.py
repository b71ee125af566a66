"""``ClipRunner``: the one object both Trainer entry points (``GradClipTrainer``/``GradClipMixin`` and
``GradClipCallback``) delegate to.

Per optimizer step it receives the micro-batch losses (:meth:`add_loss`), then, before
``optimizer.step()``, unscales fp16 gradients once and clips with the configured
:class:`~gradclip_hf.core.GradClipper` (:meth:`clip_step`). Window statistics stay on the device;
:meth:`metrics` turns them into floats in one device-to-host transfer at logging steps.

Metric keys (all since the previous log unless noted):

=============================  ==============================================================
``grad_norm``                  pre-clip norm of the last step (as the stock Trainer logs it)
``gradclip/norm_mean``         mean pre-clip norm over finite steps
``gradclip/norm_max``          max pre-clip norm over finite steps
``gradclip/norm_post``         post-clip norm of the last step
``gradclip/threshold``         threshold in force at the last step (after schedule)
``gradclip/coef``              post/pre norm ratio of the last step
``gradclip/clip_rate``         fraction of steps that were clipped
``gradclip/nonfinite_steps``   number of steps with a NaN/Inf norm
``gradclip/skipped_steps``     number of steps whose optimizer update was skipped (non-finite or spike)
``gradclip/spikes``            number of spikes flagged (spike controller on)
``gradclip/spike_factor``      threshold factor of the spike controller at the last step
``gradclip/layer/<name>``      pre-clip norm of a layer at the last step: the ``log_layers_top_k``
                               largest and those matching ``log_layer_patterns``
``gradclip/spike_layer/<name>``  pre-clip norm of a layer at the window's last spike step (top-k;
                               only in windows with spikes)
=============================  ==============================================================

The per-layer norms travel in the same single transfer as the scalars (the core computes them anyway).

Host syncs: none per step with ``nonfinite="zero"``/``"ignore"`` or under a GradScaler, and with
``spike_action="tighten"``. ``nonfinite="skip"`` (the default, without a GradScaler) and
``spike_action`` ``skip``/``rollback``/``stop`` read their flags in ONE host read per step. Spike
messages are read at logging steps, in a second transfer only when spikes happened.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Optional

import torch

from ...config import ClipConfig, Strategy
from ...core import ClipReport, GradClipper, NonFinitePolicy, SpikeAction, SpikeEvent, TrainingSnapshot
from . import compat
from .reporting import SPIKE_LAYER_PREFIX, LayerSelector

# a child of the "transformers" logger, so transformers.logging.set_verbosity_*() applies to our messages
logger = logging.getLogger("transformers.gradclip_hf")
MAX_SPIKE_MESSAGES = 5  # per logging window (or per acting step); the rest are summarised in one line

__all__ = ["ClipRunner", "METRIC_KEYS"]

METRIC_KEYS = ("grad_norm", "gradclip/norm_mean", "gradclip/norm_max", "gradclip/norm_post",
               "gradclip/threshold", "gradclip/coef", "gradclip/clip_rate", "gradclip/nonfinite_steps",
               "gradclip/skipped_steps", "gradclip/spikes", "gradclip/spike_factor")
SPIKE_KEYS = ("gradclip/spikes", "gradclip/spike_factor")

_WARNED: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)
        logger.warning(message)


def _names_wandb(report_to: Any) -> bool:
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "wandb" in targets or "all" in targets


class ClipRunner:
    """Builds the clipper at train begin, clips once per optimizer step, aggregates metrics.

    Args:
        config: the options (default ``ClipConfig()``: norm clipping at 1.0).
        clipper: a ready :class:`GradClipper` instead of ``config`` (its initial state is restored at
            every train begin, so training twice starts from the same statistics).
        owner: name used in messages (``"GradClipCallback"`` or ``"GradClipTrainer"``).
    """

    def __init__(self, config: Optional[ClipConfig] = None, clipper: Optional[GradClipper] = None,
                 owner: str = "GradClipCallback"):
        if config is not None and clipper is not None:
            raise ValueError("Pass either `config` or `clipper`, not both.")
        if clipper is not None and not isinstance(clipper, GradClipper):
            raise TypeError(f"`clipper` must be a GradClipper, got {clipper!r}.")
        self.config = config if config is not None or clipper is not None else ClipConfig()
        self._user_clipper = clipper
        self._user_clipper_state = clipper.state_dict() if clipper is not None else None
        self.owner = owner
        self.clipper: GradClipper | None = clipper
        self.active = False          # set at train begin; False under DeepSpeed (the engine clips)
        self.num_clips = 0           # host counter, no sync
        self.last_report: ClipReport | None = None
        self.log_history: list[dict[str, float]] = []
        self._pending_state: dict[str, Any] | None = None
        self._step_loss: torch.Tensor | None = None
        self._window: dict[str, torch.Tensor] | None = None
        self._saved_max_grad_norm: float | None = None
        self._skip_armed: Any = None
        self._overflow_set_on: Any = None
        self._clipped_step: int | None = None
        self.skipped_steps = 0         # host counters, updated only where a flag is read anyway
        self.rollbacks = 0
        self.consecutive_nonfinite = 0
        self.stop_reason: str | None = None
        self.snapshot: TrainingSnapshot | None = None
        self._events_seen = 0          # spike events already reported
        self.spike_events: list[SpikeEvent] = []  # every spike read back so far (messages, W&B tables)
        self._window_skipped = 0
        self.trainer_ref: Any = None   # weakref to the Trainer (set by the callback)
        self.bound = False             # True under GradClipMixin: the Trainer class does the wrapping
        self.layers = LayerSelector()  # per-layer norms in the logs (rebuilt from the config at setup)
        self.last_layer_norms: dict[str, float] = {}   # every layer's norm at the last logging step
        self.last_spike_layers: list[tuple[str, float]] = []  # top layers of the last logged spike step
        self._spike_layers: torch.Tensor | None = None  # per-tensor norms of the last spike step (device)
        self._spike_names: list[str] = []
        self._report_to: Any = None
        self._unreported: dict[str, float] | None = None
        self.wandb: Any = None         # a gradclip_hf.integrations.wandb.WandbReporter while W&B is active

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: Any, args: Any, state: Any, *, warn_max_grad_norm: bool = True) -> None:
        """Train begin: compatibility checks, the Trainer's own clipping off, a fresh clipper."""
        self.num_clips, self.last_report, self._step_loss, self._window = 0, None, None, None
        self._clipped_step, self.log_history = None, []
        self.skipped_steps = self.rollbacks = self.consecutive_nonfinite = self._events_seen = 0
        self._window_skipped, self.stop_reason, self.spike_events = 0, None, []
        self._setup_reporting(args)
        if trainer is not None and compat.is_deepspeed(trainer):
            self._setup_deepspeed(trainer)
            return
        if trainer is not None and compat.fsdp_version(trainer) == 1:
            raise ValueError(
                f"{self.owner}: FSDP1 (fsdp_version 1) shards flattened parameters into plain tensors, so each rank "
                f"would measure only its own shard and ranks would clip differently. Use FSDP2: "
                f"fsdp_config={{'version': 2}} in TrainingArguments (transformers 5.x), or fsdp_version: 2 in the "
                f"accelerate config (FSDP_VERSION=2), whose DTensor gradients give the global norm; DDP works too.")
        max_grad_norm = getattr(args, "max_grad_norm", 0.0) or 0.0
        if max_grad_norm > 0:
            if warn_max_grad_norm:
                warn_once("max_grad_norm", f"{self.owner} clips the gradients; the Trainer's own clipping "
                          f"(max_grad_norm={max_grad_norm}) is turned off for this run (max_grad_norm=0) so that "
                          f"gradients are not clipped twice. Pass TrainingArguments(max_grad_norm=0) to silence "
                          f"this warning, and set the threshold on {self.owner} instead.")
            self._saved_max_grad_norm = max_grad_norm
            args.max_grad_norm = 0.0  # never None: 5.x compares it with `>`
        if self._user_clipper is not None:
            self.clipper = self._user_clipper
            self.clipper.load_state_dict(copy.deepcopy(self._user_clipper_state))
        else:
            total = int(getattr(state, "max_steps", 0) or 0) or None
            self.clipper = self.config.build(total)
        spikes = self.clipper.spikes
        self.snapshot = (TrainingSnapshot(every=self.config.spike_snapshot_every if self.config else 50)
                         if spikes is not None and spikes.action is SpikeAction.ROLLBACK else None)
        self.active = True
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)
            self._pending_state = None

    def _setup_deepspeed(self, trainer: Any) -> None:
        engine = compat.deepspeed_clipping(trainer)
        config = self.config if self._user_clipper is None else None
        ok = (config is not None and config.is_constant_norm and config.threshold is not None
              and engine is not None and abs(engine - config.threshold) <= 1e-12)
        if not ok:
            raise ValueError(
                f"{self.owner}: DeepSpeed clips inside its engine during backward(), before any Trainer hook, "
                f"so only clip_strategy='norm' with clip_schedule='constant' and spike_detection='off' works, and its threshold must equal "
                f"DeepSpeed's gradient_clipping (got engine={engine!r}, "
                f"config={None if config is None else (config.strategy, config.schedule, config.threshold)}). "
                f"Use strategy 'norm', schedule 'constant' and gradient_clipping='auto' with max_grad_norm equal "
                f"to the threshold, or train without DeepSpeed (DDP/FSDP2 work with every strategy).")
        warn_once("deepspeed", f"{self.owner}: DeepSpeed detected: only the DeepSpeed engine clips "
                  f"(gradient_clipping={engine}); {self.owner} does not touch the gradients.")
        self.active = False

    def teardown(self, args: Any) -> None:
        """Train end: restore ``max_grad_norm``, disarm any pending skip."""
        if self._saved_max_grad_norm is not None and args is not None:
            args.max_grad_norm = self._saved_max_grad_norm
        self._saved_max_grad_norm = None
        self._disarm_skip()
        self.active = False

    # ------------------------------------------------------------------ per step
    def add_loss(self, loss: Any) -> None:
        """Add a micro-batch loss (a ``training_step`` return, already GA-normalised)."""
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach()
        self._step_loss = loss.clone() if self._step_loss is None else self._step_loss + loss.to(self._step_loss.device)

    def take_step_loss(self) -> torch.Tensor | None:
        """The step loss (mean over the micro-batches of this optimizer step, a device tensor); resets it."""
        loss, self._step_loss = self._step_loss, None
        return loss

    def clip_step(self, model: Any, step: int, optimizer: Any = None, control: Any = None,
                  state: Any = None) -> ClipReport | None:
        """Unscale (fp16) once, clip once, act on non-finite steps and spikes, update the window.

        Called before ``optimizer.step()``; ``control``/``state`` are the Trainer's, to stop training."""
        if not self.active or self.clipper is None:
            return None
        if self._clipped_step == step:  # a second hook at the same step (should not happen): never clip twice
            return self.last_report
        self._clipped_step = step
        self._disarm_skip()
        if optimizer is not None:
            compat.unscale_once(optimizer)
        loss = self.take_step_loss()
        report = self.clip(model, step, loss)
        self._act(report, model, optimizer, control, state)
        return report

    def clip(self, model: Any, step: int, loss: torch.Tensor | None = None) -> ClipReport:
        """Clip the gradients of ``model`` at optimizer step ``step``.

        ``loss`` is the step loss (device tensor, mean over the micro-batches of this optimizer step); the
        clipper's spike controller (if any) turns it into the threshold factor of this very step.
        """
        report = self.clipper.clip_(model, step=step, loss=loss)
        self.num_clips += 1
        self.last_report = report
        self._accumulate(report)
        return report

    # ------------------------------------------------------------------ actions (the only per-step host read)
    def _act(self, report: ClipReport, model: Any, optimizer: Any, control: Any, state: Any) -> None:
        spikes = self.clipper.spikes
        acting = spikes is not None and spikes.action is not SpikeAction.TIGHTEN
        guard = (self.clipper.nonfinite is NonFinitePolicy.SKIP and optimizer is not None
                 and not compat.scaler_enabled(optimizer))  # a GradScaler skips non-finite steps itself
        if not (acting or guard):
            return  # the default spike path: nothing leaves the device
        flags = torch.stack([report.skip, report.spike.act if acting else torch.zeros_like(report.skip)])
        nonfinite, spiked = (bool(v) for v in flags.tolist())  # ONE host read per step
        nonfinite = nonfinite and guard
        skip = False
        if nonfinite:
            self.consecutive_nonfinite += 1
            skip = True
            logger.warning("%s: step %d: the gradient norm is not finite; optimizer step skipped (%d in a row).",
                           self.owner, report.step, self.consecutive_nonfinite)
            limit = self.config.nonfinite_max_consecutive if self.config is not None else 10
            if self.consecutive_nonfinite >= limit:
                self._stop(f"{self.consecutive_nonfinite} consecutive steps with non-finite gradients (the "
                           f"limit is clip_nonfinite_max_consecutive={limit}): lower the learning rate, check the "
                           f"data, or use bf16/fp32 instead of fp16.", report.step, control, state)
        else:
            self.consecutive_nonfinite = 0
        if spiked:
            skip = True
            action = spikes.action
            self._warn_spikes(action.value)
            if action is SpikeAction.ROLLBACK:
                if self.snapshot is not None and self.snapshot.step is not None and optimizer is not None:
                    inner = compat.inner_optimizer(optimizer)
                    back_to = self.snapshot.restore(model.parameters(), inner)
                    self.rollbacks += 1
                    logger.warning("%s: step %d: rolled back weights and optimizer state to step %d.",
                                   self.owner, report.step, back_to)
                else:
                    logger.warning("%s: step %d: no snapshot yet to roll back to; the update is skipped.",
                                   self.owner, report.step)
            elif action is SpikeAction.STOP:
                self._stop(f"loss spike at step {report.step} and spike_action='stop'. Resume from the last "
                           f"checkpoint with a lower learning rate, or use spike_action='tighten'/'skip'/'rollback'.",
                           report.step, control, state)
        elif not nonfinite and self.snapshot is not None and self.snapshot.due(report.step) and optimizer is not None:
            # the weights now are the result of clean steps only: keep them (before this step's update)
            self.snapshot.take(report.step, model.parameters(), compat.inner_optimizer(optimizer))
        if skip and optimizer is not None:
            self._arm_skip(optimizer)
            self.skipped_steps += 1
            self._window_skipped += 1

    def _stop(self, reason: str, step: int, control: Any, state: Any) -> None:
        self.stop_reason = f"{self.owner} stopped training at step {step}: {reason}"
        logger.error(self.stop_reason)
        if control is not None:
            control.should_training_stop = True
        if state is not None:  # kept in trainer_state.json with the checkpoint
            state.log_history.append({"step": step, "gradclip/stop_reason": self.stop_reason})

    def _base_threshold(self, step: int) -> float | None:
        """Strategy threshold times schedule at ``step`` for fixed-threshold strategies (else ``None``)."""
        strategy = self.clipper.strategy
        base = next((getattr(strategy, a) for a in ("max_norm", "clip_value", "clipping") if hasattr(strategy, a)),
                    None)
        return None if base is None else base * self.clipper.scale_at(step)

    def _warn_spikes(self, action: str) -> None:
        """Read new spike events (one transfer) and warn, at most ``MAX_SPIKE_MESSAGES`` at a time."""
        spikes = self.clipper.spikes
        events, self._events_seen = spikes.read_events(self._events_seen)
        for event in events[:MAX_SPIKE_MESSAGES]:
            logger.warning("%s", event.describe(self._base_threshold(event.step), action))
        if len(events) > MAX_SPIKE_MESSAGES:
            logger.warning("... and %d more spikes up to step %d.", len(events) - MAX_SPIKE_MESSAGES, events[-1].step)
        self.spike_events.extend(events)

    def _accumulate(self, report: ClipReport) -> None:
        norm = report.norm.detach().to(torch.float32)
        finite = torch.isfinite(norm)
        safe = torch.where(finite, norm, torch.zeros_like(norm))
        if self._window is None:
            zero = torch.zeros((), dtype=torch.float32, device=norm.device)
            self._window = {k: zero.clone() for k in ("sum", "max", "finite", "steps", "clipped", "nonfinite",
                                                      "spikes")}
        w = self._window
        w["sum"] += safe
        torch.maximum(w["max"], safe, out=w["max"])
        w["finite"] += finite.to(torch.float32)
        w["steps"] += 1.0
        w["clipped"] += report.clipped.to(device=norm.device, dtype=torch.float32)
        w["nonfinite"] += (~finite).to(torch.float32)
        if report.spike is not None:
            w["spikes"] += report.spike.spike.to(device=norm.device, dtype=torch.float32)
            if self.layers.top_k:  # which layers carried the spike: kept on the device until the next log
                per = report.per_tensor_norms.detach().to(device=norm.device, dtype=torch.float32)
                kept = self._spike_layers
                if kept is None or kept.shape != per.shape or self._spike_names != report.names:
                    kept, self._spike_names = torch.zeros_like(per), list(report.names)
                self._spike_layers = torch.where(report.spike.spike.to(per.device), per, kept)

    # ------------------------------------------------------------------ skipping an optimizer step
    def _arm_skip(self, optimizer: Any) -> None:
        """Make the coming ``optimizer.step()`` a no-op: parameters AND optimizer state stay untouched."""
        original = optimizer.__dict__.get("step")

        def skipped_step(*args: Any, **kwargs: Any) -> None:
            self._disarm_skip()
            if hasattr(optimizer, "_is_overflow"):
                optimizer._is_overflow = True  # Trainer: optimizer_step_was_skipped -> no lr_scheduler.step()
                self._overflow_set_on = optimizer
            return None

        optimizer.step = skipped_step
        self._skip_armed = (optimizer, original)

    def _disarm_skip(self) -> None:
        if self._overflow_set_on is not None and self._skip_armed is None:
            # a skip of the previous step set _is_overflow on a scaler-less optimizer: clear it
            self._overflow_set_on._is_overflow = False
            self._overflow_set_on = None
        if self._skip_armed is None:
            return
        optimizer, original = self._skip_armed
        self._skip_armed = None
        if original is None:
            optimizer.__dict__.pop("step", None)
        else:
            optimizer.step = original

    # ------------------------------------------------------------------ metrics
    def metrics(self) -> dict[str, float]:
        """Window metrics as floats (one device-to-host transfer); resets the window. ``{}`` if no step.

        With the spike controller on, spikes flagged in the window are then read back (a second transfer,
        only when there were spikes) and reported as rate-limited warnings."""
        if self._window is None or self.last_report is None:
            return {}
        w, r = self._window, self.last_report
        dev = w["sum"].device
        factor = r.spike.factor if r.spike is not None else torch.ones((), device=dev)
        scalars = torch.stack([r.norm.detach().to(dev, torch.float32), w["sum"] / w["finite"].clamp(min=1.0), w["max"],
                               r.norm_post.detach().to(dev, torch.float32), r.threshold.detach().to(dev, torch.float32),
                               r.coef.detach().to(dev, torch.float32), w["clipped"] / w["steps"].clamp(min=1.0),
                               w["nonfinite"], torch.zeros((), device=dev), w["spikes"],
                               factor.detach().to(dev, torch.float32), w["steps"]])
        # per-layer norms (last step; last spike step) ride along: still ONE device-to-host transfer
        want_layers = self.layers.enabled or self._wants_histogram()
        spike_vector = self._spike_layers if want_layers and r.spike is not None else None
        parts = [scalars]
        if want_layers:
            parts.append(r.per_tensor_norms.detach().to(dev, torch.float32).reshape(-1))
        if spike_vector is not None:
            parts.append(spike_vector.to(dev))
        flat = (torch.cat(parts) if len(parts) > 1 else scalars).tolist()
        values, flat = flat[:scalars.numel()], flat[scalars.numel():]
        layer_values = flat[:len(r.names)] if want_layers else None
        spike_values = flat[len(r.names):] if spike_vector is not None else None
        self._window = None
        steps = values.pop()
        if steps == 0:
            return {}
        out = dict(zip(METRIC_KEYS, values))
        out["gradclip/nonfinite_steps"] = int(out["gradclip/nonfinite_steps"])
        out["gradclip/skipped_steps"], self._window_skipped = self._window_skipped, 0
        if r.spike is None:
            for key in SPIKE_KEYS:
                del out[key]
        else:
            out["gradclip/spikes"] = int(out["gradclip/spikes"])
            if self.clipper.spikes.action is SpikeAction.TIGHTEN and out["gradclip/spikes"]:
                self._warn_spikes(SpikeAction.TIGHTEN.value)
        if layer_values is not None:
            self.last_layer_norms = dict(zip(r.names, layer_values))
            out.update(self.layers.select(r.names, layer_values))
        if spike_values is not None and out.get("gradclip/spikes") and len(spike_values) == len(self._spike_names):
            self.last_spike_layers = LayerSelector.top(self._spike_names, spike_values, self.layers.top_k)
            out.update({SPIKE_LAYER_PREFIX + name: value for name, value in self.last_spike_layers})
        return out

    def inject(self, logs: dict[str, Any]) -> None:
        """Put the window metrics into a training ``logs`` dict (before reporters see it)."""
        if not self.active or "loss" not in logs:
            return
        metrics = self.metrics()
        if not metrics:
            return
        items = list(logs.items())
        logs.clear()
        for key, value in items:  # grad_norm right after loss, as the stock Trainer orders it
            if key == "grad_norm":
                continue
            logs[key] = value
            if key == "loss":
                logs["grad_norm"] = metrics["grad_norm"]
        logs.update({k: v for k, v in metrics.items() if k != "grad_norm"})
        self.log_history.append(dict(metrics))
        self._unreported = metrics

    # ------------------------------------------------------------------ reporting extras (W&B)
    def _setup_reporting(self, args: Any) -> None:
        config = self.config
        self.layers = LayerSelector(getattr(config, "log_layers_top_k", 8), getattr(config, "log_layer_patterns", ()))
        self.last_layer_norms, self.last_spike_layers = {}, []
        self._spike_layers, self._spike_names, self._unreported = None, [], None
        self._report_to = getattr(args, "report_to", None)
        self.wandb = None
        if _names_wandb(self._report_to):  # wandb itself is imported only when a run is there to log to
            from ..wandb import WandbReporter
            self.wandb = WandbReporter(histogram_every=getattr(config, "wandb_histogram_every", 10),
                                       alerts=getattr(config, "wandb_alerts", True))

    def _wants_histogram(self) -> bool:
        return self.wandb is not None and self.wandb.histogram_every > 0

    def report(self, state: Any = None) -> None:
        """After a logging step's metrics went into the logs: the W&B extras (histogram, spike table,
        alerts), from values already on the host. A no-op without an active W&B run."""
        metrics, self._unreported = self._unreported, None
        if self.wandb is None or not (metrics or self.stop_reason):
            return
        from ..wandb import wandb_run
        run = wandb_run(self._report_to)
        if run is None:
            return
        spikes = self.clipper.spikes if self.clipper is not None else None
        self.wandb.log_step(run, int(getattr(state, "global_step", 0) or 0), metrics or {},
                            layer_norms=self.last_layer_norms if metrics else None, events=self.spike_events,
                            spike_layers=self.last_spike_layers[:3], stop_reason=self.stop_reason,
                            threshold_base=self._base_threshold if self.clipper is not None else None,
                            action=spikes.action.value if spikes is not None else "tighten")

    def finish_report(self, state: Any = None) -> None:
        """Train end: the W&B end-of-run chart and any pending alert."""
        if self.wandb is None:
            return
        from ..wandb import wandb_run
        run = wandb_run(self._report_to)
        if run is not None:
            self.wandb.finish(run, int(getattr(state, "global_step", 0) or 0), stop_reason=self.stop_reason)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: the clipper's statistics (ZScore EMA, Quantile history)."""
        if self._pending_state is not None:
            return copy.deepcopy(self._pending_state)
        if self.clipper is None:
            return {}
        return {"clipper": self.clipper.state_dict(), "skipped_steps": self.skipped_steps,
                "rollbacks": self.rollbacks, "consecutive_nonfinite": self.consecutive_nonfinite,
                "events_seen": self._events_seen}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Restore :meth:`state_dict` now if the clipper exists, else at the next :meth:`setup`."""
        if not state:
            return
        if not self.active or self.clipper is None:
            self._pending_state = copy.deepcopy(state)
            return
        if "clipper" not in state:
            raise ValueError(f"{self.owner} state must hold `clipper`, got keys {sorted(state)}.")
        self.clipper.load_state_dict(state["clipper"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.consecutive_nonfinite = int(state.get("consecutive_nonfinite", 0))
        self._events_seen = int(state.get("events_seen", 0))

    @property
    def strategy_name(self) -> str:
        return self.clipper.strategy.name if self.clipper is not None else (
            self.config.strategy if self.config is not None else Strategy.NORM.value)
