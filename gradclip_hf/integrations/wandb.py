"""Weights & Biases extras for gradient clipping: metric definitions, a per-layer norm histogram,
spike alerts and a spike table, an end-of-run chart, and the recommended panel layout.

The scalar metrics themselves reach W&B through the Trainer's own ``WandbCallback`` (the pack puts
them into the dict given to ``Trainer.log``, which W&B logs as ``train/grad_norm``,
``train/gradclip/threshold``, ...). This module adds what a scalar log cannot carry. It never imports
``wandb`` at module load: every function imports it lazily and does nothing when wandb is not installed
or no run is active (``wandb.run is None``).

Keys logged here (x axis ``train/global_step``, the Trainer's step metric):

==================================  ===================================================================
``gradclip/layer_norms``            ``wandb.Histogram`` of the per-layer pre-clip norms of the last step,
                                    every ``histogram_every`` logging steps
``gradclip/spike_events``           ``wandb.Table`` of every spike so far, one row per step (step, kind,
                                    loss, z, factor, the step's top layers, the batch's indices or
                                    fingerprint and text), logged when new spikes were read
``gradclip/norms_over_run``         at train end: a line chart of pre-clip norm (last and max of each
                                    window), post-clip norm and threshold over the run
``run.alert``                       a rate-limited WARN alert for spikes (one line per run of consecutive
                                    spike steps), an ERROR alert when the pack stops training
==================================  ===================================================================
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Collection, Sequence
from typing import Any

from ..spikeruns import Flagged, describe_run, group_runs

__all__ = ["names_wandb", "STEP_METRIC", "SECTION", "WandbReporter", "panel_layout", "define_metrics", "create_workspace",
           "wandb_run", "spike_table_columns"]

STEP_METRIC = "train/global_step"  # what transformers' WandbCallback logs as the x axis
SECTION = "gradclip"
MAX_TABLE_ROWS = 1000
MAX_ALERT_RUNS = 5  # runs of spikes described in one alert


def names_wandb(report_to: Any) -> bool:
    """Whether the Trainer's ``report_to`` includes W&B (``"all"`` counts)."""
    targets = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return "wandb" in targets or "all" in targets


def wandb_run(report_to: Any = None) -> Any:
    """The active ``wandb.run``, or ``None`` (wandb not installed, not imported by a reporter, or no run).

    With ``report_to`` given (the Trainer's list), ``None`` unless ``"wandb"`` is in it (``"all"`` counts)."""
    if report_to is not None and not names_wandb(report_to):
        return None
    module = sys.modules.get("wandb")  # the Trainer's WandbCallback imported it if W&B is in use
    if module is None:
        try:
            import wandb as module  # noqa: F811
        except ImportError:
            return None
    return getattr(module, "run", None)


def define_metrics(run: Any, step_metric: str = STEP_METRIC) -> None:
    """Plot every ``gradclip/*`` and ``train/gradclip/*`` key against ``step_metric`` and give the
    window maxima a ``max`` summary (the run table then shows the worst norm of the run)."""
    run.define_metric(step_metric)
    for glob in (f"{SECTION}/*", f"train/{SECTION}/*"):
        run.define_metric(glob, step_metric=step_metric, step_sync=True)
    run.define_metric(f"train/{SECTION}/norm_max", step_metric=step_metric, summary="max")
    run.define_metric(f"train/{SECTION}/clip_rate", step_metric=step_metric, summary="mean")


def spike_table_columns() -> list[str]:
    return ["step", "kind", "loss", "loss_baseline", "loss_z", "norm", "norm_baseline", "norm_z",
            "factor_before", "factor_after", "top_layers", "batch"]


def batch_summary(record: dict | None) -> str:
    """What identifies a batch, in one cell: dataset indices per process, else the fingerprint; the text."""
    if not record or not record.get("batch"):
        return ""
    batch = record["batch"]
    where = f"indices {batch['indices']}" if batch.get("indices") else f"fingerprint {batch.get('fingerprint')}"
    text = batch.get("text")
    return where + (f": {text[:80]!r}" if text else "")


def _layers_text(pairs: Sequence[Sequence[Any]]) -> str:
    """``"lm_head.weight=3.5, ..."`` from a record's ``top_layers``."""
    return ", ".join(f"{name}={value:.3g}" if isinstance(value, (int, float)) else f"{name}=nan"
                     for name, value in pairs)


