"""LRGuard (issue 25.6): each step's learning rate capped at ``cap`` x its running average, closed form; the cap
is followed by an intended rise (the capped value enters the average); the group's rate is put back after the
step; tensor rates are left alone; its state round-trips and a bad state names the field."""

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


def test_no_cap_during_warmup_then_capped_at_cap_times_the_mean():
    guard, opt = LRGuard(cap=2.0, warmup_steps=3, alpha=0.9), optimizer()
    assert [step(guard, opt, [lr])[0] for lr in (1.0, 3.0, 2.0)] == [1.0, 3.0, 2.0]  # warmup: the mean is 2.0
    assert guard.limit() == pytest.approx(4.0)
    assert step(guard, opt, [10.0]) == [pytest.approx(4.0)]  # capped at 2 x 2.0
    assert opt.param_groups[0]["lr"] == 10.0  # put back: the scheduler never sees the cap
    assert guard.capped == 1


def test_a_capped_rise_is_followed_at_most_one_minus_alpha_times_cap_minus_one_per_step():
    guard, opt = LRGuard(cap=2.0, warmup_steps=2, alpha=0.9), optimizer()
    step(guard, opt, [1.0]), step(guard, opt, [1.0])
    mean, applied = 1.0, []
    for _ in range(40):
        applied.append(step(guard, opt, [10.0])[0])
        mean = 0.9 * mean + 0.1 * applied[-1]
    expected = [2.0 * 1.1 ** k for k in range(len(applied))]
    assert applied[:17] == pytest.approx(expected[:17])  # a re-warmup: 10 % higher each step
    assert applied[-1] == 10.0 and guard.limit() == pytest.approx(2 * mean)  # 10x reached in 17 steps
    assert next(k for k, a in enumerate(applied) if a == 10.0) == 17


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
def test_the_applied_rate_never_exceeds_the_given_one_nor_cap_times_the_mean(lrs, cap):
    guard, opt = LRGuard(cap=cap, warmup_steps=5), optimizer()
    for lr in lrs:
        limit = guard.limit()
        applied = step(guard, opt, [lr])[0]
        assert applied <= lr and (limit is None or applied <= limit * (1 + 1e-12))
        assert opt.param_groups[0]["lr"] == lr


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
    ({"counts": [1], "means": [1.0], "capped": -2}, "lr_guard.capped")])
def test_a_bad_state_names_the_field(state, field):
    with pytest.raises(StateError, match=field.replace(".", r"\.")):
        LRGuard().load_state_dict(state)


@pytest.mark.parametrize("kwargs, match", [({"cap": 1.0}, "cap"), ({"cap": float("nan")}, "cap"),
                                           ({"warmup_steps": 0}, "warmup_steps"), ({"alpha": 1.0}, "alpha")])
def test_bad_arguments_name_the_option(kwargs, match):
    with pytest.raises(OptionError, match=match):
        LRGuard(**kwargs)
