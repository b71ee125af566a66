"""Every invalid argument of every public constructor raises, naming the argument (and the choices)."""

import math

import pytest
import torch
from torch import nn

from gradclip_hf import (AGC, ClipGroup, Constant, Cosine, GradClipper, Linear, NormClip, Piecewise, QuantileClip,
                         ValueClip, Warmup, ZScoreClip)

NONFINITE_CHOICES = "'skip', 'zero', 'raise', 'ignore'"

INVALID = [
    # NormClip
    (lambda: NormClip(0.0), ValueError, "max_norm"),
    (lambda: NormClip(-1.0), ValueError, "max_norm"),
    (lambda: NormClip(math.nan), ValueError, "max_norm"),
    (lambda: NormClip(math.inf), ValueError, "max_norm"),
    (lambda: NormClip(True), TypeError, "max_norm"),
    (lambda: NormClip("1.0"), TypeError, "max_norm"),
    (lambda: NormClip(None), TypeError, "max_norm"),
    (lambda: NormClip(1.0, 0.5), ValueError, "norm_type"),
    (lambda: NormClip(1.0, 0), ValueError, "norm_type"),
    (lambda: NormClip(1.0, -math.inf), ValueError, "norm_type"),
    (lambda: NormClip(1.0, math.nan), ValueError, "norm_type"),
    (lambda: NormClip(1.0, "two"), TypeError, "norm_type"),
    # ValueClip
    (lambda: ValueClip(0.0), ValueError, "clip_value"),
    (lambda: ValueClip(-0.5), ValueError, "clip_value"),
    (lambda: ValueClip(math.nan), ValueError, "clip_value"),
    (lambda: ValueClip(False), TypeError, "clip_value"),
    (lambda: ValueClip("0.5"), TypeError, "clip_value"),
    # AGC
    (lambda: AGC(clipping=0.0), ValueError, "clipping"),
    (lambda: AGC(clipping=-0.01), ValueError, "clipping"),
    (lambda: AGC(clipping="0.01"), TypeError, "clipping"),
    (lambda: AGC(eps=0.0), ValueError, "eps"),
    (lambda: AGC(eps=math.inf), ValueError, "eps"),
    (lambda: AGC(exclude=["("]), ValueError, "exclude"),
    (lambda: AGC(exclude="[a-"), ValueError, "exclude"),
    # ZScoreClip
    (lambda: ZScoreClip(alpha=0.0), ValueError, "alpha"),
    (lambda: ZScoreClip(alpha=1.0), ValueError, "alpha"),
    (lambda: ZScoreClip(alpha=1.5), ValueError, "alpha"),
    (lambda: ZScoreClip(alpha="0.9"), TypeError, "alpha"),
    (lambda: ZScoreClip(z_thresh=0.0), ValueError, "z_thresh"),
    (lambda: ZScoreClip(z_thresh=-2.0), ValueError, "z_thresh"),
    (lambda: ZScoreClip(z_thresh=math.nan), ValueError, "z_thresh"),
    (lambda: ZScoreClip(max_grad_norm=0.0), ValueError, "max_grad_norm"),
    (lambda: ZScoreClip(max_grad_norm="1"), TypeError, "max_grad_norm"),
    (lambda: ZScoreClip(eps=-1e-6), ValueError, "eps"),
    (lambda: ZScoreClip(warmup_steps=0), ValueError, "warmup_steps"),
    (lambda: ZScoreClip(warmup_steps=2.5), TypeError, "warmup_steps"),
    (lambda: ZScoreClip(warmup_steps=True), TypeError, "warmup_steps"),
    (lambda: ZScoreClip(mode="foo"), ValueError, "`mode` must be one of 'zscore', 'percentile'"),
    (lambda: ZScoreClip(mode=None), ValueError, "mode"),
    (lambda: ZScoreClip(clip_option="foo"), ValueError, "`clip_option` must be one of 'adaptive_scaling', 'mean'"),
    (lambda: ZScoreClip(clip_factor=0.0), ValueError, "clip_factor"),
    (lambda: ZScoreClip(clip_factor=-1.0), ValueError, "clip_factor"),
    (lambda: ZScoreClip(skip_update_on_spike="yes"), TypeError, "skip_update_on_spike"),
    # QuantileClip
    (lambda: QuantileClip(quantile=0.0), ValueError, "quantile"),
    (lambda: QuantileClip(quantile=1.5), ValueError, "quantile"),
    (lambda: QuantileClip(quantile=-0.1), ValueError, "quantile"),
    (lambda: QuantileClip(quantile="0.5"), TypeError, "quantile"),
    (lambda: QuantileClip(history=0), ValueError, "history"),
    (lambda: QuantileClip(history=10.0), TypeError, "history"),
    (lambda: QuantileClip(norm_type=0.5), ValueError, "norm_type"),
    # schedules
    (lambda: Constant(0.0), ValueError, "value"),
    (lambda: Constant(math.nan), ValueError, "value"),
    (lambda: Linear(0.0, 1.0, 10), ValueError, "start"),
    (lambda: Linear(1.0, -1.0, 10), ValueError, "end"),
    (lambda: Linear(1.0, 0.5, 0), ValueError, "total_steps"),
    (lambda: Linear(1.0, 0.5, 10.0), TypeError, "total_steps"),
    (lambda: Cosine(-1.0, 0.5, 10), ValueError, "start"),
    (lambda: Cosine(1.0, 0.0, 10), ValueError, "end"),
    (lambda: Cosine(1.0, 0.5, -5), ValueError, "total_steps"),
    (lambda: Cosine("1", 0.5, 10), TypeError, "start"),
    (lambda: Warmup(0.0, 1.0, 10), ValueError, "start"),
    (lambda: Warmup(0.5, 0.0, 10), ValueError, "value"),
    (lambda: Warmup(0.5, 1.0, 0), ValueError, "warmup_steps"),
    (lambda: Piecewise((10, 5), (1.0, 0.5, 0.25)), ValueError, "boundaries"),
    (lambda: Piecewise((10, 10), (1.0, 0.5, 0.25)), ValueError, "boundaries"),
    (lambda: Piecewise((0,), (1.0, 0.5)), ValueError, "boundaries"),
    (lambda: Piecewise((2.5,), (1.0, 0.5)), TypeError, "boundaries"),
    (lambda: Piecewise((10,), (1.0,)), ValueError, "values"),
    (lambda: Piecewise((10,), (1.0, 0.5, 0.2)), ValueError, "values"),
    (lambda: Piecewise((10,), (1.0, 0.0)), ValueError, "values"),
    # GradClipper
    (lambda: GradClipper("norm"), TypeError, "strategy"),
    (lambda: GradClipper(None), TypeError, "strategy"),
    (lambda: GradClipper(torch.nn.utils.clip_grad_norm_), TypeError, "strategy"),
    (lambda: GradClipper(NormClip(), schedule=0.5), TypeError, "schedule"),
    (lambda: GradClipper(NormClip(), nonfinite="foo"), ValueError, f"`nonfinite` must be one of {NONFINITE_CHOICES}"),
    (lambda: GradClipper(NormClip(), nonfinite=None), ValueError, "nonfinite"),
    (lambda: GradClipper(NormClip(), trainable_only="yes"), TypeError, "trainable_only"),
    (lambda: GradClipper(NormClip(), exclude=["("]), ValueError, "exclude"),
    (lambda: GradClipper(NormClip(), include=["[a-"]), ValueError, "include"),
    (lambda: GradClipper(NormClip(), groups=["embed"]), TypeError, "groups"),
    (lambda: GradClipper(NormClip(), groups=[ClipGroup("a", ["x"], NormClip()), ClipGroup("a", ["y"], NormClip())]),
     ValueError, "groups"),
    (lambda: GradClipper(NormClip(), groups=[ClipGroup("a", ["x"], NormClip(norm_type=1))]), ValueError, "norm_type"),
    (lambda: GradClipper(NormClip(), spikes="yes"), TypeError, "spikes"),
    # ClipGroup
    (lambda: ClipGroup("default", ["x"], NormClip()), ValueError, "name"),
    (lambda: ClipGroup("", ["x"], NormClip()), ValueError, "name"),
    (lambda: ClipGroup(3, ["x"], NormClip()), ValueError, "name"),
    (lambda: ClipGroup("embed", [], NormClip()), ValueError, "patterns"),
    (lambda: ClipGroup("embed", ["("], NormClip()), ValueError, "patterns"),
    (lambda: ClipGroup("embed", ["x"], "norm"), TypeError, "strategy"),
]


