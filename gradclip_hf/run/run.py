"""``ClipRun``: the pack on one training run (a ``Trainer.train()``, or a hand-written loop): built at train begin,
closed when training ends. No transformers here: the integrations hand it what it needs.

It ties the per-step jobs together: :class:`~.metrics.StepLoss` (the step loss), the clipper and the run's
step backend (:mod:`.backends`: where the clip and the skip happen), the one decision (:mod:`.decision`), the
:class:`~.actions.StepActions` (rollback, stop, watchdogs), the :class:`~.metrics.MetricsWindow` (what is
logged, read in one transfer per logging step) and the reporting (spike messages, the spike file).
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import ClipConfig
from ..core import ClipReport, GradClipper, SpikeEvent
from ..core._state import to_host
from .actions import StepActions, logger
from .backends import LocalStep, StepBackend
from .decision import skip_update
from .messages import SPIKE_LAYER_PREFIX, LayerSelector, SpikeMessages, describe_threshold
from .metrics import MetricsWindow, StepLoss
from .records import EventRecorder
from .skiplists import Uncomputed, check_batch, check_start
from .state import RESET_HINT, load_run_state, run_state

__all__ = ["ClipRun", "RESET_HINT", "STOP_KEY"]

STOP_KEY = "gradclip/stop_reason"  # in the log row of the step the pack stopped the run at
CAPACITY = 256  # flagged steps the device rings hold between two reads


def _rank_zero() -> bool:
    """Rank 0 of ``torch.distributed`` (True where it is not initialized). The loop's own answer is not enough:
    DeepSpeed on CPU under ``torchrun`` leaves the Trainer's accelerator with one process on every rank, so each
    rank would think it writes the spike file."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class ClipRun:
    """One training run. ``config`` (or a ready ``clipper``) and the Trainer's ``args``/``state``/optimizer.

    Attributes read by users and tests: ``clipper``, ``last_report``, ``num_clips``, ``skipped_steps``,
    ``spike_events`` (every spike read back), ``stop_reason``, ``rollbacks``, ``last_metrics`` (the metrics of
    the last logging step), ``threshold_source`` (where the threshold in force came from).

    Flagged steps wait on the device until a logging step, or until the device rings would fill
    (``read_every`` steps since the last read, counted on the host): then they are read, so every event reaches
    the spike file whatever the logging interval.
    """

    def __init__(self, config: ClipConfig | None, clipper: GradClipper | None, *, args: Any, state: Any,
                 owner: str, optimizer: Any = None, backend: Callable[[GradClipper], StepBackend] | None = None,
                 decode: Any = None, max_grad_norm: float | None = None):
        self.config, self.given_config, self.owner = config or ClipConfig(), config, owner
        self.state, self.open = state, True  # the TrainerState of this run; open until train() leaves
        if max_grad_norm is None:  # None in TrainingArguments: no clipping, as 0 (checked in build)
            max_grad_norm = getattr(args, "max_grad_norm", None) or 0.0
        if clipper is None:
            total = int(getattr(state, "max_steps", 0) or 0) or None
            micro_batches = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
            self.clipper = self.config.build(total, max_grad_norm, micro_batches=micro_batches)
            self.threshold_source = describe_threshold(self.config, max_grad_norm)
        else:
            self.clipper, self.threshold_source = clipper, "a GradClipper passed in"
        if backend is None:  # the local path, on ``optimizer``
            self.backend: StepBackend = LocalStep(self.clipper, optimizer, hand_off=self.config.defers_to_optimizer)
        else:
            self.backend = backend(self.clipper)
        self.lr_guard = self._guard_lr()
        self.actions = StepActions(self.clipper, self.config, self.backend, owner)
        self.skip_prints = self.config.skip_fingerprints() if clipper is None else {}
        self.main_process = bool(getattr(state, "is_world_process_zero", True)) and _rank_zero()
        self.recorder = self._recorder(args, decode)
        spikes = self.clipper.spikes
        self.gate = spikes.gate if spikes is not None else None  # the micro-batch gate (spike_gate="micro_batch")
        self.loss, self.window = StepLoss(), MetricsWindow(gate=self.gate is not None)
        self.uncomputed = Uncomputed()  # listed steps whose batches were consumed, not computed
        self._step_loss: Any = None  # the step loss, when it was known before the last backward
        top_k = self.config.log_layers_top_k if self.backend.layer_norms else 0
        self.layers = LayerSelector(top_k, self.config.log_layer_patterns if self.backend.layer_norms else ())
        self.messages = SpikeMessages(self.clipper, owner, listed=self.actions.listed)
        self.last_report: ClipReport | None = None
        self.num_clips = self.skipped_steps = self.nonfinite_steps = 0
        self.last_metrics: dict[str, float] = {}
        self.read_every = min(self.recorder.capacity, spikes.max_events if spikes is not None else CAPACITY)
        self._since_read = 0  # steps since the flagged steps were last read (host count)
        self.stop_logged = self.stop_saved = self._stop_written = False
        self.last_layer_norms: dict[str, float] = {}
        self.last_spike_layers: list[tuple[str, float]] = []
        self.ship_layers = self.layers.enabled  # every layer's norm in the logging transfer
        self._unreported: dict[str, float] | None = None
        self._clipped_step: int | None = None
        self._layer_names: list[str] = []
        self.share: tuple[Any, Any] | None = None  # the next micro-batch's share for the gate (the integration's)

    def _recorder(self, args: Any, decode: Any) -> EventRecorder:
        samples = int(getattr(args, "per_device_train_batch_size", 1)) * int(
            getattr(args, "gradient_accumulation_steps", 1))
        return EventRecorder(getattr(args, "output_dir", None), samples, capacity=CAPACITY,
                             main_process=self.main_process, decode=decode)

    def check_skip_list(self, args: Any, state: Any) -> None:
        """Train begin: warn about listed steps this run cannot apply as meant (:mod:`.skiplists`)."""
        if self.main_process:
            check_start(self.actions.listed, int(getattr(state, "global_step", 0) or 0),
                        int(getattr(state, "max_steps", 0) or 0), getattr(args, "resume_from_checkpoint", None),
                        computed=not self.backend.uncomputed_listed)

    @property
    def spike_events(self) -> list[SpikeEvent]:
        return self.messages.events

    @property
    def stop_reason(self) -> str | None:
        return self.actions.stop_reason

    @property
    def rollbacks(self) -> int:
        return self.actions.rollbacks

    @property
    def defer(self) -> bool:
        """Whether this run hands the clip multiplier to the optimizer (a fused one) instead of the gradients."""
        return self.backend.hand_off

    # ------------------------------------------------------------------ per step
    def start(self, step: int) -> None:
        """Train begin, once a resumed run's state is loaded: the backend starts from ``step``."""
        self.backend.start(step)

    @property
    def sees_backward(self) -> bool:
        """Whether the integration must hand each micro-batch's loss to :meth:`before_backward` (the micro-batch
        gate judges it there; DeepSpeed steps inside the last backward)."""
        return self.gate is not None or self.backend.loss_before_backward

    def before_backward(self, loss: Any, last: bool, step: int, share: tuple[Any, Any] | None = None) -> Any:
        """A micro-batch's loss before its backward, where the integration sees it (:attr:`sees_backward`);
        returns the loss to backpropagate. ``last``: the step's last micro-batch (gradients are synced after
        it); ``step``: optimizer steps done before this one; ``share``: ``(scale, weight)`` for the micro-batch
        gate: the micro-batch's mean loss is ``loss * scale``, its weight in the step ``weight`` (default
        ``(1, 1)``: equal shares; see :mod:`gradclip_hf.core.gate`). With the gate the loss comes back as
        ``loss * keep`` (no host read)."""
        if self.backend.loss_before_backward:
            self.loss.add(loss)
            if last:
                self._step_loss = self.loss.take()
        if self.gate is not None:
            scale, weight = share if share is not None else (1.0, 1.0)
            loss = self.gate_loss(loss, loss.detach() * scale, weight)
        gate = self.gate.close() if last and self.gate is not None and self.backend.loss_before_backward else None
        return self.backend.before_backward(loss, last=last, step=step, step_loss=self._step_loss if last else None,
                                            gate=gate)

    def gate_loss(self, loss: Any, mean: Any, weight: Any = 1.0) -> Any:
        """The micro-batch gate on one micro-batch: ``loss * keep``, ``keep`` from judging its ``mean`` loss
        (weight ``weight``; :meth:`~gradclip_hf.core.gate.MicroBatchGate.judge`); ``loss`` without a gate."""
        if self.gate is None:
            return loss
        return loss * self.gate.judge(mean, weight).to(loss.dtype)

    def add_micro_batch(self, loss: Any, inputs: Any) -> None:
        """A micro-batch's return and inputs (after its ``training_step``): the step loss (unless
        :meth:`before_backward` took it) and what identifies the batch (and, with the gate, whether it was
        dropped)."""
        if not self.backend.loss_before_backward:
            self.loss.add(loss)
        keep = None
        if self.gate is not None:
            keep, self.gate.last_keep = self.gate.last_keep, None
        self.recorder.batches.add(inputs, dropped=None if keep is None else ~keep)

    def skip_batch(self, step: int) -> bool:
        """Whether a micro-batch of optimizer step ``step`` (optimizer steps done before it) is to be consumed
        without being computed: the step is listed (``skip_steps``/``skip_steps_from``). The integration that
        asks then neither runs its forward nor its backward, and hands :meth:`add_micro_batch` a zero loss. Not on a
        backend that computes listed steps (``backend.uncomputed_listed`` False: DeepSpeed)."""
        if step + 1 not in self.actions.listed or not self.backend.uncomputed_listed:
            return False
        self.uncomputed.step = step
        return True

    def clip_step(self, model: Any, state: Any) -> ClipReport | None:
        """Before the update of the step (``optimizer.step()``): measure and clip once, decide once, and hand the
        decision to the update (:mod:`.backends`). A second call at the same step returns the first's report."""
        step = int(state.global_step)
        if self._clipped_step == step:  # a second hook at the same step: never clip twice
            return self.last_report
        self._clipped_step = step
        self.uncomputed.steps += 1
        listed = step + 1 in self.actions.listed
        if listed and self.uncomputed.step == step:
            return self._pass_listed(step)
        loss, self._step_loss = (self._step_loss if self._step_loss is not None else self.loss.take()), None
        gate = self._close_gate(step)
        report = self.backend.measure(model, step, loss, **({} if gate is None else {"gate": gate}))
        if self.gate is not None:
            self.gate.finish()
        if report is None:
            return self.last_report
        skip = skip_update(report, self.backend, listed)
        self.window.add(report, skip, keep_spike_layers=self.layers.top_k > 0)
        skip_now = self.actions.after_decision(report, skip, loss, model, listed)
        self.backend.apply(report, skip, skip_now)
        if listed and self.main_process:
            check_batch(step + 1, self.skip_prints.get(step + 1), self.recorder.batches)
        self.recorder.record_step(report, loss, skip, len(report.names))
        if listed:
            self.recorder.add_listed(step + 1)
        self.num_clips += 1
        self.last_report = report
        if report.names:  # the names the recorded layer indices refer to (DeepSpeed: only steps that read them)
            self._layer_names = report.names
        self._since_read += 1
        if self._since_read >= self.read_every:  # the device rings would fill before the next log: read now
            self._read_flagged()
        return report

    def end_step(self) -> None:
        """After the loop's bookkeeping of the step (the Trainer's ``on_step_end``): the backend's (DeepSpeed steps
        the learning-rate scheduler there after a step the pack skipped)."""
        self.backend.end_step()

    def _close_gate(self, step: int) -> Any:
        if self.gate is None:
            return None
        gate = self.gate.close()
        if gate is None:
            raise RuntimeError(
                f"gradclip: step {step + 1}: spike_gate='micro_batch' saw no micro-batch loss before its backward in "
                f"this step, so it cannot tell which to keep. The Trainer hands it each loss through "
                f"accelerator.backward (a custom training_step must call self.accelerator.backward(loss)); a loop "
                f"with AcceleratorClipper calls loss = clipper.gate(loss) before accelerator.backward(loss).")
        return gate

    def _pass_listed(self, step: int) -> None:
        """A listed step whose batches were consumed without being computed: no gradient to measure, nothing
        learned by the statistics; the update is held back whole and the skip recorded."""
        self.loss.take()
        self._step_loss = None
        self.backend.hold()
        if self.gate is not None:
            self.gate.finish()
        if self.main_process:
            check_batch(step + 1, self.skip_prints.get(step + 1), self.recorder.batches)
        self.recorder.batches.pass_step(step + 1)
        self.recorder.add_listed(step + 1)
        self.uncomputed.listed += 1
        return None

    # ------------------------------------------------------------------ logging
    def metrics(self, state: Any = None) -> dict[str, float]:
        """The window's metrics as floats (ONE device-to-host transfer); ``{}`` if no step since the last log.
        Spike events are read back (a second transfer, only when there were spikes) and reported."""
        r = self.last_report
        if self.window.sums is None or r is None:
            return {}
        named = self.window.tensors(r)
        named.update(self.actions.watch_tensors())
        if self.ship_layers:
            named["layers"] = r.per_tensor_norms
        spike_vector = self.window.spike_norms if self.layers.top_k and r.spike is not None else None
        if spike_vector is not None:
            named["spike_layers"] = spike_vector
        values = to_host(named)
        out = self.window.metrics(values, with_spikes=r.spike is not None)
        if self.lr_guard is not None:
            out["gradclip/lr_capped"] = self._lr_capped(int(state.global_step) if state is not None else None)
        self.skipped_steps += out["gradclip/skipped_steps"]
        self.nonfinite_steps += out["gradclip/nonfinite_steps"]
        if out["gradclip/nonfinite_steps"] and state is not None:
            self._say_nonfinite(out["gradclip/nonfinite_steps"], int(state.global_step))
        if state is not None:
            self.actions.check_watch(values, int(state.global_step))
        if "layers" in values:
            self.last_layer_norms = dict(zip(r.names, values["layers"]))
            out.update(self.layers.select(r.names, values["layers"]))
        if out.get("gradclip/spikes") or out["gradclip/nonfinite_steps"] or self.recorder.pending:
            self._read_flagged()
        self._since_read = 0  # every flagged step of the window has been read
        self._write_stop()
        if out.get("gradclip/spikes"):
            if spike_vector is not None and len(values["spike_layers"]) == len(self.window.spike_names):
                self.last_spike_layers = LayerSelector.top(self.window.spike_names, values["spike_layers"],
                                                           self.layers.top_k)
                out.update({SPIKE_LAYER_PREFIX + n: v for n, v in self.last_spike_layers})
        return out

    def _guard_lr(self) -> Any:
        """The learning-rate guard (``lr_guard``), handed to the backend; refused: what the backend set up (an
        engine's wrappers) does not outlive the refusal."""
        guard, self._lr_capped_seen = self.config.build_lr_guard(), 0
        if guard is not None:
            try:
                self.backend.guard_lr(guard)
            except ValueError:
                self.backend.close()
                raise
        return guard

    def _lr_capped(self, step: int | None) -> int:
        """Steps whose learning rate the guard capped since the last call (host counts), said once per call."""
        capped, self._lr_capped_seen = self.lr_guard.capped - self._lr_capped_seen, self.lr_guard.capped
        if capped:
            limit = self.lr_guard.limit()
            logger.warning("gradclip: %s%d step%s with the learning rate capped since the last log (lr_guard=%g: at "
                           "most %g x its running average%s).", "" if step is None else f"step {step}: ", capped,
                           "s" if capped > 1 else "", self.lr_guard.cap, self.lr_guard.cap,
                           "" if limit is None else f", now {limit:.3g}")
        return capped

    def _say_nonfinite(self, count: int, step: int) -> None:
        policy = self.clipper.nonfinite.value
        what = {"skip": "their updates skipped", "zero": "their gradients zeroed", "ignore": "left as they were",
                "raise": ""}[policy]
        logger.warning("gradclip: step %d: %d step%s with NaN/Inf gradients since the last log, %s (nonfinite=%r).",
                       step, count, "s" if count > 1 else "", what, policy)

    def inject(self, logs: dict[str, Any], state: Any = None) -> dict[str, float]:
        """Put the window metrics into a training ``logs`` dict (before the reporters see it). Listed steps whose
        batches were not computed added a zero to the Trainer's loss: ``loss`` is made the mean over the steps
        that were computed (NaN when none was), and ``gradclip/listed_steps`` counts them."""
        if "loss" not in logs:
            return {}
        listed = self.uncomputed.correct(logs)
        metrics = self.metrics(state)
        if listed:
            metrics["gradclip/skipped_steps"] = metrics.get("gradclip/skipped_steps", 0) + listed
            metrics["gradclip/listed_steps"] = listed
            self.skipped_steps += listed
            if self.recorder.pending:  # a window of listed steps only: their records are written now
                self._read_flagged()
        if not metrics:
            return {}
        items = list(logs.items())
        logs.clear()
        for key, value in items:  # grad_norm right after loss, as the stock Trainer orders it
            if key != "grad_norm":
                logs[key] = value
            if key == "loss" and "grad_norm" in metrics:
                logs["grad_norm"] = metrics["grad_norm"]
        logs.update({k: v for k, v in metrics.items() if k != "grad_norm"})
        if self.stop_reason is not None and not self.stop_logged:  # in the row of the stop step, with its loss
            logs[STOP_KEY] = self.stop_reason
            self.stop_logged = True
        self.last_metrics = metrics
        self._unreported = metrics
        return metrics

    def take_unreported(self) -> dict[str, float] | None:
        """The metrics of the last logging step, once (for the W&B extras)."""
        metrics, self._unreported = self._unreported, None
        return metrics

    def close(self) -> None:
        """Train end (or any exit): the backend puts back what it changed (the gate off the optimizer); the counts
        and spikes of a last window that was not logged are read (one transfer, and one more for the spike
        messages if it had spikes)."""
        self.backend.close()
        self.skipped_steps += self.uncomputed.take()
        if self.window.sums is not None:
            counts = to_host({k: self.window.sums[k] for k in ("skipped", "nonfinite", "spikes")})
            self.skipped_steps += int(counts["skipped"][0])
            self.nonfinite_steps += int(counts["nonfinite"][0])
            self.window.sums = None
            if counts["nonfinite"][0]:
                self._say_nonfinite(int(counts["nonfinite"][0]), int(getattr(self.state, "global_step", 0)))
            if counts["spikes"][0] or counts["nonfinite"][0] or self.recorder.pending:
                self._read_flagged()
        self._write_stop()

    def _read_flagged(self) -> None:
        """Spike events, records and batches of the window, in ONE transfer: messages, then the JSONL."""
        self._since_read = 0
        values = to_host({**self.messages.tensors(), **self.recorder.tensors()})
        action = self.actions.action.value
        self.messages.show(values, action)
        self.recorder.flush(values, self.spike_events, self._layer_names, action,
                            lambda s: self.clipper.base_threshold(max(s - 1, 0)))

    def _write_stop(self) -> None:
        """Once the pack stopped the run: its ``stop`` line in the spike file, after the events before it."""
        actions = self.actions
        if actions.stop_reason is not None and not self._stop_written:
            self._stop_written = True
            self.recorder.add_stop(actions.stop_step, actions.stop_kind, actions.stop_reason)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe: the statistics and the counters, and the options of the run (:mod:`.state`)."""
        return run_state(self)

    def load_state_dict(self, state: dict[str, Any], source: str) -> None:
        """Restore :meth:`state_dict`'s output, every field checked (:func:`.state.load_run_state`)."""
        load_run_state(self, state, source)
        self._lr_capped_seen = self.lr_guard.capped if self.lr_guard is not None else 0
