"""Render FINDINGS tables for question A from results_a*.json."""
import json
import sys

R = {}
for f in ("results_a1.json", "results_a2.json", "results_a3.json"):
    R.update(json.load(open(f)))
TASKS = ("pretrain", "lora", "sft")
POS = (10, 15, 26, 50, 150)


def det(r, m, pos, task=None):
    v = [x for k, x in r["detect"].items() if float(k.split("|")[2]) == m and int(k.split("|")[1]) == pos
         and (task is None or k.split("|")[0] == task)]
    return sum(v) / len(v)


def main_table(names):
    print("| candidate | clean FP GA1 (pre/lora/sft, 10 runs each) | per-micro-batch FP GA4 / GA8 | 1.5x @10/15/26/50/150 | 2x | 3x | real garbage caught | 2x micro-batch GA4 / GA8 |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        r = R[n]
        fp = "/".join(str(r["fp"].get(t, 0)) for t in TASKS)
        ga = " / ".join("/".join(str(r[f"fp_ga{g}"].get(t, 0)) for t in TASKS) for g in (4, 8))
        cells = [" ".join(f"{det(r, m, p):.2f}" for p in POS) for m in (1.5, 2.0, 3.0)]
        real = r["real"]
        mb = " / ".join(f"{sum(x for k, x in r[f'detect_ga{g}'].items() if float(k.split('|')[2]) == 2.0) / sum(1 for k in r[f'detect_ga{g}'] if float(k.split('|')[2]) == 2.0):.2f}" for g in (4, 8))
        print(f"| `{n}` | {fp} | {ga} | {cells[0]} | {cells[1]} | {cells[2]} | {sum(v['caught'] for v in real.values())}/{len(real)} | {mb} |")


def per_task(n):
    r = R[n]
    print(f"\n`{n}`, detection per task (share of injected steps flagged; 10 seeds x lengths 1-3):\n")
    print("| task | 1.5x @10/15/26/50/150 | 2x | 3x | clean FP steps (seed, step) |")
    print("|---|---|---|---|---|")
    for t in TASKS:
        cells = [" ".join(f"{det(r, m, p, t):.2f}" for p in POS) for m in (1.5, 2.0, 3.0)]
        print(f"| {t} | {cells[0]} | {cells[1]} | {cells[2]} | {r['fp_steps'].get(t, [])} |")


if __name__ == "__main__":
    main_table(sys.argv[1].split(","))
    for n in sys.argv[2:]:
        per_task(n)
