"""Small statistics without scipy: means with a Student-t 95 % interval, paired over seeds.

``t975(df)`` is the 0.975 quantile of Student's t distribution (two-sided 95 %), from a table
(df 1-30 exact to 3 decimals, then 40, 60, 120 and the normal limit; in between the next smaller df
is used, which makes the interval slightly wider, never narrower).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

__all__ = ["t975", "Interval", "mean_interval", "paired", "ratio", "share_of_gap"]

_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
    """0.975 quantile of Student's t with ``df`` degrees of freedom (``df >= 1``)."""
    if df < 1:
        raise ValueError(f"`df` must be >= 1, got {df!r}.")
    if df in _T975:
        return _T975[df]
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` values with its 95 % t-interval ``[low, high]`` and the sample ``std``."""

    mean: float
    low: float
    high: float
    std: float
    n: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def text(self, spec: str = "+.4f") -> str:
        """``"+0.0123 [+0.0050, +0.0196]"``."""
        if self.n == 0:
            return "-"
        if self.n == 1:
            return format(self.mean, spec)
        return f"{self.mean:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def mean_interval(values: Sequence[float]) -> Interval:
    """Mean and 95 % t-interval of the finite ``values`` (nan interval for fewer than 2)."""
    xs = [float(v) for v in values if math.isfinite(v)]
    if not xs:
        return Interval(math.nan, math.nan, math.nan, math.nan, 0)
    mean = statistics.fmean(xs)
    if len(xs) < 2:
        return Interval(mean, math.nan, math.nan, math.nan, len(xs))
    std = statistics.stdev(xs)
    half = t975(len(xs) - 1) * std / math.sqrt(len(xs))
    return Interval(mean, mean - half, mean + half, std, len(xs))


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """``a[seed] - b[seed]`` over the seeds both have: mean and 95 % interval."""
    return mean_interval([a[s] - b[s] for s in sorted(set(a) & set(b))])


def ratio(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """``a[seed] / b[seed]`` over the seeds both have (``b`` must not be 0): mean and 95 % interval."""
    return mean_interval([a[s] / b[s] for s in sorted(set(a) & set(b)) if b[s] != 0])


def share_of_gap(a: Mapping[int, float], ref: Mapping[int, float], best: Mapping[int, float]) -> Interval:
    """How much of the gap from ``ref`` to ``best`` ``a`` closes, per seed: ``(ref - a) / (ref - best)`` over the
    seeds all three have (seeds where ``ref == best`` are left out): mean and 95 % interval. 1: as good as
    ``best``; 0: as ``ref``; above 1: better than ``best``."""
    seeds = sorted(set(a) & set(ref) & set(best))
    return mean_interval([(ref[s] - a[s]) / (ref[s] - best[s]) for s in seeds if ref[s] != best[s]])
