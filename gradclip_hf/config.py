"""``ClipConfig``: every clipping option as one validated, JSON-safe dataclass (torch only).

The Trainer integration mirrors these fields with a ``clip_`` prefix
(:class:`gradclip_hf.integrations.transformers.GradClipTrainingArguments`); :meth:`ClipConfig.build`
turns a config into a :class:`~gradclip_hf.core.GradClipper` once the run's length is known.

How ``threshold`` is read by each strategy:

============  ==========================================================================
strategy      ``threshold`` means
============  ==========================================================================
``none``      unused: gradients are measured (``grad_norm`` is logged) but never changed
``norm``      ``max_norm`` of :func:`torch.nn.utils.clip_grad_norm_` (bit-identical)
``value``     ``clip_value`` of :func:`torch.nn.utils.clip_grad_value_`
``agc``       AGC clipping ratio λ (gradient norm / weight norm per unit)
``zscore``    ZClip ``max_grad_norm``: the cap of the adaptive threshold and the warmup clip value
              (``None``: no cap)
``quantile``  unused (the threshold is a quantile of past norms); schedules still scale it
============  ==========================================================================

Schedules in the core return a *multiplier* of the strategy's threshold. Here they are given as
thresholds: ``threshold`` at step 0 and ``threshold_final`` at ``schedule_steps`` (cosine, linear),
``warmup_threshold`` at step 0 rising/falling to ``threshold`` at ``warmup_steps`` (warmup), or
absolute ``piecewise_values`` between ``piecewise_boundaries``; the multiplier is their ratio to
``threshold``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any, Optional

import torch

from .core import (AGC, ClipOutcome, ClipStrategy, Constant, Cosine, GradClipper, Linear, NonFinitePolicy,
                   NormClip, Piecewise, QuantileClip, SpikeAction, SpikeController, SpikeMethod, ValueClip, Warmup,
                   ZScoreClip)
from .core.clippers import ZScoreClipOption, ZScoreMode

__all__ = ["ClipConfig", "Strategy", "ScheduleName", "SpikeDetection", "MeasureOnly", "NonFinitePolicy", "ZScoreMode",
           "ZScoreClipOption"]


class Strategy(str, Enum):
    """Clipping strategies (``ClipConfig.strategy``)."""

    NONE = "none"
    NORM = "norm"
    VALUE = "value"
    AGC = "agc"
    ZSCORE = "zscore"
    QUANTILE = "quantile"


class SpikeDetection(str, Enum):
    """What the spike controller watches (``ClipConfig.spike_detection``)."""

    OFF = "off"
    LOSS = "loss"
    NORM = "norm"
    BOTH = "both"


class ScheduleName(str, Enum):
    """Threshold schedules (``ClipConfig.schedule``)."""

    CONSTANT = "constant"
    LINEAR = "linear"
    COSINE = "cosine"
    WARMUP = "warmup"
    PIECEWISE = "piecewise"


def choices(enum: type[Enum]) -> list[str]:
    """The allowed values of a ``str`` Enum, for ``argparse``/``HfArgumentParser`` ``choices``."""
    return [member.value for member in enum]


class MeasureOnly(ClipStrategy):
    """Strategy ``"none"``: measure the norm (for logging), never change the gradients."""

    name = "none"

    def __init__(self, norm_type: float = 2.0):
        self.norm_type = norm_type

    def _config(self) -> dict[str, Any]:
        return {"norm_type": self.norm_type}

    def clip_(self, grads, norms, *, scale=1.0, observe=None, params=None, names=None) -> ClipOutcome:
        total = norms.total
        return ClipOutcome(norm=total, threshold=torch.full_like(total, math.inf), coef=torch.ones_like(total),
                           norm_post=total, clipped=torch.zeros((), dtype=torch.bool, device=total.device))


def _fail(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _choice(name: str, value: Any, enum: type[Enum]) -> str:
    if isinstance(value, enum):
        return value.value
    if isinstance(value, str) and value.lower() in choices(enum):
        return value.lower()
    raise _fail(name, value, "one of " + ", ".join(repr(c) for c in choices(enum)))


def _number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, optional: bool = False,
            allow_inf: bool = False) -> float | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, "a number" + (" or None" if optional else ""))
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise _fail(name, value, "a finite number")
    if low is not None and (value < low or (low_open and value == low)):
        raise _fail(name, value, f"{'>' if low_open else '>='} {low}")
    if high is not None and (value > high or (high_open and value == high)):
        raise _fail(name, value, f"{'<' if high_open else '<='} {high}")
    return value


def _int(name: str, value: Any, *, low: int, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(name, value, f"an int >= {low}" + (" or None" if optional else ""))
    return value


def _patterns(name: str, value: Any, optional: bool = False) -> list[str] | None:
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise _fail(name, value, "a list of regular expressions" + (" or None" if optional else ""))
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise _fail(name, value, f"a list of valid regular expressions ({pattern!r}: {error})") from error
    return list(value)


@dataclass
class ClipConfig:
    """All clipping options, validated on construction; ``build(total_steps)`` makes the clipper.

    Args:
        strategy: ``"none"``, ``"norm"``, ``"value"``, ``"agc"``, ``"zscore"`` or ``"quantile"``.
        threshold: see the module table; ``> 0``. ``None`` only for ``zscore`` (no cap) and ``quantile``.
        norm_type: ``p`` of the norms, ``>= 1`` or ``inf``.
        schedule: ``"constant"``, ``"linear"``, ``"cosine"``, ``"warmup"`` or ``"piecewise"``.
        threshold_final: threshold reached at ``schedule_steps`` (linear, cosine).
        schedule_steps: length of the linear/cosine schedule; ``None``: the run's ``max_steps``.
        warmup_steps: length of the warmup schedule.
        warmup_threshold: threshold at step 0 of the warmup schedule.
        piecewise_boundaries: steps where the piecewise threshold changes (strictly increasing).
        piecewise_values: thresholds, one more than boundaries.
        zscore_alpha, zscore_z, zscore_warmup_steps, zscore_mode, zscore_clip_option: ZClip options.
        quantile, quantile_history: AutoClip options.
        agc_eps: AGC floor of the weight norm.
        exclude: regular expressions of parameter names neither measured nor clipped.
        include: if set, only parameter names matching one of these (e.g. ``["lora_"]``).
        nonfinite: ``"skip"`` (default: skip ``optimizer.step()``; one host read per step, none when a
            GradScaler is active, which skips such steps itself), ``"zero"`` (zero the step's gradients, no
            host sync; the optimizer still steps), ``"raise"`` (one host read per step) or ``"ignore"``.
        nonfinite_max_consecutive: stop training after this many non-finite steps in a row (``"skip"``).
        spike_detection: ``"off"`` (default), ``"loss"``, ``"norm"`` or ``"both"``: run the loss-spike
            controller on the step loss and/or the pre-clip gradient norm.
        spike_z, spike_norm_z, spike_ratio, spike_warmup_steps, spike_method: detector options
            (:class:`~gradclip_hf.core.SpikeController`).
        spike_action: ``"tighten"`` (default, no host sync), ``"skip"``, ``"rollback"`` or ``"stop"``.
        spike_factor, spike_relax_half_life, spike_min_factor: the threshold factor on spikes.
        spike_snapshot_every: clean steps between two in-memory snapshots (``spike_action="rollback"``).
        log_layers_top_k: log the pre-clip norms of the ``k`` layers with the largest norms at each logging
            step (``gradclip/layer/<name>``) and of the last spike step (``gradclip/spike_layer/<name>``);
            0 for none.
        log_layer_patterns: regular expressions of parameter names whose norms are always logged.
        wandb_histogram_every: with W&B active, log a histogram of all per-layer norms every this many
            logging steps (0: never).
        wandb_alerts: with W&B active, send ``run.alert`` for spikes (rate-limited) and stops.
    """

    strategy: str = "norm"
    threshold: Optional[float] = 1.0
    norm_type: float = 2.0
    schedule: str = "constant"
    threshold_final: Optional[float] = None
    schedule_steps: Optional[int] = None
    warmup_steps: int = 0
    warmup_threshold: Optional[float] = None
    piecewise_boundaries: list[int] = field(default_factory=list)
    piecewise_values: list[float] = field(default_factory=list)
    zscore_alpha: float = 0.97
    zscore_z: float = 2.5
    zscore_warmup_steps: int = 25
    zscore_mode: str = "zscore"
    zscore_clip_option: str = "adaptive_scaling"
    quantile: float = 0.9
    quantile_history: int = 1000
    agc_eps: float = 1e-3
    exclude: list[str] = field(default_factory=list)
    include: Optional[list[str]] = None
    nonfinite: str = "skip"
    nonfinite_max_consecutive: int = 10
    spike_detection: str = "off"
    spike_z: float = 6.0
    spike_norm_z: Optional[float] = None
    spike_ratio: Optional[float] = None
    spike_warmup_steps: int = 20
    spike_method: str = "ema"
    spike_action: str = "tighten"
    spike_factor: float = 0.5
    spike_relax_half_life: float = 20.0
    spike_min_factor: float = 0.05
    spike_snapshot_every: int = 50
    log_layers_top_k: int = 8
    log_layer_patterns: list[str] = field(default_factory=list)
    wandb_histogram_every: int = 10
    wandb_alerts: bool = True

    def __post_init__(self) -> None:
        self.strategy = _choice("strategy", self.strategy, Strategy)
        self.schedule = _choice("schedule", self.schedule, ScheduleName)
        self.nonfinite = _choice("nonfinite", self.nonfinite, NonFinitePolicy)
        self.zscore_mode = _choice("zscore_mode", self.zscore_mode, ZScoreMode)
        self.zscore_clip_option = _choice("zscore_clip_option", self.zscore_clip_option, ZScoreClipOption)
        threshold_optional = self.strategy in (Strategy.ZSCORE.value, Strategy.QUANTILE.value, Strategy.NONE.value)
        self.threshold = _number("threshold", self.threshold, low=0.0, low_open=True, optional=threshold_optional)
        if isinstance(self.norm_type, str) and self.norm_type.lower() in ("inf", "infinity"):
            self.norm_type = math.inf
        self.norm_type = _number("norm_type", self.norm_type, low=1.0, allow_inf=True)
        self.threshold_final = _number("threshold_final", self.threshold_final, low=0.0, low_open=True, optional=True)
        self.schedule_steps = _int("schedule_steps", self.schedule_steps, low=1, optional=True)
        self.warmup_steps = _int("warmup_steps", self.warmup_steps, low=0)
        self.warmup_threshold = _number("warmup_threshold", self.warmup_threshold, low=0.0, low_open=True,
                                        optional=True)
        self.zscore_alpha = _number("zscore_alpha", self.zscore_alpha, low=0.0, high=1.0, low_open=True,
                                    high_open=True)
        self.zscore_z = _number("zscore_z", self.zscore_z, low=0.0, low_open=True)
        self.zscore_warmup_steps = _int("zscore_warmup_steps", self.zscore_warmup_steps, low=1)
        self.quantile = _number("quantile", self.quantile, low=0.0, high=1.0, low_open=True)
        self.quantile_history = _int("quantile_history", self.quantile_history, low=1)
        self.agc_eps = _number("agc_eps", self.agc_eps, low=0.0, low_open=True)
        self.exclude = _patterns("exclude", self.exclude)
        self.include = _patterns("include", self.include, optional=True)
        self.piecewise_boundaries = list(self.piecewise_boundaries or [])
        self.piecewise_values = [_number("piecewise_values", v, low=0.0, low_open=True)
                                 for v in (self.piecewise_values or [])]
        for b in self.piecewise_boundaries:
            _int("piecewise_boundaries", b, low=1)
        self.nonfinite_max_consecutive = _int("nonfinite_max_consecutive", self.nonfinite_max_consecutive, low=1)
        self.spike_detection = _choice("spike_detection", self.spike_detection, SpikeDetection)
        self.spike_method = _choice("spike_method", self.spike_method, SpikeMethod)
        self.spike_action = _choice("spike_action", self.spike_action, SpikeAction)
        self.spike_z = _number("spike_z", self.spike_z, low=0.0, low_open=True)
        self.spike_norm_z = _number("spike_norm_z", self.spike_norm_z, low=0.0, low_open=True, optional=True)
        self.spike_ratio = _number("spike_ratio", self.spike_ratio, low=1.0, low_open=True, optional=True)
        self.spike_warmup_steps = _int("spike_warmup_steps", self.spike_warmup_steps, low=2)
        self.spike_factor = _number("spike_factor", self.spike_factor, low=0.0, high=1.0, low_open=True)
        self.spike_relax_half_life = _number("spike_relax_half_life", self.spike_relax_half_life, low=0.0,
                                             low_open=True)
        self.spike_min_factor = _number("spike_min_factor", self.spike_min_factor, low=0.0, high=1.0, low_open=True)
        self.spike_snapshot_every = _int("spike_snapshot_every", self.spike_snapshot_every, low=1)
        self.log_layers_top_k = _int("log_layers_top_k", self.log_layers_top_k, low=0)
        self.log_layer_patterns = _patterns("log_layer_patterns", self.log_layer_patterns or [])
        self.wandb_histogram_every = _int("wandb_histogram_every", self.wandb_histogram_every, low=0)
        if not isinstance(self.wandb_alerts, bool):
            raise _fail("wandb_alerts", self.wandb_alerts, "True or False")
        self._check_schedule()

    def _check_schedule(self) -> None:
        schedule = self.schedule
        if schedule == ScheduleName.CONSTANT.value:
            return
        if self.strategy == Strategy.NONE.value:
            raise _fail("schedule", schedule, "'constant' with strategy 'none' (nothing is clipped)")
        base_needed = self.strategy != Strategy.QUANTILE.value
        if base_needed and self.threshold is None:
            raise _fail("threshold", None, f"a number > 0 when schedule={schedule!r} (the schedule scales it)")
        if schedule in (ScheduleName.LINEAR.value, ScheduleName.COSINE.value) and self.threshold_final is None:
            raise _fail("threshold_final", None, f"a number > 0 when schedule={schedule!r}")
        if schedule == ScheduleName.WARMUP.value:
            if self.warmup_steps < 1:
                raise _fail("warmup_steps", self.warmup_steps, "an int >= 1 when schedule='warmup'")
            if self.warmup_threshold is None:
                raise _fail("warmup_threshold", None, "a number > 0 when schedule='warmup' (threshold at step 0)")
        if schedule == ScheduleName.PIECEWISE.value:
            bounds, values = self.piecewise_boundaries, self.piecewise_values
            if bounds != sorted(set(bounds)):
                raise _fail("piecewise_boundaries", bounds, "strictly increasing steps")
            if len(values) != len(bounds) + 1:
                raise _fail("piecewise_values", values,
                            f"len(piecewise_boundaries) + 1 = {len(bounds) + 1} thresholds")

    @classmethod
    def recommended(cls, **overrides: Any) -> "ClipConfig":
        """The pack's recommended configuration for LLM fine-tuning (what the demo and the stability
        benchmark call "recommended"): ZClip with a cap at 1.0, plus the loss-spike controller, which
        skips the update of a spike step (one host read per step) and tightens the threshold after it.
        ``overrides`` change any field."""
        options: dict[str, Any] = dict(strategy="zscore", threshold=1.0, spike_detection="loss",
                                       spike_action="skip")
        options.update(overrides)
        return cls(**options)

    # ------------------------------------------------------------------ building
    @property
    def is_constant_norm(self) -> bool:
        """Plain ``clip_grad_norm_`` (what DeepSpeed's ``gradient_clipping`` can do instead): norm strategy,
        constant schedule, no spike controller."""
        return (self.strategy == Strategy.NORM.value and self.schedule == ScheduleName.CONSTANT.value
                and self.spike_detection == SpikeDetection.OFF.value)

    def build_strategy(self) -> ClipStrategy:
        s, t = self.strategy, self.threshold
        if s == Strategy.NONE.value:
            return MeasureOnly(self.norm_type)
        if s == Strategy.NORM.value:
            return NormClip(t, self.norm_type)
        if s == Strategy.VALUE.value:
            return ValueClip(t)
        if s == Strategy.AGC.value:
            return AGC(clipping=t, eps=self.agc_eps)
        if s == Strategy.ZSCORE.value:
            return ZScoreClip(alpha=self.zscore_alpha, z_thresh=self.zscore_z, max_grad_norm=t,
                              warmup_steps=self.zscore_warmup_steps, mode=self.zscore_mode,
                              clip_option=self.zscore_clip_option)
        return QuantileClip(quantile=self.quantile, history=self.quantile_history, norm_type=self.norm_type)

    def build_schedule(self, total_steps: int | None = None):
        """The core schedule (a multiplier of the threshold), ``None`` for constant."""
        s = self.schedule
        base = self.threshold if self.threshold is not None else 1.0
        if s == ScheduleName.CONSTANT.value:
            return None
        if s in (ScheduleName.LINEAR.value, ScheduleName.COSINE.value):
            steps = self.schedule_steps or total_steps
            if not steps or steps < 1:
                raise ValueError(f"`schedule_steps` is None and the run length is unknown ({total_steps!r}): "
                                 f"set schedule_steps or max_steps.")
            cls = Linear if s == ScheduleName.LINEAR.value else Cosine
            return cls(start=1.0, end=self.threshold_final / base, total_steps=int(steps))
        if s == ScheduleName.WARMUP.value:
            return Warmup(start=self.warmup_threshold / base, value=1.0, warmup_steps=self.warmup_steps)
        return Piecewise(boundaries=self.piecewise_boundaries, values=[v / base for v in self.piecewise_values])

    def build_spikes(self) -> SpikeController | None:
        """The spike controller, ``None`` when ``spike_detection="off"``."""
        if self.spike_detection == SpikeDetection.OFF.value:
            return None
        return SpikeController(
            detect_loss=self.spike_detection in (SpikeDetection.LOSS.value, SpikeDetection.BOTH.value),
            detect_norm=self.spike_detection in (SpikeDetection.NORM.value, SpikeDetection.BOTH.value),
            z=self.spike_z, norm_z=self.spike_norm_z, ratio=self.spike_ratio, warmup_steps=self.spike_warmup_steps,
            method=self.spike_method, action=self.spike_action, spike_factor=self.spike_factor,
            relax_half_life=self.spike_relax_half_life, min_factor=self.spike_min_factor)

    def build(self, total_steps: int | None = None) -> GradClipper:
        """A fresh :class:`GradClipper` for a run of ``total_steps`` optimizer steps."""
        return GradClipper(self.build_strategy(), self.build_schedule(total_steps), exclude=self.exclude,
                           include=self.include, nonfinite=self.nonfinite, spikes=self.build_spikes())

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``ClipConfig(**d)`` rebuilds it)."""
        d = asdict(self)
        if math.isinf(d["norm_type"]):
            d["norm_type"] = "inf"
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
