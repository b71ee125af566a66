"""Values a user or a file hands the core (issue 22): hostile saved state, misspelt options, torch-style errors.

Every saved-state field is replaced by each hostile value (huge integers, wrong containers, NaN, strings):
whatever it is, loading raises :class:`StateError` naming the field, never ``OverflowError``/``TypeError``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from gradclip_hf import ClipConfig, GradClipper, NonFiniteGradientError, NormClip, StateError
from gradclip_hf.core import OptionError

HOSTILE = [10**400, -10**400, 2**63, 2**64, [], {}, "x", [[[]]], True, math.nan, math.inf, [10**400], {"a": 1}]

CONFIGS = [ClipConfig(strategy="zscore", zscore_warmup_steps=2, spike_detection="both", spike_warmup_steps=2,
                      spike_method="mad"),
           ClipConfig(strategy="quantile", quantile_history=5, spike_detection="loss", spike_warmup_steps=2)]


def _saved(config: ClipConfig) -> dict:
    clipper = config.build(10, 1.0)
    model = nn.Linear(4, 2)
    for step in range(6):
        model.zero_grad()
        (model(torch.randn(3, 4)).sum() * (1 + step)).backward()
        clipper.clip_(model, step=step, loss=torch.tensor(1.0 + step / 10))
    return clipper.state_dict()


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))


def _replaced(state: dict, path: tuple, value) -> dict:
    if not path:
        return value
    state = copy.deepcopy(state)
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return state


@pytest.mark.parametrize("config", CONFIGS, ids=["zscore-mad", "quantile-ema"])
def test_every_field_replaced_by_a_hostile_value_raises_state_error_naming_it(config):
    saved = _saved(config)
    config.build(10, 1.0).load_state_dict(saved)  # the real state loads
    tried = 0
    for path in _paths(saved):
        for value in HOSTILE:
            state = _replaced(saved, path, value)
            try:
                config.build(10, 1.0).load_state_dict(state)
            except StateError as error:
                assert "saved gradclip state field `" in str(error)
                if len(path) > 1:  # named down to the container that holds the bad value
                    assert error.field.split(".")[0] in path, (path, error.field)
            tried += 1
    assert tried > 100


@pytest.mark.parametrize("value, expected", [(10**400, "an int >= 0 and <= 9,223,372,036,854,775,807"),
                                             (2**63, "an int >= 0 and <= 9,223,372,036,854,775,807")])
def test_a_huge_count_names_the_field_and_the_range(value, expected):
    saved = _saved(CONFIGS[0])
    saved["strategies"]["default"]["count"] = value
    with pytest.raises(StateError, match=r"field `strategies\.default\.count` must be " + expected):
        CONFIGS[0].build(10, 1.0).load_state_dict(saved)


def test_a_huge_mean_and_wrong_containers_name_their_field():
    saved = _saved(CONFIGS[0])
    cases = [(("strategies", "default", "mean"), 10**400, r"`strategies\.default\.mean` must be a finite number"),
             (("spikes",), [1, 2], r"`spikes` must be a dict"),
             (("spikes",), "x", r"`spikes` must be a dict"),
             (("spikes", "loss_detector"), [], r"`spikes\.loss_detector` must be a dict"),
             (("strategies", "default", "buffer"), {"a": 1}, r"`strategies\.default\.buffer` must be a list")]
    for path, value, match in cases:
        with pytest.raises(StateError, match=match):
            CONFIGS[0].build(10, 1.0).load_state_dict(_replaced(saved, path, value))


# ---------------------------------------------------------------- 7. torch-style error type
def test_non_finite_gradient_error_is_a_runtime_error_as_torchs():
    model = nn.Linear(3, 1)
    model.weight.grad = torch.full_like(model.weight, math.nan)
    with pytest.raises(RuntimeError) as torch_error:  # what code written for torch catches
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    clipper = GradClipper(NormClip(1.0), nonfinite="raise")
    try:
        clipper.clip_(model, step=0)
    except RuntimeError as error:  # the same except clause catches ours
        caught = error
    assert isinstance(caught, NonFiniteGradientError) and isinstance(torch_error.value, RuntimeError)
    assert isinstance(caught, FloatingPointError)  # kept for code written against earlier versions
    assert torch.isnan(model.weight.grad).all()  # nothing changed


# ---------------------------------------------------------------- 6. misspelt options
@pytest.mark.parametrize("options, match", [
    (dict(stratgy="zscore"), r"`stratgy` is not an option of ClipConfig; did you mean `strategy`\?"),
    (dict(spike_actoin="skip"), r"did you mean `spike_action`\?"),
    (dict(clip_strategy="zscore"), r"`clip_strategy` is not an option of ClipConfig: the `clip_` prefix is for "
                                   r"GradClipTrainingArguments.*here the option is `strategy`"),
    (dict(bogus=1), r"`bogus` is not an option of ClipConfig \(the options: docs/options.md"),
])
def test_clip_config_with_a_misspelt_option_suggests_the_closest(options, match):
    with pytest.raises(ValueError, match=match) as error:
        ClipConfig(**options)
    assert isinstance(error.value, OptionError) and isinstance(error.value, TypeError)  # as before: a TypeError too


def test_clip_config_from_a_dict_refuses_what_is_not_an_option():
    assert ClipConfig.from_dict({"strategy": "zscore"}) == ClipConfig(strategy="zscore")
    with pytest.raises(ValueError, match=r"`bogus` is not an option of ClipConfig"):
        ClipConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match=r"`1` is not an option of ClipConfig"):
        ClipConfig.from_dict({1: 2})
    with pytest.raises(ValueError, match=r"a dict of ClipConfig options"):
        ClipConfig.from_dict(["strategy"])
