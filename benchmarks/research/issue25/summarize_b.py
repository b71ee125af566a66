"""Summarise cache/b.jsonl (or another cache): removed share vs stock, damage difference vs recommended,
FP cost per task, flags. Usage: python summarize_b.py [--cache cache/b.jsonl] [--methods ...] [--seeds ...]"""
import argparse
import json
import math
from collections import defaultdict

from gradclip_hf.experiments.metrics import eval_loss
from gradclip_hf.experiments.scenarios import GALLERY
from gradclip_hf.experiments.stats import mean_interval, paired, ratio
from i25lib import Cache, HERE

ap = argparse.ArgumentParser()
ap.add_argument("--cache", default=str(HERE / "cache" / "b.jsonl"))
ap.add_argument("--methods", nargs="*")
ap.add_argument("--seeds", type=int, nargs="*")
ap.add_argument("--ref", default="recommended")
ns = ap.parse_args()
cache = Cache(ns.cache)
runs = defaultdict(dict)  # (method, scenario|clean-task, seed) -> run
TASK = {}
for r in cache.runs.values():
    name = r["tag"].rsplit("_v", 1)[0]
    key = r["scenario"] if r["faulted"] and r["fault_steps"] else "clean-" + r["task"]
    TASK[r["scenario"]] = r["task"]
    runs[(name, key)][r["seed"]] = r
methods = ns.methods or sorted({k[0] for k in runs}, key=lambda m: (m != "stock", m != "recommended", m))
faulty = [s for s in GALLERY if GALLERY[s].fault != "none"] + sorted({k[1] for k in runs if not k[1].startswith("clean-")} - set(GALLERY))
faulty = [s for s in faulty if any(k[1] == s for k in runs)]


def dmg(m, s):
    f, c = runs.get((m, s), {}), runs.get((m, "clean-" + TASK[s]), {})
    seeds = set(f) & set(c)
    if ns.seeds:
        seeds &= set(ns.seeds)
    return {k: eval_loss(f[k]) - eval_loss(c[k]) for k in seeds}


print("## removed share of stock's damage (mean [95% CI]); n seeds\n")
print("| scenario | stock damage | " + " | ".join(methods[1:]) + " |")
print("|---" * (len(methods) + 1) + "|")
for s in faulty:
    st = dmg("stock", s)
    cells = [s, mean_interval(list(st.values())).text()]
    for m in methods[1:]:
        d = dmg(m, s)
        r = ratio(d, st)
        cells.append("-" if r.n == 0 else f"{1 - r.mean:+.2f} [{1 - r.high:+.2f}, {1 - r.low:+.2f}] n{r.n}")
    print("| " + " | ".join(cells) + " |")
print(f"\n## damage minus {ns.ref}'s damage (negative: better than {ns.ref})\n")
print("| scenario | " + " | ".join(methods) + " |")
print("|---" * (len(methods) + 1) + "|")
for s in faulty:
    ref = dmg(ns.ref, s) if any(k == (ns.ref, s) for k in runs) else {}
    print("| " + " | ".join([s] + [paired(dmg(m, s), ref).text() for m in methods]) + " |")
print("\n## FP cost: clean eval minus stock's clean eval\n")
print("| task | " + " | ".join(methods) + " |")
print("|---" * (len(methods) + 1) + "|")
for task in ("pretrain", "lora", "sft"):
    st = {k: eval_loss(v) for k, v in runs.get(("stock", "clean-" + task), {}).items()}
    if not st:
        continue
    cells = [task]
    for m in methods:
        c = {k: eval_loss(v) for k, v in runs.get((m, "clean-" + task), {}).items() if not ns.seeds or k in ns.seeds}
        cells.append(paired(c, st).text())
    print("| " + " | ".join(cells) + " |")
print("\n## prototype flags (summed over seeds): clean runs / lr_mistake\n")
for m in methods:
    tot = defaultdict(lambda: defaultdict(int))
    for (mm, key), by_seed in runs.items():
        if mm != m:
            continue
        for seed, r in by_seed.items():
            for kind, steps in (r.get("extra", {}).get("flags") or {}).items():
                tot[key][kind] += len(steps)
    if tot:
        print(f"- {m}: " + "; ".join(f"{k}: " + ", ".join(f"{kk} {v}" for kk, v in d.items()) for k, d in sorted(tot.items())))
