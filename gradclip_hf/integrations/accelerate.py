"""``AcceleratorClipper``: the pack in a hand-written ``accelerate`` training loop.

The ``*_no_trainer.py`` examples of transformers clip with one line::

    accelerator.backward(loss)
    if accelerator.sync_gradients:
        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()

With the pack (after ``accelerator.prepare``)::

    clipper = AcceleratorClipper(accelerator, ClipConfig(strategy="zscore"), model, optimizer,
                                 max_grad_norm=args.max_grad_norm)
    ...
    accelerator.backward(loss)
    clipper.clip_(loss)          # every micro-step; clips only when accelerator.sync_gradients
    optimizer.step()             # unchanged: a skipped update is skipped inside this call

Per optimizer step (``accelerator.sync_gradients`` True) it unscales fp16 gradients exactly once (through the
prepared optimizer's ``GradScaler``, only while its stage is still READY), clips once with the configured
strategy, feeds the step loss (mean of the micro-batch losses; the spike controller averages it over processes
with one all-reduce) to the spike controller, and arms the optimizer's :class:`~gradclip_hf.run.StepGate`
(installed once, on the inner torch optimizer) with the step's skip decision, so the loop keeps calling
``optimizer.step()`` as before. The decision is the same on
every process: the gradients are already reduced and the loss is averaged. Host reads: none per step on
fused torch optimizers; one per step where a skip is possible on other optimizers, and for
``spike_action`` ``rollback``/``stop``. :meth:`metrics` reads the logging window in one transfer.

It runs the same per-run machinery as the Trainer integration (:class:`~gradclip_hf.run.ClipRun`, on the local
step backend), so the metrics, spike messages and actions are those of ``GradClipTrainer``. It needs accelerate
and torch only: ``transformers`` need not be installed.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import torch

from ..config import ClipConfig
from ..core._checks import check_number
from ..core import ClipReport, GradClipper, OptionError
from ..run import ClipRun, LocalStep

__all__ = ["AcceleratorClipper"]


def _as_clipper(config: Any) -> tuple[ClipConfig | None, GradClipper | None]:
    if config is None:
        return ClipConfig(), None
    if isinstance(config, dict):
        return ClipConfig.from_dict(config, owner="ClipConfig (AcceleratorClipper's config dict)"), None
    if isinstance(config, ClipConfig):
        return config, None
    if isinstance(config, GradClipper):
        return None, config
    raise OptionError("config", config, "a ClipConfig, a dict of its options, a GradClipper, or None")


def _check_accelerator(accelerator: Any) -> None:
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    if kind == DistributedType.DEEPSPEED:
        raise ValueError("AcceleratorClipper: DeepSpeed steps inside its engine during accelerator.backward(), "
                         "before the loop could clip; use DeepSpeed's own gradient_clipping.")
    if kind == DistributedType.FSDP and not getattr(accelerator, "is_fsdp2", False):
        raise ValueError("AcceleratorClipper: FSDP1 shards flattened parameters into plain tensors, so each "
                         "process would measure only its own shard; use FSDP2 (fsdp_version: 2).")


class _LoopState:
    """What a run reads of a Trainer's state: the step counter and the run length."""

    def __init__(self, max_steps: int | None):
        self.global_step, self.max_steps = 0, max_steps or 0


