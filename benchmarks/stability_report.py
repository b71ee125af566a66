"""Markdown and chart of ``stability.py`` results (kept apart so a report can be redrawn from the JSON)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from gradclip_hf.demo.machine import describe
from gradclip_hf.demo.metrics import RECOVER_TOL, SMOOTH

TARGET_RATIO, TARGET_FP = 0.2, 0.005


def _iv(d: dict[str, Any] | None, spec: str = "+.4f") -> str:
    if not d or not d.get("n"):
        return "-"
    if d["n"] < 2 or not math.isfinite(d["low"]):
        return format(d["mean"], spec)
    return f"{d['mean']:{spec}} [{d['low']:{spec}}, {d['high']:{spec}}]"


def _num(v: Any, spec: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "never" if v > 0 else "-inf"
    return format(v, spec)


def _header(result: dict[str, Any]) -> list[str]:
    s, seeds = result["settings"], result["seeds"]
    return [
        "# What clipping saves: damage of real fault types against a clean counterfactual", "",
        f"`{result['command']}`", "",
        f"{describe(result['machine'])}; load {min(result['load'])}-{max(result['load'])}; "
        f"{result['elapsed_s']:.0f} s (cached runs not retrained); package source {result['code']}.", "",
        f"Tiny Llama (hidden {s['hidden']}, {s['layers']} layers, byte-level), batch {s['batch']} x {s['block']} bytes, "
        f"{s['steps']} steps, AdamW, {s['schedule']} schedule after {s['warmup']} warmup steps; lr {s['lr']} "
        f"(pretrain), {s['lora_lr']} (LoRA r={s['lora_rank']}), {s['sft_lr']} (SFT); seeds {seeds[0]}..{seeds[-1]} "
        f"({len(seeds)}).", "",
        "Damage: eval loss with the fault minus without (same method and seed; a diverged run counts as "
        "ln 259 = 5.557). Ratio: damage / stock's damage per seed; removed = 1 - ratio. vs stock: damage minus "
        "stock's damage (negative: less damage). FP cost: clean-run eval loss minus stock's. Brackets: 95 % "
        f"t-interval over seeds. Worst excursion: largest gap of the training loss to the clean run on the same "
        f"batch after the fault began (median over seeds); recover: steps after the fault until the {SMOOTH}-step "
        f"mean gap is within {int(RECOVER_TOL * 100)} % of the clean loss (median; 'never': not within the run). "
        "Caught: share of fault steps flagged; clean skips: updates skipped in the clean run (false positives).", ""]


def _overview(result: dict[str, Any], methods: list[str]) -> list[str]:
    table = result["table"]
    faulty = [sc for sc, info in result["scenarios"].items() if info["fault"] != "none"]
    lines = ["## Share of stock's damage removed (1 - damage ratio; mean [95 % interval])", "",
             "| scenario | stock damage | " + " | ".join(m for m in methods if m != "stock") + " |",
             "|---|---|" + "---|" * (len(methods) - 1)]
    for sc in faulty:
        rows = table[sc]
        stock = rows.get("stock", {}).get("damage")
        cells = [_iv(rows[m].get("removed"), "+.2f") for m in methods if m != "stock"]
        lines.append(f"| {sc} | {_iv(stock)} | " + " | ".join(cells) + " |")
    lines += ["", "## False-positive cost: clean eval loss minus stock's (mean [95 % interval])", "",
              "| task | " + " | ".join(m for m in methods if m != "stock") + " |", "|---|" + "---|" * (len(methods) - 1)]
    seen = set()
    for sc, info in result["scenarios"].items():
        if info["task"] in seen:
            continue
        seen.add(info["task"])
        cells = [_iv(table[sc][m].get("fp_cost")) for m in methods if m != "stock"]
        lines.append(f"| {info['task']} | " + " | ".join(cells) + " |")
    return lines + [""]


def _scenario(name: str, info: dict[str, Any], rows: dict[str, Any], labels: dict[str, str]) -> list[str]:
    steps = info["fault_steps"]
    where = "no fault" if not steps else f"fault steps {steps[0]}-{steps[-1]} ({len(steps)})" if info["length"] > 1 \
        else f"fault steps {steps}"
    lines = [f"### {name}: {info['title']}", "", f"Task {info['task']}; {where}.", "",
             "| method | damage | vs stock | ratio | FP cost | diverged | caught | clean skips | worst excursion | "
             "recover |", "|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {labels.get(m, m)} | {_iv(r.get('damage'))} | {_iv(r.get('vs_stock'))} | "
                     f"{_iv(r.get('ratio'), '.2f')} | {_iv(r.get('fp_cost'))} | {r['diverged']}/{r['seeds']} | "
                     f"{_num(r['caught'], '.0%')} | {_num(r['clean_skips'], '.1f')} | "
                     f"{_num(r.get('worst_excursion'))} | {_num(r.get('recover'), '.0f')} |")
    return lines + [""]


def _targets(result: dict[str, Any], method: str) -> list[str]:
    lines = [f"## Targets for `{method}`", "",
             f"Damage at most {TARGET_RATIO:.0%} of stock's (mean ratio, and upper end of its interval), never worse "
             f"than stock (the interval of the damage difference not above 0), false-positive cost at most "
             f"{TARGET_FP} (mean).", "", "| scenario | ratio | ratio <= 0.2 | not worse than stock | FP cost <= 0.005 |",
             "|---|---|---|---|---|"]
    for sc, info in result["scenarios"].items():
        r = result["table"][sc].get(method)
        if r is None or "fp_cost" not in r:
            continue
        fp = r["fp_cost"]["mean"] <= TARGET_FP
        if info["fault"] == "none":
            lines.append(f"| {sc} | - | - | - | {'yes' if fp else 'NO'} |")
            continue
        ratio, diff = r["ratio"], r["vs_stock"]
        ok_ratio = "yes" if ratio["high"] <= TARGET_RATIO else ("mean only" if ratio["mean"] <= TARGET_RATIO else "NO")
        lines.append(f"| {sc} | {_iv(ratio, '.2f')} | {ok_ratio} | {'NO' if diff['low'] > 0 else 'yes'} | "
                     f"{'yes' if fp else 'NO'} |")
    return lines + [""]


def markdown(result: dict[str, Any]) -> str:
    methods = [m["name"] for m in result["methods"]]
    labels = {m["name"]: m["name"] for m in result["methods"]}
    lines = _header(result) + _overview(result, methods)
    lines += ["## Per scenario", ""]
    for sc, info in result["scenarios"].items():
        lines += _scenario(sc, info, result["table"][sc], labels)
    if "recommended" in methods and "stock" in methods:
        lines += _targets(result, "recommended")
    lines += ["## Methods", "", "| name | what |", "|---|---|"]
    for m in result["methods"]:
        lines.append(f"| {m['name']} | {m['label']}{': `' + str(m['config']) + '`' if m.get('config') else ''} |")
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], k: int = 9) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - k + 1):i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else math.nan)
    return out


def plot(records: list[dict[str, Any]], result: dict[str, Any], path: str, seed: int) -> None:
    """Per scenario: the training-loss gap faulted minus clean (9-step mean) of each method at ``seed``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [sc for sc, info in result["scenarios"].items() if info["fault"] != "none"]
    if not names:
        return
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("tab10")
    methods = [m["name"] for m in result["methods"]]
    for ax, sc in zip(axes.flat, names):
        for i, m in enumerate(methods):
            r = next((r for r in records if r["scenario"] == sc and r["method"] == m and r["seed"] == seed), None)
            if r is None:
                continue
            gap = [a - b for a, b in zip(r["faulted"]["series"]["loss"], r["clean"]["series"]["loss"])]
            ax.plot(_smooth(gap), lw=1.1, color=cmap(i % 10), label=m)
        steps = result["scenarios"][sc]["fault_steps"]
        ax.axvspan(steps[0], steps[-1] + 1, color="red", alpha=0.12)
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(sc, fontsize=9)
        ax.set_ylim(-0.2, 1.5)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"training loss with the fault minus without (same batches), 9-step mean, seed {seed}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
