"""``gradclip-hf report``: what a Trainer run's gradient norms, clipping and spikes were, and which clip
threshold suits it.

Reads ``trainer_state.json`` (the Trainer's ``log_history``) and, when there, ``gradclip_spikes.jsonl``;
works on runs of the stock Trainer (``grad_norm`` only) and of this pack (``gradclip/*``). See
:mod:`.load` (what is read, where from), :mod:`.stats` (percentiles, phases, clip rates, outliers),
:mod:`.flagged` (skipped and non-finite steps, reported apart; runs of consecutive spike events),
:mod:`.advice` (the threshold rules), :mod:`.training_args` (a stock run's ``max_grad_norm``) and
``docs/report.md``.

    from gradclip_hf.report import build_report
    report = build_report("out/")            # a dict; report["advice"][0]["message"]
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

from .advice import advise
from .load import Run, load_run
from .render import render_text, to_json
from .summary import summarize

__all__ = ["build_report", "draw_chart", "render_text", "to_json", "load_run", "advise", "summarize",
           "DEFAULT_CHART"]

DEFAULT_CHART = "gradclip_report.png"


def _write_new(path: str, write) -> str:
    """``write(tmp)`` into a new file next to ``path``, then renamed over ``path``: a link planted at ``path`` is
    replaced, never followed (its target is untouched), and a failed write leaves ``path`` as it was."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".gradclip_report.", suffix=os.path.splitext(path)[1] or ".png", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def draw_chart(run: Run, report: dict, path: str) -> str:
    """The norms-vs-threshold PNG of ``run`` (:func:`gradclip_hf.charts.norms_chart`) at ``path``, written as a
    new file renamed over ``path`` (a symlink there is replaced, not followed)."""
    from ..charts import norms_chart

    windows = run.windows
    threshold = ([w.threshold for w in windows] if run.logs_threshold else report["threshold"]["value"])
    sampled = report["run"]["sampled"]
    events = [e for e in report["spikes"]["events"] if e["event"] == "spike" and e["step"] is not None]
    spikes = [e["step"] for e in events]
    at = {e["step"]: e["norm"] for e in events if e["norm"] is not None}  # drawn at the norm recorded
    skipped = report["skipped"]["steps"]
    if not report["spikes"]["events"]:  # no spike file: marked at the last step of a window that counted one
        spikes = [w["last"] for w in report["spikes"]["windows"]]
        skipped = [w.step for w in windows if w.skipped]
    gone = set(skipped) | set(report["nonfinite"]["steps"])  # the optimizer got nothing: no post-clip norm
    post = [None if w.step in gone else w.norm_post for w in windows] if run.logs_threshold else None
    return _write_new(path, lambda tmp: norms_chart(
        tmp, [w.step for w in windows], [w.grad_norm for w in windows], threshold=threshold, norm_post=post,
        norm_max=[w.norm_max for w in windows] if sampled else None, spikes=spikes, spike_norms=at, skipped=skipped,
        nonfinite=report["nonfinite"]["steps"],
        title=f"{os.path.basename(os.path.abspath(run.path))}: pre-clip gradient norm vs threshold"))


def build_report(path: str, threshold: Optional[float] = None, chart: Optional[str] = None) -> dict:
    """The report of the run at ``path`` (an ``output_dir``, a ``checkpoint-N`` folder or a
    ``trainer_state.json``) as a JSON-safe dict, with ``advice`` and ``suggested_threshold``.

    Args:
        threshold: the clip threshold of a run that did not log ``gradclip/threshold`` (stock Trainer:
            its ``max_grad_norm``); by default read from the run's own ``training_args.bin`` (a pickle, read
            inertly: :mod:`.training_args`), else the Trainer default 1.0.
        chart: where to write the norms chart (PNG); ``None``: no chart.

    Raises:
        ValueError: nothing to report on (no or unreadable ``trainer_state.json``, no ``grad_norm`` logged),
            naming the file and what is missing; or a bad ``threshold``.
    """
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                  or not 0 <= threshold < float("inf")):
        raise ValueError(f"`threshold` must be a finite number >= 0 (0: the run did not clip), got {threshold!r}.")
    run = load_run(path)
    report = summarize(run, threshold)
    report["advice"] = advise(report)
    report["suggested_threshold"] = report["advice"][0]["suggested_threshold"] if report["advice"] else None
    report["chart"] = None
    if chart is not None:
        try:
            report["chart"] = draw_chart(run, report, chart)
        except OSError as e:
            raise ValueError(f"cannot write the chart {chart!r}: {e}; choose another path (--png) or --no-png") \
                from None
    return report