@pytest.mark.parametrize("build, error, match", INVALID,
                         ids=[f"{i}-{m.split('`')[1] if '`' in m else m}" for i, (_, _, m) in enumerate(INVALID)])
def test_invalid_argument_raises_naming_it(build, error, match):
    with pytest.raises(error, match=match.replace("(", r"\(")):
        build()


def test_valid_edge_values_are_accepted():
    assert NormClip(1e-12, "inf").norm_type == math.inf
    assert NormClip(2, 1).max_norm == 2.0 and isinstance(NormClip(2).max_norm, float)
    assert ZScoreClip(mode="PERCENTILE", clip_option="Mean", eps=0.0, warmup_steps=1).mode.value == "percentile"
    assert ZScoreClip(max_grad_norm=None).max_grad_norm is None
    assert QuantileClip(quantile=1.0, history=1).quantile == 1.0
    assert GradClipper(NormClip(), nonfinite="RAISE").nonfinite.value == "raise"
    assert AGC(exclude="lm_head").exclude == ("lm_head",)
    assert ClipGroup("embed", r"embed", NormClip()).patterns == ("embed",)


def test_clip_step_argument_is_checked():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    clipper = GradClipper(NormClip())
    with pytest.raises(ValueError, match="step"):
        clipper.clip_([p], step=-1)
    with pytest.raises(TypeError, match="step"):
        clipper.clip_([p], step=1.0)


