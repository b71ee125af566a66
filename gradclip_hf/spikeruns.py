"""Runs of consecutive flagged steps and the one line that says what happened in each.

A bad shard of 20 batches is 20 spikes in a row; the console, the W&B alert and ``gradclip-hf report`` each
say it once: ``steps 61-80: 20 loss spikes, loss 7.21-7.45 against 2.47 (37-39 sigma); updates skipped``.
The spike file (``gradclip_spikes.jsonl``) keeps one line per step. Plain Python: no torch, no transformers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

from .spikefile import SpikeRecord

__all__ = ["Flagged", "group_runs", "describe_run", "step_ranges", "ACTION_WORDS"]

# what happened to the update of a flagged step, by spike action (plural for runs)
ACTION_WORDS = {"tighten": ("threshold tightened, update applied", "threshold tightened, updates applied"),
                "skip": ("update skipped", "updates skipped"),
                "rollback": ("rolled back to the last snapshot, update skipped",
                             "rolled back to the last snapshot, updates skipped"),
                "stop": ("training stopped", "training stopped"),
                "drop": ("bad micro-batch dropped, update made of the kept ones",
                         "bad micro-batches dropped, updates made of the kept ones")}


@dataclass(frozen=True)
class Flagged(SpikeRecord):
    """One flagged step as it is summarised: its spike file record (:class:`~gradclip_hf.spikefile.SpikeRecord`,
    read back or made from a spike event during training) and whether it was listed. ``event``: ``"spike"``,
    ``"nonfinite"`` or ``"listed"`` (a step skipped because ``clip_skip_steps``/``clip_skip_steps_from`` lists
    it, with no spike of its own); ``action``: the spike action (``tighten``/``skip``/``rollback``/``stop``;
    ``drop``: only micro-batches spiked, the gate dropped them and made the update of the others); ``skipped``:
    whether the update was skipped (``None``: follows from ``action``); ``listed``: the step was
    listed for skipping. Values that were not measured are ``None``."""

    event: Optional[str] = "spike"
    listed: bool = False

    @classmethod
    def from_spike_event(cls, event: Any, base_threshold: Optional[float], action: str,
                         listed: bool = False) -> "Flagged":
        """A core :class:`~gradclip_hf.core.SpikeEvent` (read back during training); the threshold before and
        after is ``base_threshold`` (strategy x schedule, ``None``: not known) times its spike factors."""
        known = base_threshold is not None
        action = getattr(event, "outcome", None) or action  # a step whose only spikes were dropped micro-batches
        return cls(step=event.step, event="spike", kind=event.kind, action=action, listed=listed,
                   skipped=True if listed else None, loss=event.loss, loss_baseline=event.loss_baseline,
                   loss_z=event.loss_z, norm=event.norm, norm_baseline=event.norm_baseline, norm_z=event.norm_z,
                   threshold_before=base_threshold * event.factor_before if known else None,
                   threshold_after=base_threshold * event.factor_after if known else None)

    @property
    def outcome(self) -> str:
        """What happened to the update, as a key (``skip``, ``tighten``, ...), for grouping."""
        if self.listed or (self.event != "spike" and self.skipped):
            return "skip"
        if self.event == "spike" and self.action in ACTION_WORDS:
            return "skip" if self.skipped and self.action == "tighten" else self.action
        return "skip" if self.skipped else "applied"


def group_runs(items: Iterable[Flagged]) -> list[list[Flagged]]:
    """Consecutive steps with the same event and outcome, in step order; one item per step (the first seen)."""
    runs: list[list[Flagged]] = []
    seen: set[int] = set()
    for item in sorted(items, key=lambda f: f.step):
        if item.step in seen:
            continue
        seen.add(item.step)
        last = runs[-1][-1] if runs else None
        if (last is not None and item.step == last.step + 1 and item.event == last.event
                and item.outcome == last.outcome and item.listed == last.listed):
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def step_ranges(steps: Sequence[int], limit: Optional[int] = None) -> str:
    """``"61-80, 95"`` for sorted steps: runs of consecutive steps as ranges (at most ``limit`` of them, then
    ``" and N more runs"``)."""
    runs: list[list[int]] = []
    for step in steps:
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:limit])
    return shown + (f" and {len(runs) - limit} more runs" if limit is not None and len(runs) > limit else "")


def _finite(values: Iterable[Optional[float]]) -> list[float]:
    return [v for v in values if v is not None and v == v and abs(v) != float("inf")]


def _span(values: Sequence[float], spec: str = ".3g") -> str:
    """``"7.21-7.45"`` (or one value when they print the same)."""
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def _sigma(values: Sequence[float]) -> str:
    spec = ".0f" if min(values) >= 10 else ".1f"
    return _span(values, spec)


def _where(run: Sequence[Flagged]) -> str:
    first, last = run[0].step, run[-1].step
    return f"step {first}" if first == last else f"steps {first}-{last}"


def _what(run: Sequence[Flagged]) -> str:
    """``"20 loss spikes"``, ``"loss spike"``, ``"12 spikes (10 loss, 2 loss+norm)"``."""
    n = len(run)
    if run[0].event == "nonfinite":
        return "non-finite gradient (NaN/Inf)" if n == 1 else f"{n} non-finite gradients (NaN/Inf)"
    if run[0].event == "listed":
        return "listed step" if n == 1 else f"{n} listed steps"
    kinds = Counter("micro-batch loss" if f.action == "drop" else f.kind or "loss" for f in run)
    if len(kinds) == 1:
        kind = next(iter(kinds))
        return f"{kind} spike" if n == 1 else f"{n} {kind} spikes"
    return f"{n} spikes (" + ", ".join(f"{c} {k}" for k, c in kinds.most_common()) + ")"


def _values(run: Sequence[Flagged]) -> str:
    """``", loss 7.21-7.45 against 2.47 (37-39 sigma)"``: the quantity the detector saw, for the whole run."""
    if run[0].event != "spike":
        norms = _finite(f.norm for f in run)
        return f", gradient norm {_span(norms)}" if norms else ""
    by_loss = all("loss" in (f.kind or "loss") for f in run)
    name, value, base, z = (("loss", "loss", "loss_baseline", "loss_z") if by_loss
                            else ("gradient norm", "norm", "norm_baseline", "norm_z"))
    values = _finite(getattr(f, value) for f in run)
    if not values:
        return ""
    text = f", {name} {_span(values)}"
    baselines = _finite(getattr(f, base) for f in run)
    text += f" against {_span(baselines)}" if baselines else ""
    zs = _finite(getattr(f, z) for f in run)
    return text + (f" ({_sigma(zs)} sigma)" if zs else "")


def _threshold(run: Sequence[Flagged]) -> str:
    before, after = run[0].threshold_before, run[-1].threshold_after
    if before is None or after is None or f"{before:.4g}" == f"{after:.4g}":
        return ""  # unchanged (skip with spike_factor=1) or not known
    return f"; clip threshold {before:.4g} -> {after:.4g}"


def _outcome(run: Sequence[Flagged]) -> str:
    plural = len(run) > 1
    first = run[0]
    if first.listed:
        return ("updates" if plural else "update") + " skipped (listed in clip_skip_steps / clip_skip_steps_from)"
    key = first.outcome
    if key in ACTION_WORDS:
        return ACTION_WORDS[key][plural]
    return "updates applied" if plural else "update applied"


def describe_run(run: Sequence[Flagged]) -> str:
    """One line for a run of :func:`group_runs`: where, how many of what, the values against their baseline
    and z-score (ranges over the run), a threshold change, and what happened to the updates."""
    return f"{_where(run)}: {_what(run)}{_values(run)}{_threshold(run)}; {_outcome(run)}"
