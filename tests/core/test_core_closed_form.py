"""Closed-form cases small enough to check by hand."""

import math

import pytest
import torch
from torch import nn

from gradclip_hf import AGC, GradClipper, NormClip, ValueClip, grad_norms


def param_with_grad(values, weight=None) -> nn.Parameter:
    grad = torch.tensor(values, dtype=torch.float32)
    p = nn.Parameter(torch.zeros_like(grad) if weight is None else torch.tensor(weight, dtype=torch.float32))
    p.grad = grad
    return p


def test_normclip_3_4_is_scaled_to_unit_norm():
    p = param_with_grad([3.0, 4.0])
    report = GradClipper(NormClip(1.0)).clip_([p], step=0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]), rtol=0, atol=1e-6)
    f = report.to_floats()
    assert f["norm"] == pytest.approx(5.0, abs=1e-6)
    assert f["coef"] == pytest.approx(0.2, abs=1e-6)
    assert f["norm_post"] == pytest.approx(1.0, abs=1e-6)
    assert f["threshold"] == 1.0
    assert f["clipped"] == 1.0
    assert (f["nonfinite"], f["skip"], f["scale"]) == (0.0, 0.0, 1.0)
    assert set(f) == {"norm", "norm_post", "threshold", "coef", "clipped", "nonfinite", "skip", "scale"}
    assert all(isinstance(v, float) for v in f.values())
    # the reported post-clip norm is the norm of what is now in .grad
    assert torch.linalg.vector_norm(p.grad).item() == pytest.approx(f["norm_post"], abs=1e-6)
    assert report.names == ["param_0"]
    torch.testing.assert_close(report.per_tensor_norms, torch.tensor([5.0]))
    assert report.groups["default"].clipped.item() is True


def test_normclip_above_norm_leaves_grads_bit_identical():
    p = param_with_grad([3.0, 4.0])
    before = p.grad.clone()
    report = GradClipper(NormClip(10.0)).clip_([p], step=0)
    assert torch.equal(p.grad, before)
    f = report.to_floats()
    assert f["coef"] == 1.0 and f["clipped"] == 0.0
    assert f["norm"] == pytest.approx(5.0) and f["norm_post"] == pytest.approx(5.0)


def test_normclip_factor_scales_the_threshold():
    p = param_with_grad([3.0, 4.0])
    report = GradClipper(NormClip(1.0)).clip_([p], step=0, factor=0.5)
    torch.testing.assert_close(p.grad, torch.tensor([0.3, 0.4]), rtol=0, atol=1e-6)
    f = report.to_floats()
    assert f["threshold"] == 0.5 and f["scale"] == 0.5
    assert f["norm_post"] == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("norm_type", [math.inf, "inf"])
def test_normclip_inf_norm(norm_type):
    p = param_with_grad([3.0, -4.0])
    report = GradClipper(NormClip(2.0, norm_type)).clip_([p], step=0)
    torch.testing.assert_close(p.grad, torch.tensor([1.5, -2.0]), rtol=0, atol=1e-6)
    f = report.to_floats()
    assert f["norm"] == 4.0
    assert f["coef"] == pytest.approx(0.5, abs=1e-6)
    assert f["norm_post"] == pytest.approx(2.0, abs=1e-6)


def test_normclip_l1_norm():
    p = param_with_grad([3.0, -4.0])
    report = GradClipper(NormClip(3.5, 1)).clip_([p], step=0)
    torch.testing.assert_close(p.grad, torch.tensor([1.5, -2.0]), rtol=0, atol=1e-6)
    f = report.to_floats()
    assert f["norm"] == 7.0
    assert f["coef"] == pytest.approx(0.5, abs=1e-6)
    assert f["norm_post"] == pytest.approx(3.5, abs=1e-6)


@pytest.mark.parametrize("norm_type, total", [(2.0, 13.0), (1.0, 19.0), (math.inf, 12.0)])
def test_grad_norms_closed_form(norm_type, total):
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]])]
    norms = grad_norms(grads, norm_type)
    assert norms.total.item() == pytest.approx(total)
    expected = {2.0: [5.0, 12.0], 1.0: [7.0, 12.0], math.inf: [4.0, 12.0]}[norm_type]
    assert norms.per_tensor.tolist() == pytest.approx(expected)
    assert norms.norm_type == norm_type


def test_grad_norms_rejects_empty_list():
    with pytest.raises(ValueError, match="grads"):
        grad_norms([])


def test_valueclip_closed_form():
    p = param_with_grad([3.0, -4.0, 1.0])
    report = GradClipper(ValueClip(2.5)).clip_([p], step=0)
    assert torch.equal(p.grad, torch.tensor([2.5, -2.5, 1.0]))
    f = report.to_floats()
    assert f["norm"] == pytest.approx(math.sqrt(26.0))
    assert f["norm_post"] == pytest.approx(math.sqrt(13.5))
    assert f["coef"] == pytest.approx(math.sqrt(13.5 / 26.0), rel=1e-6)
    assert f["threshold"] == 2.5
    assert f["clipped"] == 1.0


def test_valueclip_wide_bound_changes_nothing():
    p = param_with_grad([3.0, -4.0, 1.0])
    before = p.grad.clone()
    f = GradClipper(ValueClip(4.0)).clip_([p], step=0).to_floats()
    assert torch.equal(p.grad, before)
    assert f["clipped"] == 0.0 and f["coef"] == 1.0


def test_agc_closed_form():
    # rows of the weight have norms 5 and 0 (eps applies); the bias is one unit of norm 2
    weight = param_with_grad([[3.0, 4.0], [0.01, 0.0]], weight=[[3.0, 4.0], [0.0, 0.0]])
    bias = param_with_grad([1.0], weight=[2.0])
    head = param_with_grad([100.0], weight=[1.0])
    report = GradClipper(AGC(clipping=0.1, eps=1e-3)).clip_(
        [("body.weight", weight), ("body.bias", bias), ("lm_head.weight", head)], step=0)
    torch.testing.assert_close(weight.grad, torch.tensor([[0.3, 0.4], [1e-4, 0.0]]), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(bias.grad, torch.tensor([0.2]), rtol=1e-5, atol=0)
    assert torch.equal(head.grad, torch.tensor([100.0]))  # lm_head is excluded by default
    f = report.to_floats()
    assert f["clipped"] == 1.0
    assert f["threshold"] == pytest.approx(0.1)
    assert f["norm_post"] == pytest.approx(math.sqrt(0.25 + 1e-8 + 0.04 + 1e4), rel=1e-6)


def test_agc_small_gradients_untouched():
    weight = param_with_grad([[0.01, 0.0]], weight=[[3.0, 4.0]])
    before = weight.grad.clone()
    f = GradClipper(AGC(clipping=0.1)).clip_([weight], step=0).to_floats()
    assert torch.equal(weight.grad, before)
    assert f["clipped"] == 0.0 and f["coef"] == 1.0
