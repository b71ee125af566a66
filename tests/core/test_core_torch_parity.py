"""Bit-equality with torch.nn.utils: clip_grad_norm_, clip_grad_value_, get_total_norm."""

import math

import pytest
import torch
from torch import nn

from gradclip_hf import GradClipper, NormClip, ValueClip, grad_norms

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
SHAPES = [(7,), (3, 5), (2, 3, 4), (1,), (16, 9), (4, 1, 3)]
NORM_TYPES = [1.0, 2.0, 3.5, math.inf]
DTYPE_SETS = {
    "fp32": [F32] * 4,
    "bf16": [BF16] * 4,
    "fp16": [F16] * 4,
    "mixed": [F32, BF16, F16, F32, BF16, F16],
}


def make_params(dtypes, seed=0, scale=3.0):
    """Parameters of different shapes; gradient ``i`` is scaled by ``2**i`` so per-tensor norms differ."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, dtype in enumerate(dtypes):
        shape = SHAPES[i % len(SHAPES)]
        p = nn.Parameter(torch.randn(shape, generator=gen).to(dtype))
        p.grad = (torch.randn(shape, generator=gen) * scale * 2.0 ** i).to(dtype)
        params.append(p)
    return params


def twin_params(dtypes, seed=0):
    a, b = make_params(dtypes, seed), make_params(dtypes, seed)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))
    return a, b


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("max_norm", [0.5, 1e4])
@pytest.mark.parametrize("foreach", [None, False])
def test_normclip_bit_equal_to_clip_grad_norm(dtypes, norm_type, max_norm, foreach):
    ours, ref = twin_params(dtypes)
    expected = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=foreach)
    report = GradClipper(NormClip(max_norm, norm_type), foreach=foreach).clip_(ours, step=0)
    assert report.norm.dtype == expected.dtype
    assert torch.equal(report.norm, expected)
    assert torch.equal(report.groups["default"].norm, expected)
    for x, y in zip(ours, ref):
        assert x.grad.dtype == y.grad.dtype
        assert torch.equal(x.grad, y.grad)
    # the clip really happened (or really did not)
    assert bool(report.clipped) is (max_norm < expected.item())


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_normclip_strategy_alone_bit_equal(dtypes, norm_type):
    ours, ref = twin_params(dtypes, seed=1)
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.25, norm_type)
    grads = [p.grad for p in ours]
    outcome = NormClip(0.25, norm_type).clip_(grads, grad_norms(grads, norm_type))
    assert torch.equal(outcome.norm, expected)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(ours, ref))


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("clip_value", [0.3, 2.0, 1e4])
@pytest.mark.parametrize("foreach", [None, False])
def test_valueclip_bit_equal_to_clip_grad_value(dtypes, clip_value, foreach):
    ours, ref = twin_params(dtypes, seed=2)
    torch.nn.utils.clip_grad_value_(ref, clip_value, foreach=foreach)
    report = GradClipper(ValueClip(clip_value), foreach=foreach).clip_(ours, step=0)
    for x, y in zip(ours, ref):
        assert torch.equal(x.grad, y.grad)
    assert torch.equal(report.norm_post, torch.nn.utils.get_total_norm([p.grad for p in ref]))
    assert bool(report.clipped) is (clip_value < 1e4)


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_grad_norms_total_bit_equal_and_order_preserved(dtypes, norm_type):
    params = make_params(dtypes, seed=3)
    grads = [p.grad for p in params]
    norms = grad_norms(grads, norm_type)
    expected = torch.nn.utils.get_total_norm(grads, norm_type)
    assert norms.total.dtype == expected.dtype
    assert torch.equal(norms.total, expected)
    assert norms.per_tensor.shape == (len(grads),)
    for i, g in enumerate(grads):
        # each per-tensor norm is the norm of the i-th gradient (norms differ by ~2x, so a shuffled
        # order fails; bf16 rounding is within 1%)
        single = torch.linalg.vector_norm(g.float(), norm_type)
        torch.testing.assert_close(norms.per_tensor[i].float(), single, rtol=1e-2, atol=0)
        assert torch.equal(norms.per_tensor[i], torch._foreach_norm([g], norm_type)[0].to(norms.per_tensor.dtype))


def test_report_per_tensor_norms_order_with_mixed_dtypes():
    params = make_params([BF16, F32, F16, F32, BF16], seed=4)
    named = [(f"p{i}", p) for i, p in enumerate(params)]
    expected = [torch.linalg.vector_norm(p.grad.float()).item() for p in params]
    report = GradClipper(NormClip(1e6)).clip_(named, step=0)
    assert report.names == [f"p{i}" for i in range(5)]
    assert report.per_tensor_norms.float().tolist() == pytest.approx(expected, rel=1e-2)


@pytest.mark.parametrize("dtypes", DTYPE_SETS.values(), ids=DTYPE_SETS.keys())
def test_plan_then_apply_is_clip_and_a_hand_off_leaves_the_multiplier_to_the_optimizer(dtypes):
    """Issue 24.2: plan() writes nothing, apply_() writes what clip_() writes (bit-equal to torch), once; with
    hand_off=True the gradients stay as they are and the multiplier comes back for a fused optimizer."""
    ours, ref = twin_params(dtypes)
    untouched = [p.grad.clone() for p in ours]
    expected = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    clipper = GradClipper(NormClip(0.5))
    report = clipper.plan(ours, step=0)
    assert all(torch.equal(p.grad, g) for p, g in zip(ours, untouched))
    assert clipper.apply_(report) is None and report.optimizer_coef is None
    clipper.apply_(report)  # a second call writes nothing more
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(ours, ref)) and torch.equal(report.norm, expected)

    handed, _ = twin_params(dtypes)
    clipper = GradClipper(NormClip(0.5))
    report = clipper.plan(handed, step=0)
    coef = clipper.apply_(report, hand_off=True)
    assert torch.equal(coef, report.coef.to(torch.float32)) and report.optimizer_coef is coef and 0 < coef < 1
    assert all(torch.equal(p.grad, g) for p, g in zip(handed, untouched))
    several = GradClipper(NormClip(0.5), exclude=["param_0"])  # a gradient it does not measure: written in place
    report = several.plan(twin_params(dtypes)[0], step=0)
    assert several.apply_(report, hand_off=True) is None


def test_hand_off_on_a_nonfinite_step_is_one_and_the_zero_policy_still_zeroes():
    params = make_params([F32] * 3)
    params[1].grad[0] = math.nan
    clipper = GradClipper(NormClip(0.5), nonfinite="zero")
    coef = clipper.apply_(clipper.plan(params, step=0), hand_off=True)
    assert float(coef) == 1.0 and all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in params)
