"""The early-training rule of the loss detector (issue 25.5): a baseline that follows a falling loss (the 25th
percentile of the last 8 log-values) with the noise of its step-to-step changes; closed form, its reach where the
EMA cannot see, invariants (hypothesis), its state."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip_hf import ClipConfig, SpikeDetector, StateError


def flags(detector, values):
    return [bool(detector.update(torch.tensor(v, dtype=torch.float64))[0]) for v in values]


def test_closed_form_baseline_noise_and_z():
    """Seven log-losses falling by 0.1 a step, then a jump: baseline exp(2.55) (the 25th percentile of the seven,
    interpolated), noise sqrt(0.01 / 2), z = (2.3 + log 2 - 2.55) / noise = 6.27."""
    ys = [3.0 - 0.1 * i for i in range(7)]
    jump = math.exp(2.3) * 2
    want_z = (2.3 + math.log(2) - 2.55) / math.sqrt(0.005)
    detector = SpikeDetector(z=6.0, warmup_steps=20, early=True)
    assert flags(detector, [math.exp(y) for y in ys]) == [False] * 7
    spike, z, baseline = detector.update(torch.tensor(jump, dtype=torch.float64))
    assert bool(spike) and float(z) == pytest.approx(want_z, rel=1e-9)
    assert float(baseline) == pytest.approx(math.exp(2.55), rel=1e-9)
    # the same jump with z 7 is no spike, and 1.4x (under the 1.5x bound) is none even at a huge z
    assert flags(SpikeDetector(z=7.0, early=True), [*map(math.exp, ys), jump]) == [False] * 8
    assert flags(SpikeDetector(z=6.0, early=True), [*map(math.exp, ys), math.exp(2.3) * 1.4]) == [False] * 8


def descent(steps=60, jump_at=10, factor=2.0, seed=0):
    """A loss falling steeply from 5.5 towards 2.5 with 3 % noise; ``factor`` x at ``jump_at``."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(steps, generator=gen, dtype=torch.float64) * 0.03
    values = [(2.5 + 3.0 * math.exp(-t / 8)) * math.exp(float(noise[t])) for t in range(steps)]
    if jump_at is not None:
        values[jump_at] *= factor
    return values


@pytest.mark.parametrize("jump_at", [10, 15, 26])
def test_a_2x_jump_early_in_training_is_flagged_where_the_ema_is_blind(jump_at):
    for seed in range(5):
        values = descent(jump_at=jump_at, seed=seed)
        early = flags(SpikeDetector(early=True), values)
        assert [t for t, f in enumerate(early) if f] == [jump_at], seed
        assert not flags(SpikeDetector(early=False), values)[jump_at]  # the EMA baseline still carries the start


def test_a_clean_descent_and_non_positive_losses_are_never_early_spikes():
    for seed in range(5):
        assert not any(flags(SpikeDetector(early=True), descent(jump_at=None, seed=seed)))
    detector = SpikeDetector(early=True, warmup_steps=50)
    assert not any(flags(detector, [-1.0, 0.0, -3.0] * 10))  # a loss that can be negative: the log rule is off
    assert detector.state_dict()["early_count"] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.5, 20.0), min_size=5, max_size=60), st.data())
def test_nan_values_change_nothing_else(values, data):
    """A non-finite loss is neither a spike nor taken in: inserting some leaves every other flag as it was."""
    where = data.draw(st.lists(st.integers(0, len(values)), max_size=5))
    mixed = list(values)
    for at in sorted(where, reverse=True):
        mixed.insert(at, math.nan)
    plain = flags(SpikeDetector(early=True, warmup_steps=4), values)
    with_nan = flags(SpikeDetector(early=True, warmup_steps=4), mixed)
    assert [f for v, f in zip(mixed, with_nan) if not math.isnan(v)] == plain
    assert not any(f for v, f in zip(mixed, with_nan) if math.isnan(v))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.5, 20.0), min_size=2, max_size=40), st.integers(1, 39))
def test_a_saved_and_loaded_state_goes_on_as_if_never_stopped(values, cut):
    cut = min(cut, len(values) - 1)
    whole = flags(SpikeDetector(early=True, warmup_steps=3), values)
    first = SpikeDetector(early=True, warmup_steps=3)
    head = flags(first, values[:cut])
    second = SpikeDetector(early=True, warmup_steps=3)
    second.load_state_dict(first.state_dict())
    assert head + flags(second, values[cut:]) == whole


def test_a_state_saved_without_the_early_rule_loads_it_fresh_and_a_bad_field_is_named():
    old = SpikeDetector(early=False)
    flags(old, [3.0, 2.9, 2.8])
    detector = SpikeDetector(early=True)
    detector.load_state_dict(old.state_dict())
    flags(detector, [2.7])
    state = detector.state_dict()
    assert state["count"] == 4 and state["early_count"] == 1
    with pytest.raises(StateError, match="early_d2"):
        SpikeDetector(early=True).load_state_dict({**state, "early_d2": -1.0})
    with pytest.raises(StateError, match="early_ring"):
        SpikeDetector(early=True).load_state_dict({**state, "early_ring": [1.0] * 3})


def test_the_option_reaches_the_loss_detectors_only():
    spikes = ClipConfig(spike_detection="both", spike_gate="micro_batch").build(micro_batches=2).spikes
    assert spikes.loss_detector.early and spikes.gate.detector.early and not spikes.norm_detector.early
    off = ClipConfig(spike_detection="loss", spike_early=False).build().spikes
    assert not off.loss_detector.early
    with pytest.warns(UserWarning, match="`spike_early`=False is ignored: spike_detection is 'norm'"):
        ClipConfig(spike_detection="norm", spike_early=False)
    with pytest.raises(ValueError, match="`spike_early` must be"):
        ClipConfig(spike_early="yes")
