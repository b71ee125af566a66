"""Regression tests of the defects found by adversarial testing (issue 11), core side: each failed before."""

import math
import warnings

import pytest
import torch

from gradclip_hf import ClipConfig, GradClipper, NonFiniteGradientError, NormClip, ValueClip, ZScoreClip
from gradclip_hf.core import SpikeController, StateError, TrainingSnapshot
from gradclip_hf.run import StepGate


# ---------------------------------------------------------------- 1. the guard covers every gradient
@pytest.mark.parametrize("selection", [{"exclude": [r"bias$"]}, {"include": [r"weight"]}])
@pytest.mark.parametrize("fused", [False, True])
def test_nonfinite_in_an_unselected_gradient_never_reaches_weights_or_state(selection, fused):
    lin = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(lin.parameters(), fused=fused)
    gate = StepGate(opt)
    clipper = GradClipper(NormClip(1.0), **selection)
    (lin(torch.randn(2, 4)) ** 2).sum().backward()
    opt.step()  # some optimizer state to protect
    opt.zero_grad()
    (lin(torch.randn(2, 4)) ** 2).sum().backward()
    lin.bias.grad[0] = float("inf")
    weights = [p.detach().clone() for p in lin.parameters()]
    state = {k: v.clone() for k, v in opt.state[lin.bias].items()}
    report = clipper.clip_(lin, step=1)
    assert bool(report.nonfinite) and bool(report.skip)
    gate.arm(skip=report.skip, skip_now=bool(report.skip))
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(weights, lin.parameters()))
    assert all(torch.equal(state[k], opt.state[lin.bias][k]) for k in state)


def test_nonfinite_zero_also_zeroes_unselected_gradients():
    lin = torch.nn.Linear(4, 3)
    (lin(torch.randn(2, 4)) ** 2).sum().backward()
    lin.bias.grad[0] = float("nan")
    GradClipper(NormClip(1.0), exclude=[r"bias$"], nonfinite="zero").clip_(lin, step=0)
    assert torch.equal(lin.bias.grad, torch.zeros(3)) and torch.equal(lin.weight.grad, torch.zeros(3, 4))


# ---------------------------------------------------------------- 6. raise before touching the gradients
@pytest.mark.parametrize("strategy", [NormClip(0.1), ValueClip(0.1), ZScoreClip(max_grad_norm=0.1)])
def test_nonfinite_raise_leaves_gradients_unchanged(strategy):
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([1.0, math.inf, 2.0])
    with pytest.raises(NonFiniteGradientError, match="no gradient was changed"):
        GradClipper(strategy, nonfinite="raise").clip_([param], step=0)
    assert torch.equal(param.grad, torch.tensor([1.0, math.inf, 2.0]))


# ---------------------------------------------------------------- 7. norm_type honoured or rejected
@pytest.mark.parametrize("strategy", ["zscore", "value", "norm", "quantile", "none"])
def test_norm_type_is_honoured(strategy):
    param = torch.nn.Parameter(torch.zeros(3))
    param.grad = torch.tensor([3.0, -4.0, 1.0])
    threshold = {"value": 100.0, "none": None, "quantile": None}.get(strategy, 100.0)
    report = ClipConfig(strategy=strategy, threshold=threshold, norm_type="inf").build().clip_([param], step=0)
    assert report.norm.item() == 4.0  # the max-abs norm, not the L2 norm (5.10)


def test_agc_rejects_a_norm_type_it_cannot_use():
    with pytest.raises(ValueError, match="`norm_type` must be 2 with strategy 'agc'"):
        ClipConfig(strategy="agc", threshold=0.05, norm_type="inf")


# ---------------------------------------------------------------- 5. saved state checked field by field
@pytest.mark.parametrize("state, field", [
    ({"factor": math.nan, "spikes": 1}, "factor"),
    ({"factor": -1.0, "spikes": 1}, "factor"),
    ({"factor": 1.5, "spikes": 1}, "factor"),
    ({"factor": 0.5, "spikes": -3}, "spikes"),
    ({"factor": 0.5, "spikes": 1.5}, "spikes"),
    ({"factor": 0.5, "spikes": 1, "loss_detector": {"count": 30, "run": 0, "mean": math.nan, "var": 1.0}},
     "loss_detector.mean"),
    ({"factor": 0.5, "spikes": 1, "loss_detector": {"count": 30, "run": 0, "mean": 2.0, "var": -1.0}},
     "loss_detector.var"),
    ({"factor": 0.5, "spikes": 1, "loss_detector": {"count": "30", "run": 0, "mean": 2.0, "var": 1.0}},
     "loss_detector.count"),
])
def test_bad_controller_state_names_the_field(state, field):
    with pytest.raises(StateError, match=f"state field `{field}` must be"):
        SpikeController(detect_norm=False).load_state_dict(state)


