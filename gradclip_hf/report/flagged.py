"""Flagged steps in a report: the spike file's events (one per step, the newest line where a rerun wrote a
step twice), the runs of consecutive events the report prints (one line each), and which steps of each
logging window are reported apart from the clip rate and the norm percentiles (:class:`.stats.Flags`).

A flagged step is one whose update was skipped (a spike with ``spike_action`` skip/rollback/stop, a step
listed in ``clip_skip_steps``, a non-finite gradient under ``nonfinite="skip"``) or whose gradient norm was
NaN/Inf. Such a step says nothing about how often the threshold trims ordinary updates: a skipped update was
not clipped, the optimizer got nothing.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import asdict, fields
from typing import Optional

from ..spikeruns import Flagged, describe_run, group_runs
from ..spikefile import SpikeRecord
from .load import Run, Window
from .stats import Flags

__all__ = ["dedupe", "step_flags", "apart", "window_flags", "event_runs", "left_out"]

TOP_LAYERS = 3
SAME = 1e-3  # relative: a logged float32 norm_max and a recorded norm of the same step


def dedupe(events: list[SpikeRecord]) -> tuple[list[SpikeRecord], int]:
    """One event per (event, step), the last in file order (a rerun from a checkpoint appends the steps it
    ran again after the first run's lines), sorted by step; and how many lines were replaced."""
    kept: dict = {}
    for i, e in enumerate(events):
        kept[(e.event, e.step) if e.step is not None else ("?", i)] = e
    out = sorted(kept.values(), key=lambda e: (e.step is None, e.step or 0))
    return out, len(events) - len(out)


def _is_flagged(e: SpikeRecord) -> bool:
    return e.step is not None and (bool(e.skipped) or e.event in ("skip_listed", "nonfinite") or e.kind == "nonfinite")


def step_flags(events: list[SpikeRecord]) -> dict[int, Flagged]:
    """The flagged steps of the spike file, one :class:`~gradclip_hf.spikeruns.Flagged` per step (a spike and a
    listed skip at the same step are one spike, ``listed``)."""
    by_step: dict[int, list[SpikeRecord]] = defaultdict(list)
    for e in events:
        if e.step is not None and (e.event in ("spike", "nonfinite", "skip_listed") or _is_flagged(e)):
            by_step[e.step].append(e)
    out = {}
    for step, group in by_step.items():
        listed = any(e.event == "skip_listed" for e in group)
        main = next((e for e in group if e.event == "spike"), None) or next(
            (e for e in group if e.event == "nonfinite" or e.kind == "nonfinite"), None)
        if main is None:
            out[step] = Flagged(step=step, event="listed", action="skip", skipped=True, listed=True)
            continue
        record = {f.name: getattr(main, f.name) for f in fields(main)}
        record.update(event="nonfinite" if main.event == "nonfinite" or main.kind == "nonfinite" else "spike",
                      skipped=True if listed else main.skipped, listed=listed)
        out[step] = Flagged(**record)
    return out


def _counted_as_clipped(f: Flagged, window: Window) -> Optional[bool]:
    """Whether ``gradclip/clip_rate`` counted the step as clipped (its norm above the threshold in force);
    ``None``: not known."""
    threshold = next((t for t in (f.threshold_after, f.threshold_before, window.threshold) if t is not None), None)
    if f.norm is None or threshold is None or not math.isfinite(f.norm):
        return None
    return f.norm > threshold


def apart(f: Flagged) -> bool:
    """Reported apart from the clip rate and the percentiles: the update was skipped, or the norm was NaN/Inf
    (a spike whose update was applied, with ``spike_action="tighten"``, is an ordinary clipped step)."""
    return f.event != "spike" or f.listed or f.outcome in ("skip", "rollback", "stop")


def window_flags(run: Run, flagged: dict[int, Flagged]) -> dict[int, Flags]:
    """:class:`.stats.Flags` of every window with steps reported apart (:func:`apart`): from the spike file,
    and from the logged ``gradclip/skipped_steps``/``nonfinite_steps`` counts for what the file does not name
    (no file, or lines missing): those are assumed clipped, and their window's ``norm_max`` may be theirs."""
    flagged = {s: f for s, f in flagged.items() if apart(f)}
    out = {}
    steps = sorted(flagged)
    for w in run.windows:
        mine = [flagged[s] for s in steps[bisect_left(steps, w.first):bisect_right(steps, w.step)]]
        counted = [_counted_as_clipped(f, w) for f in mine]
        unnamed = max(0, max(w.skipped or 0, w.nonfinite or 0) - len(mine))
        flagged_steps = min(w.size, len(mine) + unnamed)
        if not flagged_steps:
            continue
        known = sum(1 for c in counted if c)
        logged = round(w.clip_rate * w.size) if w.clip_rate is not None and math.isfinite(w.clip_rate) else 0
        unknown = unnamed + sum(1 for c in counted if c is None)
        theirs = w.norm_max is not None and (unknown > 0 or any(
            f.norm is not None and math.isclose(f.norm, w.norm_max, rel_tol=SAME) for f in mine))
        out[w.step] = Flags(steps=flagged_steps, clipped=known + min(unnamed, max(0, logged - known)),
                            last=w.step in flagged or flagged_steps == w.size, max_theirs=theirs)
    return out


def _top_layers(events: list[SpikeRecord]) -> list[dict]:
    """The layers that carried a run: each layer's norm range over the run's steps, the largest first."""
    seen: dict[str, list[float]] = defaultdict(list)
    for e in events:
        for name, value in e.top_layers:
            if value is not None and math.isfinite(value):
                seen[name].append(value)
    ranked = sorted(seen.items(), key=lambda kv: -max(kv[1]))[:TOP_LAYERS]
    return [{"name": n, "min": min(v), "max": max(v), "steps": len(v)} for n, v in ranked]


def event_runs(events: list[SpikeRecord], flagged: dict[int, Flagged], last_step: int) -> list[dict]:
    """The runs of consecutive flagged steps, each as ``{"first", "last", "count", "text", "after_state",
    "top_layers", "batch"}``: ``text`` is :func:`~gradclip_hf.spikeruns.describe_run`'s line, ``batch`` the
    first step's batch (indices, fingerprint, text) that the spike file recorded."""
    by_step: dict[int, list[SpikeRecord]] = defaultdict(list)
    for e in events:
        if e.step is not None:
            by_step[e.step].append(e)
    runs = []
    for run in group_runs(flagged.values()):
        mine = [e for f in run for e in by_step[f.step]]
        first = next((e for e in mine if e.indices is not None or e.fingerprint or e.text), None)
        batch = None if first is None else {"step": first.step, "indices": first.indices,
                                            "fingerprint": first.fingerprint, "text": first.text}
        runs.append({"first": run[0].step, "last": run[-1].step, "count": len(run), "text": describe_run(run),
                     "after_state": run[-1].step > last_step, "top_layers": _top_layers(mine), "batch": batch})
    return runs


def left_out(flags: dict[int, Flags], flagged: dict[int, Flagged]) -> dict:
    """What the clip rate and the percentiles leave out: how many steps, of which skipped and non-finite,
    and the norms the spike file recorded for them."""
    flagged = {s: f for s, f in flagged.items() if apart(f)}
    norms = [f.norm for f in flagged.values() if f.norm is not None and math.isfinite(f.norm)]
    return {"steps": sum(f.steps for f in flags.values()),
            "skipped": sum(1 for f in flagged.values() if f.outcome != "applied"),
            "nonfinite": sum(1 for f in flagged.values() if f.event == "nonfinite"),
            "norm_min": min(norms) if norms else None, "norm_max": max(norms) if norms else None,
            "windows": {str(step): asdict(f) for step, f in flags.items()}}
