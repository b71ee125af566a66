"""The README documents every option and every metric key (docs that cannot silently rot)."""

import dataclasses
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_option_is_in_the_readme():
    transformers = pytest.importorskip("transformers")
    from gradclip_hf.integrations.transformers import GradClipTrainingArguments

    base = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    ours = [f.name for f in dataclasses.fields(GradClipTrainingArguments) if f.name not in base]
    assert ours, "GradClipTrainingArguments adds no option"
    missing = [name for name in ours if f"`--{name}`" not in README]
    assert not missing, f"options missing from the README options table: {missing}"


def test_every_metric_key_is_in_the_readme():
    pytest.importorskip("transformers")
    from gradclip_hf.integrations.transformers.runner import METRIC_KEYS

    missing = [key for key in METRIC_KEYS if f"`{key}`" not in README]
    assert not missing, f"metric keys missing from the README: {missing}"


def test_the_two_commands_are_in_the_readme():
    assert re.search(r"^make demo\b", README, re.M) and re.search(r"^make test\b", README, re.M)
