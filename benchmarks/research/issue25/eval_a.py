"""Question A: evaluate candidate loss-spike baselines offline on the recorded clean loss series.

Detection: a clean series with an injected multiplicative jump (x m for L steps from step p), per task and
seed; false positives: flags on the clean series (whole run). Also the GA-style per-micro-batch series
(micro-batches of 2 and 1 samples: GA 4 and GA 8 with 8 samples per step) and the real garbage-batch runs.

    PYTHONPATH=/work/main:. python eval_a.py [--seeds 10] [--set NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

import torch

from detectors import EMA, Either, Handoff, Holt, HoltDiff, LowDiff, LowQuantile, TheilSen, run_series
from i25lib import HERE, Cache

TASKS = ("pretrain", "lora", "sft")
POSITIONS = (10, 15, 26, 50, 150)
MAGS = (1.5, 2.0, 3.0)
LENGTHS = (1, 2, 3)


def load(n_seeds: int):
    cache = Cache(HERE / "cache" / "collect.jsonl")
    clean, garbage = {}, []
    for run in cache.runs.values():
        if run["tag"] != "rec_stock_v1":
            continue
        if not run["faulted"] and run["seed"] < n_seeds:
            clean[(run["task"], run["seed"])] = run
        elif run["scenario"].startswith("garbage_"):
            garbage.append(run)
    return clean, garbage


def micro_series(run, k: int) -> list[float]:
    """Per-micro-batch mean token loss, micro-batches of ``k`` samples, in order."""
    rec = run["extra"]["rec"]
    out = []
    for t in range(len(rec)):
        samples = rec[str(t)]
        for i in range(0, len(samples), k):
            s = sum(a for a, _ in samples[i:i + k])
            n = sum(b for _, b in samples[i:i + k])
            out.append(s / max(n, 1))
    return out


def step_series(run) -> list[float]:
    return micro_series(run, 10 ** 9)


CANDIDATES = {
    "ema_today": EMA(),
    "ema_w6": EMA(warmup=6),
    "ema_today+r1.5": EMA(ratio=1.5),
    "holt_a5b2_z6": Holt(),
    "holt_a5b2_z8": Holt(z_max=8),
    "holt_a3b1_z6": Holt(a=0.3, b=0.1),
    "holt_a5b2_z6_free": Holt(trend_max=None),
    "holt_a5b2_z6_w32": Holt(window=32),
    "theilsen16_z6": TheilSen(),
    "theilsen16_z8": TheilSen(z_max=8),
    "theilsen8_z6": TheilSen(window=8),
    "lowq25_r1.6": LowQuantile(ratio=1.6),
    "lowq25_r1.8": LowQuantile(ratio=1.8),
    "lowq0_r1.6": LowQuantile(ratio=1.6, q=0.0),
    "lowq25_z6": LowQuantile(ratio=None, z_max=6, window=16),
    "today|holt_z8": Either(first=EMA(), second=Holt(z_max=8)),
    "today|theilsen16_z8": Either(first=EMA(), second=TheilSen(z_max=8)),
    "today|lowq25_r1.8": Either(first=EMA(), second=LowQuantile(ratio=1.8)),
    "holt_z6->today@40": Handoff(early=Holt(), late=EMA(), until=40),
    "theilsen16_z6->today@40": Handoff(early=TheilSen(), late=EMA(), until=40),
    "lowdiff_q25w8_z6": LowDiff(),
    "lowdiff_q25w8_z8": LowDiff(z_max=8),
    "lowdiff_q50w8_z6": LowDiff(q=0.5),
    "lowdiff_q25w16_z6": LowDiff(window=16),
    "lowdiff_q25w8_z6_a95": LowDiff(alpha=0.95),
    "holtdiff_a5b2_z6": HoltDiff(),
    "holtdiff_a3b1_z6": HoltDiff(a=0.3, b=0.1),
    "today|lowdiff_z6": Either(first=EMA(), second=LowDiff()),
    "today|lowdiff_z8": Either(first=EMA(), second=LowDiff(z_max=8)),
    "lowdiff_z6->today@50": Handoff(early=LowDiff(), late=EMA(), until=50),
    "lowdiff_z6&r1.5": LowDiff(min_ratio=1.5),
    "lowdiff_z6&r1.3": LowDiff(min_ratio=1.3),
    "lowdiff_w16_z6&r1.5": LowDiff(window=16, min_ratio=1.5),
    "today|lowdiff_z6&r1.5": Either(first=EMA(), second=LowDiff(min_ratio=1.5)),
    "today|lowdiff_z5&r1.5": Either(first=EMA(), second=LowDiff(z_max=5, min_ratio=1.5)),
    "today|lowdiff_z6&r1.3": Either(first=EMA(), second=LowDiff(min_ratio=1.3)),
}


def evaluate(det, clean, garbage, ga_sizes=(2, 1)):
    out = {}
    keys = sorted(clean)
    base = torch.tensor([step_series(clean[k]) for k in keys], dtype=torch.float64)  # [S, T]
    spikes, _, _ = run_series(det, base)
    fp = defaultdict(int)
    fp_steps = defaultdict(list)
    for (task, seed), row in zip(keys, spikes):
        idx = row.nonzero().flatten().tolist()
        fp[task] += len(idx)
        fp_steps[task] += [(seed, i) for i in idx]
    out["fp"] = dict(fp)
    out["fp_steps"] = {k: v[:12] for k, v in fp_steps.items()}
    # injected jumps, all at once: [S * P * M * L, T]
    combos = [(p, m, L) for p in POSITIONS for m in MAGS for L in LENGTHS]
    xs = base.repeat_interleave(len(combos), dim=0).clone()
    for i in range(len(keys)):
        for j, (p, m, L) in enumerate(combos):
            xs[i * len(combos) + j, p:p + L] *= m
    sp, _, _ = run_series(det, xs)
    hits = defaultdict(list)  # (task, p, m) -> fraction of injected steps flagged (mean over L, seeds)
    extra = defaultdict(int)
    for i, (task, seed) in enumerate(keys):
        for j, (p, m, L) in enumerate(combos):
            row = sp[i * len(combos) + j]
            hits[(task, p, m)].append(float(row[p:p + L].float().mean()))
            extra[task] += int(row[p + L:].sum()) - int(spikes[i, p + L:].sum())
    out["detect"] = {f"{t}|{p}|{m}": sum(v) / len(v) for (t, p, m), v in hits.items()}
    out["extra_after"] = dict(extra)
    # real garbage batches (stock runs): flagged at the fault step?
    real = {}
    for run in garbage:
        xs1 = torch.tensor([step_series(run)], dtype=torch.float64)
        s1, z1, b1 = run_series(det, xs1)
        p = run["fault_steps"][0]
        c = clean.get((run["task"], run["seed"]))
        ratio = xs1[0, p].item() / (step_series(c)[p] if c else math.nan)
        real[f"{run['task']}|{p}|{run['seed']}"] = {"caught": bool(s1[0, p]), "z": float(z1[0, p]),
                                                     "ratio_vs_clean": ratio, "loss": xs1[0, p].item(),
                                                     "baseline": float(b1[0, p])}
    out["real"] = real
    # GA micro-batch series: FP, and a jump of one micro-batch (the first of step p)
    for k in ga_sizes:
        ga = 8 // k
        mb = torch.tensor([micro_series(clean[key], k) for key in keys], dtype=torch.float64)
        s_mb, _, _ = run_series(det, mb)
        fpk = defaultdict(int)
        for (task, _), row in zip(keys, s_mb):
            fpk[task] += int(row.sum())
        out[f"fp_ga{ga}"] = dict(fpk)
        combos2 = [(p, m) for p in POSITIONS for m in MAGS]
        xs2 = mb.repeat_interleave(len(combos2), dim=0).clone()
        for i in range(len(keys)):
            for j, (p, m) in enumerate(combos2):
                xs2[i * len(combos2) + j, p * ga] *= m
        s2, _, _ = run_series(det, xs2)
        h2 = defaultdict(list)
        for i, (task, _) in enumerate(keys):
            for j, (p, m) in enumerate(combos2):
                h2[(task, p, m)].append(float(s2[i * len(combos2) + j, p * ga]))
        out[f"detect_ga{ga}"] = {f"{t}|{p}|{m}": sum(v) / len(v) for (t, p, m), v in h2.items()}
    return out


def summary_line(name, r):
    d = r["detect"]
    def mean_of(pred):
        v = [x for key, x in d.items() if pred(*key.split("|"))]
        return sum(v) / len(v)
    cells = [name, "/".join(str(r["fp"].get(t, 0)) for t in TASKS)]
    for ga in (4, 8):
        if f"fp_ga{ga}" in r:
            cells.append("/".join(str(r[f"fp_ga{ga}"].get(t, 0)) for t in TASKS))
    for m in MAGS:
        cells.append(" ".join(f"{mean_of(lambda t, p, mm: int(p) == pos and float(mm) == m):.2f}" for pos in POSITIONS))
    real = r["real"]
    cells.append(f"{sum(v['caught'] for v in real.values())}/{len(real)}")
    for ga in (4, 8):
        key = f"detect_ga{ga}"
        if key in r:
            v = [x for kk, x in r[key].items() if float(kk.split('|')[2]) == 2.0]
            cells.append(f"{sum(v) / len(v):.2f}")
    return "| " + " | ".join(cells) + " |"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--set", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()
    torch.set_num_threads(1)
    clean, garbage = load(ns.seeds)
    print(f"clean series: {len(clean)}; real garbage runs: {len(garbage)}")
    names = ns.set or list(CANDIDATES)
    results = {}
    print("| candidate | clean FP flags pre/lora/sft (GA1) | GA4 micro | GA8 micro | detect 1.5x @10 15 26 50 150 | "
          "2x | 3x | real garbage caught | GA4 2x | GA8 2x |")
    print("|---" * 10 + "|")
    for name in names:
        r = evaluate(CANDIDATES[name], clean, garbage)
        results[name] = r
        print(summary_line(name, r), flush=True)
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
