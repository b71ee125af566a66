"""Metrics in the Trainer's logs: window aggregates, per-layer norms, spike layers, ONE host transfer
per logging step, TensorBoard read back from its event files."""

from __future__ import annotations

import glob
import math
import os
import sys

import pytest
import torch

pytest.importorskip("transformers")

from logrun import make_trainer, train_logs  # noqa: E402

from gradclip_hf.run.metrics import METRIC_KEYS  # noqa: E402

pytestmark = pytest.mark.slow  # real Trainer runs

SPIKE = dict(clip_spike_detection="loss", clip_spike_warmup_steps=5, clip_spike_ratio=1.2)


def test_window_metrics_per_layer_norms_and_spike_layers(tmp_path):
    trainer, recorder = make_trainer(tmp_path, steps=12, logging_steps=4, spike_steps=(9,), record=True,
                                     clip_log_layers_top_k=3, clip_log_layer_patterns=[r"layers\.0\.mlp\.up_proj"],
                                     **SPIKE)
    trainer.train()
    steps = recorder.steps
    assert [s for s, r in steps.items() if r["spike"]] == [9]
    logs = train_logs(trainer)
    assert [h["step"] for h in logs] == [4, 8, 12]
    kept = set()
    for h in logs:
        window = [steps[s] for s in range(h["step"] - 4, h["step"])]
        last = window[-1]
        assert set(METRIC_KEYS) <= set(h)
        assert h["grad_norm"] == pytest.approx(last["norm"], rel=1e-5)
        assert h["gradclip/norm_max"] == pytest.approx(max(r["norm"] for r in window), rel=1e-5)
        assert h["gradclip/norm_mean"] == pytest.approx(sum(r["norm"] for r in window) / 4, rel=1e-5)
        assert h["gradclip/norm_post"] == pytest.approx(last["norm_post"], rel=1e-5)
        assert h["gradclip/threshold"] == pytest.approx(last["threshold"], rel=1e-5)
        assert h["gradclip/coef"] == pytest.approx(last["coef"], rel=1e-5)
        assert h["gradclip/clip_rate"] == pytest.approx(sum(r["clipped"] for r in window) / 4)
        assert h["gradclip/spikes"] == sum(r["spike"] for r in window)
        assert h["gradclip/spike_factor"] == pytest.approx(last["scale"], rel=1e-5)
        assert h["gradclip/nonfinite_steps"] == 0 and h["gradclip/skipped_steps"] == 0
        # per-layer: the 3 largest of the last step, those among the 3 largest at an earlier logging step (each
        # series goes on once it started), plus the pattern's layer; every value the last step's norm
        norms = dict(zip(last["names"], last["per_tensor"]))
        top3 = sorted(norms, key=norms.get, reverse=True)[:3]
        layer = {k[len("gradclip/layer/"):]: v for k, v in h.items() if k.startswith("gradclip/layer/")}
        assert set(layer) == set(top3) | kept | {"model.layers.0.mlp.up_proj.weight"}
        kept |= set(top3)
        for name, value in layer.items():
            assert value == pytest.approx(norms[name], rel=1e-5)
    assert len(kept) > 3  # the top 3 changed over the run: without the kept ones the series would have gaps
    # the spike window names the layers of the spike step (9), not of the window's last step (11)
    spiky = logs[2]
    spike_norms = dict(zip(steps[9]["names"], steps[9]["per_tensor"]))
    spike_layers = {k[len("gradclip/spike_layer/"):]: v for k, v in spiky.items()
                    if k.startswith("gradclip/spike_layer/")}
    assert set(spike_layers) == set(sorted(spike_norms, key=spike_norms.get, reverse=True)[:3])
    for name, value in spike_layers.items():
        assert value == pytest.approx(spike_norms[name], rel=1e-5)
    assert not any(k.startswith("gradclip/spike_layer/") for h in logs[:2] for k in h)


def test_layer_logging_off(tmp_path):
    trainer, _ = make_trainer(tmp_path, steps=4, logging_steps=2, clip_log_layers_top_k=0)
    trainer.train()
    assert all(not any("/layer/" in k for k in h) for h in train_logs(trainer))


