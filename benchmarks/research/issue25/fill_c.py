"""Fill the C tables of FINDINGS.md from cache/acc.jsonl."""
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


def dmg(m, s):
    ga = SCENARIOS[s].ga
    f = R.get((m, s), {})
    cl = R.get(("recommended" if m.startswith("oracle") else m, f"clean-ga{ga}"), {})
    return {k: eval_loss(f[k]) - eval_loss(cl[k]) for k in set(f) & set(cl)}


D = ["stock", "recommended", "oracle_step", "gate", "gate2", "gate3", "oracle_micro"]
rows_d, rows_r, rows_det, rows_fp = [], [], [], []
for s, acc in SCENARIOS.items():
    rows_d.append("| " + " | ".join([f"`{s}`"] + [mean_interval(list(dmg(m, s).values())).text() for m in D]) + " |")
    st = dmg("stock", s)
    cells = [f"`{s}`"]
    for m in D[1:]:
        d = dmg(m, s)
        cells.append(mean_interval([1 - d[k] / st[k] for k in sorted(set(d) & set(st))]).text("+.2f"))
    rows_r.append("| " + " | ".join(cells) + " |")
    fs = set(acc.scenario().fault_steps(300))
    rec = R.get(("recommended", s), {})
    cells = [f"`{s}`", ", ".join(f"{len(fs & set(r['skipped_steps'] or []))}/{len(fs)}" for _, r in sorted(rec.items()))]
    for g in ("gate", "gate2", "gate3"):
        parts = []
        for _, r in sorted(R.get((g, s), {}).items()):
            dropped = [tuple(x) for x in r["extra"].get("gate", [])]
            inside = [x for x in dropped if x[0] in fs]
            right = [x for x in inside if x[1] in acc.bad_micro()]
            parts.append(f"{len(right)}/{len(fs) * len(acc.bad_micro())}" + (f" ({len(inside) - len(right)})" if len(inside) > len(right) else ""))
        cells.append(", ".join(parts))
    rows_det.append("| " + " | ".join(cells) + " |")
for ga in (4, 8):
    st = {k: eval_loss(v) for k, v in R.get(("stock", f"clean-ga{ga}"), {}).items()}
    cells = [str(ga)]
    for m in ("recommended", "gate", "gate2", "gate3"):
        cl = R.get((m, f"clean-ga{ga}"), {})
        fp = mean_interval([eval_loss(cl[k]) - st[k] for k in cl if k in st])
        drops = [len(cl[k].get("extra", {}).get("gate", [])) for k in sorted(cl)] if m != "recommended" else \
            [len(cl[k].get("skipped_steps") or []) for k in sorted(cl)]
        what = "dropped" if m != "recommended" else "skipped steps"
        cells.append(f"{fp.text()}; {what} {drops}")
    rows_fp.append("| " + " | ".join(cells) + " |")
text = open("FINDINGS.md").read()
for key, rows in (("GATE3_DAMAGE", rows_d), ("GATE3_REMOVED", rows_r), ("GATE3_DETECT", rows_det), ("GATE3_FP", rows_fp)):
    text = text.replace(key, "\n".join(rows))
open("FINDINGS.md", "w").write(text)
print("\n".join(rows_d + [""] + rows_r + [""] + rows_det + [""] + rows_fp))
