"""Numbers of a run report: norm percentiles, clip rates, phases and outliers, from :class:`Window` lists.

**Percentiles** interpolate linearly between order statistics (``numpy.percentile``'s default, Python's
``statistics.quantiles(method="inclusive")``). They are taken over the logged ``grad_norm`` values: with
``logging_steps=1`` every step's pre-clip norm; with ``logging_steps=k > 1`` only the last step of each
window of k steps is known, so they are a 1-in-k sample. The **max** is exact whenever the pack logged
``gradclip/norm_max`` (the window's largest finite norm). Non-finite norms are counted, not ranked.

**Phases**: the first 10 % of steps ("start": norms right after initialisation, and during a typical LR
warm-up, are larger and would inflate the tail of the rest), then the remaining steps in three equal
thirds ("early", "middle", "late"), so a drift of the norm over the run shows. A window belongs to the
phase of its last step. The threshold advice uses the steps after "start".

**Clip rate**: ``gradclip/clip_rate`` (exact, the fraction of each window's steps that were clipped),
weighted by window length. Without it (the stock Trainer), the fraction of logged ``grad_norm`` above the
threshold: exact with ``logging_steps=1``, an estimate from one step per window otherwise.

**Flagged steps are reported apart** (:class:`Flags`): a step whose update was skipped (a spike, a listed
step, a non-finite gradient) or whose norm was NaN/Inf is neither clipped nor a sample of the run's usual
norm. It is taken out of the clip rate (``gradclip/clip_rate`` counts every step whose norm was above the
threshold, skipped ones too), out of the percentiles (a window whose last step it is) and out of the max (a
window's ``gradclip/norm_max`` that may be its norm).

**Outliers**: a logged value more than 6 robust standard deviations (1.4826 x the median absolute
deviation, at least 1 % of the median) above the median of the 50 logged values before it (at least 10
needed). Rolling, because norms and losses drift over a run; 6 sigma as OLMo-core's spike skipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence

from .load import Window

__all__ = ["percentile", "Phase", "phases", "Flags", "norm_summary", "clip_rate", "outliers", "finite",
           "START_FRACTION", "OUTLIER_Z", "OUTLIER_HISTORY", "OUTLIER_MIN_HISTORY"]

START_FRACTION = 0.10
OUTLIER_Z = 6.0
OUTLIER_HISTORY = 50
OUTLIER_MIN_HISTORY = 10
SIGMA_FLOOR = 0.01  # of the median: a flat series must not turn rounding noise into outliers


def finite(values: Iterable[Optional[float]]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) with linear interpolation, as ``numpy.percentile`` by default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _median(values: Sequence[float]) -> float:
    return percentile(values, 50)


@dataclass
class Phase:
    name: str
    first: int
    last: int

    def holds(self, window: Window) -> bool:
        return self.first <= window.step <= self.last


def phases(last_step: int) -> list[Phase]:
    """"start" = the first 10 % of ``1..last_step`` (at least one step), then three equal thirds; empty
    phases (very short runs) are left out."""
    start = max(1, round(START_FRACTION * last_step))
    rest = last_step - start
    bounds = [start] + [start + round(k * rest / 3) for k in (1, 2, 3)]
    out = [Phase("start", 1, start)]
    for name, lo, hi in zip(("early", "middle", "late"), bounds, bounds[1:]):
        if hi > lo:
            out.append(Phase(name, lo + 1, hi))
    return out


@dataclass
class Flags:
    """The steps of one logging window that are reported apart (see the module docstring).

    ``steps``: how many; ``clipped``: how many of them ``gradclip/clip_rate`` counted as clipped;
    ``last``: the window's last step (its logged ``grad_norm`` and ``norm_post``) is one of them;
    ``max_theirs``: the window's ``gradclip/norm_max`` may be one of their norms."""

    steps: int = 0
    clipped: int = 0
    last: bool = False
    max_theirs: bool = False


NO_FLAGS = Flags()


def _flags(window: Window, flags: Optional[Mapping[int, Flags]]) -> Flags:
    return flags.get(window.step, NO_FLAGS) if flags else NO_FLAGS


def norm_summary(windows: Sequence[Window], flags: Optional[Mapping[int, Flags]] = None) -> dict:
    """``n`` finite logged norms, ``nonfinite`` logged norms, p50/p90/p99 (``None`` without data) and
    ``max``: the largest of the logged norms and of ``gradclip/norm_max`` (exact when that is logged).
    ``flags`` (by window step): the norms of flagged steps are left out."""
    kept = [w for w in windows if not _flags(w, flags).last]
    norms = finite(w.grad_norm for w in kept)
    out: dict = {"n": len(norms), "nonfinite": sum(1 for w in windows if w.grad_norm is not None
                                                      and not math.isfinite(w.grad_norm))}
    for q in (50, 90, 99):
        out[f"p{q}"] = percentile(norms, q) if norms else None
    clean_max = [w for w in windows if not _flags(w, flags).max_theirs]
    maxima = norms + finite(w.norm_max for w in clean_max)
    out["max"] = max(maxima) if maxima else None
    out["max_exact"] = all(w.size == 1 or (w.norm_max is not None and not _flags(w, flags).max_theirs)
                           for w in windows if _flags(w, flags).steps < w.size)  # a clean step's norm may be lost
    return out


def _clips(window: Window, threshold: Optional[float]) -> Optional[bool]:
    limit = window.threshold if window.threshold is not None else threshold
    if window.grad_norm is None or not math.isfinite(window.grad_norm):
        return None
    return limit is not None and 0 < limit < math.inf and window.grad_norm > limit


def clip_rate(windows: Sequence[Window], threshold: Optional[float],
              flags: Optional[Mapping[int, Flags]] = None) -> tuple[Optional[float], bool]:
    """(rate, estimated): the logged ``gradclip/clip_rate`` weighted by window length, else the share of
    logged finite norms above the threshold (``estimated`` unless every window is one step). ``flags`` (by
    window step): flagged steps are taken out of both counts."""
    logged = [w for w in windows if w.clip_rate is not None and math.isfinite(w.clip_rate)]
    if logged:
        steps = clipped = 0.0
        for w in logged:
            f = _flags(w, flags)
            steps += w.size - f.steps
            clipped += max(0.0, w.clip_rate * w.size - f.clipped)
        return (min(1.0, clipped / steps) if steps > 0 else None), False
    marks = [c for c in (_clips(w, threshold) for w in windows if not _flags(w, flags).last) if c is not None]
    if not marks:
        return None, False
    return sum(marks) / len(marks), any(w.size > 1 for w in windows)


def outliers(points: Sequence[tuple[int, Optional[float]]], z: float = OUTLIER_Z, history: int = OUTLIER_HISTORY,
             min_history: int = OUTLIER_MIN_HISTORY) -> list[dict]:
    """``(step, value)`` points more than ``z`` robust sigmas above the median of the ``history`` finite
    values before them: ``[{"step", "value", "median", "z"}]``."""
    seen: list[float] = []
    found = []
    for step, value in points:
        if value is None or not math.isfinite(value):
            continue
        if len(seen) >= min_history:
            recent = seen[-history:]
            median = _median(recent)
            mad = _median([abs(v - median) for v in recent])
            sigma = max(1.4826 * mad, SIGMA_FLOOR * abs(median), 1e-12)
            score = (value - median) / sigma
            if score > z:
                found.append({"step": step, "value": value, "median": median, "z": score})
        seen.append(value)
    return found
