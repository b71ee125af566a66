"""False positives only: the clean runs of the gallery's tasks (no fault) for some methods and seeds, and each
method's false-positive cost (clean eval loss minus stock's, per seed, 95 % interval) with the steps it flagged,
skipped or dropped a micro-batch in. Cheaper than ``stability.py`` (no faulted runs) where only the clean side
is in question, e.g. the micro-batch gate on clean accumulation runs (issue 25):

    python benchmarks/clean_runs.py --scenario ga4_garbage_micro,ga8_garbage_micro --methods stock rec_gate --seeds 10

(a scenario names its task: its clean run is the one used). Shares ``stability.py``'s cache and keys.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import _common  # noqa: E402
from benchmarks.harness.methods import method  # noqa: E402
from benchmarks.harness.scenarios import scenario  # noqa: E402
from benchmarks.harness.stats import mean_interval  # noqa: E402
from benchmarks.harness.sweep import RunStore, _get_or_train, code_hashes  # noqa: E402
from benchmarks.harness.tasks import Settings  # noqa: E402
from benchmarks.stability import CACHE  # noqa: E402


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", required=True, help="comma-separated gallery scenarios (their tasks' clean runs)")
    p.add_argument("--methods", nargs="+", default=["stock", "recommended"])
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--out", default=_common.RESULTS)
    p.add_argument("--name", default="clean_runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=Settings().steps, help="steps per run (default: the gallery's)")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Any]:
    ns = parse(argv)
    import torch

    torch.set_num_threads(ns.threads)
    store, code = RunStore(None if ns.cache == "none" else ns.cache), code_hashes()
    settings = Settings(steps=ns.steps)
    rows: dict[str, dict[str, Any]] = {}
    for name in ns.scenario.split(","):
        sc = scenario(name.strip())
        runs = {m: [_get_or_train(store, method(m), sc, seed, False, settings, code, print) for seed in range(ns.seeds)]
                for m in ns.methods}
        base = [r["eval_loss"] for r in runs.get("stock", [])]
        task = {}
        for m, rs in runs.items():
            iv = mean_interval([r["eval_loss"] - b for r, b in zip(rs, base)]) if base else None
            task[m] = {"fp_cost": None if iv is None else iv.to_dict(),
                       "flagged": [r["spike_steps"] for r in rs], "skipped": [r["skipped_steps"] for r in rs],
                       "dropped": [r.get("dropped_steps", []) for r in rs]}
        rows[sc.task] = task
    result = {"command": "python benchmarks/clean_runs.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "seeds": ns.seeds, "code": code, "tasks": rows}
    _common.write_json(os.path.join(ns.out, ns.name + ".json"), result)
    lines = [f"`{result['command']}`\n", "| task | method | false-positive cost | runs with a clean step flagged | "
             "micro-batches dropped |", "|---|---|---|---|---|"]
    for task, methods in rows.items():
        for m, r in methods.items():
            fp = r["fp_cost"]
            cost = "-" if fp is None else f"{fp['mean']:+.4f} [{fp['low']:+.4f}, {fp['high']:+.4f}]"
            flagged = sum(bool(f) for f in r["flagged"])
            lines.append(f"| {task} | {m} | {cost} | {flagged} of {ns.seeds} | {sum(len(d) for d in r['dropped'])} |")
    _common.write_text(os.path.join(ns.out, ns.name + ".md"), "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
