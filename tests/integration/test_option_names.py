"""Option names a user hands the pack (issues 22.5 and 22.6): a config dict with a key that is no option gives the
``ValueError`` of the keyword form, naming the key, and a misspelt name gets the closest option at every entry
point (with what is wrong with the ``clip_`` prefix where that is the mistake)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest

from gradclip_hf.config import ClipConfig
from gradclip_hf.core import OptionError

transformers = pytest.importorskip("transformers")
pydantic = pytest.importorskip("pydantic")

from gradclip_hf.integrations.axolotl_args import GradClipArgs, clip_config, unknown_message  # noqa: E402
from gradclip_hf.integrations.transformers import (GradClipArgumentParser, GradClipCallback,  # noqa: E402
                                                   GradClipTrainingArguments)


# ---------------------------------------------------------------- 5. one behaviour for config dicts
def test_a_config_dict_with_an_unknown_key_fails_like_the_keyword_form():
    with pytest.raises(ValueError, match=r"`bogus` is not an option of GradClipCallback"):
        GradClipCallback(bogus=1)
    with pytest.raises(ValueError, match=r"`bogus` is not an option of ClipConfig \(GradClipCallback's config dict\)"):
        GradClipCallback(config={"bogus": 1})
    with pytest.raises(ValueError, match=r"`stratgy` is not an option of .*; did you mean `strategy`\?"):
        GradClipCallback(config={"stratgy": "zscore"})
    with pytest.raises(ValueError, match=r"`threshold` must be a number"):  # values: the documented error, as before
        GradClipCallback(config={"threshold": "x"})
    assert GradClipCallback(config={"strategy": "zscore"}).config == ClipConfig(strategy="zscore")


def test_the_axolotl_keys_refuse_a_max_grad_norm_that_is_no_number_naming_it():
    for value in ("x", [1.0], math.nan):
        with pytest.raises(ValueError, match=r"`max_grad_norm` must be a number") as error:
            clip_config({"max_grad_norm": value, "clip_strategy": "norm"})
        assert not isinstance(error.value, TypeError) or isinstance(error.value, OptionError)
    Merged = pydantic.create_model("Merged", __base__=GradClipArgs, max_grad_norm=(object, None))  # no type check first
    with pytest.raises(pydantic.ValidationError, match=r"`max_grad_norm` must be a number .*got 'x'"):
        Merged(max_grad_norm="x")


# ---------------------------------------------------------------- 6. suggestions at every entry point
def test_callback_keywords_say_the_clip_prefix_is_for_the_training_arguments():
    with pytest.raises(ValueError) as error:
        GradClipCallback(clip_strategy="zscore")
    message = str(error.value)
    assert message == ("`clip_strategy` is not an option of GradClipCallback: the `clip_` prefix is for "
                       "GradClipTrainingArguments, the command line and the Axolotl YAML; here the option is "
                       "`strategy`.")
    with pytest.raises(ValueError, match=r"`spike_actoin` is not an option of GradClipCallback; did you mean "
                                         r"`spike_action`\?"):
        GradClipCallback(spike_actoin="skip")


def test_training_arguments_suggest_the_clip_field(tmp_path):
    with pytest.raises(ValueError, match=r"`clip_stratgy` is not an option of GradClipTrainingArguments; did you mean "
                                         r"`clip_strategy`\?"):
        GradClipTrainingArguments(output_dir=str(tmp_path), clip_stratgy="zscore")
    with pytest.raises(TypeError, match=r"`strategy` is not an option .*did you mean `clip_strategy`\? \(here the "
                                        r"clipping options take the `clip_` prefix\)"):
        GradClipTrainingArguments(output_dir=str(tmp_path), strategy="zscore")  # still a TypeError too
    with pytest.raises(ValueError, match=r"did you mean `max_grad_norm`\?"):
        GradClipTrainingArguments(output_dir=str(tmp_path), max_grad_nrom=1.0)


def test_axolotl_unknown_keys_get_the_closest_key():
    assert unknown_message(["clip_stratgy", "clip_spike_actoin"]) == (
        "clip_stratgy; did you mean `clip_strategy`?; clip_spike_actoin; did you mean `clip_spike_action`?")


def test_the_parser_suggests_the_closest_flag_and_exits_with_status_2(tmp_path, capsys):
    parser = GradClipArgumentParser(GradClipTrainingArguments)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--clip_stratgy", "zscore",
                                            "--clip-spike-actoin=skip"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("error: unrecognized argument --clip_stratgy; did you mean --clip_strategy?; --clip-spike-actoin; did "
            "you mean --clip_spike_action?") in err
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "stray"])
    assert "error: unrecognized arguments: stray" in capsys.readouterr().err
    args, = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--clip_strategy", "zscore"])
    assert args.clip_strategy == "zscore"


@pytest.mark.slow
def test_a_script_with_the_parser_prints_no_traceback(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        from gradclip_hf.integrations.transformers import GradClipArgumentParser, GradClipTrainingArguments
        args, = GradClipArgumentParser(GradClipTrainingArguments).parse_args_into_dataclasses()
        print("parsed", args.clip_strategy)
    """))
    def run(*argv):
        return subprocess.run([sys.executable, str(script), "--output_dir", str(tmp_path), "--report_to", "none", *argv],
                              capture_output=True, text=True, timeout=300)
    bad = run("--clip_stratgy", "zscore")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: unrecognized argument --clip_stratgy; did you mean --clip_strategy?" in bad.stderr
    assert "usage:" in bad.stderr
    good = run("--clip_strategy", "zscore")
    assert good.returncode == 0 and "parsed zscore" in good.stdout


def test_the_parser_dict_and_json_paths_suggest_too(tmp_path):
    parser = GradClipArgumentParser(GradClipTrainingArguments)
    with pytest.raises(ValueError, match=r"unknown option clip_thresold; did you mean `clip_threshold`\?"):
        parser.parse_dict({"output_dir": str(tmp_path), "clip_thresold": 0.5})
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "report_to": "none", "clip_strategy": "zscore"}))
    args, = parser.parse_json_file(str(path))
    assert args.clip_strategy == "zscore"
    args, rest = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--mine", "1"],
                                                    return_remaining_strings=True)
    assert rest == ["--mine", "1"]  # asked for: handed back, as HfArgumentParser does
