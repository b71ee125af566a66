"""Candidate loss-spike baselines for issue 25 item 5, as small pure-torch functions.

Each detector is a frozen-parameter object with ``fresh(shape, device, dtype)`` -> state (a dict of tensors)
and ``update(state, x)`` -> ``(spike, z, baseline)``, with SpikeDetector.update's semantics:

* ``x`` is the step loss (0-dim, or any shape: every element is an independent stream, so one call tests
  many series at once); nothing is read on the host (only torch ops, ``torch.where`` instead of ``if``);
* a non-finite ``x`` is neither a spike nor observed; during warmup nothing is a spike;
* a spike does not enter the statistics, unless ``adapt_after`` spikes came in a row (the level moved);
* ``z`` is the score compared with ``z_max`` (0 during warmup / for a non-finite value), ``baseline`` the
  value the loss was compared with (the forecast, in loss units).

State keys: ``n`` (values observed), ``t`` (calls: the step index), ``run`` (consecutive spikes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

LOG2 = math.log(2.0)


def _common(shape, device, dtype):
    z = lambda dt: torch.zeros(shape, dtype=dt, device=device)  # noqa: E731
    return {"n": z(torch.int64), "t": z(torch.int64), "run": z(torch.int64)}


def _ring(shape, w, device, dtype):
    return torch.full((*shape, w), math.nan, dtype=dtype, device=device)


def _ring_write(ring: Tensor, pos: Tensor, value: Tensor, take: Tensor) -> None:
    """ring[..., pos % W] = value where take (device only)."""
    w = ring.shape[-1]
    idx = (pos % w).unsqueeze(-1)
    old = ring.gather(-1, idx).squeeze(-1)
    ring.scatter_(-1, idx, torch.where(take, value, old).unsqueeze(-1))


class Detector:
    """``score(st, x)`` -> (finite, ready, raw spike, z, baseline, aux) reads the state only;
    ``observe(st, x, take, aux)`` updates the statistics. ``update`` = score, the run counter, observe."""

    adapt_after: int = 50

    @torch.no_grad()
    def update(self, st, x):
        finite, ready, spike, z, base, aux = self.score(st, x)
        spike = spike & ready & finite
        run = torch.where(spike, st["run"] + 1, torch.where(finite, torch.zeros_like(st["run"]), st["run"]))
        st["run"].copy_(run)
        take = finite & (~spike | (run > self.adapt_after))
        self.observe(st, x, take, aux)
        st["t"].add_(1)
        return spike, torch.where(ready & finite, z, torch.zeros_like(z)), base


# ------------------------------------------------------------------ today's rule (reference)
def _log(x):
    finite = torch.isfinite(x) & (x > 0)
    return finite, torch.log(torch.where(finite, x, torch.ones_like(x)))


def _nanmedian(v):
    return torch.nanmedian(v, dim=-1).values


@dataclass(frozen=True)
class EMA(Detector):
    """gradclip_hf.core.spikes.SpikeDetector(method='ema'): cumulative mean/var during warmup, EMA after."""

    z_max: float = 6.0
    ratio: float | None = None
    warmup: int = 20
    alpha: float = 0.9
    min_rel_spread: float = 0.02
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st.update(mean=torch.zeros(shape, dtype=dtype, device=device), var=torch.zeros(shape, dtype=dtype, device=device))
        return st

    def score(self, st, x):
        x = x.to(st["mean"].dtype)
        finite = torch.isfinite(x)
        ready = st["n"] >= self.warmup
        base = st["mean"].clone()
        spread = torch.maximum(st["var"].clamp(min=0).sqrt(), self.min_rel_spread * base.abs()).clamp(min=1e-12)
        z = (x - base) / spread
        spike = z > self.z_max
        if self.ratio is not None:
            spike = spike | (x > self.ratio * base)
        return finite, ready, spike, z, base, None

    def observe(self, st, x, take, aux):
        x = x.to(st["mean"].dtype)
        n, mean, var = st["n"], st["mean"], st["var"]
        xs = torch.where(take, x, mean)
        w = torch.where(n < self.warmup, 1.0 / (n + 1).to(mean.dtype), torch.full_like(mean, 1 - self.alpha))
        w = torch.where(take, w, torch.zeros_like(w))
        d = xs - mean
        mean.add_(w * d)
        var.copy_((1 - w) * (var + w * d * d))
        n.add_(take.to(n.dtype))


# ------------------------------------------------------------------ Holt's linear smoothing of the log-loss
@dataclass(frozen=True)
class Holt(Detector):
    """Holt's linear (double exponential) smoothing of ``log(loss)``: level + trend forecast one step
    ahead; the score is the residual ``log(x) - forecast`` over a robust spread of past residuals
    (1.4826 x median |residual| of the last ``window`` accepted steps, floored at ``min_spread`` in log
    units, i.e. ~2 % of the loss). A spike: score > ``z_max``, or ``x > ratio x exp(forecast)``.
    ``trend_max``: the trend used in the forecast is clamped at this (0: a rising loss is not extrapolated)."""

    z_max: float = 6.0
    ratio: float | None = None
    warmup: int = 6
    a: float = 0.5  # level smoothing
    b: float = 0.2  # trend smoothing
    window: int = 16
    min_spread: float = 0.02
    trend_max: float | None = 0.0
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st.update(level=torch.zeros(shape, dtype=dtype, device=device),
                  trend=torch.zeros(shape, dtype=dtype, device=device), res=_ring(shape, self.window, device, dtype))
        return st

    def score(self, st, x):
        finite, y = _log(x.to(st["level"].dtype))
        ready = st["n"] >= self.warmup
        trend = st["trend"] if self.trend_max is None else st["trend"].clamp(max=self.trend_max)
        f = st["level"] + trend
        r = y - f
        spread = torch.nan_to_num(1.4826 * _nanmedian(st["res"].abs()), nan=0.0).clamp(min=self.min_spread)
        z = r / spread
        spike = z > self.z_max
        if self.ratio is not None:
            spike = spike | (r > math.log(self.ratio))
        return finite, ready, spike, z, torch.exp(f), (y, r)

    def observe(self, st, x, take, aux):
        y, r = aux
        n, lvl, tr = st["n"], st["level"], st["trend"]
        _ring_write(st["res"], n, r, take & (n >= 2))
        new_lvl = torch.where(n == 0, y, self.a * y + (1 - self.a) * (lvl + tr))
        new_tr = torch.where(n == 0, torch.zeros_like(tr),
                             torch.where(n == 1, y - lvl, self.b * (new_lvl - lvl) + (1 - self.b) * tr))
        lvl.copy_(torch.where(take, new_lvl, lvl))
        tr.copy_(torch.where(take, new_tr, tr))
        n.add_(take.to(n.dtype))


# ------------------------------------------------------------------ Theil-Sen line over a short window
@dataclass(frozen=True)
class TheilSen(Detector):
    """A robust line through the last ``window`` accepted log-losses (Theil-Sen: median of pairwise slopes,
    median intercept), forecast at this step; score = residual / (1.4826 x MAD of the window's residuals),
    floored at ``min_spread`` (log units). Slope clamped at ``slope_max`` (0: no upward extrapolation)."""

    z_max: float = 6.0
    ratio: float | None = None
    warmup: int = 6
    window: int = 16
    min_spread: float = 0.02
    slope_max: float | None = 0.0
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st.update(y=_ring(shape, self.window, device, dtype), ts=_ring(shape, self.window, device, dtype))
        return st

    def score(self, st, x):
        dtype = st["y"].dtype
        finite, y = _log(x.to(dtype))
        ready = st["n"] >= self.warmup
        ys, ts = st["y"], st["ts"]
        dy = ys.unsqueeze(-1) - ys.unsqueeze(-2)
        dt = ts.unsqueeze(-1) - ts.unsqueeze(-2)
        slopes = torch.where(dt > 0, dy / dt.clamp(min=1e-9), torch.full_like(dy, math.nan)).flatten(-2)
        slope = torch.nan_to_num(_nanmedian(slopes), nan=0.0)
        if self.slope_max is not None:
            slope = slope.clamp(max=self.slope_max)
        t_now = st["t"].to(dtype)
        inter = _nanmedian(ys - slope.unsqueeze(-1) * ts)
        fitted = ys - (inter.unsqueeze(-1) + slope.unsqueeze(-1) * ts)
        spread = (1.4826 * torch.nan_to_num(_nanmedian(fitted.abs()), nan=0.0)).clamp(min=self.min_spread)
        f = inter + slope * t_now
        r = y - f
        z = r / spread
        spike = z > self.z_max
        if self.ratio is not None:
            spike = spike | (r > math.log(self.ratio))
        return finite, ready, spike, z, torch.exp(f), (y, t_now)

    def observe(self, st, x, take, aux):
        y, t_now = aux
        _ring_write(st["y"], st["n"], y, take)
        _ring_write(st["ts"], st["n"], t_now, take)
        st["n"].add_(take.to(st["n"].dtype))


# ------------------------------------------------------------------ ratio to a recent low quantile
@dataclass(frozen=True)
class LowQuantile(Detector):
    """Baseline = the ``q`` quantile of the last ``window`` accepted losses (q=0: their minimum). A spike:
    ``x > ratio x baseline``, or (``z_max`` set) ``(log x - log baseline) / spread > z_max`` with spread =
    1.4826 x MAD of the window's log-losses floored at ``min_spread``."""

    ratio: float | None = 1.6
    z_max: float | None = None
    q: float = 0.25
    warmup: int = 6
    window: int = 8
    min_spread: float = 0.02
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st["y"] = _ring(shape, self.window, device, dtype)
        return st

    def score(self, st, x):
        dtype = st["y"].dtype
        finite, y = _log(x.to(dtype))
        ready = st["n"] >= self.warmup
        ys = st["y"]
        base = torch.nan_to_num(torch.nanquantile(ys, self.q, dim=-1), nan=0.0)
        med = _nanmedian(ys)
        spread = (1.4826 * torch.nan_to_num(_nanmedian((ys - med.unsqueeze(-1)).abs()), nan=0.0)).clamp(min=self.min_spread)
        r = y - base
        z = r / spread
        spike = torch.zeros_like(finite)
        if self.ratio is not None:
            spike = spike | (r > math.log(self.ratio))
        if self.z_max is not None:
            spike = spike | (z > self.z_max)
        return finite, ready, spike, z, torch.exp(base), y

    def observe(self, st, x, take, aux):
        _ring_write(st["y"], st["n"], aux, take)
        st["n"].add_(take.to(st["n"].dtype))


# ------------------------------------------------------------------ either of two rules (today's + an early one)
@dataclass(frozen=True)
class Either(Detector):
    """A spike when either detector flags it; a spike stays out of both (one shared run counter)."""

    first: Detector = None
    second: Detector = None
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st.update(a=self.first.fresh(shape, device, dtype), b=self.second.fresh(shape, device, dtype))
        return st

    def score(self, st, x):
        fa, ra, sa, za, ba, xa = self.first.score(st["a"], x)
        fb, rb, sb, zb, bb, xb = self.second.score(st["b"], x)
        sa, sb = sa & ra, sb & rb
        z = torch.where(sa | ~sb, torch.where(ra, za, zb), zb)
        return fa & fb, ra | rb, sa | sb, z, torch.where(sa | ~sb, ba, bb), (xa, xb)

    def observe(self, st, x, take, aux):
        self.first.observe(st["a"], x, take, aux[0])
        self.second.observe(st["b"], x, take, aux[1])
        for sub in (st["a"], st["b"]):
            sub["t"].add_(1)


def run_series(det, xs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Run ``det`` over ``xs`` of shape [B, T] (B independent streams): spikes, z, baselines, each [B, T]."""
    st = det.fresh(xs.shape[:-1], xs.device, torch.float64)
    out = [det.update(st, xs[..., t]) for t in range(xs.shape[-1])]
    return tuple(torch.stack([o[i] for o in out], dim=-1) for i in range(3))


@dataclass(frozen=True)
class Handoff(Detector):
    """``early`` decides before step ``until``, ``late`` from then on; a spike stays out of both."""

    early: Detector = None
    late: Detector = None
    until: int = 40
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st.update(a=self.early.fresh(shape, device, dtype), b=self.late.fresh(shape, device, dtype))
        return st

    def score(self, st, x):
        fa, ra, sa, za, ba, xa = self.early.score(st["a"], x)
        fb, rb, sb, zb, bb, xb = self.late.score(st["b"], x)
        early = st["t"] < self.until
        return (fa & fb, torch.where(early, ra, rb), torch.where(early, sa, sb), torch.where(early, za, zb),
                torch.where(early, ba, bb), (xa, xb))

    def observe(self, st, x, take, aux):
        self.early.observe(st["a"], x, take, aux[0])
        self.late.observe(st["b"], x, take, aux[1])
        for sub in (st["a"], st["b"]):
            sub["t"].add_(1)


# ------------------------------------------------------------------ a recent low baseline, noise from step-to-step differences
@dataclass(frozen=True)
class LowDiff(Detector):
    """Baseline = the ``q`` quantile of the last ``window`` accepted log-losses (follows a falling loss within a
    few steps); noise = sqrt(EMA of squared differences between consecutive accepted log-losses / 2) (a trend
    hardly enters it, heavy tails do: non-robust on purpose), floored at ``min_spread``. A spike:
    ``(log x - baseline) / noise > z_max`` (or ``x > ratio x baseline`` when ``ratio`` is set)."""

    z_max: float = 6.0
    ratio: float | None = None
    q: float = 0.25
    window: int = 8
    warmup: int = 6
    alpha: float = 0.9
    min_spread: float = 0.02
    min_ratio: float | None = None  # AND: a z-spike must also be this many times the baseline
    adapt_after: int = 50

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = _common(shape, device, dtype)
        st.update(y=_ring(shape, self.window, device, dtype), last=torch.zeros(shape, dtype=dtype, device=device),
                  d2=torch.zeros(shape, dtype=dtype, device=device))
        return st

    def score(self, st, x):
        dtype = st["y"].dtype
        finite, y = _log(x.to(dtype))
        ready = st["n"] >= self.warmup
        base = torch.nan_to_num(torch.nanquantile(st["y"], self.q, dim=-1), nan=0.0)
        noise = (st["d2"] / 2).clamp(min=0).sqrt().clamp(min=self.min_spread)
        r = y - base
        z = r / noise
        spike = z > self.z_max
        if self.min_ratio is not None:
            spike = spike & (r > math.log(self.min_ratio))
        if self.ratio is not None:
            spike = spike | (r > math.log(self.ratio))
        return finite, ready, spike, z, torch.exp(base), y

    def observe(self, st, x, take, y):
        n = st["n"]
        d = y - st["last"]
        k = (n - 1).clamp(min=1).to(y.dtype)  # differences seen so far, counting this one
        w = torch.where(n - 1 < self.warmup, 1.0 / k, torch.full_like(y, 1 - self.alpha))
        w = torch.where(take & (n >= 1), w, torch.zeros_like(w))
        st["d2"].add_(w * (d * d - st["d2"]))
        st["last"].copy_(torch.where(take, y, st["last"]))
        _ring_write(st["y"], n, y, take)
        n.add_(take.to(n.dtype))


@dataclass(frozen=True)
class HoltDiff(Holt):
    """Holt's forecast with the noise of LowDiff (EMA of squared consecutive differences / 2)."""

    alpha: float = 0.9

    def fresh(self, shape=(), device=None, dtype=torch.float64):
        st = super().fresh(shape, device, dtype)
        st.update(last=torch.zeros(shape, dtype=dtype, device=device), d2=torch.zeros(shape, dtype=dtype, device=device))
        return st

    def score(self, st, x):
        finite, ready, spike, z, base, (y, r) = super().score(st, x)
        noise = (st["d2"] / 2).clamp(min=0).sqrt().clamp(min=self.min_spread)
        z = r / noise
        spike = z > self.z_max
        if self.ratio is not None:
            spike = spike | (r > math.log(self.ratio))
        return finite, ready, spike, z, base, (y, r)

    def observe(self, st, x, take, aux):
        y, r = aux
        n = st["n"]
        d = y - st["last"]
        k = (n - 1).clamp(min=1).to(y.dtype)
        w = torch.where(n - 1 < self.warmup, 1.0 / k, torch.full_like(y, 1 - self.alpha))
        w = torch.where(take & (n >= 1), w, torch.zeros_like(w))
        st["d2"].add_(w * (d * d - st["d2"]))
        st["last"].copy_(torch.where(take, y, st["last"]))
        super().observe(st, x, take, aux)
