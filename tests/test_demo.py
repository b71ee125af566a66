"""`gradclip-hf demo` end to end (tiny settings): report, charts, TensorBoard, offline W&B, spike detected."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from gradclip_hf import demo  # noqa: E402
from gradclip_hf.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_writes_report_charts_logs_and_detects_the_injected_spike(tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("matplotlib")
    out = tmp_path / "demo_output"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": ROOT}
    for key in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_DISABLED", "TENSORBOARD_LOGGING_DIR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "gradclip_hf", "demo", "--steps", "60", "--injections", "1",
                           "--output-dir", str(out), "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    injections = demo.injection_steps(60, 1)
    assert injections == [36]  # well after the detector's 20-step warmup, once the loss has settled
    # the summary table in the terminal
    for text in ("Summary", "final eval loss", "worst loss after injection", "steps to recover", "clip rate",
                 "spikes detected", "skipped steps", "no clipping", "stock max_grad_norm=1.0",
                 "gradclip-hf recommended", "report.md", "wandb sync "):
        assert text in stdout, text
    # report and charts
    report = (out / "report.md").read_text()
    assert "| method | final eval loss |" in report and "gradclip-hf recommended" in report
    assert "stock max_grad_norm=1.0" in report and "no clipping" in report
    for png in ("loss.png", "norms.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # TensorBoard event files, one folder per method
    for method in ("none", "stock", "gradclip"):
        assert glob.glob(str(out / "tensorboard" / method / "events.out.tfevents.*")), method
    # three offline W&B runs under the output folder, and the sync commands name them
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 3
    assert all(glob.glob(os.path.join(r, "run-*.wandb")) for r in runs)
    for r in runs:
        assert os.path.basename(r) in stdout
    # the pack's run caught the injection (and only it) and skipped that update
    result = json.loads((out / "results.json").read_text())
    assert result["injections"] == injections
    pack = next(r for r in result["runs"] if r["key"] == "gradclip")
    assert pack["spikes_detected"] == injections
    assert pack["skipped_steps"] == 1 and pack["steps_done"] == 60
    stock = next(r for r in result["runs"] if r["key"] == "stock")
    assert stock["spikes_detected"] is None and 0.0 <= stock["clip_rate"] <= 1.0
    for r in result["runs"]:
        assert r["final_eval_loss"] == pytest.approx(r["final_eval_loss"])  # finite, not NaN


def test_cuda_asked_without_cuda_is_a_clear_error(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--device", "cuda"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "CUDA is not available" in err and "--device cpu" in err


def test_options_are_validated(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--model-size", "huge"])
    assert "tiny" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--strategy", "foo"])
    assert "recommended" in capsys.readouterr().err


def test_injections_come_after_the_spike_warmup():
    assert demo.injection_steps(300, 3) == [90, 165, 240] and demo.injection_steps(60, 1) == [36]
    assert all(s >= demo.SPIKE_WARMUP + 10 for n in (40, 60, 100, 1000) for s in demo.injection_steps(n, 3))
    assert demo.injection_steps(10, 1) == [] and demo.injection_steps(300, 0) == []


def test_spike_metrics():
    loss = [3.0] * 10 + [8.0] + [3.6, 3.3, 3.1, 3.0] + [3.0] * 5
    m = demo.spike_metrics(loss, [10], window=8)
    assert m["worst_loss"] == pytest.approx(3.6) and m["recover_steps"] == 3
    assert demo.spike_metrics([3.0] * 10 + [8.0] + [4.0] * 9, [10], window=8)["recover_steps"] is None


@pytest.mark.slow
def test_console_script_and_module_help():
    script = os.path.join(os.path.dirname(sys.executable), "gradclip-hf")
    commands = [[sys.executable, "-m", "gradclip_hf", "demo", "--help"]]
    if os.path.exists(script):
        commands.append([script, "demo", "--help"])
    for command in commands:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": ROOT})
        assert proc.returncode == 0, proc.stderr
        for flag in ("--steps", "--model-size", "--strategy", "--device", "--output-dir", "--seed", "--no-wandb"):
            assert flag in proc.stdout, flag
