"""`gradclip-hf demo` end to end (tiny settings) and its pieces: options, warmup warning, report wording."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from gradclip_hf import demo  # noqa: E402
from gradclip_hf.cli import main  # noqa: E402
from gradclip_hf.config import ClipConfig  # noqa: E402
from gradclip_hf.demo import report  # noqa: E402
from gradclip_hf.demo.scenarios import SCENARIOS as GALLERY  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": ROOT, **extra}
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_DISABLED", "TENSORBOARD_LOGGING_DIR"):
        env.pop(key, None)
    return env


@pytest.mark.slow
def test_demo_writes_report_charts_logs_and_measures_damage(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo_output"
    proc = subprocess.run([sys.executable, "-m", "gradclip_hf", "demo", "--steps", "120", "--output-dir", str(out),
                           "--no-progress"], cwd=tmp_path, env=_env(WANDB_MODE="offline"), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    fault_steps = GALLERY["corrupt_shard"].fault_steps(120)  # the default fault: 30 batches from half-way
    assert fault_steps == list(range(60, 90)) and "warning" not in proc.stderr
    for text in ("Summary", "eval loss without fault", "with fault", "damage", "worst excursion", "steps clipped",
                 "spikes flagged", "updates skipped", "no clipping", "stock max_grad_norm=1.0",
                 "gradclip-hf recommended", "of the stock run's damage", "report.md", "wandb sync "):
        assert text in stdout, text
    assert "one per optimizer step" not in stdout
    assert (out / "report.md").read_text().count("| gradclip-hf recommended |") == 1
    for png in ("loss.png", "norms.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    for method in ("none", "stock", "gradclip"):  # TensorBoard: one folder per method and run
        for kind in ("with_fault", "clean"):
            assert glob.glob(str(out / "tensorboard" / method / kind / "events.out.tfevents.*")), (method, kind)
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))  # six offline W&B runs, named in the output
    assert len(runs) == 6 and all(os.path.basename(r) in stdout for r in runs)
    result = json.loads((out / "results.json").read_text())
    pack = [r for r in result["runs"] if r["key"] == "gradclip"]
    assert [r["faulted"] for r in pack] == [True, False]
    assert pack[0]["spike_steps"] == fault_steps and pack[0]["skipped_steps"] == fault_steps  # caught, only them
    assert pack[1]["spike_steps"] == [] and pack[1]["skipped_steps"] == []  # no false positive without the fault
    rows = {r["key"]: r for r in result["summary"]["rows"]}
    assert all(math.isfinite(r["damage"]) for r in rows.values())  # (at 120 steps, which is smaller is seed noise)
    assert result["summary"]["removed"] == pytest.approx(1 - rows["gradclip"]["damage"] / rows["stock"]["damage"])


@pytest.mark.slow
def test_no_wandb_prints_no_wandb_line_and_short_runs_warn(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "gradclip_hf", "demo", "--steps", "20", "--output-dir",
                           str(tmp_path / "o"), "--no-progress", "--no-wandb"], cwd=tmp_path,
                          env=_env(WANDB_MODE="offline"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "WANDB" not in text and "W&B" not in text and "wandb sync" not in text
    assert not (tmp_path / "o" / "wandb").exists()
    assert "within the pack's 20-step detector warmup" in proc.stderr and "Use --steps 80 or more" in proc.stderr


def test_warmup_note_only_when_the_first_fault_is_too_early():
    config, sc = ClipConfig.recommended(), GALLERY["garbage_batches"]
    assert demo.warmup_note(config, sc, 300) is None
    note = demo.warmup_note(config, sc, 80)
    assert "step 32" in note and "--steps 100" in note  # the first fault at 0.4 x steps: (20 + 20) / 0.4
    zscore = demo.warmup_note(ClipConfig.recommended(strategy="zscore"), sc, 80)
    assert "--steps 113" in zscore  # ZClip's 25-step warmup: (25 + 20) / 0.4    assert demo.warmup_note(ClipConfig(strategy="norm"), sc, 80) is None  # no detector, nothing to warn about


def test_cuda_asked_without_cuda_is_a_clear_error(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err and "--device cpu" in err


@pytest.mark.parametrize("argv, expected", [(["--model-size", "huge"], "tiny"), (["--strategy", "foo"], "recommended"),
                                            (["--scenario", "foo"], "garbage_batches"), (["--steps", "3"], "--steps"),
                                            (["--threshold", "0"], "--threshold")])
def test_options_are_validated(capsys, argv, expected):
    with pytest.raises(SystemExit):
        main(["demo", *argv])
    assert expected in capsys.readouterr().err


def test_help_is_plain_text(capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--scenario", "--steps", "--model-size", "--strategy", "--device", "--output-dir", "--seed", "--no-wandb"):
        assert flag in text, flag
    for markup in ("``", ":class:", ":meth:", ":func:"):
        assert markup not in text, markup


def _run(key, label, faulted, loss, clip_rate=0.2, spikes=None, skipped=None):
    return {"key": key, "label": label, "faulted": faulted, "eval_loss": loss, "fault_steps": [3] if faulted else [],
            "series": {"loss": [2.0] * 10}, "steps_done": 10, "clip_rate": clip_rate, "spike_steps": spikes,
            "skipped_steps": skipped}


def test_summary_damage_and_wording():
    runs = [_run("none", "no clipping", True, 2.5, 0.0), _run("none", "no clipping", False, 2.2, 0.0),
            _run("stock", "stock", True, 2.3), _run("stock", "stock", False, 2.2),
            _run("gradclip", "pack", True, 2.21, 0.3, [3], [3]), _run("gradclip", "pack", False, 2.2, 0.1, [], [])]
    result = {"runs": runs, "fault_steps": [3]}
    result["summary"] = report.summary(result)
    assert result["summary"]["removed"] == pytest.approx(0.9)
    assert "pack removed 90% of the stock run's damage" in report.verdict(result)
    text = report.table_text(result)
    assert "3 of 10 (30%)" in text and "1 (1 of 1 fault steps)" in text and "- (no detector)" in text
    assert report.steps_text([150, 151, 152]) == "150-152" and report.steps_text([1, 5]) == "1, 5"
    assert math.isnan(report.summary({"runs": [r for r in runs if r["key"] != "stock"] + [
        _run("stock", "stock", True, 2.2), _run("stock", "stock", False, 2.2)], "fault_steps": [3]})["removed"])
