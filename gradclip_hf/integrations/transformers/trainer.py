"""``GradClipMixin`` and ``GradClipTrainer``: the Trainer's clipping replaced by a configurable clipper."""

from __future__ import annotations

from typing import Any, Optional

from transformers import Trainer

from ...config import ClipConfig
from ...core import GradClipper
from .callback import GradClipCallback
from .runner import ClipRunner

__all__ = ["GradClipMixin", "GradClipTrainer"]


def _config_from_args(args: Any) -> ClipConfig:
    if hasattr(args, "clip_config"):
        return args.clip_config()
    # a plain TrainingArguments: the drop-in, norm clipping at max_grad_norm (measure only if 0)
    max_grad_norm = getattr(args, "max_grad_norm", 0.0) or 0.0
    if max_grad_norm > 0:
        return ClipConfig(strategy="norm", threshold=float(max_grad_norm))
    return ClipConfig(strategy="none", threshold=None)


class GradClipMixin:
    """Mix into any ``Trainer`` subclass (``class MySFT(GradClipMixin, SFTTrainer)``) to replace its
    gradient clipping: each optimizer step computes the norm once, clips with the configured
    strategy and schedule, and logs the pre-clip norm as ``grad_norm`` plus ``gradclip/*`` metrics.

    Options come from ``GradClipTrainingArguments`` (``clip_*`` fields), or ``clip_config=`` /
    ``clipper=`` keywords; with plain ``TrainingArguments`` it clips by norm at ``max_grad_norm``
    exactly as the stock Trainer (bit-identical). The Trainer's own clipping is turned off for the
    run (``max_grad_norm`` is set to 0 during ``train()`` and restored after).

    Overrides ``training_step`` (step loss), ``log`` (metrics before reporters), and on
    transformers 5.x ``_get_grad_norm``/``_clip_grad_norm`` (no second norm pass); clipping itself
    happens in a bound :class:`GradClipCallback` placed first among the callbacks
    (``on_pre_optimizer_step``, the one hook before ``optimizer.step()`` shared by 4.57 and 5.x).
    """

    def __init__(self, *args: Any, clip_config: Optional[ClipConfig] = None,
                 clipper: Optional[GradClipper] = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if clipper is None and clip_config is None:
            clip_config = _config_from_args(self.args)
        callback = GradClipCallback(config=clip_config, clipper=clipper).bind(self)
        callback.runner.owner = type(self).__name__
        self._gradclip_callback = callback
        self.callback_handler.callbacks.insert(0, callback)

    @property
    def clip_runner(self) -> ClipRunner:
        """The :class:`ClipRunner` (``num_clips``, ``last_report``, ``log_history``, ``clipper``)."""
        return self._gradclip_callback.runner

    def training_step(self, model, inputs, *args: Any, **kwargs: Any):
        loss = super().training_step(model, inputs, *args, **kwargs)
        self._gradclip_callback.runner.add_loss(loss)
        return loss

    def log(self, logs, *args: Any, **kwargs: Any) -> None:
        self._gradclip_callback.runner.inject(logs)
        return super().log(logs, *args, **kwargs)

    # transformers >= 5: the norm is ours, computed once in on_pre_optimizer_step
    def _get_grad_norm(self, model, grad_norm=None):
        if self._gradclip_callback.runner.active:
            return None
        return super()._get_grad_norm(model, grad_norm=grad_norm)

    def _clip_grad_norm(self, model):
        if self._gradclip_callback.runner.active:
            return None
        return super()._clip_grad_norm(model)


class GradClipTrainer(GradClipMixin, Trainer):
    """``transformers.Trainer`` with configurable, scheduled, logged gradient clipping.

    Example::

        args = GradClipTrainingArguments(output_dir="out", clip_strategy="zscore", clip_threshold=1.0,
                                         clip_schedule="cosine", clip_threshold_final=0.3)
        trainer = GradClipTrainer(model=model, args=args, train_dataset=ds)
    """
