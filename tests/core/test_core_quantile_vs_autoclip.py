"""QuantileClip against the AutoClip rule written out with numpy, step for step."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from gradclip_hf import GradClipper, QuantileClip

SPIKES = {5: 8.0, 17: 30.0, 18: 3.0, 33: 12.0}


def sequence(n=45, seed=0, spikes=True):
    rng = np.random.default_rng(seed)
    values = 0.5 * np.exp(rng.normal(0.0, 0.3, n))
    if spikes:
        for step, factor in SPIKES.items():
            if step < n:
                values[step] *= factor
    return [float(np.float32(v)) for v in values]


def autoclip_reference(values, quantile, history=None):
    """The AutoClip rule: the norm joins the history, then clip to its percentile (last ``history`` norms)."""
    p = nn.Parameter(torch.zeros(1))
    seen, grads, thresholds = [], [], []
    for value in values:
        seen.append(value)
        window = seen if history is None else seen[-history:]
        clip_value = float(np.percentile(window, quantile * 100))
        p.grad = torch.tensor([value], dtype=torch.float32)
        torch.nn.utils.clip_grad_norm_([p], clip_value)
        grads.append(p.grad.clone())
        thresholds.append(clip_value)
    return grads, thresholds


def run_ours(clipper, values, start=0):
    p = nn.Parameter(torch.zeros(1))
    grads, reports = [], []
    for step, value in enumerate(values, start=start):
        p.grad = torch.tensor([value], dtype=torch.float32)
        reports.append(clipper.clip_([p], step=step))
        grads.append(p.grad.clone())
    return grads, reports


@pytest.mark.parametrize("quantile", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("history", [3, 10, 1000])
@pytest.mark.parametrize("spikes", [True, False])
def test_step_for_step_equal_to_autoclip(quantile, history, spikes):
    values = sequence(spikes=spikes)
    expected_grads, expected_thresholds = autoclip_reference(values, quantile, history)
    grads, reports = run_ours(GradClipper(QuantileClip(quantile, history=history)), values)
    clipped = 0
    for step, (g, e, r, t) in enumerate(zip(grads, expected_grads, reports, expected_thresholds)):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=0, msg=f"grad at step {step}")
        assert r.threshold.item() == pytest.approx(t, rel=1e-6), step
        clipped += bool(r.clipped)
    if quantile < 1.0:
        assert clipped >= 3
    if spikes and quantile <= 0.5:  # spikes were cut down to ordinary norms
        assert grads[17].item() < 0.5 * values[17]


def test_unbounded_history_longer_than_sequence_is_plain_autoclip():
    values = sequence(30)
    expected, _ = autoclip_reference(values, 0.25, history=None)
    grads, _ = run_ours(GradClipper(QuantileClip(0.25, history=1000)), values)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=0)


def test_nan_norm_stays_out_of_history():
    values = sequence(30)
    with_nan = values[:12] + [math.nan] + values[12:]
    expected, _ = autoclip_reference(values, 0.5, history=8)
    strategy = QuantileClip(0.5, history=8)
    grads, reports = run_ours(GradClipper(strategy), with_nan)
    assert bool(reports[12].nonfinite) and bool(reports[12].skip)
    assert strategy.state_dict()["count"] == len(values)
    for g, e in zip(grads[:12] + grads[13:], expected):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=0)


@pytest.mark.parametrize("history, split", [(8, 0), (8, 5), (8, 8), (8, 13), (8, 16), (8, 30), (100, 20), (1, 7)])
def test_state_dict_json_round_trip_continues_identically(history, split):
    values = sequence(40)
    original = GradClipper(QuantileClip(0.3, history=history))
    run_ours(original, values[:split])
    state = json.loads(json.dumps(original.state_dict()))
    saved = state["strategies"]["default"]
    if split:
        assert saved["count"] == split
        # the last `history` norms, oldest first (the ring wrapped when split > history)
        assert saved["history"] == values[max(0, split - history):split]
    fresh = GradClipper(QuantileClip(0.3, history=history))
    fresh.load_state_dict(state)
    assert fresh.state_dict() == original.state_dict()
    expected, expected_reports = run_ours(original, values[split:], start=split)
    got, got_reports = run_ours(fresh, values[split:], start=split)
    for a, b, ra, rb in zip(expected, got, expected_reports, got_reports):
        assert torch.equal(a, b)
        assert torch.equal(ra.threshold, rb.threshold)
    assert fresh.state_dict() == original.state_dict()


def test_state_dict_after_wrap_matches_reference_continuation():
    values = sequence(40)
    history = 6
    first = GradClipper(QuantileClip(0.5, history=history))
    run_ours(first, values[:23])
    fresh = GradClipper(QuantileClip(0.5, history=history))
    fresh.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got, _ = run_ours(fresh, values[23:], start=23)
    expected, _ = autoclip_reference(values, 0.5, history=history)
    for g, e in zip(got, expected[23:]):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=0)


def test_observe_false_keeps_norm_out_and_empty_history_does_not_clip():
    strategy = QuantileClip(0.5, history=4)
    clipper = GradClipper(strategy)
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([3.0])
    report = clipper.clip_([p], step=0, observe=torch.tensor(False))
    assert strategy.state_dict()["count"] == 0
    assert not bool(report.clipped)
    assert torch.equal(p.grad, torch.tensor([3.0]))


def test_empty_history_with_tighter_factor_does_not_clip():
    """With no history there is no threshold: a factor < 1 must not turn into a gradient multiplier."""
    clipper = GradClipper(QuantileClip(0.5, history=4))
    p = nn.Parameter(torch.zeros(1))
    p.grad = torch.tensor([3.0])
    report = clipper.clip_([p], step=0, factor=0.5, observe=torch.tensor(False))
    assert torch.equal(p.grad, torch.tensor([3.0]))
    assert not bool(report.clipped)
