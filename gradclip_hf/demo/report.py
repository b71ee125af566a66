"""The demo's numbers (damage per method, share of stock's damage removed), its terminal summary,
``report.md`` and ``results.json``."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from .metrics import RECOVER_TOL, SMOOTH, damage, excursion

__all__ = ["summary", "table_text", "verdict", "markdown", "write", "print_summary", "steps_text", "pack_expr",
           "HEADERS"]

HEADERS = ["method", "eval loss without fault", "with fault", "damage", "worst excursion", "steps to recover",
           "steps clipped", "spikes flagged", "updates skipped"]


def steps_text(steps: list[int]) -> str:
    """``"120, 159, 201, 240"`` or ``"150-179"`` for a consecutive range."""
    if not steps:
        return "none"
    if len(steps) > 2 and steps[-1] - steps[0] == len(steps) - 1:
        return f"{steps[0]}-{steps[-1]}"
    return ", ".join(map(str, steps))


def pack_expr(ns: argparse.Namespace, config) -> str:
    from ..config import ClipConfig

    recommended = ClipConfig.recommended().to_dict()
    extra = {k: v for k, v in config.to_dict().items() if recommended.get(k) != v}
    return "ClipConfig.recommended(" + ", ".join(f"{k}={v!r}" for k, v in extra.items()) + ")"


def _method_row(faulted: dict[str, Any], clean: dict[str, Any]) -> dict[str, Any]:
    exc = excursion(faulted["series"]["loss"], clean["series"]["loss"], faulted["fault_steps"])
    n = faulted["steps_done"]
    rate = faulted["clip_rate"]
    spikes = faulted["spike_steps"]
    return {"key": faulted["key"], "label": faulted["label"], "clean_eval": clean["eval_loss"],
            "faulted_eval": faulted["eval_loss"], "damage": damage(faulted, clean), "worst_excursion": exc["worst"],
            "recover": exc["recover"], "steps": n, "clipped": None if math.isnan(rate) else round(rate * n),
            "spikes": spikes, "caught": None if spikes is None else len(set(spikes) & set(faulted["fault_steps"])),
            "skipped": len(faulted["skipped_steps"] or [])}


def summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per method: eval losses, damage, excursion; and the share of stock's damage the pack removed."""
    runs = result["runs"]
    rows = []
    for key in dict.fromkeys(r["key"] for r in runs):
        faulted = next(r for r in runs if r["key"] == key and r["faulted"])
        clean = next(r for r in runs if r["key"] == key and not r["faulted"])
        rows.append(_method_row(faulted, clean))
    by_key = {r["key"]: r for r in rows}
    stock, pack = by_key["stock"]["damage"], by_key["gradclip"]["damage"]
    removed = 1 - pack / stock if stock > 0 else math.nan
    return {"rows": rows, "removed": removed, "stock_damage": stock, "pack_damage": pack,
            "none_damage": by_key["none"]["damage"]}


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("diverged" if math.isinf(value) else format(value, spec))
    return str(value)


def _cells(row: dict[str, Any], fault_steps: list[int]) -> list[str]:
    recover = "never" if row["recover"] is None else str(row["recover"])
    clipped = "-" if row["clipped"] is None else f"{row['clipped']} of {row['steps']} ({row['clipped'] / row['steps']:.0%})"
    spikes = "- (no detector)" if row["spikes"] is None else f"{len(row['spikes'])} ({row['caught']} of {len(fault_steps)} fault steps)"
    return [row["label"], _fmt(row["clean_eval"]), _fmt(row["faulted_eval"]), _fmt(row["damage"], "+.4f"),
            _fmt(row["worst_excursion"], ".3f"), recover, clipped, spikes, str(row["skipped"])]


