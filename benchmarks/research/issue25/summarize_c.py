"""Summarise cache/acc.jsonl: damage, removed share of stock's damage, avoidable share
(stock - method) / (stock - oracle_step), FP cost of the gate, dropped micro-batches."""
from collections import defaultdict

from gradclip_hf.experiments.metrics import eval_loss
from gradclip_hf.experiments.stats import mean_interval
from i25lib import Cache, HERE
from acc import SCENARIOS

c = Cache(HERE / "cache" / "acc.jsonl")
R = defaultdict(dict)
for r in c.runs.values():
    m = r["tag"].rsplit("_v", 1)[0]
    key = r["scenario"] if r["faulted"] else f"clean-ga{r['variant'][2:]}"
    R[(m, key)][r["seed"]] = r
M = ["stock", "recommended", "oracle_step", "gate", "gate2", "gate3", "oracle_micro"]


def dmg(m, s):
    ga = SCENARIOS[s].ga
    f = R.get((m, s), {})
    cl = R.get(("recommended" if m.startswith("oracle") else m, f"clean-ga{ga}"), {})
    return {k: eval_loss(f[k]) - eval_loss(cl[k]) for k in set(f) & set(cl)}


print("## damage (eval loss with the fault minus without; mean [95% CI] over seeds)\n")
print("| scenario | " + " | ".join(M) + " |")
print("|---" * (len(M) + 1) + "|")
for s in SCENARIOS:
    print("| " + " | ".join([s] + [mean_interval(list(dmg(m, s).values())).text() for m in M]) + " |")
print("\n## removed share of stock's damage (1 - damage / stock's, per seed) and avoidable share "
      "(stock - method) / (stock - oracle_step), means over seeds\n")
print("| scenario | " + " | ".join(f"{m} removed / avoidable" for m in M[1:]) + " |")
print("|---" * len(M) + "|")
for s in SCENARIOS:
    st, orc = dmg("stock", s), dmg("oracle_step", s)
    cells = [s]
    for m in M[1:]:
        d = dmg(m, s)
        seeds = sorted(set(d) & set(st) & set(orc))
        rem = mean_interval([1 - d[k] / st[k] for k in seeds])
        av = mean_interval([(st[k] - d[k]) / (st[k] - orc[k]) for k in seeds if abs(st[k] - orc[k]) > 1e-9])
        cells.append(f"{rem.text('+.2f')} / {av.mean:+.2f}")
    print("| " + " | ".join(cells) + " |")
print("\n## clean runs: FP cost vs stock (same GA) and dropped micro-batches / skipped steps\n")
for ga in (4, 8):
    st = {k: eval_loss(v) for k, v in R.get(("stock", f"clean-ga{ga}"), {}).items()}
    for m in ("recommended", "gate", "gate2", "gate3"):
        cl = R.get((m, f"clean-ga{ga}"), {})
        fp = mean_interval([eval_loss(cl[k]) - st[k] for k in cl if k in st])
        drops = [len(cl[k].get("extra", {}).get("gate", [])) for k in sorted(cl)]
        skips = [len(cl[k].get("skipped_steps") or []) for k in sorted(cl)]
        print(f"- GA{ga} {m}: FP cost {fp.text()}; dropped micro-batches per run {drops}; skipped steps {skips}")
print("\n## what the gate dropped on the faulted runs (seed: dropped (step, micro) in fault steps / outside)\n")
for s, acc in SCENARIOS.items():
    fs = set(acc.scenario().fault_steps(300))
    for gname in ("gate", "gate2", "gate3"):
      for k, r in sorted(R.get((gname, s), {}).items()):
        g = [tuple(x) for x in r["extra"].get("gate", [])]
        inside = [x for x in g if x[0] in fs]
        right = [x for x in inside if x[1] in acc.bad_micro()]
        print(f"- {gname} {s} seed {k}: {len(right)} bad micro-batches dropped of {len(fs) * len(acc.bad_micro())}; "
              f"{len(inside) - len(right)} good ones in fault steps; {len(g) - len(inside)} outside fault steps; "
              f"recommended skipped {len(R[('recommended', s)][k]['skipped_steps'] or []) if k in R.get(('recommended', s), {}) else '-'} steps")
