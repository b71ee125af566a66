"""Real W&B in offline mode with a real tiny Trainer run; the run's records read back from its
``.wandb`` file: history keys and values, the histogram, the spike table, alerts, metric definitions,
the end-of-run chart. Plus: no wandb import at module load, and the pack without wandb installed."""

from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

pytest.importorskip("transformers")
wandb = pytest.importorskip("wandb")

from logrun import make_trainer, train_logs  # noqa: E402
from wandb_records import read_run  # noqa: E402

from gradclip_hf.integrations.transformers.metrics import METRIC_KEYS  # noqa: E402
from gradclip_hf.integrations.wandb import WandbReporter, panel_layout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
                           WANDB_PROJECT="gradclip-test", WANDB_CONSOLE="off").items():
        monkeypatch.setenv(key, value)
    wandb.teardown()
    yield tmp_path
    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


@pytest.mark.slow
def test_offline_run_records_metrics_histogram_table_alerts_chart(offline_wandb):
    trainer, _ = make_trainer(offline_wandb, steps=12, logging_steps=4, spike_steps=(9,), report_to=["wandb"],
                              clip_spike_detection="loss", clip_spike_warmup_steps=5, clip_spike_ratio=1.2,
                              clip_log_layers_top_k=3, clip_wandb_histogram_every=2)
    trainer.train()
    reporter = trainer.clip_session.wandb.reporter
    wandb.finish()
    run = read_run(offline_wandb)
    logs = {h["step"]: h for h in train_logs(trainer)}
    assert sorted(logs) == [4, 8, 12] and logs[12]["gradclip/spikes"] == 1

    scalar_rows = {r["train/global_step"]: r for r in run["history"] if "train/gradclip/threshold" in r}
    assert sorted(scalar_rows) == [4, 8, 12]
    for step, row in scalar_rows.items():
        for key in METRIC_KEYS:
            assert row[f"train/{key}"] == pytest.approx(logs[step][key], rel=1e-6), key
        layers = [k for k in row if k.startswith("train/gradclip/layer/")]
        assert len(layers) == 3
    assert any(k.startswith("train/gradclip/spike_layer/") for k in scalar_rows[12])

    histograms = [r for r in run["history"] if r.get("gradclip/layer_norms/_type") == "histogram"]
    assert [r["train/global_step"] for r in histograms] == [4, 12]  # every 2nd logging step
    n_layers = len(trainer.clip_run.last_layer_norms)
    assert sum(histograms[-1]["gradclip/layer_norms/values"]) == n_layers

    tables = [r for r in run["history"] if r.get("gradclip/spike_events/_type") == "table-file"]
    assert len(tables) == 1 and tables[0]["gradclip/spike_events/nrows"] == 1
    assert tables[0]["train/global_step"] == 12

    charts = [r for r in run["history"] if any(k.startswith("gradclip/norms_over_run") for k in r)]
    assert len(charts) == 1 and reporter.logged["charts"] == 1

    assert [a.level for a in run["alerts"]] == ["WARN"]
    # the spike injected into the batch of the 10th optimizer step is named as train/global_step names it
    assert "step 10: loss" in run["alerts"][0].text and "1 spike (tighten)" in run["alerts"][0].title

    globs = {m.glob_name: m.step_metric for m in run["metrics"] if m.glob_name}
    assert globs.get("gradclip/*") == "train/global_step"
    assert globs.get("train/gradclip/*") == "train/global_step"


class FakeRun:
    def __init__(self):
        self.rows, self.alerts, self.defined = [], [], []

    def log(self, data):
        self.rows.append(data)

    def alert(self, **kw):
        self.alerts.append(kw)

    def define_metric(self, *a, **kw):
        self.defined.append((a, kw))


def event(step):
    from gradclip_hf.core import SpikeEvent
    return SpikeEvent(step=step, loss=8.0, loss_baseline=4.0, loss_z=7.0, norm=3.0, norm_baseline=1.0, norm_z=2.0,
                      factor_before=1.0, factor_after=0.5, loss_spike=True, norm_spike=False)


def test_alerts_are_rate_limited_and_stops_alert_once():
    run, reporter = FakeRun(), WandbReporter(histogram_every=0, alert_interval_s=3600)
    metrics = {"grad_norm": 2.0, "gradclip/threshold": 1.0}
    events = [event(3)]
    reporter.log_step(run, 4, metrics, events=events)
    events += [event(5), event(6)]
    reporter.log_step(run, 8, metrics, events=events)       # within the interval: held back
    assert len(run.alerts) == 1
    reporter.log_step(run, 9, {}, events=events, stop_reason="stopped: spike")
    reporter.log_step(run, 9, {}, events=events, stop_reason="stopped: spike")
    reporter.finish(run, 9, stop_reason="stopped: spike")  # pending spikes flushed in one alert
    assert [a["level"] for a in run.alerts] == ["WARN", "ERROR", "WARN"]
    assert "2 spikes" in run.alerts[2]["title"]
    tables = [r["gradclip/spike_events"] for r in run.rows if "gradclip/spike_events" in r]
    assert len(tables[-1].data) == 3
    assert WandbReporter(alerts=False).alerts is False


def test_panel_layout_covers_every_metric_key():
    layout = panel_layout()
    keys = {y for section in layout for panel in section["panels"] for y in panel["y"]}
    assert {f"train/{k}" for k in METRIC_KEYS} <= keys
    assert layout[0]["name"] == "gradclip"


@pytest.mark.slow
def test_no_wandb_import_at_module_load_and_works_without_wandb(tmp_path):
    code = r"""
import sys
sys.modules["wandb"] = None  # as if not installed: `import wandb` raises, find_spec("wandb") is None
import gradclip_hf, gradclip_hf.integrations.wandb as gw, gradclip_hf.integrations.transformers
assert sys.modules["wandb"] is None
assert gw.wandb_run(["wandb"]) is None and gw.panel_layout()
sys.path.insert(0, "tests/logging")
import pathlib
from logrun import make_trainer
trainer, _ = make_trainer(pathlib.Path(sys.argv[1]), steps=2, logging_steps=1)
trainer.train()
assert sys.modules["wandb"] is None
assert trainer.clip_run.log_history
print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "WANDB_MODE": "disabled"}, timeout=120)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_reporter_is_built_only_for_report_to_wandb():
    from gradclip_hf.config import ClipConfig
    from gradclip_hf.integrations.transformers.wandb_glue import WandbGlue

    run = types.SimpleNamespace(config=ClipConfig(), ship_layers=False)
    assert WandbGlue.create(types.SimpleNamespace(report_to=["tensorboard"]), run) is None
    glue = WandbGlue.create(types.SimpleNamespace(report_to=["wandb"]), run)
    assert isinstance(glue.reporter, WandbReporter) and run.ship_layers  # every layer's norm, for the histogram