def test_clip_without_any_gradient_raises():
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="No selected parameter has a gradient"):
        GradClipper(NormClip()).clip_([p], step=0)


def test_agc_needs_params():
    grads = [torch.ones(2)]
    from gradclip_hf import grad_norms
    with pytest.raises(ValueError, match="params"):
        AGC().clip_(grads, grad_norms(grads))


MALFORMED = [
    (lambda: ZScoreClip(warmup_steps=5), {"count": 3, "mean": 0.0, "var": 0.0}),  # no buffer
    (lambda: ZScoreClip(warmup_steps=5), {"count": "x", "mean": 0.0, "var": 0.0, "buffer": []}),
    (lambda: ZScoreClip(warmup_steps=5), {"count": 3, "mean": 0.0, "var": 0.0, "buffer": [1.0]}),
    (lambda: ZScoreClip(warmup_steps=5), {"count": 3, "mean": 0.0, "var": 0.0, "buffer": [1.0, "a", 2.0]}),
    (lambda: ZScoreClip(warmup_steps=5), {"count": 3, "mean": 0.0, "var": 0.0, "buffer": "abc"}),
    (lambda: ZScoreClip(warmup_steps=5), {"count": -1, "mean": 0.0, "var": 0.0, "buffer": []}),
    (lambda: ZScoreClip(warmup_steps=3), {"count": 3, "mean": "nan", "var": 0.0, "buffer": [1.0, 1.0, 1.0]}),
    (lambda: ZScoreClip(warmup_steps=3), {"count": 3, "mean": 1.0, "var": -1.0, "buffer": [1.0, 1.0, 1.0]}),
    (lambda: ZScoreClip(warmup_steps=3), {"count": 2, "mean": 0.0, "var": 0.0, "buffer": [1.0, math.inf]}),
    (lambda: ZScoreClip(warmup_steps=3), [1, 2, 3]),
    (lambda: QuantileClip(history=5), {"count": 3}),
    (lambda: QuantileClip(history=5), {"count": None, "history": []}),
    (lambda: QuantileClip(history=5), {"count": 3, "history": None}),
    (lambda: QuantileClip(history=5), {"count": 3, "history": "abc"}),
    (lambda: QuantileClip(history=5), {"count": 3, "history": [1.0, "a", 2.0]}),
    (lambda: QuantileClip(history=5), {"count": -1, "history": []}),
    (lambda: QuantileClip(history=5), {"count": 2, "history": [1.0, 2.0, 3.0]}),  # more norms than were counted
    (lambda: QuantileClip(history=5), [1.0, 2.0]),
    (lambda: NormClip(), {"count": 1}),
    (lambda: ValueClip(), {"x": 1}),
]


@pytest.mark.parametrize("build, state", MALFORMED)
def test_load_malformed_strategy_state_raises_value_error(build, state):
    strategy = build()
    with pytest.raises(ValueError):
        strategy.load_state_dict(state)


@pytest.mark.parametrize("state", [
    {}, {"strategies": None}, {"strategies": {}}, {"strategies": {"default": {}, "extra": {}}}, "nope", None,
    {"strategies": {"default": {"count": -3, "history": []}}},
])
def test_load_malformed_clipper_state_raises_value_error(state):
    with pytest.raises(ValueError):
        GradClipper(QuantileClip()).load_state_dict(state)


def test_failed_load_keeps_the_previous_state():
    strategy = QuantileClip(0.5, history=3)
    strategy.load_state_dict({"count": 2, "history": [1.0, 2.0]})
    with pytest.raises(ValueError):
        strategy.load_state_dict({"count": 1, "history": [1.0, 2.0]})
    assert strategy.state_dict() == {"count": 2, "history": [1.0, 2.0]}
