"""Hugging Face Trainer integration: arguments, ``GradClipTrainer``/``GradClipMixin``, ``GradClipCallback``."""

from .arguments import GradClipArgumentParser, GradClipTrainingArguments, with_clip_options
from ...run import ClipRun
from ...run.metrics import METRIC_KEYS
from .callback import GradClipCallback
from .session import ClipSession
from .trainer import GradClipMixin, GradClipTrainer

__all__ = ["GradClipTrainingArguments", "GradClipArgumentParser", "GradClipCallback", "GradClipMixin", "GradClipTrainer", "ClipSession",
           "ClipRun", "METRIC_KEYS", "with_clip_options"]
