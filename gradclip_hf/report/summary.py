"""Turn a :class:`~gradclip_hf.report.load.Run` into the report: one JSON-safe dict (see :func:`summarize`)."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Optional

from .flagged import dedupe, event_runs, left_out, step_flags, window_flags
from ..spikefile import SpikeRecord
from .load import Run, Window
from .stats import Flags, clip_rate, finite, norm_summary, outliers, percentile, phases
from .training_args import stock_threshold

__all__ = ["summarize", "MIN_NORMS"]

MIN_NORMS = 5  # fewer finite norms after the start phase: the advice uses the whole run


def _phase_row(name: str, first: int, last: int, windows: list[Window], threshold: Optional[float],
               flags: dict[int, Flags]) -> dict:
    """Norm percentiles and clip rate of ``windows``, flagged steps left out (``flagged``: how many)."""
    rate, estimated = clip_rate(windows, threshold, flags)
    flagged = sum(flags[w.step].steps for w in windows if w.step in flags)
    return {"name": name, "first": first, "last": last, **norm_summary(windows, flags), "clip_rate": rate,
            "clip_rate_estimated": estimated, "flagged": flagged}


def _threshold(run: Run, steady: list[Window], override: Optional[float]) -> dict:
    """The threshold the run clipped at: logged (median after the start phase), else ``--threshold``, else
    the stock Trainer's ``max_grad_norm`` (training_args.bin or the default)."""
    if run.logs_threshold:
        logged = [w.threshold for w in run.windows if w.threshold is not None]
        usable = finite(logged)
        value = percentile(finite(w.threshold for w in steady) or usable, 50) if usable else None
        if override is not None:
            run.warnings.append(f"--threshold {override:g} ignored: the run logged its threshold (gradclip/threshold)")
        return {"value": value, "min": min(usable) if usable else None, "max": max(usable) if usable else None,
                "source": "logged (gradclip/threshold)", "clipping": bool(usable) and value is not None and value > 0}
    value, source = (override, "--threshold") if override is not None else stock_threshold(run)
    clipping = value is not None and 0 < value < math.inf
    return {"value": value if clipping else None, "min": value, "max": value, "source": source, "clipping": clipping}


def _events(run: Run, events: list[SpikeRecord], flagged: dict) -> dict:
    """Spike-file events by step; ``after_state``: after this state's last step (a checkpoint's report lists
    the later events of the run too: the candidates to skip when resuming from it); ``runs``: consecutive
    flagged steps, one line each."""
    rows = [asdict(e) for e in events]
    for e in rows:
        e["after_state"] = e["step"] is not None and e["step"] > run.windows[-1].step
    logged = [w.spikes for w in run.windows if w.spikes is not None]
    return {"detector": bool(logged), "logged": sum(logged) if logged else None, "events": rows,
            "runs": event_runs(events, flagged, run.windows[-1].step),
            "windows": [{"first": w.first, "last": w.step, "count": w.spikes} for w in run.windows if w.spikes]}


def _steps(values) -> list[int]:
    return sorted({s for s in values if s is not None})


def _skipped_and_nonfinite(run: Run, events: list[SpikeRecord]) -> tuple[dict, dict]:
    skipped_logged = [w.skipped for w in run.windows if w.skipped is not None]
    skipped = {"logged": sum(skipped_logged) if skipped_logged else None,
               "steps": _steps(e.step for e in events if e.skipped or e.event == "skip_listed")}
    steps = _steps([e.step for e in events if e.event == "nonfinite" or e.kind == "nonfinite"]
                   + [w.step for w in run.windows if w.grad_norm is not None and not math.isfinite(w.grad_norm)])
    counted = [w.nonfinite for w in run.windows if w.nonfinite is not None]
    nonfinite = {"count": max(sum(counted), len(steps)) if counted else len(steps), "steps": steps}
    return skipped, nonfinite


def _stops(run: Run) -> list[dict]:
    """The logged ``gradclip/stop_reason`` entries, else the spike file's ``stop`` events."""
    if run.stop_reasons:
        return [{"step": step, "reason": reason} for step, reason in run.stop_reasons]
    return [{"step": e.step, "reason": "stop event in the spike file" + (f" ({e.kind})" if e.kind else "")}
            for e in run.events if e.event == "stop"]


def _norm_outliers(windows: list[Window], threshold: Optional[float], flags: dict[int, Flags]) -> list[dict]:
    """Norm outliers, each with ``clipped``: whether its norm was above the threshold in force, and
    ``skipped``: whether its update was skipped (then it was not applied at all)."""
    by_step = {w.step: w for w in windows}
    found = outliers([(w.step, w.grad_norm) for w in windows])
    for o in found:
        limit = by_step[o["step"]].threshold if by_step[o["step"]].threshold is not None else threshold
        o["skipped"] = o["step"] in flags and flags[o["step"]].last
        o["clipped"] = not o["skipped"] and limit is not None and 0 < limit < o["value"]
    return found


def _run_info(run: Run) -> dict:
    losses = [(w.step, w.loss) for w in run.windows if w.loss is not None]
    return {"first_step": run.windows[0].first, "last_step": run.windows[-1].step, "global_step": run.global_step,
            "max_steps": run.max_steps, "logging_steps": run.logging_steps, "windows": len(run.windows),
            "sampled": any(w.size > 1 for w in run.windows), "last_loss": losses[-1] if losses else None,
            "last_eval_loss": list(run.evals[-1]) if run.evals else None, "strategy": run.strategy,
            "pack": run.logs_threshold}


def summarize(run: Run, threshold: Optional[float] = None) -> dict:
    """The report of ``run`` as a JSON-safe dict (advice and chart are added by the caller).

    ``threshold``: the threshold of a run that did not log ``gradclip/threshold`` (stock: its
    ``max_grad_norm``); ignored, with a warning, when the run logged one."""
    windows = run.windows
    events, replaced = dedupe(run.events)
    if replaced:
        run.warnings.append(f"{run.spike_path}: {replaced} line(s) for steps written again by a later run (a rerun "
                            "from a checkpoint): the last line of each step is used")
    flagged = step_flags(events)
    flags = window_flags(run, flagged)
    parts = phases(windows[-1].step)
    after_start = [w for w in windows if w.step > parts[0].last]
    steady = after_start if norm_summary(after_start, flags)["n"] >= MIN_NORMS else windows
    limit = _threshold(run, steady, threshold)
    value = limit["value"]
    rows = [_phase_row(p.name, p.first, p.last, [w for w in windows if p.holds(w)], value, flags) for p in parts]
    steady_row = _phase_row("after start" if steady is after_start else "all", steady[0].first, steady[-1].step,
                            steady, value, flags)
    skipped, nonfinite = _skipped_and_nonfinite(run, events)
    return {
        "source": {"path": run.path, "state_file": run.state_path, "spike_file": run.spike_path,
                   "output_dir": run.output_dir},
        "run": _run_info(run),
        "threshold": limit,
        "norms": {"all": _phase_row("all", windows[0].first, windows[-1].step, windows, value, flags),
                  "phases": rows},
        "steady": steady_row,
        "left_out": left_out(flags, flagged),
        "spikes": _events(run, events, flagged),
        "skipped": skipped,
        "nonfinite": nonfinite,
        "stop": _stops(run),
        "outliers": {"norm": _norm_outliers(windows, value, flags),
                     "loss": outliers([(w.step, w.loss) for w in windows])},
        "warnings": run.warnings,
    }
