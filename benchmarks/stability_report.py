"""Markdown and chart of ``stability.py`` results (kept apart so a report can be redrawn from the JSON), and the
README's "Does it help?" table from one or more result JSONs:

    python benchmarks/stability_report.py benchmarks/results/stability.json benchmarks/results/stability_accum.json --readme
    python benchmarks/stability_report.py benchmarks/results/stability_scale.json   # the report's markdown again
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from typing import Any, Sequence

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
        f"({len(seeds)}).{_accumulation(result)}", "",
        "Damage: eval loss with the fault minus without (same method and seed; a diverged run counts as "
        "ln 259 = 5.557). Ratio: damage / stock's damage per seed; removed = 1 - ratio. vs stock: damage minus "
        "stock's damage (negative: less damage). FP cost: clean-run eval loss minus stock's. Brackets: 95 % "
        f"t-interval over seeds. Worst excursion: largest gap of the training loss to the clean run on the same "
        f"batch after the fault began (median over seeds); recover: steps after the fault until the {SMOOTH}-step "
        f"mean gap is within {int(RECOVER_TOL * 100)} % of the clean loss (median; 'never': not within the run). "
        "Caught: share of fault steps flagged or skipped; clean skips: updates skipped in the clean run (false "
        "positives). "
        "Avoidable: the share of the avoidable damage removed, (stock's damage - damage) / (stock's damage - the "
        "oracle's damage) per seed, where `oracle` skips exactly the fault steps (1: as good as a perfect whole-step "
        "skip; above 1: better than any); micro: the same against `oracle_micro`, which drops exactly the bad "
        "micro-batches; n/a: the avoidable damage (stock's minus the oracle's) is not above 0 or its interval reaches "
        "0 (no share of it can be told). Caught counts listed, non-finite and spike skips alike.", ""]


def _accumulation(result: dict[str, Any]) -> str:
    tasks = sorted({info["task"] for info in result["scenarios"].values() if "_ga" in info["task"]})
    if not tasks:
        return ""
    batch = result["settings"]["batch"]
    parts = [f"`{t}`: {int(t.rsplit('ga', 1)[1])} micro-batches of {batch // int(t.rsplit('ga', 1)[1])}" for t in tasks]
    return (" Gradient accumulation (the same samples per optimizer step, the same fault steps): " + "; ".join(parts)
            + "; the clean counterfactual replaces the bad samples by the clean ones they displaced.")


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
    lines += _avoidable(result, methods, faulty)
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


AVOIDABLE = {"avoidable": "oracle", "avoidable_micro": "oracle_micro"}  # row field: its oracle


def _share(rows: dict[str, Any], method: str, field: str, spec: str = "+.2f") -> str:
    """``rows[method][field]``, or "n/a" where the oracle's avoidable damage (stock's damage minus the oracle's) is
    not above 0 on average or its interval reaches 0: no share of it can be told (a skip of a step that is mostly
    good can cost more than its bad part does)."""
    if field not in rows.get(method, {}):
        return "-"
    return "n/a" if _no_gap(rows[method].get(field + "_gap")) else _iv(rows[method][field], spec)


def _no_gap(gap: dict[str, Any] | None) -> bool:
    if not gap or not gap.get("n"):
        return False
    return gap["mean"] <= 0 or (gap["n"] >= 2 and math.isfinite(gap["low"]) and gap["low"] <= 0)


def _avoidable(result: dict[str, Any], methods: list[str], faulty: list[str]) -> list[str]:
    lines: list[str] = []
    for field, oracle, what in (("avoidable", "oracle", "skips exactly the fault steps"),
                                ("avoidable_micro", "oracle_micro", "drops exactly the bad micro-batches")):
        names = [sc for sc in faulty if any(field in row for row in result["table"][sc].values())]
        shown = [m for m in methods if m not in ("stock", oracle)]
        if not names:
            continue
        lines += ["", f"## Share of the avoidable damage removed, against `{oracle}` (it {what}): (stock - method) / "
                      f"(stock - {oracle}), mean [95 % interval]", "",
                  f"| scenario | stock damage | {oracle} damage | " + " | ".join(shown) + " |",
                  "|---|---|---|" + "---|" * len(shown)]
        for sc in names:
            rows = result["table"][sc]
            cells = [_share(rows, m, field) for m in shown]
            lines.append(f"| {sc} | {_iv(rows['stock'].get('damage'))} | {_iv(rows.get(oracle, {}).get('damage'))} | "
                         + " | ".join(cells) + " |")
    return lines


def _scenario(name: str, info: dict[str, Any], rows: dict[str, Any], labels: dict[str, str]) -> list[str]:
    steps = info["fault_steps"]
    where = "no fault" if not steps else f"fault steps {steps[0]}-{steps[-1]} ({len(steps)})" if info["length"] > 1 \
        else f"fault steps {steps}"
    lines = [f"### {name}: {info['title']}", "", f"Task {info['task']}; {where}.", "",
             "| method | damage | vs stock | ratio | avoidable | micro | FP cost | diverged | caught | clean skips | "
             "worst excursion | recover |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m, r in rows.items():
        lines.append(f"| {labels.get(m, m)} | {_iv(r.get('damage'))} | {_iv(r.get('vs_stock'))} | "
                     f"{_iv(r.get('ratio'), '.2f')} | {_share(rows, m, 'avoidable')} | "
                     f"{_share(rows, m, 'avoidable_micro')} | {_iv(r.get('fp_cost'))} | {r['diverged']}/{r['seeds']} | "
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


# ---------------------------------------------------------------------------------------------- README table
README_LABELS = {
    "nonfinite": "NaN/Inf in 2 steps (bf16/fp16 overflow)",
    "lora_garbage": "LoRA fine-tune, 3 bursts of 4 garbage batches",
    "label_noise_shard": "a shard with wrong labels (30 batches)",
    "corrupt_shard": "a corrupted shard, UTF-16 (30 batches)",
    "garbage_batches": "4 isolated garbage batches",
    "lr_mistake": "learning rate 10x too high for 10 steps",
    "ga4_garbage_micro": "GA 4: 1 garbage micro-batch of 4, at 4 steps",
    "ga8_garbage_micro": "GA 8: 1 garbage micro-batch of 8, at 4 steps",
    "ga4_garbage_sample": "GA 4: 1 garbage sample of 8, at 4 steps",
    "ga4_shard_steps": "GA 4: a UTF-16 shard over all micro-batches of 30 steps",
    "ga4_shard_micro": "GA 4: a UTF-16 shard in 1 micro-batch of 4, 30 steps",
    "ga8_shard_steps": "GA 8: a UTF-16 shard over all micro-batches of 30 steps",
}
METHOD_LABELS = {"recommended": "`recommended()`", "olmo": "OLMo-core rule", "zclip": "zclip 1.0.0",
                 "oracle": "step oracle", "oracle_micro": "micro-batch oracle"}


def _pct(d: dict[str, Any] | None, interval: bool = False) -> str:
    if not d or not d.get("n") or not math.isfinite(d["mean"]):
        return "-"
    text = f"{100 * d['mean'] + 0.0:.0f} %"
    if d["n"] >= 2 and math.isfinite(d["low"]):
        if interval:
            return f"{text} [{100 * d['low'] + 0.0:.0f}, {100 * d['high'] + 0.0:.0f}]"
        if d["low"] < 0 < d["high"]:
            return text + " (n.s.)"
    return text


def _readme_rows(result: dict[str, Any], main: str, peers: Sequence[str], seeds: str,
                 shown: set[str]) -> list[tuple[float, str]]:
    rows = []
    for sc, info in result["scenarios"].items():
        table = result["table"][sc]
        if info["fault"] == "none" or main not in table or "stock" not in table or sc in shown:
            continue
        shown.add(sc)
        stock, row = table["stock"], table[main]
        diverged = f" ({stock['diverged']}/{stock['seeds']} runs diverged)" if stock["diverged"] else ""
        field = "avoidable_micro" if "avoidable_micro" in row else "avoidable"
        avoidable = "n/a" if _no_gap(row.get(field + "_gap")) else _pct(row.get(field), True)
        cells = [f"**{_pct(row.get('removed'), True)}**", avoidable]
        cells += [_pct(table.get(p, {}).get("removed")) for p in peers]
        label = README_LABELS.get(sc, info["title"]) + seeds
        rows.append((row.get("removed", {}).get("mean", math.nan),
                     f"| {label} | {stock['damage']['mean']:+.3f}{diverged} | " + " | ".join(cells) + " |"))
    return rows


def _fp_row(results: Sequence[dict[str, Any]], main: str, peers: Sequence[str]) -> str:
    tasks: dict[str, dict[str, Any]] = {}
    for result in results:
        for sc, info in result["scenarios"].items():
            tasks.setdefault(info["task"], result["table"][sc])

    def cell(m: str) -> str:
        values = [rows[m]["fp_cost"]["mean"] if "fp_cost" in rows.get(m, {}) else None for rows in tasks.values()]
        return " / ".join("-" if v is None else f"{v:+.4f}" for v in values)

    names = " / ".join(tasks)
    return (f"| false-positive cost (clean {names} runs) | | **{cell(main)}** | | "
            + " | ".join(cell(p) for p in peers) + " |")


def readme_table(results: Sequence[dict[str, Any]], main: str = "recommended",
                 peers: Sequence[str] = ("olmo", "zclip")) -> str:
    """The README's "Does it help?" table from ``stability.py`` results (in order; within one result the faults
    by ``main``'s removed share, highest first; a fault in several results: the first one's row): stock's damage, the share removed by ``main`` and the share of the
    avoidable damage it removed (against the best oracle the result has: the micro-batch oracle, else the step
    oracle; "n/a" where the avoidable damage is not resolved above 0), the share removed by each of ``peers``, and
    the false-positive cost per task."""
    counts = {len(r["seeds"]) for r in results}
    same = len(counts) == 1
    head = f"fault ({counts.pop()} seeds)" if same else "fault"
    label = METHOD_LABELS.get(main, f"`{main}`")
    lines = [f"| {head} | stock's damage | removed by {label} | avoidable damage removed by {label} | "
             + " | ".join(METHOD_LABELS.get(p, p) for p in peers) + " |", "|---|---|---|---|" + "---|" * len(peers)]
    shown: set[str] = set()  # a fault in several results: the first one's row
    for result in results:
        seeds = "" if same else f" ({len(result['seeds'])} seeds)"
        rows = _readme_rows(result, main, peers, seeds, shown)
        lines += [text for _, text in sorted(rows, key=lambda r: -r[0] if math.isfinite(r[0]) else math.inf)]
    lines.append(_fp_row(results, main, peers))
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description="Redraw a stability report's markdown, or the README table, from JSON.")
    p.add_argument("results", nargs="+", help="stability.py JSON files")
    p.add_argument("--readme", action="store_true", help="the README's 'Does it help?' table of all the files")
    p.add_argument("--main", default="recommended", help="the method whose removed and avoidable shares lead")
    p.add_argument("--peers", nargs="*", default=["olmo", "zclip"], help="methods shown by their removed share")
    ns = p.parse_args(argv)
    results = []
    for path in ns.results:
        with open(path) as f:
            results.append(json.load(f))
    text = readme_table(results, ns.main, ns.peers) if ns.readme else "\n".join(markdown(r) for r in results)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
