"""``GradClipMixin`` and ``GradClipTrainer``: the Trainer's clipping replaced by a configurable clipper."""

from __future__ import annotations

from typing import Any, Optional

from transformers import Trainer

from ...config import ClipConfig
from ...core import GradClipper, OptionError
from ...run import ClipRun
from .callback import GradClipCallback
from .compat import insert_callback
from .console import ConsoleTrim
from .session import ClipSession
from .wrappers import before_training_step, release

__all__ = ["GradClipMixin", "GradClipTrainer", "config_from_args"]


def config_from_args(args: Any) -> ClipConfig:
    """The options of ``args``: ``clip_*`` fields (``GradClipTrainingArguments``), else the drop-in of plain
    ``TrainingArguments``: norm clipping at ``max_grad_norm`` (0 or inf: measure only, as the stock Trainer)."""
    if hasattr(args, "clip_config"):
        return args.clip_config()
    return ClipConfig()


class GradClipMixin:
    """Mix into any ``Trainer`` subclass (``class MySFT(GradClipMixin, SFTTrainer)``) to replace its gradient
    clipping: each optimizer step computes the norm once, clips with the configured strategy and schedule,
    and logs the pre-clip norm as ``grad_norm`` plus ``gradclip/*`` metrics.

    Options come from ``GradClipTrainingArguments`` (``clip_*`` fields) or the ``clip_config=`` / ``clipper=``
    keywords; with plain ``TrainingArguments`` it clips by norm at ``max_grad_norm`` exactly as the stock
    Trainer (bit-identical). ``TrainingArguments`` are never changed; whatever the pack sets up for a run
    (optimizer hooks, the console filter) is removed when ``train()`` leaves, by any exit.

    Overrides ``train`` (``try``/``finally``), ``training_step`` (the step loss; a step that ``skip_steps`` lists
    consumes its batches without computing them), ``log`` (metrics before the
    reporters) and, on transformers 5.x, ``_clip_grad_norm``/``_get_grad_norm`` (they do nothing while the
    pack's run is active: no second norm pass). Clipping itself happens in a bound :class:`GradClipCallback`
    placed first among the callbacks (``on_pre_optimizer_step``).
    """

    def __init__(self, *args: Any, clip_config: Optional[ClipConfig] = None,
                 clipper: Optional[GradClipper] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if clip_config is not None and not isinstance(clip_config, ClipConfig):
            raise OptionError("clip_config", clip_config, "a ClipConfig or None")
        if clipper is not None and not isinstance(clipper, GradClipper):
            raise OptionError("clipper", clipper, "a GradClipper or None")
        if (clip_config is not None or clipper is not None) and hasattr(self.args, "clip_config"):
            set_fields = sorted("clip_" + k for k in self.args.clip_config().non_default())
            if set_fields:
                raise ValueError(f"{type(self).__name__}: options given twice: clip_config=/clipper= and the "
                                 f"arguments' {', '.join(set_fields)}. Pass them in one place.")
        if clipper is None and clip_config is None:
            clip_config = config_from_args(self.args)
        if clipper is None:  # max_grad_norm with the options, now (NaN refused, naming it)
            clip_config.resolved_threshold(getattr(self.args, "max_grad_norm", None) or 0.0)
        callback = GradClipCallback(config=clip_config, clipper=clipper).bind(self)
        callback.session.owner = type(self).__name__
        self._gradclip_callback = callback
        insert_callback(self, callback)  # first: it clips before other callbacks' on_pre_optimizer_step

    @property
    def clip_session(self) -> ClipSession:
        return self._gradclip_callback.session

    @property
    def clip_run(self) -> ClipRun | None:
        """The current (or last) run: ``clipper``, ``last_report``, ``num_clips``, ``spike_events``, ..."""
        return self.clip_session.run

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)
        finally:  # any exit: the optimizer hooks and the console filter go, the run closes
            release(self)
            self.clip_session.end()

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        run = self.clip_session.live(self)
        if run is not None:
            num_items = args[0] if args else kwargs.get("num_items_in_batch")
            skipped = before_training_step(self, run, inputs, num_items)
            if skipped is not None:  # a listed step: its batch is consumed, not computed
                run.add_micro_batch(skipped, inputs)
                return skipped
        loss = super().training_step(model, inputs, *args, **kwargs)
        if run is not None:
            run.add_micro_batch(loss, inputs)
        return loss

    def log(self, logs, *args: Any, **kwargs: Any) -> None:
        run = self.clip_session.live(self)
        if run is not None:
            ConsoleTrim.place(self)
            run.inject(logs, self.state)
        return super().log(logs, *args, **kwargs)

    # transformers >= 5: the Trainer neither clips nor measures while the pack's run is active
    def _clip_grad_norm(self, model):
        return None if self.clip_session.live(self) is not None else super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        if self.clip_session.live(self) is not None:
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)


class GradClipTrainer(GradClipMixin, Trainer):
    """``transformers.Trainer`` with configurable, scheduled, logged gradient clipping.

    Example::

        args = GradClipTrainingArguments(output_dir="out", clip_strategy="zscore", clip_schedule="cosine",
                                         clip_threshold_final=0.3)
        trainer = GradClipTrainer(model=model, args=args, train_dataset=ds)
    """