def _table_rows(events: Sequence[Any], records: Sequence[dict], spike_layers: Sequence[tuple[str, float]]) -> list:
    """Spike-table rows: each step's top layers from its record in the spike file (``spike_layers``, the
    window's last spike, for a step without one), and its batch."""
    by_step = {r["step"]: r for r in records if r.get("event") == "spike"}
    rows = []
    for event in events:
        record = by_step.get(event.step)
        top = _layers_text(record["top_layers"]) if record and record.get("top_layers") else ""
        if not top and event is events[-1]:
            top = ", ".join(f"{n}={v:.3g}" for n, v in spike_layers)
        rows.append([event.step, event.kind, _finite(event.loss), _finite(event.loss_baseline), _finite(event.loss_z),
                     _finite(event.norm), _finite(event.norm_baseline), _finite(event.norm_z), event.factor_before,
                     event.factor_after, top, batch_summary(record)])
    return rows


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


class WandbReporter:
    """Logs the extras to the active W&B run at each logging step and at train end.

    Args:
        histogram_every: log the per-layer norm histogram every this many logging steps (0: never).
        alerts: send ``run.alert`` for spikes (WARN) and stops (ERROR).
        alert_interval_s: at most one spike alert per this many seconds (the rest are summarised in
            the next one); W&B's own ``wait_duration`` is set to the same value.
        step_metric: the x axis (the Trainer's ``train/global_step``).
    """

    def __init__(self, histogram_every: int = 10, alerts: bool = True, alert_interval_s: float = 300.0,
                 step_metric: str = STEP_METRIC):
        if isinstance(histogram_every, bool) or not isinstance(histogram_every, int) or histogram_every < 0:
            raise ValueError(f"`wandb_histogram_every` must be an int >= 0, got {histogram_every!r}.")
        self.histogram_every = histogram_every
        self.alerts = bool(alerts)
        self.alert_interval_s = float(alert_interval_s)
        self.step_metric = step_metric
        self.reset()

    def reset(self) -> None:
        self._run_id: Any = None
        self._logs = 0
        self._events_seen = 0
        self._rows: list[list[Any]] = []
        self._pending_alert: list[Any] = []
        self._last_alert = -math.inf
        self._stop_alerted = False
        self.series: dict[str, list[tuple[int, float]]] = {"grad_norm": [], "norm_max": [], "norm_post": [],
                                                            "threshold": []}
        self.logged: dict[str, int] = {"histograms": 0, "tables": 0, "alerts": 0, "charts": 0}

    # ------------------------------------------------------------------ helpers
    def _ensure(self, run: Any) -> None:
        if self._run_id != id(run):
            self._run_id = id(run)
            try:
                define_metrics(run, self.step_metric)
            except Exception:  # an old wandb without step_sync/summary: the default x axis still works
                pass

    def _log(self, run: Any, step: int, data: dict[str, Any]) -> None:
        run.log({**data, self.step_metric: step})

    # ------------------------------------------------------------------ per logging step
    def log_step(self, run: Any, step: int, metrics: dict[str, float], layer_norms: dict[str, float] | None = None,
                 events: Sequence[Any] = (), spike_layers: Sequence[tuple[str, float]] = (),
                 stop_reason: str | None = None, threshold_base: Any = None, action: str = "tighten",
                 records: Sequence[dict] = (), listed: Collection[int] = ()) -> None:
        """One logging step: ``metrics`` as the runner computed them (already in the Trainer's logs),
        ``layer_norms`` every measured layer's pre-clip norm (for the histogram), ``events`` every
        spike event read so far (new ones since the last call become alerts and table rows),
        ``spike_layers`` the top layers of the window's last spike step (for a row without a record),
        ``records`` the spike file's records (each row's top layers and batch), ``listed`` the steps that
        ``clip_skip_steps`` skips."""
        import wandb

        self._ensure(run)
        self._logs += 1
        for key, name in (("grad_norm", "grad_norm"), ("gradclip/norm_max", "norm_max"),
                          ("gradclip/norm_post", "norm_post"), ("gradclip/threshold", "threshold")):
            value = _finite(metrics.get(key))
            if value is not None:
                self.series[name].append((step, value))
        extra: dict[str, Any] = {}
        if layer_norms and self.histogram_every and (self._logs - 1) % self.histogram_every == 0:
            values = [v for v in layer_norms.values() if math.isfinite(v)]
            if values:
                extra[f"{SECTION}/layer_norms"] = wandb.Histogram(values, num_bins=min(64, max(4, len(values))))
                self.logged["histograms"] += 1
        new = list(events[self._events_seen:])
        self._events_seen = len(events)
        if new:
            self._rows = (self._rows + _table_rows(new, records, spike_layers))[-MAX_TABLE_ROWS:]
            extra[f"{SECTION}/spike_events"] = wandb.Table(columns=spike_table_columns(), data=list(self._rows))
            self.logged["tables"] += 1
            self._pending_alert.extend(new)
        if extra:
            self._log(run, step, extra)
        self._alert_spikes(run, threshold_base, action, listed)
        if stop_reason:
            self._alert_stop(run, stop_reason)

    def _alert_spikes(self, run: Any, threshold_base: Any, action: str, listed: Collection[int] = ()) -> None:
        """One WARN alert for the pending spikes: one line per run of consecutive spike steps."""
        if not (self.alerts and self._pending_alert):
            return
        now = time.monotonic()
        if now - self._last_alert < self.alert_interval_s:
            return  # kept for the next alert
        events, self._pending_alert = self._pending_alert, []
        runs = group_runs(Flagged.from_spike_event(e, threshold_base(e.step) if callable(threshold_base)
                                                   else threshold_base, action, e.step in listed) for e in events)
        lines = [describe_run(r) for r in runs[:MAX_ALERT_RUNS]]
        if len(runs) > MAX_ALERT_RUNS:
            rest = sum(len(r) for r in runs[MAX_ALERT_RUNS:])
            lines.append(f"... and {rest} more spikes up to step {events[-1].step} (the spike table and "
                         "gradclip_spikes.jsonl list every one).")
        steps = events[0].step, events[-1].step
        where = f"step {steps[0]}" if steps[0] == steps[1] else f"steps {steps[0]}-{steps[1]}"
        title = f"gradclip: {len(events)} spike{'s' if len(events) > 1 else ''} at {where} ({action})"
        try:
            run.alert(title=title, text="\n".join(lines), level="WARN", wait_duration=int(self.alert_interval_s))
            self.logged["alerts"] += 1
        except Exception:  # alerts need a W&B account setting online; never break training for them
            pass
        self._last_alert = now

    def _alert_stop(self, run: Any, reason: str) -> None:
        if not self.alerts or self._stop_alerted:
            return
        self._stop_alerted = True
        try:
            run.alert(title="gradclip: training stopped", text=reason, level="ERROR", wait_duration=0)
            self.logged["alerts"] += 1
        except Exception:
            pass

    # ------------------------------------------------------------------ train end
    def finish(self, run: Any, step: int, stop_reason: str | None = None, threshold_base: Any = None,
               action: str = "tighten", listed: Collection[int] = ()) -> None:
        """Train end: the stop alert (if not sent yet), pending spike alerts, and the run's norm chart."""
        import wandb

        self._ensure(run)
        if self._pending_alert:
            self._last_alert = -math.inf
            self._alert_spikes(run, threshold_base, action, listed)
        if stop_reason:
            self._alert_stop(run, stop_reason)
        series = {k: v for k, v in self.series.items() if v}
        if not series:
            return
        names = {"grad_norm": "pre-clip norm (last)", "norm_max": "pre-clip norm (window max)",
                 "norm_post": "post-clip norm", "threshold": "threshold"}
        chart = wandb.plot.line_series(xs=[[s for s, _ in v] for v in series.values()],
                                       ys=[[y for _, y in v] for v in series.values()],
                                       keys=[names[k] for k in series], title="gradclip: gradient norm vs threshold",
                                       xname=self.step_metric)
        self._log(run, step, {f"{SECTION}/norms_over_run": chart})
        self.logged["charts"] += 1


