"""Hugging Face Trainer integration: arguments, ``GradClipTrainer``/``GradClipMixin``, ``GradClipCallback``."""

from .arguments import GradClipArgumentParser, GradClipTrainingArguments, with_clip_options
from .callback import ClipSession, GradClipCallback
from .metrics import METRIC_KEYS
from .run import ClipRun
from .trainer import GradClipMixin, GradClipTrainer

__all__ = ["GradClipTrainingArguments", "GradClipArgumentParser", "GradClipCallback", "GradClipMixin", "GradClipTrainer", "ClipSession",
           "ClipRun", "METRIC_KEYS", "with_clip_options"]
