"""Hypothesis properties of every strategy: bounds, idempotence, direction, no-op thresholds."""

import math
import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gradclip_hf import AGC, GradClipper, NormClip, QuantileClip, ValueClip, ZScoreClip
from gradclip_hf.core.strategies import unitwise_norm

SETTINGS = settings(max_examples=50, deadline=None)
SHAPES = [(5,), (3, 4), (2, 3, 2), (1,), (6, 2)]

seeds = st.integers(0, 2**31 - 1)
log_scales = st.floats(-3.0, 3.0)  # gradient magnitudes 1e-3 .. 1e3
counts = st.integers(1, 4)
norm_types = st.sampled_from([1.0, 2.0, 3.5, math.inf])


def make_grads(seed, n, log_scale):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPES[i], generator=gen) * 10.0 ** log_scale for i in range(n)]


def as_params(grads):
    params = []
    for g in grads:
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def flat(params):
    return torch.cat([p.grad.reshape(-1).double() for p in params])


def total_norm(params, norm_type=2.0):
    return torch.nn.utils.get_total_norm([p.grad for p in params], norm_type).item()


def assert_same_direction(before, after):
    cos = torch.nn.functional.cosine_similarity(before, after, dim=0).item()
    assert abs(cos - 1.0) < 1e-5, cos


@SETTINGS
@given(seed=seeds, n=counts, log_scale=log_scales, log_thr=st.floats(-3.0, 3.0), norm_type=norm_types)
def test_normclip_bounds_norm_and_keeps_direction(seed, n, log_scale, log_thr, norm_type):
    threshold = 10.0 ** log_thr
    params = as_params(make_grads(seed, n, log_scale))
    before = flat(params)
    report = GradClipper(NormClip(threshold, norm_type)).clip_(params, step=0)
    post = total_norm(params, norm_type)
    assert post <= threshold * (1 + 1e-5) + 1e-6
    assert report.norm_post.item() <= threshold * (1 + 1e-5) + 1e-6
    assert_same_direction(before, flat(params))
    if report.norm.item() > threshold * (1 + 1e-5):  # clipped: lands on the threshold
        assert bool(report.clipped)
        assert abs(post - threshold) <= 1e-5 * threshold + 1e-6


@SETTINGS
@given(seed=seeds, n=counts, log_scale=log_scales, log_thr=st.floats(-2.0, 3.0), norm_type=norm_types)
def test_normclip_twice_equals_once(seed, n, log_scale, log_thr, norm_type):
    threshold = 10.0 ** log_thr
    params = as_params(make_grads(seed, n, log_scale))
    clipper = GradClipper(NormClip(threshold, norm_type))
    clipper.clip_(params, step=0)
    once = flat(params)
    clipper.clip_(params, step=1)
    twice = flat(params)
    # torch's coefficient is max_norm / (norm + 1e-6): a second pass over a norm that already sits
    # at the threshold scales by at most 1e-6 / threshold (plus float32 rounding); nothing more.
    torch.testing.assert_close(twice, once, rtol=1e-5 + 2e-6 / threshold, atol=0)


def _strategies():
    return {
        "norm": lambda: NormClip(1.0),
        "value": lambda: ValueClip(0.1),
        "agc": lambda: AGC(0.01),
        "zscore": lambda: ZScoreClip(warmup_steps=3, max_grad_norm=1.0),
        "zscore_nocap": lambda: ZScoreClip(warmup_steps=3, max_grad_norm=None, mode="percentile"),
        "quantile": lambda: QuantileClip(0.5, history=4),
    }


@SETTINGS
@given(seed=seeds, n=counts, log_scales_seq=st.lists(log_scales, min_size=1, max_size=8),
       name=st.sampled_from(sorted(_strategies())))
def test_huge_factor_changes_nothing(seed, n, log_scales_seq, name):
    """A threshold multiplied by 1e12 never clips, whatever the strategy and its statistics."""
    clipper = GradClipper(_strategies()[name]())
    for step, log_scale in enumerate(log_scales_seq):
        params = as_params(make_grads(seed + step, n, log_scale))
        for p in params:
            p.data = torch.randn_like(p)  # AGC needs weights with a norm
        before = [p.grad.clone() for p in params]
        report = clipper.clip_(params, step=step, factor=1e12)
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before)), (name, step)
        assert not bool(report.clipped)


def _run_norm_sequence(strategy, history_norms, final_grads):
    """Feed 1-element gradients with the given norms, then ``final_grads``; return (params, report)."""
    clipper = GradClipper(strategy)
    p = nn.Parameter(torch.zeros(1))
    for step, value in enumerate(history_norms):
        p.grad = torch.tensor([value], dtype=torch.float32)
        clipper.clip_([p], step=step)
    params = as_params(final_grads)
    return params, clipper.clip_(params, step=len(history_norms))


history_values = st.lists(st.floats(0.05, 5.0), min_size=1, max_size=20)


@SETTINGS
@given(history=history_values, seed=seeds, n=counts, log_scale=log_scales,
       mode=st.sampled_from(["zscore", "percentile"]), clip_option=st.sampled_from(["adaptive_scaling", "mean"]),
       max_grad_norm=st.sampled_from([None, 1.0]), warmup=st.integers(1, 5))