# (options, optimizer) -> whether a flag is read at every step: only rollback/stop, and skips on optimizers that
# cannot take the decision as a device tensor (non-fused)
READ_CASES = [
    (dict(clip_nonfinite="zero", **SPIKE), "adamw_torch", False),
    (dict(clip_nonfinite="zero", **SPIKE), "adamw_torch_fused", False),
    (dict(SPIKE), "adamw_torch_fused", False),  # nonfinite="skip" (the default) + tighten
    (dict(clip_spike_action="skip", **SPIKE), "adamw_torch_fused", False),  # the recommended actions
    (dict(clip_spike_action="skip", **SPIKE), "adamw_torch", True),
    (dict(SPIKE), "adamw_torch", True),  # nonfinite="skip" on a non-fused optimizer
    (dict(clip_spike_action="rollback", **SPIKE), "adamw_torch_fused", True),
    (dict(clip_spike_action="stop", **SPIKE), "adamw_torch", True),
    (dict(clip_spike_action="stop", **SPIKE), "adamw_torch_fused", True),
]


@pytest.mark.parametrize("options, optim, per_step", READ_CASES,
                         ids=[f"{o.get('clip_spike_action', 'tighten')}-{o.get('clip_nonfinite', 'skip')}-{opt}"
                              for o, opt, _ in READ_CASES])
def test_host_reads_per_step_and_per_logging_step(tmp_path, monkeypatch, options, optim, per_step):
    """Every device-to-host read made by gradclip_hf code during training, counted: one transfer per logging
    step (plus one spike-event read in a window with a spike, for its message); between logging steps none,
    or exactly one stacked read per step where the configuration needs the decision on the host."""
    reads = []
    trainer, _ = make_trainer(tmp_path, steps=12, logging_steps=4, spike_steps=(9,), clip_log_layers_top_k=4,
                              optim=optim, **options)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def method(self, *a, **kw):
            filename = sys._getframe(1).f_code.co_filename
            if "gradclip_hf" in filename:
                reads.append((trainer.state.global_step, name, filename.rsplit("/", 1)[-1]))
            return original(self, *a, **kw)
        return method

    for name in ("tolist", "item", "__bool__", "__float__", "__int__", "numpy", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    trainer.train()
    monkeypatch.undo()
    logs = train_logs(trainer)
    steps_done = trainer.state.global_step
    per_step_reads = [r for r in reads if r[2] == "actions.py"]
    other = [r for r in reads if r[2] != "actions.py"]
    assert len(per_step_reads) == (steps_done if per_step else 0), per_step_reads
    ends = 1 if logs[-1]["step"] < steps_done else 0  # a last window not logged: its counters read at train end
    spike_reads = 1  # the spike's events, for its message: at the logging step of its window, or at train end
    assert len(other) == len(logs) + spike_reads + ends, other
    assert [e.step for e in trainer.clip_run.spike_events] == [10]
    assert {step for step, *_ in other} <= {h["step"] for h in logs} | {steps_done}


def test_tensorboard_event_files_hold_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # 5.x; 4.57 writes to output_dir/runs/...
    trainer, _ = make_trainer(tmp_path, steps=6, logging_steps=2, report_to=["tensorboard"],
                              clip_log_layers_top_k=2)
    trainer.train()
    files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for key in METRIC_KEYS:
        if key not in ("gradclip/spikes", "gradclip/spike_factor"):  # spike controller off here
            assert f"train/{key}" in tags, (key, sorted(tags))
    assert len([t for t in tags if t.startswith("train/gradclip/layer/")]) >= 2
    logs = {h["step"]: h for h in train_logs(trainer)}
    for tag in ("train/gradclip/threshold", "train/grad_norm", "train/gradclip/norm_max", "train/gradclip/clip_rate"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [2, 4, 6]
        for e in events:
            assert e.value == pytest.approx(logs[e.step][tag[len("train/"):]], rel=1e-5)
    assert all(math.isclose(e.value, 1.0, rel_tol=1e-6) for e in acc.Scalars("train/gradclip/threshold"))
