"""Hugging Face Trainer integration: arguments, ``GradClipTrainer``/``GradClipMixin``, ``GradClipCallback``."""

from .arguments import GradClipTrainingArguments
from .callback import GradClipCallback
from .runner import METRIC_KEYS, ClipRunner
from .trainer import GradClipMixin, GradClipTrainer

__all__ = ["GradClipTrainingArguments", "GradClipCallback", "GradClipMixin", "GradClipTrainer", "ClipRunner",
           "METRIC_KEYS"]
