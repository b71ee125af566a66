"""What a fault did to one run, measured against its clean counterfactual (same method and seed).

* ``damage``: final eval loss of the faulted run minus that of the clean run. A diverged run (a
  non-finite eval loss) counts as the uniform predictor, ``ln(vocab size)``.
* ``worst excursion``: the largest gap between the two runs' training losses on the same batch at the
  same step, after the fault began (the fault steps themselves left out: their batches differ).
* ``steps to recover``: steps after the last fault step until the gap, averaged over ``SMOOTH``
  steps, is within ``RECOVER_TOL`` of the clean loss (``None``: never within the run).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from ..standins import VOCAB_SIZE

__all__ = ["DIVERGED_LOSS", "eval_loss", "diverged", "damage", "excursion", "RECOVER_TOL", "SMOOTH"]

DIVERGED_LOSS = math.log(VOCAB_SIZE)  # the loss of predicting every byte with equal probability
RECOVER_TOL = 0.02  # relative to the clean run's loss
SMOOTH = 5


def eval_loss(run: dict[str, Any]) -> float:
    """The run's final eval loss; ``DIVERGED_LOSS`` if it is not finite."""
    value = run["eval_loss"]
    return value if math.isfinite(value) else DIVERGED_LOSS


def diverged(run: dict[str, Any]) -> bool:
    return not math.isfinite(run["eval_loss"])


def damage(faulted: dict[str, Any], clean: dict[str, Any]) -> float:
    return eval_loss(faulted) - eval_loss(clean)


def excursion(faulted: Sequence[float], clean: Sequence[float], fault_steps: Sequence[int]) -> dict[str, Any]:
    """``{"worst": max gap, "recover": steps or None}`` from two per-step training-loss series."""
    if not fault_steps:
        return {"worst": math.nan, "recover": None}
    skip, first, last = set(fault_steps), min(fault_steps), max(fault_steps)
    gaps = {t: faulted[t] - clean[t] for t in range(first, min(len(faulted), len(clean))) if t not in skip}
    finite = [g for g in gaps.values() if math.isfinite(g)]
    nonfinite = any(not math.isfinite(faulted[t]) for t in gaps)
    worst = math.inf if nonfinite else (max(finite) if finite else math.nan)
    after = [t for t in sorted(gaps) if t > last]
    for i, t in enumerate(after):
        window = [gaps[u] for u in after[i:i + SMOOTH]]
        base = [clean[u] for u in after[i:i + SMOOTH]]
        if len(window) < SMOOTH or not all(math.isfinite(g) for g in window):
            continue
        if statistics.fmean(window) <= RECOVER_TOL * statistics.fmean(base):
            return {"worst": worst, "recover": t - last}
    return {"worst": worst, "recover": None}
