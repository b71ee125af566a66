"""GradClipper: parameter selection, groups, reports, non-finite policies, state."""

import json
import math

import pytest
import torch
from torch import nn

from gradclip_hf import (AGC, ClipGroup, GradClipper, NonFiniteGradientError, NormClip, QuantileClip, ValueClip,
                         ZScoreClip)


def norm_of(tensors, norm_type=2.0):
    return torch.nn.utils.get_total_norm(list(tensors), norm_type)


def grads_by_name(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_groups_clip_separately_with_their_own_threshold(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=3.0)
    clipper = GradClipper(NormClip(1.0), groups=[ClipGroup("embed", [r"embed"], NormClip(5.0))])
    report = clipper.clip_(tiny_lm, step=0)

    embed = [n for n in before if "embed" in n]
    rest = [n for n in before if "embed" not in n]
    assert embed == ["embed.weight"]
    # each group is exactly torch's clip_grad_norm_ over that group alone
    for names, max_norm in ((embed, 5.0), (rest, 1.0)):
        ref = [nn.Parameter(torch.zeros_like(before[n])) for n in names]
        for r, n in zip(ref, names):
            r.grad = before[n].clone()
        torch.nn.utils.clip_grad_norm_(ref, max_norm)
        got = grads_by_name(tiny_lm)
        assert all(torch.equal(got[n], r.grad) for n, r in zip(names, ref))
        assert norm_of(got[n] for n in names).item() == pytest.approx(max_norm, rel=1e-5)

    assert list(report.groups) == ["embed", "default"]
    assert report.groups["embed"].threshold.item() == 5.0
    assert report.groups["default"].threshold.item() == 1.0
    assert report.threshold.item() == 1.0  # the default group's
    assert report.names == embed + rest
    pre_embed, pre_rest = norm_of(before[n] for n in embed), norm_of(before[n] for n in rest)
    assert report.norm.item() == pytest.approx(math.hypot(pre_embed, pre_rest), rel=1e-6)
    assert report.norm_post.item() == pytest.approx(math.hypot(5.0, 1.0), rel=1e-5)
    assert bool(report.clipped)


def test_group_with_only_some_clipped_reports_clipped(tiny_lm, grads_filler):
    grads_filler(tiny_lm, scale=1e-4)
    tiny_lm.embed.weight.grad.mul_(1e6)
    clipper = GradClipper(NormClip(1.0), groups=[ClipGroup("embed", [r"embed"], NormClip(5.0))])
    report = clipper.clip_(tiny_lm, step=0)
    assert bool(report.groups["embed"].clipped) and not bool(report.groups["default"].clipped)
    assert bool(report.clipped)


def test_first_matching_group_wins_and_group_state_round_trips(tiny_lm, grads_filler):
    groups = [ClipGroup("lora", [r"lora_"], QuantileClip(0.5, history=4)),
              ClipGroup("all_weights", [r"weight"], ZScoreClip(warmup_steps=2))]
    clipper = GradClipper(NormClip(1.0), groups=groups)
    for step in range(4):
        grads_filler(tiny_lm, seed=step)
        report = clipper.clip_(tiny_lm, step=step)
    assert report.names[:2] == ["lora_A.weight", "lora_B.weight"]
    assert all(n.endswith("weight") for n in report.names[2:5])
    state = json.loads(json.dumps(clipper.state_dict()))
    assert set(state["strategies"]) == {"default", "lora", "all_weights"}
    assert state["strategies"]["lora"]["count"] == 4 and state["strategies"]["all_weights"]["count"] == 2
    fresh = GradClipper(NormClip(1.0), groups=[ClipGroup("lora", [r"lora_"], QuantileClip(0.5, history=4)),
                                               ClipGroup("all_weights", [r"weight"], ZScoreClip(warmup_steps=2))])
    fresh.load_state_dict(state)
    assert fresh.state_dict() == clipper.state_dict()


def test_exclude_leaves_grads_untouched_and_out_of_the_norm(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=3.0)
    tiny_lm.body.bias.grad.fill_(math.nan)  # excluded from the norm, but still guarded
    report = GradClipper(NormClip(1.0), exclude=[r"bias$"]).clip_(tiny_lm, step=0)
    kept = [n for n in before if not n.endswith("bias")]
    assert report.names == kept
    assert torch.equal(report.norm, norm_of(before[n] for n in kept))
    assert bool(report.nonfinite) and bool(report.skip)
    assert torch.isnan(tiny_lm.body.bias.grad).all()
    assert torch.equal(tiny_lm.lm_head.bias.grad, before["lm_head.bias"])
    assert norm_of(grads_by_name(tiny_lm)[n] for n in kept).item() == pytest.approx(1.0, rel=1e-5)


def test_include_selects_only_lora(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=3.0)
    report = GradClipper(NormClip(0.1), include=[r"lora_"]).clip_(tiny_lm, step=0)
    assert report.names == ["lora_A.weight", "lora_B.weight"]
    assert torch.equal(report.norm, norm_of([before["lora_A.weight"], before["lora_B.weight"]]))
    after = grads_by_name(tiny_lm)
    for n in before:
        if "lora_" in n:
            assert not torch.equal(after[n], before[n])
        else:
            assert torch.equal(after[n], before[n]), n
    assert norm_of([after["lora_A.weight"], after["lora_B.weight"]]).item() == pytest.approx(0.1, rel=1e-5)


def test_trainable_only_skips_frozen_params(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=3.0)
    tiny_lm.body.requires_grad_(False)
    report = GradClipper(NormClip(0.1)).clip_(tiny_lm, step=0)
    assert "body.weight" not in report.names and "body.bias" not in report.names
    assert torch.equal(tiny_lm.body.weight.grad, before["body.weight"])

    grads_filler(tiny_lm, scale=3.0)
    report = GradClipper(NormClip(0.1), trainable_only=False).clip_(tiny_lm, step=0)
    assert "body.weight" in report.names
    assert not torch.equal(tiny_lm.body.weight.grad, before["body.weight"])


def test_selection_follows_requires_grad_changes(tiny_lm, grads_filler):
    tiny_lm.body.requires_grad_(False)
    clipper = GradClipper(NormClip(0.1))
    grads_filler(tiny_lm)
    clipper.clip_(tiny_lm, step=0)
    tiny_lm.body.requires_grad_(True)
    grads_filler(tiny_lm)
    report = clipper.clip_(tiny_lm, step=1)
    assert "body.weight" in report.names


def test_params_without_grad_are_ignored(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=3.0)
    tiny_lm.lm_head.weight.grad = None
    report = GradClipper(NormClip(1.0)).clip_(tiny_lm, step=0)
    assert "lm_head.weight" not in report.names
    assert tiny_lm.lm_head.weight.grad is None
    assert torch.equal(report.norm, norm_of(before[n] for n in before if n != "lm_head.weight"))


def test_names_and_per_tensor_norms_match(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=3.0)
    report = GradClipper(NormClip(1.0), groups=[ClipGroup("head", [r"lm_head"], NormClip(2.0))]).clip_(
        tiny_lm, step=0)
    assert sorted(report.names) == sorted(before)
    assert report.per_tensor_norms.shape == (len(before),)
    for name, value in zip(report.names, report.per_tensor_norms):
        assert value.item() == pytest.approx(torch.linalg.vector_norm(before[name]).item(), rel=1e-6), name


@pytest.mark.parametrize("parameters", ["module", "named", "list", "generator", "tensor"])
def test_parameter_forms(parameters, tiny_lm, grads_filler):
    grads_filler(tiny_lm, scale=3.0)
    arg = {"module": lambda: tiny_lm, "named": lambda: tiny_lm.named_parameters(),
           "list": lambda: list(tiny_lm.parameters()), "generator": lambda: tiny_lm.parameters(),
           "tensor": lambda: tiny_lm.body.weight}[parameters]()
    report = GradClipper(NormClip(0.5)).clip_(arg, step=0)
    expected = {"module": 7, "named": 7, "list": 7, "generator": 7, "tensor": 1}[parameters]
    assert len(report.names) == expected
    if parameters in ("module", "named"):
        assert report.names[0] == "embed.weight"
    assert report.norm_post.item() == pytest.approx(0.5, rel=1e-5)


def test_transformer_layer_after_backward_equals_torch():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    twin = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 16)
    for module in (layer, twin):
        module(x).pow(2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.1)
    report = GradClipper(NormClip(0.1)).clip_(layer, step=0)
    assert torch.equal(report.norm, expected)
    for a, b in zip(layer.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert len(report.names) == len(list(layer.parameters()))


def _nan_model(tiny_lm, grads_filler, value=math.nan):
    before = grads_filler(tiny_lm)
    tiny_lm.body.weight.grad[0, 0] = value
    return before


def _warm(clipper, module, grads_filler, steps):
    for step in range(steps):
        grads_filler(module, seed=step)
        clipper.clip_(module, step=step)


@pytest.mark.parametrize("strategy_factory", [lambda: ZScoreClip(warmup_steps=3), lambda: QuantileClip(0.5, history=5)],
                         ids=["zscore", "quantile"])
@pytest.mark.parametrize("warm_steps", [1, 6])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_skip_reports_skip_and_keeps_statistics(strategy_factory, warm_steps, bad, tiny_lm, grads_filler):
    clipper = GradClipper(strategy_factory(), nonfinite="skip")
    _warm(clipper, tiny_lm, grads_filler, warm_steps)
    state = clipper.state_dict()
    _nan_model(tiny_lm, grads_filler, bad)
    report = clipper.clip_(tiny_lm, step=warm_steps)
    assert bool(report.skip) and bool(report.nonfinite)
    assert report.to_floats()["skip"] == 1.0
    assert clipper.state_dict() == state


def test_nonfinite_skip_keeps_statistics_of_every_group(tiny_lm, grads_filler):
    clipper = GradClipper(ZScoreClip(warmup_steps=3), groups=[ClipGroup("body", [r"body"], NormClip(1.0))],
                          nonfinite="skip")
    _warm(clipper, tiny_lm, grads_filler, 5)
    state = clipper.state_dict()
    _nan_model(tiny_lm, grads_filler)  # NaN in the "body" group only
    report = clipper.clip_(tiny_lm, step=5)
    assert bool(report.skip)
    assert clipper.state_dict() == state


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("strategy", [NormClip(1.0), ValueClip(0.1)], ids=["norm", "value"])
def test_nonfinite_zero_zeroes_all_grads(tiny_lm, grads_filler, bad, strategy):
    # ValueClip clamps an Inf to a finite value: the zeroing must not depend on what the strategy did
    _nan_model(tiny_lm, grads_filler, bad)
    report = GradClipper(strategy, nonfinite="zero").clip_(tiny_lm, step=0)
    assert bool(report.nonfinite) and not bool(report.skip)
    for name, g in grads_by_name(tiny_lm).items():
        assert torch.equal(g, torch.zeros_like(g)), name


def test_nonfinite_zero_leaves_finite_steps_alone(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=1e-3)
    report = GradClipper(NormClip(1e3), nonfinite="zero").clip_(tiny_lm, step=0)
    assert not bool(report.nonfinite)
    assert all(torch.equal(g, before[n]) for n, g in grads_by_name(tiny_lm).items())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_raise(bad, tiny_lm, grads_filler):
    _nan_model(tiny_lm, grads_filler, bad)
    with pytest.raises(NonFiniteGradientError, match=r"step 7: .*nonfinite="):
        GradClipper(NormClip(1.0), nonfinite="raise").clip_(tiny_lm, step=7)
    assert issubclass(NonFiniteGradientError, FloatingPointError)


def test_nonfinite_raise_passes_finite_steps(tiny_lm, grads_filler):
    grads_filler(tiny_lm)
    report = GradClipper(NormClip(1.0), nonfinite="raise").clip_(tiny_lm, step=0)
    assert not bool(report.nonfinite)


def test_nonfinite_ignore(tiny_lm, grads_filler):
    _nan_model(tiny_lm, grads_filler)
    report = GradClipper(NormClip(1.0), nonfinite="ignore").clip_(tiny_lm, step=0)
    assert bool(report.nonfinite) and not bool(report.skip)
    assert torch.isnan(tiny_lm.body.weight.grad).any()


def test_finite_step_is_not_skipped(tiny_lm, grads_filler):
    grads_filler(tiny_lm)
    report = GradClipper(NormClip(1.0)).clip_(tiny_lm, step=0)
    assert not bool(report.skip) and not bool(report.nonfinite)


def test_observe_false_keeps_step_out_of_statistics(tiny_lm, grads_filler):
    clipper = GradClipper(ZScoreClip(warmup_steps=2))
    _warm(clipper, tiny_lm, grads_filler, 4)
    state = clipper.state_dict()
    grads_filler(tiny_lm, seed=99)
    clipper.clip_(tiny_lm, step=4, observe=torch.tensor(False))
    assert clipper.state_dict() == state
    grads_filler(tiny_lm, seed=99)
    clipper.clip_(tiny_lm, step=5, observe=torch.tensor(True))
    assert clipper.state_dict() != state


def test_agc_in_engine_uses_names_for_exclusion(tiny_lm, grads_filler):
    before = grads_filler(tiny_lm, scale=100.0)
    report = GradClipper(AGC(clipping=0.01)).clip_(tiny_lm, step=0)
    after = grads_by_name(tiny_lm)
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])
    assert torch.equal(after["lm_head.bias"], before["lm_head.bias"])
    assert not torch.equal(after["body.weight"], before["body.weight"])
    assert bool(report.clipped)


def test_valueclip_with_groups_and_repr(tiny_lm, grads_filler):
    grads_filler(tiny_lm, scale=3.0)
    clipper = GradClipper(ValueClip(0.5), groups=[ClipGroup("embed", [r"embed"], ValueClip(2.0))])
    clipper.clip_(tiny_lm, step=0)
    assert tiny_lm.embed.weight.grad.abs().max().item() == 2.0
    assert tiny_lm.body.weight.grad.abs().max().item() == 0.5
    assert "ValueClip(clip_value=0.5, norm_type=2.0)" in repr(clipper)
