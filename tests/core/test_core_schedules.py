"""Threshold schedules: exact values, monotonicity, composition with strategies."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradclip_hf import Constant, Cosine, GradClipper, Linear, NormClip, Piecewise, QuantileClip, Warmup, ZScoreClip


def test_constant():
    schedule = Constant(0.7)
    assert schedule(0) == 0.7 and schedule(10**9) == 0.7
    assert Constant()(5) == 1.0


def test_linear_exact_values():
    schedule = Linear(1.0, 0.5, total_steps=10)
    assert [schedule(s) for s in (0, 5, 10, 11, 10**6)] == [1.0, 0.75, 0.5, 0.5, 0.5]
    assert schedule(2) == pytest.approx(0.9)
    rising = Linear(0.2, 1.0, total_steps=4)
    assert [rising(s) for s in (0, 2, 4, 8)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_cosine_endpoints_and_midpoint():
    schedule = Cosine(1.0, 0.2, total_steps=100)
    assert schedule(0) == pytest.approx(1.0, abs=1e-12)
    assert schedule(50) == pytest.approx(0.6, abs=1e-12)
    assert schedule(100) == pytest.approx(0.2, abs=1e-12)
    assert schedule(150) == pytest.approx(0.2, abs=1e-12)
    assert schedule(25) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-12)
    assert schedule(25) > 0.6  # a half cosine lingers near the start


def test_warmup_exact_values():
    schedule = Warmup(start=0.1, value=1.0, warmup_steps=10)
    assert schedule(0) == 0.1
    assert schedule(5) == pytest.approx(0.55)
    assert schedule(10) == 1.0 and schedule(10**6) == 1.0
    loose = Warmup(start=5.0, value=1.0, warmup_steps=4)
    assert [loose(s) for s in (0, 2, 4, 5)] == [5.0, 3.0, 1.0, 1.0]


def test_piecewise_boundaries():
    schedule = Piecewise(boundaries=(100, 500), values=(2.0, 1.0, 0.5))
    assert [schedule(s) for s in (0, 99, 100, 101, 499, 500, 10**9)] == [2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    assert Piecewise(boundaries=[], values=[0.3])(7) == 0.3
    assert isinstance(schedule.boundaries, tuple)


@pytest.mark.parametrize("schedule", [Constant(1.0), Linear(1.0, 0.5, 10), Cosine(1.0, 0.5, 10),
                                      Warmup(0.5, 1.0, 10), Piecewise((3,), (1.0, 2.0))])
def test_step_must_be_a_non_negative_int(schedule):
    with pytest.raises(ValueError, match="step"):
        schedule(-1)
    with pytest.raises(TypeError, match="step"):
        schedule(1.5)
    with pytest.raises(TypeError, match="step"):
        schedule(True)


positive = st.floats(0.01, 100.0)


@settings(max_examples=50, deadline=None)
@given(start=positive, end=positive, total=st.integers(1, 1000), kind=st.sampled_from(["linear", "cosine", "warmup"]),
       steps=st.lists(st.integers(0, 2000), min_size=2, max_size=10))
def test_monotone_between_start_and_end(start, end, total, kind, steps):
    schedule = {"linear": Linear, "cosine": Cosine, "warmup": Warmup}[kind](start, end, total)
    values = [schedule(s) for s in sorted(steps)]
    low, high = min(start, end), max(start, end)
    tol = 1e-12 * high
    assert all(low - tol <= v <= high + tol for v in values)
    if start >= end:
        assert all(a >= b - tol for a, b in zip(values, values[1:]))
    else:
        assert all(a <= b + tol for a, b in zip(values, values[1:]))
    assert schedule(total) == pytest.approx(end, rel=1e-12) and schedule(0) == pytest.approx(start, rel=1e-12)


@settings(max_examples=50, deadline=None)
@given(values=st.lists(positive, min_size=1, max_size=6), data=st.data())
def test_piecewise_monotone_when_values_are(values, data):
    values = sorted(values, reverse=True)
    boundaries = sorted(data.draw(st.sets(st.integers(1, 1000), min_size=len(values) - 1, max_size=len(values) - 1)))
    schedule = Piecewise(boundaries, values)
    steps = sorted(data.draw(st.lists(st.integers(0, 1200), min_size=2, max_size=10)))
    got = [schedule(s) for s in steps]
    assert all(a >= b for a, b in zip(got, got[1:]))
    assert set(got) <= set(values)
    for b, v in zip(boundaries, values[1:]):
        assert schedule(b) == v


def test_schedule_composes_with_strategy():
    clipper = GradClipper(NormClip(2.0), schedule=Linear(1.0, 0.5, total_steps=10))
    p = nn.Parameter(torch.zeros(2))
    expected = {0: 2.0, 5: 1.5, 10: 1.0, 20: 1.0}
    for step, threshold in expected.items():
        p.grad = torch.tensor([30.0, 40.0])
        report = clipper.clip_([p], step=step)
        f = report.to_floats()
        assert f["threshold"] == pytest.approx(threshold)
        assert f["scale"] == pytest.approx(threshold / 2.0)
        assert f["norm_post"] == pytest.approx(threshold, rel=1e-5)
        assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(threshold, rel=1e-5)
    assert clipper.scale_at(10) == 0.5


def test_callable_schedule_and_factor_multiply():
    clipper = GradClipper(NormClip(2.0), schedule=lambda step: 0.5)
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([30.0, 40.0])
    report = clipper.clip_([p], step=3, factor=torch.tensor(0.5))
    assert report.to_floats()["threshold"] == pytest.approx(0.5)
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(0.5, rel=1e-5)


def _calm(n=30):
    gen = torch.Generator().manual_seed(0)
    return (1.0 + 0.01 * torch.randn(n, generator=gen)).tolist()


@pytest.mark.parametrize("mode", ["zscore", "percentile"])
def test_tighter_schedule_does_not_scale_calm_zscore_steps(mode):
    """ZScoreClip without a cap has no threshold outside spikes: a schedule < 1 must not shrink calm steps.

    (It scales the pass-through value ``norm`` by the schedule, multiplying every gradient by it.)
    """
    scaled = GradClipper(ZScoreClip(max_grad_norm=None, warmup_steps=5, mode=mode), schedule=Constant(0.5))
    unscaled = GradClipper(ZScoreClip(max_grad_norm=None, warmup_steps=5, mode=mode))
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    calm_steps = 0
    for step, value in enumerate(_calm()):
        p.grad, q.grad = torch.tensor([value]), torch.tensor([value])
        spike = bool(unscaled.clip_([q], step=step).clipped)
        report = scaled.clip_([p], step=step)
        if not spike:
            calm_steps += 1
            assert torch.equal(p.grad, torch.tensor([value])), step
            assert not bool(report.clipped), step
    assert calm_steps >= 25


def test_schedule_scales_zscore_cap_and_spike_threshold():
    values = _calm()
    strategy = ZScoreClip(max_grad_norm=2.0, warmup_steps=5)
    clipper = GradClipper(strategy, schedule=Piecewise((10,), (1.0, 0.25)))
    p = nn.Parameter(torch.zeros(1))
    for step, value in enumerate(values[:10]):  # calm, under the cap: untouched
        p.grad = torch.tensor([value])
        assert not bool(clipper.clip_([p], step=step).clipped)
    p.grad = torch.tensor([values[10]])  # scale 0.25: the cap is 0.5, a calm norm of ~1 is clipped to it
    report = clipper.clip_([p], step=10)
    assert p.grad.item() == pytest.approx(0.5, rel=1e-5)
    assert report.threshold.item() == pytest.approx(0.5)
    # a spike: its adaptive threshold is scaled too
    mean = strategy.statistics["mean"].item()
    unscaled = GradClipper(ZScoreClip(max_grad_norm=None, warmup_steps=5))
    scaled = GradClipper(ZScoreClip(max_grad_norm=None, warmup_steps=5), schedule=Constant(0.5))
    for step, value in enumerate(values[:10]):
        for c in (unscaled, scaled):
            p.grad = torch.tensor([value])
            c.clip_([p], step=step)
    thresholds = []
    for c in (unscaled, scaled):
        p.grad = torch.tensor([10.0 * mean])
        report = c.clip_([p], step=10)
        assert bool(report.clipped)
        thresholds.append(report.threshold.item())
    assert thresholds[1] == pytest.approx(0.5 * thresholds[0], rel=1e-6)


def test_quantile_threshold_is_scaled():
    clipper = GradClipper(QuantileClip(0.5, history=10), schedule=Constant(0.5))
    p = nn.Parameter(torch.zeros(1))
    for step, value in enumerate([1.0, 2.0, 3.0]):
        p.grad = torch.tensor([value])
        report = clipper.clip_([p], step=step)
    assert report.threshold.item() == pytest.approx(1.0)  # median 2.0 times 0.5
    assert p.grad.item() == pytest.approx(1.0, rel=1e-5)
