"""The Axolotl YAML keys (``GradClipArgs``, pydantic only: runs without Axolotl) are derived from ``ClipConfig``
and fail like ``GradClipTrainingArguments``. The real ``axolotl train`` runs are in ``tests/axolotl``."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Optional

import pytest

pydantic = pytest.importorskip("pydantic")

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.integrations.axolotl_args import GradClipArgs, clip_config, unknown_keys  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipTrainingArguments  # noqa: E402

BAD = [dict(clip_strategy="bogus"), dict(clip_threshold=-1), dict(clip_threshold="abc"), dict(clip_warmup_steps=1.5),
       dict(clip_exclude=["("]), dict(clip_spike_action="skip"), dict(clip_schedule="cosine"),
       dict(clip_strategy="value"), dict(clip_piecewise_values=[1.0], clip_schedule="piecewise",
                                          clip_piecewise_boundaries=[5]),
       dict(max_grad_norm=math.nan), dict(max_grad_norm=0.0, clip_schedule="cosine", clip_threshold_final=0.3),
       dict(clip_spike_factor=0)]


# Axolotl mixes the plugin's model into its own config class, which has `max_grad_norm` (default None: unset)
Merged = pydantic.create_model("Merged", __base__=GradClipArgs, max_grad_norm=(Optional[float], None))


def test_every_option_is_a_clip_key_with_its_default_help_and_choices():
    model_fields = GradClipArgs.model_fields
    assert sorted(model_fields) == sorted("clip_" + name for name in ClipConfig.field_names())
    defaults = ClipConfig()
    for f in dataclasses.fields(ClipConfig):
        field = model_fields["clip_" + f.name]
        assert field.description == f.metadata["help"]
        assert field.get_default(call_default_factory=True) == getattr(defaults, f.name)
        assert (field.json_schema_extra or {}).get("choices") == f.metadata.get("choices")
    assert GradClipArgs().clip_strategy == "norm" and GradClipArgs().clip_exclude == []


def _args_error(options):
    options = dict(options)
    max_grad_norm = options.pop("max_grad_norm", 1.0)
    with pytest.raises(ValueError) as error:
        GradClipTrainingArguments(output_dir="unused", max_grad_norm=max_grad_norm, **options)
    return str(error.value)


@pytest.mark.parametrize("options", BAD, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_bad_values_fail_with_the_messages_of_the_training_arguments(options):
    expected = _args_error(options)
    assert expected.startswith(("`clip_", "`max_grad_norm`"))  # named as the user wrote it
    with pytest.raises(pydantic.ValidationError) as error:
        Merged(**options)
    assert expected in str(error.value)
    assert isinstance(error.value, ValueError)  # what Axolotl's config loading raises


def test_values_are_cleaned_by_clip_config():
    args = GradClipArgs(clip_strategy="zscore", clip_threshold=float("inf"), clip_norm_type="inf",
                        clip_include="lora_")
    assert args.clip_threshold == math.inf and args.clip_norm_type == math.inf and args.clip_include == ["lora_"]
    assert clip_config(args.model_dump()) == ClipConfig(strategy="zscore", threshold=math.inf, norm_type=math.inf,
                                                        include=["lora_"])


def test_ignored_options_warn_with_the_clip_name():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GradClipArgs(clip_zscore_z=3.0)
    assert any("`clip_zscore_z`=3.0 is ignored" in str(w.message) for w in caught)


def test_max_grad_norm_unset_means_the_trainer_default():
    assert Merged().clip_threshold is None  # resolved to max_grad_norm=1.0 by the Trainer at train start
    assert Merged(max_grad_norm=0.0).clip_threshold is None  # no clipping, as the stock Trainer: norms measured
    assert clip_config({"max_grad_norm": 0.0}).resolved_threshold(0.0) == math.inf
    with pytest.raises(pydantic.ValidationError, match=r"`max_grad_norm` must be a number.*got nan\. NaN"):
        Merged(max_grad_norm=math.nan)


def test_unknown_keys_are_the_clip_keys_that_are_no_option():
    cfg = {"clip_strategy": "norm", "clip_stratgy": "zscore", "clip_thresold": 1.0, "max_grad_norm": 1.0}
    assert unknown_keys(cfg) == ["clip_stratgy", "clip_thresold"]
    assert unknown_keys({"clip_strategy": "norm"}) == []
