"""``GradClipTrainingArguments``: ``TrainingArguments`` plus ``clip_*`` options (``HfArgumentParser`` flags)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from transformers import TrainingArguments

from ...config import ClipConfig, ScheduleName, SpikeDetection, Strategy, choices
from ...core import NonFinitePolicy, SpikeAction, SpikeMethod
from ...core.clippers import ZScoreClipOption, ZScoreMode

__all__ = ["GradClipTrainingArguments"]

_PREFIX = "clip_"


def argument_name(option: str) -> str:
    """The ``TrainingArguments`` field of a ``ClipConfig`` option: ``spike_*`` as is, others ``clip_*``."""
    return option if option.startswith("spike_") else _PREFIX + option


@dataclass
class GradClipTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the gradient-clipping options of :class:`~gradclip_hf.config.ClipConfig`,
    prefixed ``clip_`` (``--clip_strategy zscore --clip_schedule cosine ...`` on the command line), and the
    loss-spike controller's ``spike_*`` options (``--spike_detection loss --spike_action skip ...``).

    ``max_grad_norm``: ``GradClipTrainer`` owns clipping, so the Trainer's own clipping is turned off
    during ``train()``. ``max_grad_norm`` is only the default of ``clip_threshold`` (when that is
    ``None``), so ``GradClipTrainingArguments(max_grad_norm=0.5)`` clips exactly like the stock Trainer.
    DeepSpeed reads ``max_grad_norm`` for ``gradient_clipping="auto"``.

    Invalid values raise ``ValueError`` naming the field, the value and what is allowed.
    """

    clip_strategy: str = field(default="norm", metadata={
        "help": "Gradient clipping strategy: 'norm' (global norm, as torch clip_grad_norm_), 'value' (element "
                "clamp), 'agc' (adaptive gradient clipping), 'zscore' (ZClip: EMA z-score of the norm), "
                "'quantile' (AutoClip: quantile of past norms), 'none' (measure and log only).",
        "choices": choices(Strategy)})
    clip_threshold: Optional[float] = field(default=None, metadata={
        "help": "Threshold: max norm (norm), clip value (value), clipping ratio (agc), max norm cap (zscore), "
                "unused (quantile). Default: max_grad_norm."})
    clip_norm_type: float = field(default=2.0, metadata={"help": "p of the norms (>= 1, or inf)."})
    clip_schedule: str = field(default="constant", metadata={
        "help": "Threshold schedule: constant, linear or cosine (clip_threshold -> clip_threshold_final over "
                "clip_schedule_steps), warmup (clip_warmup_threshold -> clip_threshold over clip_warmup_steps), "
                "piecewise (clip_piecewise_values between clip_piecewise_boundaries).",
        "choices": choices(ScheduleName)})
    clip_threshold_final: Optional[float] = field(default=None, metadata={
        "help": "Threshold at the end of a linear/cosine schedule."})
    clip_schedule_steps: Optional[int] = field(default=None, metadata={
        "help": "Length of the linear/cosine schedule in optimizer steps. Default: the run's max_steps."})
    clip_warmup_steps: int = field(default=0, metadata={"help": "Length of the warmup schedule."})
    clip_warmup_threshold: Optional[float] = field(default=None, metadata={
        "help": "Threshold at step 0 of the warmup schedule."})
    clip_piecewise_boundaries: list[int] = field(default_factory=list, metadata={
        "help": "Steps where the piecewise threshold changes (strictly increasing)."})
    clip_piecewise_values: list[float] = field(default_factory=list, metadata={
        "help": "Piecewise thresholds: one more than clip_piecewise_boundaries."})
    clip_zscore_alpha: float = field(default=0.97, metadata={"help": "ZClip EMA smoothing, in (0, 1)."})
    clip_zscore_z: float = field(default=2.5, metadata={"help": "ZClip z-score above which a norm is a spike."})
    clip_zscore_warmup_steps: int = field(default=25, metadata={
        "help": "ZClip: norms collected before the EMA starts (clipped at clip_threshold meanwhile)."})
    clip_zscore_mode: str = field(default="zscore", metadata={
        "help": "ZClip mode.", "choices": choices(ZScoreMode)})
    clip_zscore_clip_option: str = field(default="adaptive_scaling", metadata={
        "help": "ZClip clip value on spikes.", "choices": choices(ZScoreClipOption)})
    clip_quantile: float = field(default=0.9, metadata={"help": "AutoClip quantile of past norms, in (0, 1]."})
    clip_quantile_history: int = field(default=1000, metadata={"help": "AutoClip: number of past norms kept."})
    clip_agc_eps: float = field(default=1e-3, metadata={"help": "AGC floor of the weight norm."})
    clip_exclude: list[str] = field(default_factory=list, metadata={
        "help": "Regular expressions of parameter names neither measured nor clipped."})
    clip_include: Optional[list[str]] = field(default=None, metadata={
        "help": "If set, only parameters whose names match one of these (e.g. lora_)."})
    clip_nonfinite: str = field(default="skip", metadata={
        "help": "Non-finite gradient norm: 'skip' the optimizer step (one host read per step; none under a "
                "GradScaler, which skips such steps itself), 'zero' the step's gradients (no host sync; the "
                "optimizer still steps), 'raise', or 'ignore'.",
        "choices": choices(NonFinitePolicy)})
    clip_nonfinite_max_consecutive: int = field(default=10, metadata={
        "help": "Stop training after this many consecutive non-finite steps (with clip_nonfinite='skip')."})
    spike_detection: str = field(default="off", metadata={
        "help": "Loss-spike controller: watch the step 'loss', the gradient 'norm', 'both', or 'off'. On a spike "
                "the clip threshold is tightened at once (x spike_factor) and relaxes back while calm.",
        "choices": choices(SpikeDetection)})
    spike_z: float = field(default=6.0, metadata={
        "help": "A spike is a loss more than spike_z spreads (EMA std or 1.4826 MAD) above its baseline."})
    spike_norm_z: Optional[float] = field(default=None, metadata={
        "help": "z threshold of the gradient-norm detector (default: spike_z)."})
    spike_ratio: Optional[float] = field(default=None, metadata={
        "help": "Also a spike: a value above spike_ratio x its baseline (> 1; off by default)."})
    spike_warmup_steps: int = field(default=20, metadata={"help": "Steps observed before spikes are flagged."})
    spike_method: str = field(default="ema", metadata={
        "help": "Running statistics: 'ema' (mean/variance) or 'mad' (rolling median/MAD).",
        "choices": choices(SpikeMethod)})
    spike_action: str = field(default="tighten", metadata={
        "help": "On a spike, besides tightening: 'tighten' only (no host sync), 'skip' the update, 'rollback' to "
                "the last in-memory snapshot, or 'stop' training (the last three read one flag per step).",
        "choices": choices(SpikeAction)})
    spike_factor: float = field(default=0.5, metadata={
        "help": "Threshold multiplier applied on each spike, in (0, 1]; repeated spikes multiply again."})
    spike_relax_half_life: float = field(default=20.0, metadata={
        "help": "Calm steps for the threshold factor's distance to 1 to halve."})
    spike_min_factor: float = field(default=0.05, metadata={"help": "Floor of the threshold factor, in (0, 1]."})
    spike_snapshot_every: int = field(default=50, metadata={
        "help": "Clean steps between in-memory snapshots of trainable weights and optimizer state (rollback)."})
    clip_log_layers_top_k: int = field(default=8, metadata={
        "help": "Log the pre-clip gradient norms of the k layers with the largest norms at each logging step "
                "(gradclip/layer/<name>) and of the last spike step (gradclip/spike_layer/<name>); 0 for none."})
    clip_log_layer_patterns: list[str] = field(default_factory=list, metadata={
        "help": "Regular expressions of parameter names whose gradient norms are always logged."})
    clip_wandb_histogram_every: int = field(default=10, metadata={
        "help": "With report_to wandb: a histogram of all per-layer norms every this many logging steps (0: never)."})
    clip_wandb_alerts: bool = field(default=True, metadata={
        "help": "With report_to wandb: W&B alerts for loss spikes (at most one per 5 minutes) and for stops."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.clip_config()  # validate now

    def clip_config(self) -> ClipConfig:
        """The :class:`ClipConfig` of the ``clip_*`` fields (``clip_threshold=None``: ``max_grad_norm``)."""
        options = {name: getattr(self, argument_name(name)) for name in ClipConfig.field_names()}
        if options["threshold"] is None and options["strategy"] not in ("quantile", "none"):
            max_grad_norm = self.max_grad_norm or 0.0
            if max_grad_norm > 0:
                options["threshold"] = float(max_grad_norm)
            elif options["strategy"] != "zscore":
                raise ValueError(f"`clip_threshold` must be a number > 0 for clip_strategy={options['strategy']!r}, "
                                 f"got None and max_grad_norm={self.max_grad_norm!r} to default to.")
        try:
            return ClipConfig(**options)
        except (ValueError, TypeError) as error:
            names = set(ClipConfig.field_names())
            message = re.sub(r"`(\w+)`", lambda m: f"`{argument_name(m.group(1))}`" if m.group(1) in names
                             else m.group(0), str(error))
            raise ValueError(message) from None
