"""The torch-only clipping core: norms, strategies, schedules, the spike controller and the per-step clipper."""

from ._checks import OptionError, StateError
from .adaptive import QuantileClip, ZScoreClip
from .clipper import ClipGroup, ClipReport, GradClipper, NonFiniteGradientError, NonFinitePolicy
from .external import ExternalClip
from .lrguard import LRGuard
from .norms import GradNorms, grad_norms
from .schedules import Constant, Cosine, Linear, Piecewise, Schedule, Warmup
from .snapshot import TrainingSnapshot
from .spikes import SpikeAction, SpikeController, SpikeDecision, SpikeDetector, SpikeEvent, SpikeMethod
from .strategies import AGC, ClipOutcome, ClipStrategy, MeasureOnly, NormClip, ValueClip

__all__ = [
    "AGC", "ClipGroup", "ClipOutcome", "ClipReport", "ClipStrategy", "Constant", "Cosine", "ExternalClip",
    "GradClipper", "GradNorms", "LRGuard", "Linear", "MeasureOnly", "NonFiniteGradientError", "NonFinitePolicy",
    "NormClip", "OptionError", "Piecewise", "QuantileClip", "Schedule", "SpikeAction", "SpikeController",
    "SpikeDecision", "SpikeDetector", "SpikeEvent", "SpikeMethod", "StateError", "TrainingSnapshot", "ValueClip",
    "Warmup", "ZScoreClip", "grad_norms",
]