# ---------------------------------------------------------------------- panel layout
def panel_layout(layer_keys: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The recommended W&B workspace layout for the pack's metrics, as data.

    One section, ``gradclip``, top to bottom (``x`` is ``train/global_step`` everywhere):

    1. **norm vs threshold**: ``train/grad_norm``, ``train/gradclip/norm_mean``, ``train/gradclip/norm_max``,
       ``train/gradclip/norm_post`` and ``train/gradclip/threshold`` in one line plot (log y): clipping is active where the norm lines
       cross the threshold line.
    2. **clip rate**: ``train/gradclip/clip_rate`` (0..1): near 1 for long means the threshold is too
       tight for the run; near 0 always means it never acts.
    3. **spikes and skipped steps**: ``train/gradclip/spikes``, ``train/gradclip/skipped_steps``,
       ``train/gradclip/nonfinite_steps`` (counts per logging window) over the steps, next to ``train/loss``.
    4. **spike factor and coefficient**: ``train/gradclip/spike_factor`` and ``train/gradclip/coef``.
    5. **per-layer norms**: every ``train/gradclip/layer/<name>`` key in one line plot (the top-k layers; a
       metric regex, as the names depend on the model), the
       ``gradclip/layer_norms`` histogram, and the ``gradclip/spike_events`` table.
    6. **over the run**: the ``gradclip/norms_over_run`` chart logged at train end.

    Returns a list of sections ``{"name", "panels": [{"type", "title", "x", "y", "log_y"?, "regex"?}]}``
    (``regex``: more y keys, every metric the regular expression matches);
    :func:`create_workspace` turns it into a saved W&B workspace when ``wandb-workspaces`` is installed.
    """
    x = STEP_METRIC
    layers = {"y": list(layer_keys)} if layer_keys else {"y": [], "regex": f"^train/{SECTION}/layer/"}
    return [{
        "name": SECTION,
        "panels": [
            {"type": "line", "title": "gradient norm vs clip threshold", "x": x, "log_y": True,
             "y": ["train/grad_norm", "train/gradclip/norm_mean", "train/gradclip/norm_max",
                   "train/gradclip/norm_post", "train/gradclip/threshold"]},
            {"type": "line", "title": "clip rate (fraction of steps clipped)", "x": x,
             "y": ["train/gradclip/clip_rate"]},
            {"type": "line", "title": "spikes, skipped and non-finite steps per logging window", "x": x,
             "y": ["train/gradclip/spikes", "train/gradclip/skipped_steps", "train/gradclip/nonfinite_steps"]},
            {"type": "line", "title": "loss", "x": x, "y": ["train/loss"]},
            {"type": "line", "title": "spike factor and clip coefficient", "x": x,
             "y": ["train/gradclip/spike_factor", "train/gradclip/coef"]},
            {"type": "line", "title": "per-layer gradient norms (top-k)", "x": x, "log_y": True, **layers},
            {"type": "histogram", "title": "per-layer norm histogram", "x": x, "y": [f"{SECTION}/layer_norms"]},
            {"type": "table", "title": "spike events", "y": [f"{SECTION}/spike_events"]},
            {"type": "custom", "title": "norms over the run", "y": [f"{SECTION}/norms_over_run"]},
        ],
    }]


def create_workspace(entity: str, project: str, name: str = "gradclip", layer_keys: Sequence[str] = ()) -> Any:
    """Save :func:`panel_layout` as a W&B workspace view with the ``wandb-workspaces`` library
    (``pip install wandb-workspaces``; needs a W&B login). Returns the saved workspace.

    Line panels become ``LinePlot`` panels against ``train/global_step`` (also the workspace's x axis); the
    per-layer panel selects its keys with a metric regex. The histogram, table and custom chart panels appear
    by themselves in the ``gradclip`` section of an automatic workspace and are left out here.
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as error:
        raise ImportError("create_workspace needs the `wandb-workspaces` package (pip install wandb-workspaces); "
                          "without it, use panel_layout() as a guide and the automatic `gradclip` section "
                          "the run's define_metric calls give.") from error
    sections = []
    for section in panel_layout(layer_keys):
        panels = [wr.LinePlot(title=panel["title"], x=panel["x"], y=list(panel["y"]), log_y=panel.get("log_y", False),
                              metric_regex=panel.get("regex"))
                  for panel in section["panels"] if panel["type"] == "line"]
        sections.append(ws.Section(name=section["name"], panels=panels, is_open=True))
    workspace = ws.Workspace(entity=entity, project=project, name=name, sections=sections,
                             settings=ws.WorkspaceSettings(x_axis=STEP_METRIC))
    workspace.save()
    return workspace
