"""Real W&B in offline mode with a real tiny Trainer run; the run's records read back with wandb's own reader
(``wandb leet inspect --json``): history keys and values, the histogram, the spike table, alerts, metric
definitions, the end-of-run chart; the run's summary; the ``wandb leet`` terminal UI drawing the charts.
Plus: no wandb import at module load, the pack without wandb installed, and ``create_workspace`` against the
real ``wandb-workspaces`` library with its network save replaced."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import types

import pytest

pytest.importorskip("transformers")
wandb = pytest.importorskip("wandb")

from logrun import make_trainer, train_logs  # noqa: E402
from wandb_records import read_run, run_dir, summary, wandb_cli  # noqa: E402

from gradclip_hf.run.metrics import METRIC_KEYS  # noqa: E402
from gradclip_hf.integrations.wandb import WandbReporter, create_workspace, panel_layout  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    """One offline W&B run of a real 12-step Trainer with a loss spike at the 10th step."""
    root = tmp_path_factory.mktemp("wandb_offline")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
                               WANDB_PROJECT="gradclip-test", WANDB_CONSOLE="off").items():
            patch.setenv(key, value)
        wandb.teardown()
        trainer, _ = make_trainer(root, steps=12, logging_steps=4, spike_steps=(9,), report_to=["wandb"],
                                  clip_spike_detection="loss", clip_spike_warmup_steps=5, clip_spike_ratio=1.2,
                                  clip_log_layers_top_k=3, clip_wandb_histogram_every=2)
        try:
            trainer.train()
        finally:
            wandb.finish()
            wandb.teardown()
    return root, trainer


@pytest.mark.slow
def test_offline_run_records_metrics_histogram_table_alerts_chart(offline_run):
    root, trainer = offline_run
    reporter = trainer.clip_session.wandb.reporter
    run = read_run(root)
    assert run["kinds"]["exit"] == 1
    logs = {h["step"]: h for h in train_logs(trainer)}
    assert sorted(logs) == [4, 8, 12] and logs[12]["gradclip/spikes"] == 1

    scalar_rows = {r["train/global_step"]: r for r in run["history"] if "train/gradclip/threshold" in r}
    assert sorted(scalar_rows) == [4, 8, 12]
    seen: set = set()
    for step, row in sorted(scalar_rows.items()):
        for key in METRIC_KEYS:
            assert row[f"train/{key}"] == pytest.approx(logs[step][key], rel=1e-6), key
        layers = {k for k in row if k.startswith("train/gradclip/layer/")}
        assert 3 <= len(layers) <= 12 and seen <= layers  # the top 3, and every series that started goes on
        seen = layers
    assert any(k.startswith("train/gradclip/spike_layer/") for k in scalar_rows[12])

    histograms = [r for r in run["history"] if r.get("gradclip/layer_norms._type") == "histogram"]
    assert [r["train/global_step"] for r in histograms] == [4, 12]  # every 2nd logging step
    n_layers = len(trainer.clip_run.last_layer_norms)
    assert sum(histograms[-1]["gradclip/layer_norms.values"]) == n_layers

    tables = [r for r in run["history"] if r.get("gradclip/spike_events._type") == "table-file"]
    assert len(tables) == 1 and tables[0]["gradclip/spike_events.nrows"] == 1
    assert tables[0]["train/global_step"] == 12

    charts = [r for r in run["history"] if any(k.startswith("gradclip/norms_over_run") for k in r)]
    assert len(charts) == 1 and reporter.logged["charts"] == 1

    assert [a["level"] for a in run["alerts"]] == ["WARN"]
    # the spike injected into the batch of the 10th optimizer step is named as train/global_step names it
    assert run["alerts"][0]["text"].startswith("step 10: loss spike, loss ")
    assert run["alerts"][0]["title"] == "gradclip: 1 spike at step 10 (tighten)"

    globs = {m["glob_name"]: m["step_metric"] for m in run["metrics"] if m.get("glob_name")}
    assert globs.get("gradclip/*") == "train/global_step"
    assert globs.get("train/gradclip/*") == "train/global_step"


@pytest.mark.slow
def test_the_run_summary_keeps_the_worst_norm(offline_run):
    root, trainer = offline_run
    state = summary(run_dir(root))
    assert state["state"] == "finished" and state["project"] == "gradclip-test"
    logs = train_logs(trainer)
    worst, last = max(h["gradclip/norm_max"] for h in logs), logs[-1]["gradclip/norm_max"]
    assert worst != last  # so the summary below is the max, not the last value
    assert state["summary"]["train/gradclip/norm_max"] == {"max": pytest.approx(worst, rel=1e-6)}  # summary="max"
    assert state["summary"]["train/grad_norm"] == pytest.approx(logs[-1]["grad_norm"], rel=1e-6)


def _strip(raw: bytes) -> str:
    return re.sub(rb"\x1b\[[0-9;?<>]*[A-Za-z~]|\x1b\][^\x07]*\x07|\x1b[()][AB0]", b"", raw).decode("utf-8", "replace")


def _terminal_screen(args, ready, keys=(), done=None, timeout=20.0):
    """Run ``args`` in a pseudo-terminal (200x60) until ``ready(text)``, type ``keys``, read until
    ``done(text)``, quit with ``q``; the text drawn, terminal escape sequences removed."""
    import fcntl
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: the terminal UI
        os.environ.update(TERM="xterm-256color", COLUMNS="200", LINES="60")
        os.execvp(args[0], args)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 200, 0, 0))
    out = b""

    def read_until(predicate, seconds):
        nonlocal out
        end = time.monotonic() + seconds
        while time.monotonic() < end and not predicate(_strip(out)):
            if select.select([fd], [], [], 0.1)[0]:
                try:
                    out += os.read(fd, 65536)
                except OSError:
                    return

    try:
        read_until(ready, timeout)
        for key in keys:
            os.write(fd, key)
            read_until(lambda text: False, 0.3)
        read_until(done or ready, timeout)
        os.write(fd, b"q")
    finally:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
    return _strip(out)


@pytest.mark.slow
def test_wandb_leet_draws_the_gradient_norm_chart(offline_run):
    """`wandb leet <run-dir>` (docs/wandb.md) is a terminal UI: run it in a pseudo-terminal and read its first
    screen (a chart per metric against train/global_step), then filter the charts with `/norm`. (The UI redraws
    only the cells that change, so only the first screen holds whole chart titles.)"""
    if subprocess.run([wandb_cli(), "leet", "--help"], capture_output=True).returncode != 0:
        pytest.skip("this wandb has no `wandb leet` (wandb >= 0.31)")
    root, _ = offline_run
    x_axis = re.compile(r"\b4\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+12\b")  # train/global_step 4..12, not _step 0..6
    filtered = re.compile(r'"norm" \[\d+/\d+\]')
    screen = _terminal_screen([wandb_cli(), "leet", run_dir(root)],
                              ready=lambda t: "train/grad_norm" in t and x_axis.search(t) is not None,
                              keys=(b"/", b"norm", b"\r"), done=lambda t: filtered.search(t) is not None)
    assert "State: Finished" in screen and re.search(r"Metrics \[1-\d+ of \d+\]", screen)
    assert "train/grad_norm" in screen and x_axis.search(screen)
    assert filtered.search(screen)


@pytest.fixture(scope="module")
def burst_run(tmp_path_factory):
    """An offline W&B run with a burst of 5 bad batches (train/global_step 10-14) read in two logging windows."""
    root = tmp_path_factory.mktemp("wandb_burst")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in dict(WANDB_MODE="offline", WANDB_DIR=str(root), WANDB_SILENT="true",
                               WANDB_PROJECT="gradclip-test", WANDB_CONSOLE="off").items():
            patch.setenv(key, value)
        wandb.teardown()
        trainer, _ = make_trainer(root, steps=20, logging_steps=4, spike_steps=tuple(range(9, 14)),
                                  report_to=["wandb"], clip_spike_detection="loss", clip_spike_action="skip",
                                  clip_spike_warmup_steps=5, clip_spike_ratio=1.2, clip_log_layers_top_k=3)
        try:
            trainer.train()
        finally:
            wandb.finish()
            wandb.teardown()
    return root, trainer


@pytest.mark.slow
def test_a_burst_is_one_alert_line_per_run_and_every_table_row_names_its_layers(burst_run):
    import json

    root, trainer = burst_run
    assert [e.step for e in trainer.clip_run.spike_events] == [10, 11, 12, 13, 14]
    run = read_run(root)
    # one alert per logging step at most (the second waits for train end: 5 minutes between alerts), each one
    # line per run of consecutive spike steps
    assert [a["title"] for a in run["alerts"]] == ["gradclip: 3 spikes at steps 10-12 (skip)",
                                                   "gradclip: 2 spikes at steps 13-14 (skip)"]
    for alert in run["alerts"]:
        assert len(alert["text"].splitlines()) == 1 and alert["text"].endswith("; updates skipped")
    tables = [r for r in run["history"] if r.get("gradclip/spike_events._type") == "table-file"]
    path = os.path.join(run_dir(root), "files", tables[-1]["gradclip/spike_events.path"])
    with open(path) as f:
        table = json.load(f)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    records = {r["step"]: r for r in trainer.clip_run.recorder.records}
    assert [r["step"] for r in rows] == [10, 11, 12, 13, 14]
    for row in rows:  # every row, not only the last of each window
        top = records[row["step"]]["top_layers"]
        assert row["top_layers"] == ", ".join(f"{name}={value:.3g}" for name, value in top) and len(top) == 3


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
    assert not any("*" in key for key in keys)  # a W&B metric name is literal: globs go through "regex"


def test_create_workspace_builds_the_sections_and_panels_of_the_layout(monkeypatch):
    workspaces = pytest.importorskip("wandb_workspaces.workspaces")
    saved = []

    def fake_save(self):  # the network save replaced; the library's own conversion to its wire model still runs
        saved.append(self._to_model().model_dump(by_alias=True, exclude_none=True, mode="json"))
        return self

    monkeypatch.setattr(workspaces.Workspace, "save", fake_save)
    workspace = create_workspace("my-team", "my-project")
    assert len(saved) == 1 and (workspace.entity, workspace.project, workspace.name) == ("my-team", "my-project",
                                                                                         "gradclip")
    assert workspace.settings.x_axis == "train/global_step"
    [section] = workspace.sections
    assert section.name == "gradclip" and section.is_open
    lines = [p for p in panel_layout()[0]["panels"] if p["type"] == "line"]
    assert [p.title for p in section.panels] == [p["title"] for p in lines]
    for panel, planned in zip(section.panels, lines):
        assert type(panel).__name__ == "LinePlot" and panel.x == "train/global_step"
        assert panel.y == planned["y"] and bool(panel.log_y) == planned.get("log_y", False)
    layers = section.panels[-1]
    assert layers.y == [] and layers.metric_regex == "^train/gradclip/layer/" and layers.log_y
    wire = [p["config"] for p in saved[0]["spec"]["section"]["panelBankConfig"]["sections"][0]["panels"]]
    assert wire[0]["metrics"][0] == "train/grad_norm" and wire[0]["yLogScale"] is True
    assert all(c["xAxis"] == "train/global_step" for c in wire)
    assert wire[-1]["useMetricRegex"] is True
    explicit = create_workspace("my-team", "my-project", layer_keys=["train/gradclip/layer/lm_head.weight"])
    last = explicit.sections[0].panels[-1]
    assert last.y == ["train/gradclip/layer/lm_head.weight"] and last.metric_regex is None


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
assert trainer.clip_run.last_metrics["grad_norm"] > 0
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