def test_zscoreclip_after_warmup_bounds_norm_and_keeps_direction(history, seed, n, log_scale, mode, clip_option,
                                                                 max_grad_norm, warmup):
    strategy = ZScoreClip(warmup_steps=warmup, max_grad_norm=max_grad_norm, mode=mode, clip_option=clip_option)
    grads = make_grads(seed, n, log_scale)
    params, report = _run_norm_sequence(strategy, history, grads)
    before = torch.cat([g.reshape(-1).double() for g in grads])
    threshold = report.threshold.item()
    post = total_norm(params)
    assert post <= threshold * (1 + 1e-5) + 1e-6
    if max_grad_norm is not None:  # the cap holds in warmup and after
        assert threshold <= max_grad_norm * (1 + 1e-6)
        assert post <= max_grad_norm * (1 + 1e-5) + 1e-6
    if len(history) >= warmup:
        assert int(strategy.statistics["count"]) == warmup
        if mode == "zscore" and clip_option == "mean" and bool(report.clipped) and max_grad_norm is None:
            # a spike is clipped to the EMA mean it was compared against
            assert threshold <= report.norm.item()
    assert_same_direction(before, flat(params))


@SETTINGS
@given(history=history_values, seed=seeds, n=counts, log_scale=log_scales,
       quantile=st.floats(0.05, 1.0), size=st.integers(1, 30))
def test_quantileclip_bounds_norm_and_keeps_direction(history, seed, n, log_scale, quantile, size):
    grads = make_grads(seed, n, log_scale)
    params, report = _run_norm_sequence(QuantileClip(quantile, history=size), history, grads)
    threshold = report.threshold.item()
    window = [float(torch.tensor(v, dtype=torch.float32)) for v in history] + [report.norm.item()]
    window = window[-size:]
    assert min(window) * (1 - 1e-6) <= threshold <= max(window) * (1 + 1e-6)
    assert total_norm(params) <= threshold * (1 + 1e-5) + 1e-6
    assert_same_direction(torch.cat([g.reshape(-1).double() for g in grads]), flat(params))


@SETTINGS
@given(seed=seeds, n=counts, log_scale=log_scales, log_bound=st.floats(-3.0, 3.0))
def test_valueclip_within_bounds_and_small_values_untouched(seed, n, log_scale, log_bound):
    bound = 10.0 ** log_bound
    grads = make_grads(seed, n, log_scale)
    params = as_params(grads)
    GradClipper(ValueClip(bound)).clip_(params, step=0)
    b32 = torch.tensor(bound, dtype=torch.float32)
    for p, g in zip(params, grads):
        assert p.grad.abs().max() <= b32
        inside = g.abs() <= b32
        assert torch.equal(p.grad[inside], g[inside])
        assert torch.equal(p.grad[~inside], torch.sign(g[~inside]) * b32)


AGC_SHAPES = [("layer.weight", (4, 3)), ("layer.bias", (4,)), ("conv.weight", (3, 2, 2, 2)),
              ("lm_head.weight", (5, 3)), ("scalar", ())]


@SETTINGS
@given(seed=seeds, log_scale=log_scales, log_clip=st.floats(-3.0, 0.0), log_eps=st.floats(-4.0, -1.0),
       zero_rows=st.booleans(), exclude=st.sampled_from([("lm_head",), ("lm_head", r"bias$"), ()]))
def test_agc_unitwise_bound_and_exclusions(seed, log_scale, log_clip, log_eps, zero_rows, exclude):
    clipping, eps = 10.0 ** log_clip, 10.0 ** log_eps
    gen = torch.Generator().manual_seed(seed)
    named, before = [], {}
    for name, shape in AGC_SHAPES:
        p = nn.Parameter(torch.randn(shape, generator=gen))
        if zero_rows and p.ndim >= 2:
            p.data[0].zero_()  # a zero-initialised unit: eps is the floor of its weight norm
        p.grad = torch.randn(shape, generator=gen) * 10.0 ** log_scale
        before[name] = p.grad.clone()
        named.append((name, p))
    GradClipper(AGC(clipping, eps=eps, exclude=exclude)).clip_(named, step=0)
    for name, p in named:
        if any(re.search(pattern, name) for pattern in exclude):
            assert torch.equal(p.grad, before[name]), name
            continue
        limit = unitwise_norm(p.detach()).clamp(min=eps) * clipping
        g_norm_before = unitwise_norm(before[name])
        g_norm = unitwise_norm(p.grad)
        assert torch.all(g_norm <= limit * (1 + 1e-5) + 1e-12), name
        # units under the limit are untouched; clipped units keep their direction
        untouched = (g_norm_before <= limit).expand_as(p.grad)
        assert torch.equal(p.grad[untouched], before[name][untouched]), name
        units = p.shape[0] if p.ndim >= 2 else 1
        cos = torch.nn.functional.cosine_similarity(p.grad.reshape(units, -1).double(),
                                                    before[name].reshape(units, -1).double(), dim=1)
        assert torch.all((cos - 1).abs() < 1e-5), name
