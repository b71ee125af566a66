"""The torch-only clipping core: norms, strategies, schedules and the per-step engine."""

from .clippers import AGC, ClipOutcome, ClipStrategy, NormClip, QuantileClip, ValueClip, ZScoreClip
from .engine import ClipGroup, ClipReport, GradClipper, NonFiniteGradientError, NonFinitePolicy
from .norms import GradNorms, grad_norms
from .schedules import Constant, Cosine, Linear, Piecewise, Schedule, Warmup
from .snapshot import TrainingSnapshot
from .spikes import SpikeAction, SpikeController, SpikeDecision, SpikeDetector, SpikeEvent, SpikeMethod

__all__ = [
    "AGC", "ClipGroup", "ClipOutcome", "ClipReport", "ClipStrategy", "Constant", "Cosine", "GradClipper",
    "GradNorms", "Linear", "NonFiniteGradientError", "NonFinitePolicy", "NormClip", "Piecewise",
    "QuantileClip", "Schedule", "SpikeAction", "SpikeController", "SpikeDecision", "SpikeDetector", "SpikeEvent",
    "SpikeMethod", "TrainingSnapshot", "ValueClip", "Warmup", "ZScoreClip", "grad_norms",
]
