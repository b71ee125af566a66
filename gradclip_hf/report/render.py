"""The report as text (what ``gradclip-hf report`` prints) and as JSON-safe data (``--json``)."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from .advice import g, pct

__all__ = ["render_text", "to_json", "terminal_safe"]

MAX_EVENTS = 20   # spike-file events printed (all are in --json)
TEXT_CHARS = 80   # of a batch's decoded text
INDICES = 16      # dataset indices printed per event


def terminal_safe(text: str) -> str:
    """``text`` with every character a terminal would act on (escape sequences, control and bidi characters,
    newlines) written as a Python escape (``\\x1b``): strings from the files read (events, kinds, actions, layer
    names, fingerprints, stop reasons, paths) cannot move the cursor, recolour or rewrite the screen."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def to_json(report: dict) -> str:
    """JSON text of the report; NaN/Inf become null (JSON has no such numbers)."""
    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(report), indent=1, allow_nan=False)


def _opt(value: Optional[float], spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _header(r: dict) -> list[str]:
    src, run, t = r["source"], r["run"], r["threshold"]
    of = f" of max_steps {run['max_steps']}" if run["max_steps"] else ""
    lines = [f"gradclip-hf report: {src['path']}",
             f"  read: {src['state_file']}; spike file: {src['spike_file'] or 'none'}",
             f"  run: steps {run['first_step']}-{run['last_step']} logged (global_step {run['global_step']}{of}), "
             f"logging_steps {run['logging_steps']}, {run['windows']} logged norms"]
    if run["last_loss"]:
        lines[-1] += f"; last loss {g(run['last_loss'][1])} (step {run['last_loss'][0]})"
    if run["last_eval_loss"]:
        lines[-1] += f"; last eval_loss {g(run['last_eval_loss'][1])} (step {run['last_eval_loss'][0]})"
    value = g(t["value"]) if t["clipping"] else "none (no clipping)"
    varied = (f" (median after the start; it varied from {g(t['min'])} to {g(t['max'])})"
              if t["clipping"] and t["min"] != t["max"] else "")
    strategy = f"; strategy {run['strategy']}" if run["strategy"] else ""
    lines.append(f"  threshold: {value}{varied} [{t['source']}]{strategy}")
    return lines


def _table(r: dict) -> list[str]:
    steady = [r["steady"]] if r["steady"]["name"] != "all" else []
    rows = [r["norms"]["all"]] + steady + r["norms"]["phases"]
    lines = ["", "pre-clip gradient norm (grad_norm) and clip rate per phase",
             f"  {'phase':<11} {'steps':>11} {'norms':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}  clip rate"]
    estimated = False
    for row in rows:
        rate = "-" if row["clip_rate"] is None else pct(row["clip_rate"]) + ("*" if row["clip_rate_estimated"] else "")
        estimated |= bool(row["clip_rate_estimated"])
        nonfinite = f" (+{row['nonfinite']} non-finite)" if row["nonfinite"] else ""
        lines.append(f"  {row['name']:<11} {str(row['first']) + '-' + str(row['last']):>11} {row['n']:>6} "
                     f"{_opt(row['p50']):>8} {_opt(row['p90']):>8} {_opt(row['p99']):>8} {_opt(row['max']):>8}  "
                     f"{rate}{nonfinite}")
    lines.append("  phases: the first 10 % of steps ('start'), then the rest in thirds; the advice uses "
                 + ("'after start'" if steady else "'all' (too few norms after the start)"))
    if r["run"]["sampled"]:
        exact = "exact (gradclip/norm_max)" if r["norms"]["all"]["max_exact"] else "of the logged steps only"
        lines.append("  logging_steps > 1: percentiles of the last step of each logging window (a sample); "
                     f"max {exact}")
    if estimated:
        lines.append("  * estimated: share of logged grad_norm above the threshold (no gradclip/clip_rate logged)")
    return lines


def _batch(e: dict) -> Optional[str]:
    parts = []
    if e["indices"] is not None:
        flat = json.dumps(e["indices"], separators=(",", ":"))
        count = flat.count(",") + 1 if flat.strip("[]") else 0
        parts.append("indices " + (flat if count <= INDICES else flat[:INDICES * 4] + f"... ({count} in all)"))
    if e["fingerprint"]:
        parts.append(f"fingerprint {e['fingerprint']}")
    if e["text"]:
        text = e["text"] if len(e["text"]) <= TEXT_CHARS else e["text"][:TEXT_CHARS] + "..."
        parts.append(f"text {text!r}")
    return "; ".join(parts) or None


def _event_lines(e: dict) -> list[str]:
    head = f"  step {e['step'] if e['step'] is not None else '?':>6}  {e['event'] or '?'}"
    head += f" {e['kind']}" if e["kind"] else ""
    head += f", action {e['action']}" if e["action"] else ""
    head += " (update skipped)" if e["skipped"] else ""
    head += " [after this state's last step]" if e["after_state"] else ""
    for what in ("loss", "norm"):
        if e[what] is not None:
            extra = [f"baseline {g(e[what + '_baseline'])}" if e[what + "_baseline"] is not None else None,
                     f"z {e[what + '_z']:.1f}" if e[what + "_z"] is not None else None]
            extra = [x for x in extra if x]
            head += f"; {what} {g(e[what])}" + (f" ({', '.join(extra)})" if extra else "")
    if e["threshold_before"] is not None or e["threshold_after"] is not None:
        head += f"; threshold {_opt(e['threshold_before'])} -> {_opt(e['threshold_after'])}"
    lines = [head]
    if e["top_layers"]:
        lines.append("          top layers: " + ", ".join(f"{n} {g(v)}" for n, v in e["top_layers"][:3]))
    batch = _batch(e)
    if batch:
        lines.append(f"          batch: {batch}")
    return lines


def _spikes(r: dict) -> list[str]:
    sp = r["spikes"]
    if sp["detector"]:
        lines = ["", f"spikes: {sp['logged']} (logged gradclip/spikes)"]
    else:
        lines = ["", "spikes: no spike detector in this run (no gradclip/spikes logged; the stock Trainer has none)"]
    events = sp["events"]
    if events:
        first = f", the first {MAX_EVENTS}" if len(events) > MAX_EVENTS else ""
        lines.append(f"  {len(events)} event(s) in the spike file{first}:")
        for e in events[:MAX_EVENTS]:
            lines.extend(_event_lines(e))
    elif sp["windows"]:
        lines.append("  no spike file; spikes per logging window: " + ", ".join(
            f"{w['count']} in step {w['first']}" + (f"-{w['last']}" if w["last"] != w["first"] else "")
            for w in sp["windows"]))
    return lines


def _counts(r: dict) -> list[str]:
    sk, nf = r["skipped"], r["nonfinite"]
    skipped = f"{sk['logged']} logged" if sk["logged"] is not None else "-"
    skipped += f"; steps {', '.join(map(str, sk['steps']))}" if sk["steps"] else ""
    where = f" (steps {', '.join(map(str, nf['steps']))})" if nf["steps"] else ""
    lines = [f"skipped updates: {skipped}", f"non-finite norms: {nf['count']}{where}"]
    for kind in ("norm", "loss"):
        found = r["outliers"][kind]
        shown = ", ".join(f"{o['step']} ({g(o['value'])}" + ("" if kind == "loss" else
                                                              ", clipped" if o["clipped"] else ", not clipped") + ")"
                          for o in found[:MAX_EVENTS])
        lines.append(f"{kind} outliers (> 6 sigma above the 50 logged values before): {shown or 'none'}")
    for stop in r["stop"]:
        lines.append(f"stopped at step {stop['step']}: {stop['reason']}")
    return lines


def render_text(report: dict) -> str:
    """The report as printed by ``gradclip-hf report``."""
    lines = _header(report) + _table(report) + _spikes(report) + _counts(report) + ["", "advice:"]
    for i, a in enumerate(report["advice"]):
        label = "" if i == 0 else "note "
        lines.append(f"  {label}[{a['rule']}] {a['message']}")
    suggested = report.get("suggested_threshold")
    if suggested is not None:
        lines.append(f"suggested threshold: {g(suggested)}")
    if report.get("chart"):
        lines.append(f"chart: {report['chart']}")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(terminal_safe(line) for line in lines)  # every line: whatever came from the files
