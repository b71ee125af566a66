"""TRL: the clip options on ``SFTConfig`` (``with_clip_options``), parsed by ``TrlParser`` from the command line
and from a ``--config`` YAML file, and ``SFTTrainer`` + LoRA with the pack as a mixin and as a callback."""

from __future__ import annotations

import argparse
import pickle

import pytest
import torch
import yaml

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from byte_tokenizer import byte_tokenizer  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer, TrlParser  # noqa: E402

from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.standins import stdlib_text, tiny_llama  # noqa: E402
from gradclip_hf.integrations.transformers import GradClipCallback, GradClipMixin, with_clip_options  # noqa: E402

GradClipSFTConfig = with_clip_options(SFTConfig)  # module level: training_args.bin pickles it by reference


class GradClipSFTTrainer(GradClipMixin, SFTTrainer):
    pass


CPU = ["--use_cpu", "True", "--bf16", "False"]  # SFTConfig defaults to bf16=True


def parse(argv):
    return TrlParser((GradClipSFTConfig,)).parse_args_and_config(argv)[0]  # a fresh parser: --config sets defaults


def test_trl_parser_reads_the_clip_options_from_the_command_line(tmp_path):
    args = parse(["--output_dir", str(tmp_path), *CPU, "--clip_strategy", "zscore", "--clip_threshold", "inf",
                  "--clip_exclude", "bias$", "norm", "--clip_spike_detection", "loss", "--clip_spike_action", "skip"])
    assert type(args) is GradClipSFTConfig and isinstance(args, SFTConfig)
    assert args.clip_config() == ClipConfig(strategy="zscore", threshold=float("inf"), exclude=["bias$", "norm"],
                                            spike_detection="loss", spike_action="skip")


def test_trl_parser_reads_them_from_a_yaml_config_and_the_command_line_wins(tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "max_steps": 3,
                                      "clip_strategy": "zscore", "clip_zscore_z": 2.0, "clip_exclude": ["bias$"],
                                      "clip_schedule": "cosine", "clip_threshold_final": 0.2}))
    args = parse(["--config", str(config), "--clip_zscore_z", "3.0"])
    assert args.max_steps == 3 and args.clip_zscore_z == 3.0  # command line over the file
    assert args.clip_config().non_default() == {"strategy": "zscore", "schedule": "cosine", "threshold_final": 0.2,
                                                "zscore_z": 3.0, "exclude": ["bias$"]}


def test_bad_values_fail_naming_the_clip_option(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path), "use_cpu": True, "bf16": False,
                                      "clip_strategy": "bogus"}))
    with pytest.raises(ValueError, match=r"`clip_strategy` must be one of 'none', 'norm'.*got 'bogus'"):
        parse(["--config", str(config)])  # a config value is a default: ClipConfig's check catches it
    with pytest.raises(ValueError, match=r"`clip_threshold` must be > 0, got -1.0"):
        parse(["--output_dir", str(tmp_path), *CPU, "--clip_threshold", "-1"])
    with pytest.raises(SystemExit):  # argparse checks the choices on the command line
        parse(["--output_dir", str(tmp_path), *CPU, "--clip_strategy", "bogus"])
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_clip_config_as_a_separate_dataclass_clashes_with_the_training_arguments():
    """Why the options get the clip_ prefix: ClipConfig's own names (warmup_steps, ...) are TrainingArguments
    names too, so the parser cannot take both dataclasses."""
    with pytest.raises(argparse.ArgumentError, match="warmup_steps"):
        TrlParser((SFTConfig, ClipConfig))


def test_the_derived_config_pickles_by_reference(tmp_path):
    args = parse(["--output_dir", str(tmp_path), *CPU, "--clip_strategy", "agc", "--clip_threshold", "0.02"])
    loaded = pickle.loads(pickle.dumps(args))
    assert type(loaded) is GradClipSFTConfig and loaded.clip_config() == args.clip_config()


def sft_data() -> Dataset:
    text = stdlib_text(40_000).encode("ascii", "ignore").decode()
    return Dataset.from_dict({"text": [text[i * 60:(i + 1) * 60] for i in range(64)]})


@pytest.mark.slow
@pytest.mark.parametrize("entry", ["mixin", "callback"])
def test_sft_trainer_with_lora(tmp_path, entry):
    args = parse(["--output_dir", str(tmp_path), *CPU, "--max_steps", "6", "--per_device_train_batch_size", "4",
                  "--learning_rate", "3e-3", "--logging_steps", "2", "--report_to", "none", "--save_strategy",
                  "steps", "--save_steps", "6", "--max_length", "64", "--max_grad_norm", "0.3",
                  "--dataloader_num_workers", "0", "--disable_tqdm", "True", "--clip_spike_detection", "loss",
                  "--clip_spike_warmup_steps", "3"])
    common = dict(model=tiny_llama(0), args=args, train_dataset=sft_data(), processing_class=byte_tokenizer(),
                  peft_config=peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                              task_type="CAUSAL_LM"))
    if entry == "mixin":
        trainer = GradClipSFTTrainer(**common)
    else:
        callback = GradClipCallback(config=args.clip_config())
        trainer = SFTTrainer(callbacks=[callback], **common)
    trainer.train()
    run = trainer.clip_run if entry == "mixin" else callback.run
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    assert all(h["gradclip/threshold"] == pytest.approx(0.3) for h in logs)  # from max_grad_norm
    assert max(h["gradclip/norm_max"] for h in logs) > 0.3  # the Trainer did not clip before the pack measured
    assert all(h["gradclip/norm_post"] <= 0.3 + 1e-6 for h in logs)
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert run.last_report.names == trainable and all("lora_" in n for n in trainable)
    assert run.clipper.spikes.state_dict()["loss_detector"]["count"] == 6  # SFTTrainer's step loss reached it
    saved = torch.load(tmp_path / "checkpoint-6" / "training_args.bin", weights_only=False)
    assert type(saved) is GradClipSFTConfig and saved.clip_config() == args.clip_config()
