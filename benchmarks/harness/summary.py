"""Per (scenario, method) statistics over seeds from :func:`~.sweep.run_grid` records.

Per method and scenario, paired per seed: ``damage`` (faulted minus clean eval loss, same method),
``vs_stock`` (damage minus stock's damage), ``ratio`` (damage / stock's damage; ``removed`` = 1 - ratio),
``fp_cost`` (clean eval loss minus stock's clean eval loss: what the method costs when nothing goes
wrong), each a mean with its 95 % t-interval; the median worst excursion and steps to recover; how
many fault steps the method flagged, skipped or dropped a micro-batch of ("caught": a listed skip, a non-finite
skip, a spike and a micro-batch gate's drop alike),
and how many steps it skipped in its clean run (false positives). Where the
scenario has an oracle's runs (``ORACLES``): ``avoidable`` = the share of the *avoidable* damage removed,
``(stock's damage - damage) / (stock's damage - the step oracle's damage)`` per seed (1: as good as skipping exactly
the fault steps; above 1: better than any whole-step skip), and ``avoidable_micro`` against the micro-batch oracle;
``avoidable_gap`` / ``avoidable_micro_gap``: stock's damage minus the oracle's (paired), the avoidable damage itself
(a share of it means little where this interval reaches 0).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Sequence

from gradclip_hf.demo.metrics import damage, diverged, eval_loss, excursion

from .stats import Interval, mean_interval, paired, ratio, share_of_gap

__all__ = ["summarise", "REFERENCE", "ORACLES"]

REFERENCE = "stock"
ORACLES = {"avoidable": "oracle", "avoidable_micro": "oracle_micro"}  # row field: the oracle it is measured against


def _median(values: Sequence[float]) -> float:
    xs = [v for v in values if not math.isnan(v)]
    return statistics.median(xs) if xs else math.nan


def _by_seed(records: list[dict[str, Any]], fn) -> dict[int, float]:
    return {r["seed"]: fn(r) for r in records}


def _detection(records: list[dict[str, Any]]) -> dict[str, float]:
    flagged = [r["faulted"]["spike_steps"] for r in records]
    if any(f is None for f in flagged):
        return {"caught": math.nan, "clean_skips": math.nan}
    acted = [set(f) | set(r["faulted"]["skipped_steps"] or []) | set(r["faulted"].get("dropped_steps") or [])
             for f, r in zip(flagged, records)]
    hits = [len(a & set(r["faulted"]["fault_steps"])) / max(1, len(r["faulted"]["fault_steps"]))
            for a, r in zip(acted, records)]
    skips = [len(r["clean"]["skipped_steps"] or []) for r in records]
    return {"caught": statistics.fmean(hits), "clean_skips": statistics.fmean(skips)}


def _damage(records: list[dict[str, Any]]) -> dict[int, float]:
    return _by_seed(records, lambda r: damage(r["faulted"], r["clean"]))


def _row(records: list[dict[str, Any]], stock: list[dict[str, Any]] | None, faulty: bool,
         oracles: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    dmg = _damage(records)
    clean = _by_seed(records, lambda r: eval_loss(r["clean"]))
    exc = [excursion(r["faulted"]["series"]["loss"], r["clean"]["series"]["loss"], r["faulted"]["fault_steps"])
           for r in records]
    row: dict[str, Any] = {"seeds": len(records), "clean_eval": mean_interval(list(clean.values())),
                           "faulted_eval": mean_interval([eval_loss(r["faulted"]) for r in records]),
                           "diverged": sum(diverged(r["faulted"]) for r in records),
                           "clip_rate_clean": statistics.fmean(r["clean"]["clip_rate"] for r in records),
                           **_detection(records)}
    if faulty:
        row.update(damage=mean_interval(list(dmg.values())), worst_excursion=_median([e["worst"] for e in exc]),
                   recover=_median([math.inf if e["recover"] is None else e["recover"] for e in exc]),
                   not_recovered=sum(e["recover"] is None for e in exc))
    if stock is not None:
        stock_dmg = _damage(stock)
        row["fp_cost"] = paired(clean, _by_seed(stock, lambda r: eval_loss(r["clean"])))
        if faulty:
            row["vs_stock"] = paired(dmg, stock_dmg)
            row["ratio"] = ratio(dmg, stock_dmg)
            r = row["ratio"]
            row["removed"] = Interval(1 - r.mean, 1 - r.high, 1 - r.low, r.std, r.n)
            for field, runs in (oracles or {}).items():
                row[field] = share_of_gap(dmg, stock_dmg, _damage(runs))
                row[field + "_gap"] = paired(stock_dmg, _damage(runs))
    return row


def summarise(records: list[dict[str, Any]], faults: dict[str, bool]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{scenario: {method: row}}``; ``faults[scenario]`` says whether the scenario has a fault."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for name in dict.fromkeys(r["scenario"] for r in records):
        rows = [r for r in records if r["scenario"] == name]
        stock = [r for r in rows if r["method"] == REFERENCE] or None
        oracles = {field: runs for field, m in ORACLES.items() if (runs := [r for r in rows if r["method"] == m])}
        table[name] = {m: _row([r for r in rows if r["method"] == m], stock, faults[name], oracles)
                       for m in dict.fromkeys(r["method"] for r in rows)}
    return table