def table_text(result: dict[str, Any]) -> str:
    rows = [HEADERS] + [_cells(r, result["fault_steps"]) for r in result["summary"]["rows"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verdict(result: dict[str, Any]) -> str:
    s = result["summary"]
    pack = next(r["label"] for r in s["rows"] if r["key"] == "gradclip")
    if not s["stock_damage"] > 0:
        return (f"On this seed the fault did no measurable damage to the stock run ({s['stock_damage']:+.4f}); "
                f"{pack}: {s['pack_damage']:+.4f}.")
    return (f"{pack} removed {s['removed']:.0%} of the stock run's damage on this seed "
            f"(damage {s['stock_damage']:+.4f} -> {s['pack_damage']:+.4f}); without clipping the damage was "
            f"{s['none_damage']:+.4f}.")


DEFINITIONS = [
    "**damage**: final eval loss (held-out clean blocks) with the fault minus without it, same method and seed: "
    "the same initialisation, data order and steps, the bad batches replaced by the clean batches they displaced.",
    "**worst excursion**: the largest gap between the training losses of the two runs on the same batch after the "
    "fault began. **steps to recover**: steps after the last fault step until that gap, averaged over "
    f"{SMOOTH} steps, is within {int(RECOVER_TOL * 100)}% of the clean loss ('never': not within the run).",
    "**steps clipped**: optimizer steps whose gradients were scaled down, of all steps of the run with the fault "
    "(stock: pre-clip norm above 1.0). **spikes flagged**: steps the pack's detector flagged; **updates "
    "skipped**: optimizer updates it did not apply.",
]


def markdown(result: dict[str, Any]) -> str:
    s, o = result["settings"], result["options"]
    lines = ["# gradclip-hf demo: what a fault costs, measured against the same run without it", "",
             f"`{result['command']}`", "",
             f"Tiny byte-level Llama (hidden {s['hidden']}, {s['layers']} layers, {s['block']}-byte blocks, batch "
             f"{s['batch']}) trained with the Hugging Face Trainer on the Python standard library's source text, AdamW "
             f"lr {s['lr']} ({s['schedule']} after {s['warmup']} warmup steps), {s['steps']} steps, seed {o['seed']}, "
             f"device {o['device']}. Fault: {result['title']}, at steps {steps_text(result['fault_steps'])}.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(_cells(r, result["fault_steps"])) + " |" for r in result["summary"]["rows"]]
    lines += ["", f"**{verdict(result)}**", ""] + [f"- {d}" for d in DEFINITIONS]
    lines += ["", "One seed is one sample: `python benchmarks/stability.py --scenario "
              f"{result['scenario']} --methods none stock recommended` measures the same over 10 seeds with 95 % "
              "intervals (results in benchmarks/README.md).", "",
              f"The pack's run: `GradClipTrainer` with `{result['pack_expr']}`.", "",
              "![training loss with and without the fault](loss.png)", "", "![gradient norms of the pack's run](norms.png)",
              "", f"TensorBoard: `tensorboard --logdir {os.path.join(o['output_dir'], 'tensorboard')}`"]
    syncs = [r["wandb_dir"] for r in result["runs"] if r.get("wandb_dir")]
    if syncs:
        lines += ["", "W&B (offline runs; upload with):", "", "```"] + [f"wandb sync {d}" for d in syncs] + ["```"]
    lines += ["", f"{result['machine']}; {result['elapsed_s']:.0f} s in all (load average {result['load_before']} "
              f"before, {result['load_after']} after)."]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: str) -> list[str]:
    """Charts, ``report.md`` and ``results.json`` in ``out``; returns the chart paths."""
    from .charts import plot

    charts = plot(result, out)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    return charts


def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def print_summary(result: dict[str, Any], charts: list[str], out: str) -> None:
    print(f"\nSummary ({result['elapsed_s']:.0f} s; fault: {result['title']}, at steps "
          f"{steps_text(result['fault_steps'])}):\n")
    print(table_text(result))
    print(f"\n{verdict(result)}")
    print(f"One seed is one sample: python benchmarks/stability.py --scenario {result['scenario']} --methods none "
          f"stock recommended measures it over 10 seeds.")
    print(f"\nReport: {os.path.join(_rel(out), 'report.md')}   charts: {', '.join(_rel(c) for c in charts)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(_rel(out), 'tensorboard')}")
    syncs = [r["wandb_dir"] for r in result["runs"] if r.get("wandb_dir")]
    if syncs:
        print(f"W&B ({os.environ.get('WANDB_MODE', 'online')} runs, project {os.environ.get('WANDB_PROJECT', '')}); "
              f"upload with:")
        for d in syncs:
            print(f"  wandb sync {_rel(d)}")
