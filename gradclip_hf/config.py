"""``ClipConfig``: THE definition of every clipping option (torch only).

Each option is declared once below, with its default, its help text, its allowed values and its check (the
field's metadata; the checks and the choice Enums are in :mod:`gradclip_hf.options`); everything
else is derived from these fields: the ``clip_*`` fields of ``GradClipTrainingArguments`` (and of TRL
configs), the command line (``HfArgumentParser``), the Axolotl YAML keys. :meth:`ClipConfig.build` turns a
config into a :class:`~gradclip_hf.core.GradClipper` once the run's length and ``max_grad_norm`` are known.

How ``threshold`` is read by each strategy (``None``: the Trainer's ``max_grad_norm``, 1.0 outside a
Trainer):

============  ==========================================================================
strategy      ``threshold`` means
============  ==========================================================================
``none``      unused: gradients are measured (``grad_norm`` is logged) but never changed
``norm``      ``max_norm`` of :func:`torch.nn.utils.clip_grad_norm_` (bit-identical)
``value``     ``clip_value`` of :func:`torch.nn.utils.clip_grad_value_` (required)
``agc``       AGC clipping ratio λ, gradient norm / weight norm per unit (required)
``zscore``    ZClip's cap of the adaptive threshold and its warmup clip value (``inf``: no cap)
``quantile``  unused (the threshold is a quantile of the norms so far, this step's included); schedules still scale it
============  ==========================================================================

Schedules are given as thresholds: ``threshold`` at step 0 and ``threshold_final`` at ``schedule_steps``
(cosine, linear), ``warmup_threshold`` at step 0 moving to ``threshold`` at ``warmup_steps`` (warmup), or
``piecewise_values`` between ``piecewise_boundaries``; the core gets their ratio to ``threshold``.
"""

import functools
import math
import warnings
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, Callable, Optional

from ._config_checks import check_combinations, check_max_grad_norm, ignored_options
from .core import (AGC, Cosine, GradClipper, Linear, MeasureOnly, NonFinitePolicy, NormClip, OptionError,
                   Piecewise, QuantileClip, SpikeAction, SpikeController, SpikeMethod, ValueClip, Warmup, ZScoreClip)
from .core._checks import UnknownOptionError, check_bool, check_norm_type, check_number, check_patterns
from .core.lrguard import LRGuard
from .core.adaptive import ZScoreClipOption, ZScoreMode
from .options import (Apply, ScheduleName, SpikeDetection, SpikeFilePath, SpikeGate, Strategy, choice, choices,
                      display_name, floats, integer, ints, option, option_names, positive, spike_file, unit)
from .spikefile import SkipList, read_skip_list

__all__ = ["ClipConfig", "Strategy", "ScheduleName", "SpikeDetection", "SpikeGate", "Apply", "OPTION_CHECKS",
           "option_names", "check_max_grad_norm", "choices"]

_pos, _pos_opt = positive(), positive(optional=True)


