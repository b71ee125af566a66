"""What the learning-rate guard (``lr_guard``, issue 25.6) costs where the learning rate rises on purpose: clean
gallery runs (pretraining from scratch, the gallery's settings) under schedules with intended upward jumps (warm
restarts back to the peak) or a long ramp, ``recommended()`` with and without its ``lr_guard=2``. The cost is the
eval-loss difference to the same run without the guard, per seed, with its 95 % interval; the capped steps are
counted (0 means the runs are the same run).

    python benchmarks/lr_guard_schedules.py --seeds 3 [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformers import TrainerCallback  # noqa: E402

from benchmarks import _common  # noqa: E402
from benchmarks.harness import stats  # noqa: E402
from benchmarks.harness.methods import method  # noqa: E402
from benchmarks.harness.tasks import Settings  # noqa: E402
from benchmarks.harness.training import train_one  # noqa: E402

SCHEDULES: dict[str, dict[str, Any]] = {
    "cosine, 3 hard restarts": dict(lr_scheduler_type="cosine_with_restarts", lr_scheduler_kwargs={"num_cycles": 3}),
    "cosine, 100-step warmup": dict(warmup_steps=100),
    "constant after a 10-step warmup": dict(lr_scheduler_type="constant_with_warmup"),
}
METHODS = ("rec_no_lrguard", "rec_lrguard")  # recommended() without and with its lr_guard=2


class CappedSteps(TrainerCallback):
    """Counts the steps whose learning rate the guard capped (a callback reading the run's logged metric)."""

    def __init__(self):
        self.count = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.count += int((logs or {}).get("gradclip/lr_capped", 0))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=Settings().steps)
    p.add_argument("--out", default=_common.RESULTS)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def run(schedule: dict[str, Any], name: str, seed: int, settings: Settings) -> dict[str, Any]:
    counter = CappedSteps()
    record = train_one(method(name), "garbage_batches", seed, False, settings, callbacks=[counter], **schedule)  # its clean run
    return {"eval_loss": record["eval_loss"], "capped": counter.count}


def main(argv=None) -> dict[str, Any]:
    ns = parse(argv)
    import torch

    torch.set_num_threads(ns.threads)
    settings = Settings(steps=ns.steps)
    results: dict[str, Any] = {"command": "python benchmarks/lr_guard_schedules.py " + " ".join(argv or sys.argv[1:]),
                               "seeds": ns.seeds, "steps": ns.steps, "schedules": {}}
    for label, schedule in SCHEDULES.items():
        runs = {m: [run(schedule, m, seed, settings) for seed in range(ns.seeds)] for m in METHODS}
        diffs = {seed: runs["rec_lrguard"][seed]["eval_loss"] - runs["rec_no_lrguard"][seed]["eval_loss"]
                 for seed in range(ns.seeds)}
        iv = stats.mean_interval(list(diffs.values()))
        results["schedules"][label] = {"runs": runs, "cost": {"mean": iv.mean, "low": iv.low, "high": iv.high},
                                       "capped_per_run": sum(r["capped"] for r in runs["rec_lrguard"]) / ns.seeds}
        print(f"{label:32s} cost {iv.mean:+.4f} [{iv.low:+.4f}, {iv.high:+.4f}]  capped/run "
              f"{results['schedules'][label]['capped_per_run']:.1f}", flush=True)
    os.makedirs(ns.out, exist_ok=True)
    with open(os.path.join(ns.out, "lr_guard_schedules.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = [f"`{results['command']}` ({ns.seeds} seeds, {ns.steps} steps, clean pretraining)\n",
             "| schedule | eval-loss cost of `lr_guard=2` (`recommended()` vs `recommended(lr_guard=None)`) | capped steps per run |", "|---|---|---|"]
    for label, r in results["schedules"].items():
        c = r["cost"]
        lines.append(f"| {label} | {c['mean']:+.4f} [{c['low']:+.4f}, {c['high']:+.4f}] | {r['capped_per_run']:.1f} |")
    with open(os.path.join(ns.out, "lr_guard_schedules.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