def test_bad_strategy_state_names_the_field_and_kind_mismatch_says_so():
    clipper = GradClipper(ZScoreClip(warmup_steps=2))
    with pytest.raises(StateError, match=r"`strategies.default.var` must be >= 0, got -2.0"):
        clipper.load_state_dict({"strategies": {"default": {"count": 2, "mean": 1.0, "var": -2.0,
                                                            "buffer": [1.0, 1.0]}}, "spikes": None})
    with pytest.raises(StateError, match=r"`strategies.default` must be a state of NormClip"):
        GradClipper(NormClip()).load_state_dict({"strategies": {"default": {"count": 2}}, "spikes": None})


# ---------------------------------------------------------------- 3. rollback keeps the scheduler's lr
def test_rollback_restores_weights_and_moments_but_not_the_learning_rate():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    snapshot = TrainingSnapshot(every=1)
    snapshot.take(0, model.parameters(), opt)
    weights = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
    opt.param_groups[0]["lr"] = 4.44e-4  # the scheduler moved on
    snapshot.restore(model.parameters(), opt)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert opt.state == {} or all(not s for s in opt.state.values())  # no moments yet at the snapshot
    assert opt.param_groups[0]["lr"] == 4.44e-4


# ---------------------------------------------------------------- 8. accepted at construction, failed later
@pytest.mark.parametrize("options, match", [
    ({"quantile_history": 10**12}, "`quantile_history` must be an int >= 1 and <= 1,000,000"),
    ({"zscore_warmup_steps": 10**12}, "`zscore_warmup_steps` must be an int >= 1 and <= 1,000,000"),
    ({"spike_warmup_steps": 10**12}, "`spike_warmup_steps` must be an int >= 2 and <= 1,000,000"),
    ({"threshold": 1e39}, "`threshold` must be a finite number"),
    ({"include": []}, "`include` must be a non-empty list"),
    ({"exclude": ""}, "`exclude` must be a list of non-empty regular expressions"),
    ({"exclude": [""]}, "`exclude` must be a list of non-empty regular expressions"),
    ({"piecewise_boundaries": 5}, "`piecewise_boundaries` must be a list of ints, got 5"),
    ({"piecewise_values": "1.0"}, "`piecewise_values` must be a list of numbers"),
    ({"spike_action": "skip"}, "`spike_action` must be 'tighten' while spike_detection is 'off'"),
    ({"strategy": "value"}, "`threshold` must be a number > 0 with strategy 'value'"),
    ({"strategy": "norm", "threshold": math.inf}, "`threshold` must be a finite number > 0"),
])
def test_bad_options_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        ClipConfig(**options)


def test_mad_with_a_long_warmup_builds_and_runs():
    clipper = ClipConfig(spike_detection="loss", spike_method="mad", spike_warmup_steps=150).build()
    assert clipper.spikes.loss_detector.window == 150
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    clipper.clip_([param], step=0, loss=torch.tensor(1.0))


# ---------------------------------------------------------------- 9. options the rest ignores: one warning each
@pytest.mark.parametrize("options, name", [
    ({"threshold_final": 0.5}, "threshold_final"),
    ({"spike_detection": "loss", "spike_norm_z": 3.0}, "spike_norm_z"),
    ({"nonfinite": "zero", "nonfinite_max_consecutive": 3}, "nonfinite_max_consecutive"),
    ({"spike_z": 4.0}, "spike_z"),
    ({"strategy": "quantile", "threshold": 1.0}, "threshold"),
    ({"zscore_z": 3.0}, "zscore_z"),
    ({"spike_detection": "loss", "spike_factor": 1.0}, "spike_factor"),  # tighten by 1: nothing happens
])
def test_ignored_options_warn_once_naming_them(options, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ClipConfig(**options)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and messages[0].startswith(f"`{name}`=") and "is ignored" in messages[0]


def test_default_and_consistent_options_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ClipConfig()
        ClipConfig.recommended()
        ClipConfig(schedule="cosine", threshold=1.0, threshold_final=0.3)
        ClipConfig(spike_detection="both", spike_norm_z=4.0, spike_action="rollback", spike_snapshot_every=10)


def test_a_spike_file_without_spikes_warns_that_nothing_will_be_skipped(tmp_path):
    path = tmp_path / "gradclip_spikes.jsonl"
    path.write_text('{"event": "skip_listed", "step": 5}\n')
    with pytest.warns(UserWarning, match="lists no spike or non-finite step"):
        assert ClipConfig(skip_steps_from=str(path)).steps_to_skip() == frozenset()
    path.write_text('{"event": "spike", "step": 7}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ClipConfig(skip_steps_from=str(path)).steps_to_skip() == frozenset({7})