class AcceleratorClipper:
    """Clips, and skips updates, in a loop written with ``accelerate`` (see the module docstring).

    Args:
        accelerator: the ``accelerate.Accelerator`` of the loop.
        config: a :class:`~gradclip_hf.config.ClipConfig` (or a dict of its options), a ready
            :class:`~gradclip_hf.core.GradClipper`, or ``None`` (norm clipping at ``max_grad_norm``, exactly
            ``accelerator.clip_grad_norm_``).
        model, optimizer: what ``accelerator.prepare`` returned (the gate goes on the inner torch optimizer).
        max_grad_norm: the loop's clipping threshold; ``config.threshold`` defaults to it.
        total_steps: optimizer steps of the run (linear/cosine schedules without ``schedule_steps``).
    """

    def __init__(self, accelerator: Any, config: Any = None, model: Any = None, optimizer: Any = None, *,
                 max_grad_norm: float = 1.0, total_steps: int | None = None):
        if model is None or optimizer is None:
            raise ValueError("AcceleratorClipper needs the prepared model and optimizer: "
                             "AcceleratorClipper(accelerator, config, model, optimizer).")
        _check_accelerator(accelerator)
        config, clipper = _as_clipper(config)
        self.accelerator, self.optimizer = accelerator, optimizer
        self.model = accelerator.unwrap_model(model)  # parameter names without DDP's "module." prefix
        self.state = _LoopState(total_steps)
        hand_off = (config or ClipConfig()).defers_to_optimizer
        unscale = lambda: accelerator.unscale_gradients(optimizer)  # noqa: E731  (fp16: through accelerate)
        args = SimpleNamespace(max_grad_norm=max_grad_norm,
                               gradient_accumulation_steps=int(getattr(accelerator, "gradient_accumulation_steps", 1)))
        self.run = ClipRun(config, clipper, args=args, state=self.state,
                           owner=type(self).__name__,
                           backend=lambda c: LocalStep(c, optimizer, hand_off=hand_off, unscale=unscale))
        spikes = self.run.clipper.spikes
        self.needs_loss = spikes is not None and spikes.loss_detector is not None
        self._loss_sum: Any = None
        self._loss_count = 0
        self._awaiting_step = False  # a step was clipped and its optimizer.step() has not run yet
        inner = getattr(optimizer, "optimizer", optimizer)
        self._step_hook = (inner.register_step_pre_hook(self._stepped) if hasattr(inner, "register_step_pre_hook")
                           else None)

    def _stepped(self, *args: Any) -> None:
        self._awaiting_step = False

    # ------------------------------------------------------------------ per micro-step
    def gate(self, loss: Any, mean: Any = None, weight: Any = 1.0) -> Any:
        """With ``spike_gate="micro_batch"``: call at every micro-step before ``accelerator.backward``,
        ``loss = clipper.gate(loss)``. Returns ``loss * keep`` (``keep`` 0 for a micro-batch whose loss spikes
        against the micro-batches before it: it adds no gradient; no host read); without the gate, ``loss``.

        ``mean``: the micro-batch's mean loss, to judge (default: ``loss`` itself, the usual ``model(**batch).loss``);
        ``weight``: its share of the step's gradient up to a constant (default 1: micro-batches enter equally, as
        accelerate divides each loss by the accumulation steps; the number of label tokens where ``loss`` is a
        sum over tokens divided by the step's count). At the optimizer step the kept gradient is rescaled to the
        weighted mean of the kept micro-batches; a step with none kept is skipped.

        Raises:
            ValueError: ``loss`` is not a one-element tensor."""
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise OptionError("loss", loss if not isinstance(loss, torch.Tensor) else f"a tensor of shape "
                              f"{list(loss.shape)}", "the micro-batch loss as a one-element tensor (model(**batch).loss)")
        if not isinstance(weight, torch.Tensor):
            check_number("weight", weight, low=0.0)
        return self.run.gate_loss(loss, loss.detach().reshape(()) if mean is None else mean, weight)

    def clip_(self, loss: Any = None) -> ClipReport | None:
        """Call after ``accelerator.backward(loss)``, before ``optimizer.step()``, at every micro-step.

        ``loss`` is the micro-batch loss as the loop computed it (before accelerate divides it by the
        accumulation steps); the step loss is their mean. Returns the step's report when gradients are synced
        (an optimizer step follows), else ``None``.

        Raises:
            ValueError: ``loss`` is not a one-element tensor (a Python number, a per-sample loss).
            RuntimeError: a second call for one optimizer step (no ``optimizer.step()`` since the call that
                returned a report), or a call after :meth:`close`."""
        if not self.run.open:
            raise RuntimeError("AcceleratorClipper.clip_() after close(): the optimizer hooks are gone, so a skip "
                               "would not be applied. Make a new AcceleratorClipper for another loop.")
        sync = self.accelerator.sync_gradients
        if sync and self._awaiting_step and not getattr(self.optimizer, "step_was_skipped", False):
            raise RuntimeError("AcceleratorClipper.clip_() was called twice for one optimizer step (no optimizer.step() "
                               "since the call that returned a report): each such call counts a step of the schedule "
                               "and the statistics. Call it once per micro-step, after accelerator.backward(loss) and "
                               "before optimizer.step(), and call optimizer.step() after it (a skip happens inside).")
        if loss is not None:
            self._add_loss(loss)
        if not sync:
            return None
        step_loss = self._take_loss()
        if step_loss is None and self.needs_loss:
            raise ValueError("AcceleratorClipper.clip_(loss): spike_detection watches the loss, so pass the "
                             "micro-batch loss at every call (clipper.clip_(loss)).")
        self.run.loss.add(step_loss)
        report = self.run.clip_step(self.model, self.state)
        self.state.global_step += 1
        self._awaiting_step = self._step_hook is not None
        return report

    def _add_loss(self, loss: Any) -> None:
        allowed = ("the micro-batch loss as a one-element tensor (model(**batch).loss; loss.mean() for a "
                   "per-sample loss), or None")
        if not isinstance(loss, torch.Tensor):
            raise OptionError("loss", loss, allowed, "A Python number has left the device (loss.item()): pass the "
                              "tensor itself.")
        if loss.numel() != 1:
            raise OptionError("loss", f"a tensor of shape {list(loss.shape)}", allowed)
        loss = loss.detach().float().reshape(())
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_count += 1

    def _take_loss(self) -> Any:
        if self._loss_sum is None:
            return None
        loss = self._loss_sum / self._loss_count
        self._loss_sum, self._loss_count = None, 0
        return loss

    # ------------------------------------------------------------------ logging and the end
    def metrics(self) -> dict[str, float]:
        """The metrics since the last call (``grad_norm``, ``gradclip/*``) as floats, in one transfer; ``{}``
        when no optimizer step happened since. Call it at logging steps: ``accelerator.log(clipper.metrics(),
        step=step)``."""
        return self.run.metrics(self.state)

    @property
    def global_step(self) -> int:
        """Optimizer steps clipped so far (as ``TrainerState.global_step`` and the spike file number them)."""
        return self.state.global_step

    @property
    def step(self) -> int:
        """Deprecated name of :attr:`global_step`."""
        warnings.warn("AcceleratorClipper.step is deprecated: use AcceleratorClipper.global_step (the optimizer steps "
                      "clipped so far).", DeprecationWarning, stacklevel=2)
        return self.global_step

    @property
    def stop_reason(self) -> str | None:
        """Why the pack asks the loop to stop (``spike_action="stop"``, too many non-finite steps), else None."""
        return self.run.stop_reason

    @property
    def should_stop(self) -> bool:
        return self.run.stop_reason is not None

    @property
    def spike_events(self) -> list[Any]:
        """Every spike read back so far (at :meth:`metrics` calls and :meth:`close`)."""
        return self.run.spike_events

    def close(self) -> None:
        """Remove the optimizer hooks and read the last window's counts; idempotent."""
        if self.run.open:
            self.run.open = False
            self.run.close()
            if self._step_hook is not None:
                self._step_hook.remove()

    def __enter__(self) -> "AcceleratorClipper":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
