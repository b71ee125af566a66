"""ZScoreClip against the reference ``zclip`` 1.0.0 package, step for step.

Both sides see the same norm: zclip steps a ``Linear(1, 1, bias=False)`` whose weight gradient is
``[[norm]]``; we clip a 1-element parameter whose gradient is ``[norm]``, so both 2-norms are the norm.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from zclip import ZClip

from gradclip_hf import GradClipper, ZScoreClip

SPIKES = {8: 6.0, 30: 12.0, 31: 4.0, 45: 25.0, 46: 1.0, 60: 8.0}


def calm_sequence(n=70, seed=0):
    rng = np.random.default_rng(seed)
    # lognormal around 0.9 with a slow drift: some norms exceed max_grad_norm=1.0
    values = 0.9 * np.exp(rng.normal(0.0, 0.15, n) + np.linspace(0.0, 0.3, n))
    return [float(np.float32(v)) for v in values]


def spiky_sequence(n=70, seed=1):
    values = calm_sequence(n, seed)
    for step, factor in SPIKES.items():
        values[step] = float(np.float32(values[step] * factor))
    return values


SEQUENCES = {"calm": calm_sequence(), "spiky": spiky_sequence()}


class Pair:
    """zclip and ZScoreClip side by side."""

    def __init__(self, **kwargs):
        self.ref = ZClip(**kwargs)
        self.model = nn.Linear(1, 1, bias=False)
        self.strategy = ZScoreClip(**kwargs)
        self.clipper = GradClipper(self.strategy)
        self.param = nn.Parameter(torch.zeros(1))
        self.max_grad_norm = kwargs.get("max_grad_norm", 1.0)

    def step(self, step, value):
        expected_threshold = None
        if self.ref.initialized:  # the threshold in force, from zclip's clip value computed before its step
            clip_val = self.ref._compute_clip_val(value)
            cap = math.inf if self.max_grad_norm is None else self.max_grad_norm
            # on a spike, zclip's min(clip_val, cap); on calm steps zclip "clips" to the norm itself
            # (no-op) and the cap: the threshold in force is the cap (inf without one)
            expected_threshold = cap if clip_val is None else min(clip_val, cap)
        self.model.weight.grad = torch.tensor([[value]], dtype=torch.float32)
        self.ref.step(self.model)
        self.param.grad = torch.tensor([value], dtype=torch.float32)
        report = self.clipper.clip_([self.param], step=step)
        return report, expected_threshold

    def check(self, step, report, expected_threshold):
        ref_grad = self.model.weight.grad.view(1)
        torch.testing.assert_close(self.param.grad, ref_grad, rtol=1e-6, atol=0, msg=f"grad at step {step}")
        stats = self.strategy.statistics
        if self.ref.initialized:
            assert int(stats["count"]) == self.ref.warmup_steps
            assert stats["mean"].item() == pytest.approx(self.ref.mean, rel=1e-12, abs=1e-15), step
            assert stats["var"].item() == pytest.approx(self.ref.var, rel=1e-9, abs=1e-15), step
        else:
            assert int(stats["count"]) == len(self.ref.buffer), step
        if expected_threshold is not None:
            assert report.threshold.item() == pytest.approx(expected_threshold, rel=1e-6), step


CASES = list(itertools.product(
    SEQUENCES, ["zscore", "percentile"], ["adaptive_scaling", "mean"], [None, 1.0], [False, True], [5, 25]))


@pytest.mark.parametrize("sequence, mode, clip_option, max_grad_norm, skip_update_on_spike, warmup_steps", CASES)
def test_step_for_step_equal_to_zclip(sequence, mode, clip_option, max_grad_norm, skip_update_on_spike,
                                      warmup_steps):
    pair = Pair(mode=mode, clip_option=clip_option, max_grad_norm=max_grad_norm,
                skip_update_on_spike=skip_update_on_spike, warmup_steps=warmup_steps)
    clipped_after_warmup = 0
    for step, value in enumerate(SEQUENCES[sequence]):
        report, expected_threshold = pair.step(step, value)
        pair.check(step, report, expected_threshold)
        if expected_threshold is not None and bool(report.clipped):
            clipped_after_warmup += 1
    assert pair.ref.initialized
    if sequence == "spiky":  # the comparison covered clipped steps, not only pass-throughs
        assert clipped_after_warmup >= 1


@pytest.mark.parametrize("z_thresh, alpha, clip_factor", [(1.5, 0.9, 0.7), (3.0, 0.99, 1.3)])
def test_other_hyperparameters_equal_to_zclip(z_thresh, alpha, clip_factor):
    pair = Pair(z_thresh=z_thresh, alpha=alpha, clip_factor=clip_factor, max_grad_norm=None, warmup_steps=5)
    for step, value in enumerate(SEQUENCES["spiky"]):
        pair.check(step, *pair.step(step, value))


@pytest.mark.parametrize("nan_step", [3, 40])
def test_nan_norm_leaves_statistics_unchanged_where_zclip_is_poisoned(nan_step):
    values = list(SEQUENCES["spiky"])
    values[nan_step] = math.nan
    poisoned = Pair(max_grad_norm=1.0, warmup_steps=5)
    for step, value in enumerate(values):
        before = {k: v.clone() for k, v in poisoned.strategy.statistics.items()} if step else None
        poisoned.step(step, value)
        if step == nan_step:
            assert all(torch.equal(before[k], v) for k, v in poisoned.strategy.statistics.items())
    # the flaw we fix: zclip's EMA stays NaN for good after one NaN norm
    assert math.isnan(poisoned.ref.mean) and math.isnan(poisoned.ref.var)
    stats = poisoned.strategy.statistics
    assert math.isfinite(stats["mean"].item()) and math.isfinite(stats["var"].item())

    # ours continues exactly as zclip does on the same sequence without the NaN
    clean = Pair(max_grad_norm=1.0, warmup_steps=5)
    ours = ZScoreClip(max_grad_norm=1.0, warmup_steps=5)
    clipper = GradClipper(ours)
    p = nn.Parameter(torch.zeros(1))
    clean_values = [v for v in values if not math.isnan(v)]
    for step, value in enumerate(values):
        p.grad = torch.tensor([value], dtype=torch.float32)
        clipper.clip_([p], step=step)
        if step == nan_step:
            assert torch.isnan(p.grad).all()
            continue
        clean_step = step - (step > nan_step)
        clean.step(clean_step, clean_values[clean_step])
        torch.testing.assert_close(p.grad, clean.model.weight.grad.view(1), rtol=1e-6, atol=0)
    assert ours.statistics["mean"].item() == pytest.approx(clean.ref.mean, rel=1e-12)
    assert ours.statistics["var"].item() == pytest.approx(clean.ref.var, rel=1e-9)


def _run(clipper, param, values, start):
    grads = []
    for step, value in enumerate(values, start=start):
        param.grad = torch.tensor([value], dtype=torch.float32)
        clipper.clip_([param], step=step)
        grads.append(param.grad.clone())
    return grads


@pytest.mark.parametrize("split", [0, 3, 5, 17, 45])
@pytest.mark.parametrize("level", ["strategy", "clipper"])
def test_state_dict_json_round_trip_continues_identically(split, level):
    kwargs = dict(warmup_steps=5, max_grad_norm=1.0, skip_update_on_spike=True)
    values = SEQUENCES["spiky"]
    original = GradClipper(ZScoreClip(**kwargs))
    p = nn.Parameter(torch.zeros(1))
    _run(original, p, values[:split], 0)
    state = original.state_dict() if level == "clipper" else original.strategy.state_dict()
    restored_state = json.loads(json.dumps(state))
    assert restored_state == state
    strategy_state = state["strategies"]["default"] if level == "clipper" else state
    if split:
        assert strategy_state["count"] == min(split, 5)
        assert len(strategy_state["buffer"]) == min(split, 5)
    else:
        assert strategy_state == {}

    fresh = GradClipper(ZScoreClip(**kwargs))
    if level == "clipper":
        fresh.load_state_dict(restored_state)
    else:
        fresh.strategy.load_state_dict(restored_state)
    # loaded but not yet used: exports the same state
    assert (fresh.state_dict() if level == "clipper" else fresh.strategy.state_dict()) == state

    q = nn.Parameter(torch.zeros(1))
    expected = _run(original, p, values[split:], split)
    got = _run(fresh, q, values[split:], split)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    for key in ("count", "mean", "var"):
        assert torch.equal(original.strategy.statistics[key], fresh.strategy.statistics[key])


def test_state_dict_before_first_step_is_empty_and_loads():
    strategy = ZScoreClip(warmup_steps=5)
    assert strategy.state_dict() == {}
    assert strategy.statistics is None
    strategy.load_state_dict({})
    assert strategy.state_dict() == {}
