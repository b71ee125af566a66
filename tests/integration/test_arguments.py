"""GradClipTrainingArguments / ClipConfig: flags, choices, validation."""

from __future__ import annotations

import pytest

from gradclip_hf.config import ClipConfig
from gradclip_hf.core import Cosine, ZScoreClip

transformers = pytest.importorskip("transformers")
from gradclip_hf.integrations.transformers import GradClipTrainingArguments  # noqa: E402


def parse(argv):
    parser = transformers.HfArgumentParser(GradClipTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def test_each_option_carries_its_check_in_its_field_and_the_parser_takes_clip_config_itself():
    """Issue 24.3: the check of each option is in its field's metadata (no list matched by position); argparse
    never sees it, so HfArgumentParser(ClipConfig) parses the options under their own names."""
    import dataclasses

    from gradclip_hf.config import OPTION_CHECKS
    from gradclip_hf.core import OptionError

    for f in dataclasses.fields(ClipConfig):
        assert OPTION_CHECKS[f.name] is f.metadata["check"] and "check" not in dict(f.metadata), f.name
    with pytest.raises(OptionError, match="spike_factor"):
        OPTION_CHECKS["spike_factor"]("spike_factor", 1.5)
    assert OPTION_CHECKS["strategy"]("strategy", "zscore") == "zscore"
    (config,) = transformers.HfArgumentParser(ClipConfig).parse_args_into_dataclasses(
        args=["--strategy", "zscore", "--spike_detection", "loss"])
    assert (config.strategy, config.spike_detection) == ("zscore", "loss")


def test_parser_round_trip(tmp_path):
    args = parse(["--output_dir", str(tmp_path), "--clip_strategy", "zscore", "--clip_threshold", "2.0",
                  "--clip_schedule", "cosine", "--clip_threshold_final", "0.5", "--clip_zscore_z", "3.0",
                  "--clip_exclude", "bias$", "norm", "--clip_include", "lora_", "--report_to", "none"])
    assert (args.clip_strategy, args.clip_threshold, args.clip_schedule) == ("zscore", 2.0, "cosine")
    assert args.clip_exclude == ["bias$", "norm"] and args.clip_include == ["lora_"]
    config = args.clip_config()
    assert config.zscore_z == 3.0 and config.threshold_final == 0.5
    clipper = config.build(total_steps=100)
    assert isinstance(clipper.strategy, ZScoreClip) and clipper.strategy.max_grad_norm == 2.0
    assert clipper.schedule == Cosine(start=1.0, end=0.25, total_steps=100)


def test_parser_help_and_choices(capsys):
    parser = transformers.HfArgumentParser(GradClipTrainingArguments)
    action = next(a for a in parser._actions if a.dest == "clip_strategy")
    assert set(action.choices) == {"none", "norm", "value", "agc", "zscore", "quantile"}
    assert "ZClip" in action.help
    with pytest.raises(SystemExit):
        parse(["--output_dir", "x", "--clip_strategy", "foo"])
    err = capsys.readouterr().err
    assert "clip_strategy" in err and "zscore" in err and "quantile" in err


def test_threshold_defaults_to_max_grad_norm(tmp_path):
    args = GradClipTrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.7, report_to="none")
    config = args.clip_config()
    assert config.threshold is None and config.strategy == "norm"
    assert config.resolved_threshold(args.max_grad_norm) == 0.7
    assert config.build(max_grad_norm=args.max_grad_norm).strategy.max_norm == 0.7


@pytest.mark.parametrize("options, match", [
    (dict(clip_strategy="foo"), r"`clip_strategy` must be one of .*'zscore'.*got 'foo'"),
    (dict(clip_threshold=-1.0), r"`clip_threshold` must be > 0, got -1.0"),
    (dict(clip_schedule="cosine"), r"`clip_threshold_final` must be a number > 0 when schedule='cosine'"),
    (dict(clip_schedule="warmup", clip_warmup_steps=10), r"`clip_warmup_threshold`"),
    (dict(clip_schedule="piecewise", clip_piecewise_boundaries=[5], clip_piecewise_values=[1.0]),
     r"`clip_piecewise_values` must be len\(piecewise_boundaries\) \+ 1 = 2"),
    (dict(clip_zscore_alpha=1.5), r"`clip_zscore_alpha` must be < 1, got 1.5"),
    (dict(clip_quantile=0.0), r"`clip_quantile` must be > 0"),
    (dict(clip_nonfinite="explode"), r"`clip_nonfinite` must be one of 'skip', 'zero', 'raise', 'ignore'"),
    (dict(clip_exclude=["("]), r"`clip_exclude` must be a list of valid regular expressions"),
    (dict(max_grad_norm=float("nan")), r"`max_grad_norm` must be a number \(0, negative or inf: no clipping.*got nan\. NaN"),
    (dict(max_grad_norm=0.0, clip_schedule="cosine", clip_threshold_final=0.3),
     r"`clip_threshold` must be a number > 0 with schedule 'cosine', got None. It defaults to max_grad_norm"),
])
def test_validation_errors(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        GradClipTrainingArguments(output_dir=str(tmp_path), report_to="none", **options)


def test_clip_config_errors_and_schedules():
    with pytest.raises(ValueError, match=r"`strategy` must be one of"):
        ClipConfig(strategy="nope")
    with pytest.raises(ValueError, match=r"`norm_type` must be >= 1 or inf"):
        ClipConfig(norm_type=0.5)
    with pytest.raises(ValueError, match=r"run length is unknown"):
        ClipConfig(schedule="linear", threshold_final=0.5).build(None)
    config = ClipConfig(threshold=2.0, schedule="piecewise", piecewise_boundaries=[10], piecewise_values=[2.0, 1.0])
    clipper = config.build(100)
    assert clipper.scale_at(0) == 1.0 and clipper.scale_at(10) == 0.5
    assert ClipConfig(**ClipConfig(norm_type="inf").to_dict()) == ClipConfig(norm_type=float("inf"))


GradClipSeq2SeqArgs = None  # made below with module=__name__: pickled by reference to this module


def test_with_clip_options_takes_the_module_explicitly_and_pickles_by_reference(tmp_path):
    """Issue 24.5: no stack walk; the class is defined in the module it is given (else in the pack's module)."""
    import pickle

    from gradclip_hf.core import OptionError
    from gradclip_hf.integrations.transformers import arguments, with_clip_options

    global GradClipSeq2SeqArgs
    GradClipSeq2SeqArgs = with_clip_options(transformers.Seq2SeqTrainingArguments, "GradClipSeq2SeqArgs",
                                            module=__name__)
    args = GradClipSeq2SeqArgs(output_dir=str(tmp_path), clip_strategy="zscore", report_to="none")
    assert GradClipSeq2SeqArgs.__module__ == __name__ and not hasattr(arguments, "GradClipSeq2SeqArgs")
    assert type(pickle.loads(pickle.dumps(args))) is GradClipSeq2SeqArgs
    default = with_clip_options(transformers.Seq2SeqTrainingArguments)  # lives in the pack's module
    assert default.__module__ == arguments.__name__ and arguments.GradClipSeq2SeqTrainingArguments is default
    again = with_clip_options(transformers.Seq2SeqTrainingArguments)  # a later call replaces it
    assert arguments.GradClipSeq2SeqTrainingArguments is again is not default
    with pytest.raises(OptionError, match="`name` must be a name not already used"):
        with_clip_options(transformers.TrainingArguments, "PREFIX")
    with pytest.raises(OptionError, match="`module` must be the name of the module"):
        with_clip_options(transformers.TrainingArguments, module="")