@dataclass
class ClipConfig:
    """All clipping options, validated on construction (:class:`~gradclip_hf.core.OptionError`, a
    ``ValueError``, naming the option, the value and what is allowed). The field help texts are the reference
    (``docs/options.md`` lists them)."""

    strategy: str = option("norm", "Clipping strategy: 'norm' (global norm, as torch clip_grad_norm_), 'value' "
                           "(element clamp), 'agc' (adaptive gradient clipping), 'zscore' (ZClip: EMA z-score of the "
                           "norm), 'quantile' (AutoClip: quantile of the norms so far), 'none' (measure and log only).",
                           choice(Strategy), Strategy)
    threshold: Optional[float] = option(None, "Threshold: max norm (norm), element bound (value), clipping ratio "
                                        "(agc), cap (zscore; inf for none), unused (quantile, none). Default: the "
                                        "Trainer's max_grad_norm (1.0 outside a Trainer).", positive(True, True))
    norm_type: float = option(2.0, "p of the gradient norms (>= 1, or inf).", lambda n, v: check_norm_type(v, n))
    apply: str = option("auto", "Where the clip multiplier goes: 'auto' (a fused torch optimizer's grad_scale, one pass "
                        "fewer, except for the drop-in norm configuration, which multiplies in place to stay bit-"
                        "identical to clip_grad_norm_), 'optimizer' (always the fused optimizer when possible), "
                        "'grads' (always in place).", choice(Apply), Apply)
    schedule: str = option("constant", "Threshold schedule: constant; linear or cosine (threshold -> threshold_final "
                           "over schedule_steps); warmup (warmup_threshold -> threshold over warmup_steps); piecewise "
                           "(piecewise_values between piecewise_boundaries).", choice(ScheduleName), ScheduleName)
    threshold_final: Optional[float] = option(None, "Threshold at the end of a linear/cosine schedule.", _pos_opt)
    schedule_steps: Optional[int] = option(None, "Length of the linear/cosine schedule in optimizer steps. Default: "
                                           "the run's max_steps.", integer(1, 10**12, optional=True))
    warmup_steps: int = option(0, "Length of the warmup schedule in optimizer steps.", integer(0, 10**12))
    warmup_threshold: Optional[float] = option(None, "Threshold at step 0 of the warmup schedule.", _pos_opt)
    piecewise_boundaries: list[int] = option([], "Steps where the piecewise threshold changes (increasing).", ints)
    piecewise_values: list[float] = option([], "Piecewise thresholds: one more than the boundaries.", floats)
    zscore_alpha: float = option(0.97, "ZClip EMA smoothing, in (0, 1).", unit(True, True))
    zscore_z: float = option(2.5, "ZClip: z-score above which a norm is clipped.", _pos)
    zscore_warmup_steps: int = option(25, "ZClip: norms collected before the EMA starts (clipped at the threshold "
                                      "meanwhile).", integer(1))
    zscore_mode: str = option("zscore", "ZClip mode.", choice(ZScoreMode), ZScoreMode)
    zscore_clip_option: str = option("adaptive_scaling", "ZClip clip value on spikes.", choice(ZScoreClipOption),
                                     ZScoreClipOption)
    quantile: float = option(0.9, "AutoClip: quantile of the norms so far (this step's included), in (0, 1].",
                             unit())
    quantile_history: int = option(1000, "AutoClip: number of past norms kept.", integer(1))
    agc_eps: float = option(1e-3, "AGC floor of the weight norm.", _pos)
    exclude: list[str] = option([], "Regular expressions of parameter names neither measured nor clipped (their "
                                "gradients are still guarded against NaN/Inf).", check_patterns)
    include: Optional[list[str]] = option(None, "If set, only parameters whose names match one of these (e.g. "
                                          "lora_) are measured and clipped.",
                                          lambda n, v: check_patterns(n, v, optional=True, nonempty=True))
    nonfinite: str = option("skip", "A NaN/Inf in any gradient: 'skip' the update (inside the optimizer step), "
                            "'zero' the step's gradients (the optimizer still steps), 'raise' before touching them, "
                            "or 'ignore'.", choice(NonFinitePolicy), NonFinitePolicy)
    nonfinite_max_consecutive: int = option(10, "Stop training after this many non-finite steps in a row "
                                            "(nonfinite='skip').", integer(1))
    spike_detection: str = option("off", "Loss-spike controller: watch the step 'loss', the gradient 'norm', "
                                  "'both', or 'off'. On a spike the threshold is tightened at once (x spike_factor) "
                                  "and relaxes back while calm.", choice(SpikeDetection), SpikeDetection)
    spike_z: float = option(6.0, "A spike is a loss more than spike_z spreads above its baseline.", _pos)
    spike_norm_z: Optional[float] = option(None, "z of the gradient-norm detector (default: spike_z).", _pos_opt)
    spike_ratio: Optional[float] = option(None, "Also a spike: a value above spike_ratio x its baseline (> 1).",
                                          lambda n, v: check_number(n, v, low=1.0, low_inclusive=False, optional=True))
    spike_warmup_steps: int = option(20, "Steps observed before the running statistics flag spikes (the early rule, "
                                     "spike_early, flags from the 7th step on).", integer(2))
    spike_early: bool = option(True, "Loss detection also judges each loss against a baseline that follows a "
                               "falling loss (the 25th percentile of its last 8 values, the noise of its step-to-step "
                               "changes): a spike when more than spike_z of that noise and 1.5x above it, from the 7th "
                               "step on. Catches a 2x jump early in training, where the running statistics still "
                               "carry the steep start; False: the running statistics only.", check_bool)
    spike_method: str = option("ema", "Running statistics: 'ema' (mean/variance) or 'mad' (median/MAD of the last "
                               "max(100, spike_warmup_steps) steps).", choice(SpikeMethod), SpikeMethod)
    spike_action: str = option("tighten", "On a spike, besides tightening: 'tighten' only, 'skip' the update, "
                               "'rollback' to the last in-memory snapshot, or 'stop' training.",
                               choice(SpikeAction), SpikeAction)
    spike_gate: str = option("step", "Where a loss spike is judged: 'step' (the step loss; spike_action acts on "
                             "the whole update), or 'micro_batch' (needs spike_detection 'loss' or 'both'): each "
                             "micro-batch's loss against its own baseline, before its backward; a spiking micro-batch "
                             "is dropped (backward on loss x 0), the update is the mean of the kept micro-batches (by "
                             "tokens when the Trainer counts them), and skipped only when none is kept; spike_action "
                             "acts on what the step still flags (the kept loss, the gradient norm). With one "
                             "micro-batch per step: the same as 'step' with spike_action 'skip'.",
                             choice(SpikeGate), SpikeGate)
    spike_adapt_after: int = option(10, "Consecutive spikes after which the detectors take the new level in (a lasting "
                                    "shift of the loss is followed instead of flagged for ever).", integer(1))
    spike_factor: float = option(0.5, "Threshold multiplier on each spike, in (0, 1]; 1 never tightens.", unit())
    spike_relax_half_life: float = option(20.0, "Calm steps for the threshold factor's distance to 1 to halve.",
                                          _pos)
    spike_min_factor: float = option(0.05, "Floor of the threshold factor, in (0, 1].", unit())
    spike_snapshot_every: int = option(50, "Clean steps between in-memory snapshots (spike_action='rollback').",
                                       integer(1))
    skip_steps: list[int] = option([], "Optimizer steps (numbered from 1, as train/global_step logs them) whose update "
                                   "is skipped: through the Trainer their batches are consumed without being computed (no forward, no backward), "
                                   "so the data order stays the same.",
                                   ints)
    skip_steps_from: Optional[str] = option(None, "A gradclip_spikes.jsonl written by an earlier run: skip the update "
                                            "of every spike and non-finite step it lists (resume from a checkpoint "
                                            "before them).", spike_file)
    loss_cap: Optional[float] = option(None, "Loss watchdog: stop training when the step loss stays above this (or "
                                       "is NaN/Inf) for loss_cap_patience steps in a row.", _pos_opt)
    loss_cap_patience: int = option(1, "Steps in a row above loss_cap before the watchdog stops training.", integer(1))
    lr_guard: Optional[float] = option(None, "Learning-rate guard: a learning rate that jumps (above this many times "
                                       "the previous step's) and stands above this many times its running average "
                                       "(the mean of the first 20 steps, then an EMA, alpha 0.9) is capped at the "
                                       "latter, e.g. 2. Against a learning-rate mistake (a scheduler restarted at its "
                                       "peak, a wrong multiplier); a warmup of any length is never capped, an "
                                       "intended jump (a warm restart) becomes a re-warmup of about 10 steps. None: "
                                       "off.",
                                       lambda n, v: check_number(n, v, low=1.0, low_inclusive=False, optional=True))
    log_layers_top_k: int = option(8, "Log the pre-clip norms of the k layers with the largest norms "
                                   "(gradclip/layer/<name>; W&B and TensorBoard only, not the console); 0 for none.",
                                   integer(0))
    log_layer_patterns: list[str] = option([], "Regular expressions of parameter names whose norms are always logged.",
                                           check_patterns)
    wandb_histogram_every: int = option(10, "With W&B: a histogram of per-layer norms every this many logging steps "
                                        "(0: never).", integer(0))
    wandb_alerts: bool = option(True, "With W&B: alerts for spikes (at most one per 5 minutes) and stops.",
                                check_bool)
    reset_statistics: bool = option(False, "On resume, do not load the checkpoint's gradclip state: the clipping "
                                    "and spike statistics start fresh (for a resume with changed statistics "
                                    "options, e.g. zscore_warmup_steps or spike_method).", check_bool)

    def __post_init__(self) -> None:
        rename = display_name()
        try:
            for f in fields(self):
                setattr(self, f.name, f.metadata["check"](f.name, getattr(self, f.name)))
            check_combinations(self)
        except OptionError as error:
            raise error.renamed(rename) from None
        for name, reason in ignored_options(self):
            warnings.warn(f"`{rename(name)}`={getattr(self, name)!r} is ignored: {reason}", UserWarning, stacklevel=4)

    @classmethod
    def recommended(cls, **overrides: Any) -> "ClipConfig":
        """The pack's recommended configuration (what the demo and the benchmarks call "recommended"), chosen on
        the fault gallery (docs/benchmarks.md): a tiny byte-level Llama (about 0.1 M parameters), 300 steps; five of
        its six faults hit pretraining from scratch, one a LoRA fine-tune, and the false-positive cost was measured
        on clean pretraining, LoRA and SFT streams. Mostly pretraining-like faults on a tiny model, then: not
        measured on a large fine-tune (docs/recipes/ say what to check on yours). It does: clip by norm at the
        threshold (``max_grad_norm`` by default) and skip the update of every loss-spike step (inside the optimizer step:
        no host read on fused optimizers), without tightening the threshold after it (``spike_factor=1``: on
        the gallery, tightening after a skipped spike removed no more damage), for up to 50 spikes in a row
        (``spike_adapt_after=50``: a bad shard of up to 50 batches is skipped whole; a lasting shift of the loss
        costs at most 50 skipped updates before it is followed). ``overrides`` change any field."""
        options: dict[str, Any] = dict(strategy="norm", spike_detection="loss", spike_action="skip",
                                       spike_factor=1.0, spike_adapt_after=50)
        options.update(overrides)
        return cls(**options)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, options: Any, owner: str = "ClipConfig") -> "ClipConfig":
        """``ClipConfig(**options)`` for a dict of options (a config dict, parsed YAML): a key that is not an
        option raises the same ``ValueError`` as a misspelt keyword, naming it (``owner``: where it was given)."""
        if not isinstance(options, dict):
            raise OptionError("config", options, "a dict of ClipConfig options")
        for key in options:
            if key not in _FIELD_NAMES:
                raise UnknownOptionError(key, owner, _FIELD_NAMES)
        return cls(**options)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict (``ClipConfig(**d)`` rebuilds it)."""
        d = asdict(self)
        for key in ("norm_type", "threshold"):
            if isinstance(d[key], float) and math.isinf(d[key]):
                d[key] = "inf"
        return d

    def non_default(self) -> dict[str, Any]:
        """The options that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != _default(f)}

    # ------------------------------------------------------------------ building
    @property
    def is_drop_in(self) -> bool:
        """Exactly what ``max_grad_norm`` does: norm, constant threshold, no spike controller."""
        return (self.strategy == Strategy.NORM.value and self.schedule == ScheduleName.CONSTANT.value
                and self.spike_detection == SpikeDetection.OFF.value)

    @property
    def defers_to_optimizer(self) -> bool:
        """Whether a fused optimizer should apply the clip multiplier (``apply``, see its help)."""
        return self.apply == Apply.OPTIMIZER.value or (self.apply == Apply.AUTO.value and not self.is_drop_in)

    def resolved_threshold(self, max_grad_norm: Any = None) -> Optional[float]:
        """The threshold in force: ``threshold``, else the Trainer's ``max_grad_norm`` (``None``: no Trainer,
        1.0). ``max_grad_norm`` 0 (or ``None`` in ``TrainingArguments``), ``inf`` or above the float32 maximum
        means no clipping, as in the stock Trainer: ``inf`` here (strategy ``norm`` then only measures, ``zscore``
        has no cap; the spike controller still acts).

        Raises:
            OptionError: ``max_grad_norm`` NaN, negative or not a number (named ``max_grad_norm``); a schedule
                with neither a threshold nor a ``max_grad_norm`` that clips.
        """
        no_trainer = max_grad_norm is None
        max_grad_norm = check_max_grad_norm(max_grad_norm)
        if self.threshold is not None or self.strategy in (Strategy.NONE.value, Strategy.QUANTILE.value):
            return self.threshold
        if no_trainer:
            return 1.0
        if 0 < max_grad_norm < math.inf:
            return max_grad_norm
        if self.schedule != ScheduleName.CONSTANT.value and self.strategy != Strategy.ZSCORE.value:
            raise OptionError("threshold", None, f"a number > 0 with schedule {self.schedule!r}", "It defaults to "
                              "max_grad_norm, which turns clipping off here (0 or inf): set the threshold the schedule "
                              "scales.")
        return math.inf

    def build(self, total_steps: Optional[int] = None, max_grad_norm: Optional[float] = None,
              micro_batches: int = 1) -> GradClipper:
        """A fresh :class:`GradClipper` for a run of ``total_steps`` optimizer steps of ``micro_batches``
        micro-batches each (gradient accumulation steps: the micro-batch gate's time constants)."""
        threshold = self.resolved_threshold(max_grad_norm)
        return GradClipper(_STRATEGIES[self.strategy](self, threshold), _schedule(self, threshold, total_steps),
                           exclude=self.exclude, include=self.include, nonfinite=self.nonfinite,
                           spikes=self.build_spikes(micro_batches))

    @property
    def gates_micro_batches(self) -> bool:
        """Whether each micro-batch's loss is judged before its backward (``spike_gate="micro_batch"``)."""
        return self.spike_gate == SpikeGate.MICRO_BATCH.value

    def steps_to_skip(self) -> frozenset[int]:
        """``skip_steps`` and the steps of ``skip_steps_from`` (read once, when the option was set)."""
        return frozenset(self.skip_steps) | self._skip_list().steps

    def skip_fingerprints(self) -> dict[int, str]:
        """The batch fingerprint ``skip_steps_from`` recorded for each of its steps (where it has one)."""
        return dict(self._skip_list().fingerprints)

    def _skip_list(self) -> SkipList:
        path = self.skip_steps_from
        if not path:
            return SkipList()
        return path.skip if isinstance(path, SpikeFilePath) else read_skip_list(path)

    def build_lr_guard(self) -> Optional[LRGuard]:
        """The learning-rate guard, ``None`` when ``lr_guard`` is unset."""
        return None if self.lr_guard is None else LRGuard(cap=self.lr_guard)

    def build_spikes(self, micro_batches: int = 1) -> Optional[SpikeController]:
        """The spike controller, ``None`` when ``spike_detection="off"``; with its micro-batch gate for steps of
        ``micro_batches`` micro-batches when ``spike_gate="micro_batch"``."""
        if self.spike_detection == SpikeDetection.OFF.value:
            return None
        both = SpikeDetection.BOTH.value
        return SpikeController(
            detect_loss=self.spike_detection in (SpikeDetection.LOSS.value, both),
            detect_norm=self.spike_detection in (SpikeDetection.NORM.value, both),
            z=self.spike_z, norm_z=self.spike_norm_z, ratio=self.spike_ratio, warmup_steps=self.spike_warmup_steps,
            method=self.spike_method, window=max(100, self.spike_warmup_steps), action=self.spike_action,
            adapt_after=self.spike_adapt_after, micro_batches=micro_batches if self.gates_micro_batches else None,
            early=self.spike_early,
            spike_factor=self.spike_factor, relax_half_life=self.spike_relax_half_life,
            min_factor=self.spike_min_factor)


OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {f.name: f.metadata["check"] for f in fields(ClipConfig)}
_FIELD_NAMES = tuple(ClipConfig.field_names())
_dataclass_init = ClipConfig.__init__


@functools.wraps(_dataclass_init)
def _init(self: ClipConfig, *args: Any, **options: Any) -> None:
    """The dataclass ``__init__``; a keyword that is not an option: a ``ValueError`` with the closest name."""
    for key in options:
        if key not in _FIELD_NAMES:
            raise UnknownOptionError(key, "ClipConfig", _FIELD_NAMES)
    _dataclass_init(self, *args, **options)


ClipConfig.__init__ = _init  # type: ignore[method-assign]


def _default(f) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


_STRATEGIES: dict[str, Callable[[ClipConfig, Optional[float]], Any]] = {
    "none": lambda c, t: MeasureOnly(c.norm_type),
    "norm": lambda c, t: NormClip(t, c.norm_type) if t < math.inf else MeasureOnly(c.norm_type),  # max_grad_norm 0
    "value": lambda c, t: ValueClip(t, c.norm_type),
    "agc": lambda c, t: AGC(clipping=t, eps=c.agc_eps),
    "zscore": lambda c, t: ZScoreClip(alpha=c.zscore_alpha, z_thresh=c.zscore_z, max_grad_norm=t,
                                      warmup_steps=c.zscore_warmup_steps, mode=c.zscore_mode,
                                      clip_option=c.zscore_clip_option, norm_type=c.norm_type),
    "quantile": lambda c, t: QuantileClip(quantile=c.quantile, history=c.quantile_history, norm_type=c.norm_type),
}


def _schedule(c: ClipConfig, threshold: Optional[float], total_steps: Optional[int]):
    """The core schedule (a multiplier of the threshold), ``None`` for constant."""
    base = threshold if threshold is not None and math.isfinite(threshold) else 1.0
    if c.schedule == ScheduleName.CONSTANT.value:
        return None
    if c.schedule in (ScheduleName.LINEAR.value, ScheduleName.COSINE.value):
        steps = c.schedule_steps or total_steps
        if not steps:
            raise OptionError("schedule_steps", None, "set", "The run length is unknown: set schedule_steps or "
                              "max_steps.")
        cls = Linear if c.schedule == ScheduleName.LINEAR.value else Cosine
        return cls(start=1.0, end=c.threshold_final / base, total_steps=int(steps))
    if c.schedule == ScheduleName.WARMUP.value:
        return Warmup(start=c.warmup_threshold / base, value=1.0, warmup_steps=c.warmup_steps)
    return Piecewise(boundaries=c.piecewise_boundaries, values=[v / base for v in c.piecewise_values])
