"""The report as text (what ``gradclip-hf report`` prints) and as JSON-safe data (``--json``)."""

from __future__ import annotations

import json
import math
from typing import Any, Optional

from ..spikeruns import step_ranges
from .advice import g, pct

__all__ = ["render_text", "to_json", "terminal_safe"]

MAX_EVENTS = 20   # runs of flagged steps (and other spike-file events) printed (all are in --json)
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
    out = r.get("left_out") or {}
    if out.get("steps"):
        what = " and ".join(x for x in (f"{out['skipped']} skipped" if out["skipped"] else "",
                                         f"{out['nonfinite']} non-finite" if out["nonfinite"] else "") if x)
        low, high = _opt(out["norm_min"]), _opt(out["norm_max"])
        norms = "" if out["norm_min"] is None else f"; norm {low}" if low == high else f"; norms {low}-{high}"
        lines.append(f"  left out of the clip rate and the percentiles: {out['steps']} flagged step(s)"
                     f"{' (' + what + norms + ')' if what or norms else ''}, listed under spikes below; "
                     "a skipped update was not clipped, the optimizer got nothing")
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


def _run_lines(run: dict) -> list[str]:
    """A run of consecutive flagged steps: its summary, the layers that carried it, its first batch."""
    lines = [f"  {run['text']}" + (" [after this state's last step]" if run["after_state"] else "")]
    if run["top_layers"]:
        lines.append("      top layers: " + ", ".join(
            f"{t['name']} {g(t['min'])}" + (f"-{g(t['max'])}" if g(t["min"]) != g(t["max"]) else "")
            for t in run["top_layers"]))
    batch = _batch(run["batch"]) if run["batch"] else None
    if batch:
        where = f"batch of step {run['batch']['step']}" + (" (the first)" if run["count"] > 1 else "")
        lines.append(f"      {where}: {batch}")
    return lines


def _spikes(r: dict) -> list[str]:
    sp = r["spikes"]
    if sp["detector"]:
        lines = ["", f"spikes: {sp['logged']} (logged gradclip/spikes)"]
    else:
        lines = ["", "spikes: no spike detector in this run (no gradclip/spikes logged; the stock Trainer has none)"]
    events, runs = sp["events"], sp.get("runs", [])
    others = [e for e in events if e["step"] is None or e["event"] not in ("spike", "nonfinite", "skip_listed")]
    if runs:
        first = f", the first {MAX_EVENTS}" if len(runs) > MAX_EVENTS else ""
        lines.append(f"  {sum(x['count'] for x in runs)} flagged step(s) in the spike file, in {len(runs)} run(s) of "
                     f"consecutive steps{first} (--json and the file have one entry per step):")
        for run in runs[:MAX_EVENTS]:
            lines.extend(_run_lines(run))
    for e in others[:MAX_EVENTS]:
        lines.extend(_event_lines(e))
    if not events and sp["windows"]:
        lines.append("  no spike file; spikes per logging window: " + ", ".join(
            f"{w['count']} in step {w['first']}" + (f"-{w['last']}" if w["last"] != w["first"] else "")
            for w in sp["windows"]))
    return lines


def _outlier_status(o: dict, kind: str) -> str:
    if kind == "loss":
        return ""
    return ", update skipped" if o.get("skipped") else ", clipped" if o["clipped"] else ", not clipped"


def _outliers(found: list[dict], kind: str) -> str:
    """``"151 (17.8, clipped), 61-80 (20 steps, 8.65-12.9, update skipped)"``: consecutive outliers with the
    same status as one range."""
    groups: list[list[dict]] = []
    for o in found:
        if groups and o["step"] == groups[-1][-1]["step"] + 1 and \
                _outlier_status(o, kind) == _outlier_status(groups[-1][-1], kind):
            groups[-1].append(o)
        else:
            groups.append([o])
    shown = []
    for group in groups[:MAX_EVENTS]:
        first, last, status = group[0], group[-1], _outlier_status(group[0], kind)
        if len(group) == 1:
            shown.append(f"{first['step']} ({g(first['value'])}{status})")
            continue
        values = [o["value"] for o in group]
        shown.append(f"{first['step']}-{last['step']} ({len(group)} steps, {g(min(values))}-{g(max(values))}{status})")
    more = f" and {len(groups) - MAX_EVENTS} more" if len(groups) > MAX_EVENTS else ""
    return ", ".join(shown) + more


def _counts(r: dict) -> list[str]:
    sk, nf = r["skipped"], r["nonfinite"]
    skipped = f"{sk['logged']} logged" if sk["logged"] is not None else "-"
    skipped += f"; steps {step_ranges(sk['steps'])}" if sk["steps"] else ""
    where = f" (steps {step_ranges(nf['steps'])})" if nf["steps"] else ""
    lines = [f"skipped updates: {skipped}", f"non-finite norms: {nf['count']}{where}"]
    for kind in ("norm", "loss"):
        lines.append(f"{kind} outliers (> 6 sigma above the 50 logged values before): "
                     f"{_outliers(r['outliers'][kind], kind) or 'none'}")
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
