"""LRGuard (issue 25.6): a jump of a step's learning rate capped at ``cap`` x its running average, closed form; a
smooth rise (a warmup of any length) never capped; an intended jump followed (the capped value enters the average);
the group's rate put back after the step; tensor rates left alone; its state round-trips and a bad state names the
field."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradclip_hf.core import LRGuard, OptionError, StateError


def optimizer(lr=1.0, groups=1):
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p]} for p in params], lr=lr)


def step(guard, opt, lrs):
    """One guarded step with the groups' rates set to ``lrs``: returns the applied rates, then puts them back."""
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    saved = guard.before_step(opt)
    applied = [g["lr"] for g in opt.param_groups]
    guard.after_step(saved)
    return applied


def test_no_cap_during_warmup_then_a_jump_capped_at_cap_times_the_mean():
    guard, opt = LRGuard(cap=2.0, warmup_steps=3, alpha=0.9), optimizer()
    assert [step(guard, opt, [lr])[0] for lr in (1.0, 3.0, 2.0)] == [1.0, 3.0, 2.0]  # warmup: the mean is 2.0
    assert guard.limit() == pytest.approx(4.0)
    assert step(guard, opt, [10.0]) == [pytest.approx(4.0)]  # a 5x jump, capped at 2 x 2.0
    assert opt.param_groups[0]["lr"] == 10.0  # put back: the scheduler never sees the cap
    assert guard.capped == 1


def test_an_intended_jump_is_followed_10_percent_a_step_until_the_jump_left_is_at_most_cap():
    guard, opt = LRGuard(cap=2.0, warmup_steps=2, alpha=0.9), optimizer()
    step(guard, opt, [1.0]), step(guard, opt, [1.0])
    applied = [step(guard, opt, [10.0])[0] for _ in range(20)]
    ramp = [2.0 * 1.1 ** k for k in range(11)]  # 2, 2.2, ... 5.19: each capped at 2 x a mean that grows 10 %
    assert applied[:11] == pytest.approx(ramp) and applied[11:] == [10.0] * 9  # 10 <= 2 x 5.19: the rest applied
    assert guard.capped == 11


@pytest.mark.parametrize("ramp", [30, 100, 1000])
def test_a_linear_warmup_of_any_length_is_never_capped(ramp):
    guard, opt = LRGuard(cap=2.0, warmup_steps=20), optimizer()
    lrs = [min(1.0, k / ramp) for k in range(2 * ramp)]  # from 0, as transformers' linear warmup
    assert [step(guard, opt, [lr])[0] for lr in lrs] == lrs and guard.capped == 0


def test_an_ordinary_schedule_is_never_capped():
    guard, opt = LRGuard(cap=2.0, warmup_steps=20), optimizer()
    lrs = [min(1.0, (k + 1) / 100) * 0.5 * (1 + math.cos(math.pi * k / 1000)) for k in range(1000)]  # warmup+cosine
    assert [step(guard, opt, [lr])[0] for lr in lrs] == lrs
    assert guard.capped == 0


def test_each_group_has_its_own_average_and_tensor_rates_are_left_alone():
    guard, opt = LRGuard(cap=2.0, warmup_steps=1), optimizer(groups=2)
    step(guard, opt, [1.0, 0.1])
    assert step(guard, opt, [5.0, 0.15]) == [pytest.approx(2.0), 0.15]
    opt.param_groups[0]["lr"] = rate = torch.tensor(50.0)
    guard.before_step(opt)
    assert opt.param_groups[0]["lr"] is rate


def test_a_group_added_later_gets_its_own_warmup():
    guard, opt = LRGuard(cap=2.0, warmup_steps=1), optimizer()
    step(guard, opt, [1.0])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 7.0})
    assert step(guard, opt, [1.0, 7.0]) == [1.0, 7.0]
    assert guard.limit(1) == pytest.approx(14.0)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=60), st.floats(1.01, 10.0))
def test_the_applied_rate_never_exceeds_the_given_one_nor_both_cap_bounds(lrs, cap):
    guard, opt, last = LRGuard(cap=cap, warmup_steps=5), optimizer(), None
    for lr in lrs:
        limit = guard.limit()
        applied = step(guard, opt, [lr])[0]
        assert applied <= lr and opt.param_groups[0]["lr"] == lr
        if limit is not None:  # a rate above cap x its average came smoothly (at most cap x the step before)
            assert applied <= max(limit, cap * last) * (1 + 1e-12)
        last = applied


def test_state_round_trip_continues_identically():
    a, b, opt_a, opt_b = LRGuard(warmup_steps=3), LRGuard(warmup_steps=3), optimizer(), optimizer()
    for lr in (1.0, 1.0, 1.0, 9.0):
        step(a, opt_a, [lr])
    b.load_state_dict(a.state_dict())
    assert [step(a, opt_a, [9.0]) for _ in range(5)] == [step(b, opt_b, [9.0]) for _ in range(5)]
    assert a.capped == b.capped == 6


@pytest.mark.parametrize("state, field", [
    ([], "lr_guard"), ({"counts": [1], "means": []}, "lr_guard.means"), ({"counts": [-1], "means": [1.0]},
                                                                         "lr_guard.counts"),
    ({"counts": [1], "means": [float("nan")]}, "lr_guard.means"), ({"counts": [True], "means": [1.0]},
                                                                   "lr_guard.counts"),
    ({"counts": [1], "means": [1.0], "capped": -2}, "lr_guard.capped"),
    ({"counts": [1], "means": [1.0], "last": [float("inf")]}, "lr_guard.last")])
def test_a_bad_state_names_the_field(state, field):
    with pytest.raises(StateError, match=field.replace(".", r"\.")):
        LRGuard().load_state_dict(state)


@pytest.mark.parametrize("kwargs, match", [({"cap": 1.0}, "cap"), ({"cap": float("nan")}, "cap"),
                                           ({"warmup_steps": 0}, "warmup_steps"), ({"alpha": 1.0}, "alpha")])
def test_bad_arguments_name_the_option(kwargs, match):
    with pytest.raises(OptionError, match=match):
        LRGuard(**kwargs)
