"""The checks of ``ClipConfig`` that involve several options (one-option checks are in each field's metadata,
:mod:`gradclip_hf.options`): combinations that cannot mean anything raise
(``OptionError``), options the rest of the configuration does not use are returned for one warning each; and
the Trainer's ``max_grad_norm`` as the pack reads it (:func:`check_max_grad_norm`)."""

from __future__ import annotations

import math
from typing import Any

from .core import NonFinitePolicy, OptionError, SpikeAction
from .core._checks import FLOAT32_MAX
from .options import ScheduleName, SpikeDetection, Strategy


def check_max_grad_norm(value: Any) -> float:
    """The Trainer's ``max_grad_norm`` as the pack reads it: 0.0 for 0 and ``None`` (no clipping), ``inf`` for
    ``inf`` and values above the float32 maximum (no clipping: torch's clip coefficient is 1 there), 0.0 for
    negative values (the stock Trainer clips only when ``max_grad_norm > 0``: scripts pass -1 to turn it off),
    else the number. NaN and non-numbers raise :class:`OptionError` naming ``max_grad_norm``."""
    if value is None:
        return 0.0
    allowed = "a number (0, negative or inf: no clipping, norms still measured)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError("max_grad_norm", value, allowed)
    try:
        value = float(value)
    except OverflowError:
        return math.inf
    if math.isnan(value):
        raise OptionError("max_grad_norm", value, allowed, "NaN is not a threshold (the stock Trainer would not clip "
                          "without saying so): pass 0 to turn clipping off.")
    if value < 0:
        return 0.0
    return math.inf if value > FLOAT32_MAX else value


def check_combinations(c: Any) -> None:
    """Combinations of the options of ``c`` (a ``ClipConfig`` being built) that cannot mean anything: errors."""
    s = c.strategy
    if c.threshold is not None and math.isinf(c.threshold) and s != Strategy.ZSCORE.value:
        raise OptionError("threshold", c.threshold, "a finite number > 0", "(inf, no cap, is for strategy 'zscore')")
    if c.threshold is None and s in (Strategy.VALUE.value, Strategy.AGC.value):
        what = "the bound of each gradient element" if s == Strategy.VALUE.value else "the ratio of gradient to weight norm"
        raise OptionError("threshold", None, f"a number > 0 with strategy {s!r}",
                          f"It is {what}, so it does not default to max_grad_norm (a norm).")
    if s == Strategy.AGC.value and c.norm_type != 2.0:
        raise OptionError("norm_type", c.norm_type, "2 with strategy 'agc'", "AGC clips unit-wise L2 norms.")
    if c.spike_detection == SpikeDetection.OFF.value and c.spike_action != SpikeAction.TIGHTEN.value:
        raise OptionError("spike_action", c.spike_action, "'tighten' while spike_detection is 'off'",
                          "Set spike_detection to 'loss', 'norm' or 'both' to act on spikes.")
    if c.spike_gate != "step" and c.spike_detection not in (SpikeDetection.LOSS.value, SpikeDetection.BOTH.value):
        raise OptionError("spike_gate", c.spike_gate, "'step' while spike_detection is "
                          f"{c.spike_detection!r}", "The micro-batch gate judges losses: set spike_detection to "
                          "'loss' or 'both'.")
    _check_schedule(c)


def _check_schedule(c: Any) -> None:
    schedule = c.schedule
    if schedule == ScheduleName.CONSTANT.value:
        return
    if c.strategy == Strategy.NONE.value:
        raise OptionError("schedule", schedule, "'constant' with strategy 'none' (nothing is clipped)")
    if schedule in (ScheduleName.LINEAR.value, ScheduleName.COSINE.value) and c.threshold_final is None:
        raise OptionError("threshold_final", None, f"a number > 0 when schedule={schedule!r}")
    if schedule == ScheduleName.WARMUP.value:
        if c.warmup_steps < 1:
            raise OptionError("warmup_steps", c.warmup_steps, "an int >= 1 when schedule='warmup'")
        if c.warmup_threshold is None:
            raise OptionError("warmup_threshold", None, "a number > 0 when schedule='warmup' (threshold at step 0)")
    if schedule == ScheduleName.PIECEWISE.value:
        bounds, values = c.piecewise_boundaries, c.piecewise_values
        if bounds != sorted(set(bounds)):
            raise OptionError("piecewise_boundaries", bounds, "strictly increasing steps")
        if len(values) != len(bounds) + 1:
            raise OptionError("piecewise_values", values, f"len(piecewise_boundaries) + 1 = {len(bounds) + 1} "
                              f"thresholds")


_SCHEDULE_OPTIONS = {"threshold_final": ("linear", "cosine"), "schedule_steps": ("linear", "cosine"),
                     "warmup_steps": ("warmup",), "warmup_threshold": ("warmup",),
                     "piecewise_boundaries": ("piecewise",), "piecewise_values": ("piecewise",)}


def ignored_options(c: Any) -> list[tuple[str, str]]:
    """Options of ``c`` set to a non-default value that the rest of the configuration does not use: warnings."""
    changed = c.non_default()
    out = [(name, f"it only applies to schedule {' or '.join(map(repr, used))} (schedule is {c.schedule!r}).")
           for name, used in _SCHEDULE_OPTIONS.items() if name in changed and c.schedule not in used]
    if "threshold" in changed and c.strategy in (Strategy.NONE.value, Strategy.QUANTILE.value):
        out.append(("threshold", f"strategy {c.strategy!r} has no fixed threshold."))
    prefixes = {"zscore_": Strategy.ZSCORE.value, "quantile": Strategy.QUANTILE.value, "agc_": Strategy.AGC.value}
    out += [(name, f"it only applies to strategy {strategy!r}.") for name in changed
            for prefix, strategy in prefixes.items() if name.startswith(prefix) and c.strategy != strategy]
    if c.spike_detection == SpikeDetection.OFF.value:
        out += [(name, "spike_detection is 'off'.") for name in changed
                if name.startswith("spike_") and name not in ("spike_detection", "spike_action")]
    elif c.spike_detection == SpikeDetection.LOSS.value and "spike_norm_z" in changed:
        out.append(("spike_norm_z", "spike_detection is 'loss' (no gradient-norm detector)."))
    elif c.spike_detection == SpikeDetection.NORM.value and "spike_early" in changed:
        out.append(("spike_early", "spike_detection is 'norm' (the early rule is the loss detector's)."))
    if ("spike_factor" in changed and c.spike_factor == 1.0 and c.spike_detection != SpikeDetection.OFF.value
            and c.spike_action == SpikeAction.TIGHTEN.value):
        out.append(("spike_factor", "with spike_action 'tighten' a factor of 1 changes nothing: spikes are only "
                                    "counted and logged (set it below 1, e.g. 0.5, to tighten)."))
    if "spike_snapshot_every" in changed and c.spike_action != SpikeAction.ROLLBACK.value:
        out.append(("spike_snapshot_every", "it only applies to spike_action 'rollback'."))
    if "nonfinite_max_consecutive" in changed and c.nonfinite != NonFinitePolicy.SKIP.value:
        out.append(("nonfinite_max_consecutive", "it only applies to nonfinite 'skip'."))
    if "loss_cap_patience" in changed and c.loss_cap is None:
        out.append(("loss_cap_patience", "loss_cap is not set."))
    return out
