"""How early the loss detector catches a loss jump: the shipped early-training rule (``spike_early``, on by
default) against the running statistics alone (``spike_early=False``, the detector before issue 25.5).

1. Record the step-loss series (the Trainer's logged training loss, one value per optimizer step) of clean runs of
   the gallery's tasks (``pretrain``, ``lora``, ``sft``; ``benchmarks/harness``: the gallery's own data, models,
   settings and the stock Trainer with ``max_grad_norm=1.0``), cached in a JSON-lines file (the gallery's run cache
   format and keys: a rerun trains nothing).
2. Replay the package's own loss detector (``ClipConfig.recommended(spike_early=...).build_spikes().loss_detector``:
   z 6, warmup 20, adapt after 50) over each clean series, one value per step as in training: every flag is a
   false positive.
3. Replay it over the same series with an injected multiplicative jump (the loss x ``factor`` for ``length`` steps
   from 0-based step ``position``, the rest unchanged: what the detector sees when the jumped steps are skipped):
   the share of the jumped steps flagged, and the flags in the ``--after`` clean steps that follow beyond the clean
   replay's (extra flags a jump causes). The detector's state before the jump is the clean replay's (a copy), so
   only the jumped steps and those after are replayed.

    python benchmarks/early_detection.py                   # 10 seeds x pretrain, lora, sft
    python benchmarks/early_detection.py --seeds 3 --tasks pretrain
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import sys
import time
from statistics import mean
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

from benchmarks.harness.scenarios import Scenario  # noqa: E402
from benchmarks.harness.sweep import RunStore, code_hashes, run_grid  # noqa: E402
from benchmarks.harness.tasks import Settings  # noqa: E402
from gradclip_hf import ClipConfig  # noqa: E402
from gradclip_hf.demo import machine  # noqa: E402

TASKS = ("pretrain", "lora", "sft")
POSITIONS = (10, 15, 26, 50, 150)
FACTORS = (1.5, 2.0, 3.0)
LENGTHS = (1, 2, 3)
VARIANTS = {"early": True, "before": False}  # name -> spike_early
LABELS = {"early": "early rule (`spike_early=True`, default)",
          "before": "running statistics only (`spike_early=False`)"}
CACHE = os.path.join(_common.RESULTS, "cache", "early_detection.jsonl")


def detector(early: bool):
    """The loss detector of ``ClipConfig.recommended(spike_early=early)``, as the pack builds it."""
    return ClipConfig.recommended(spike_early=early).build_spikes().loss_detector


def feed(det: Any, values: Sequence[float]) -> list[bool]:
    """``det.update`` on each value in turn (a 0-dim tensor per step, as in training): the flags."""
    return [bool(det.update(torch.tensor(float(v), dtype=torch.float64))[0]) for v in values]


def inject(series: Sequence[float], position: int, factor: float, length: int) -> list[float]:
    """``series`` with its values at ``position .. position + length - 1`` multiplied by ``factor``."""
    out = list(series)
    for t in range(position, min(position + length, len(out))):
        out[t] = out[t] * factor
    return out


def replay(early: bool, series: Sequence[float], positions: Sequence[int], factors: Sequence[float],
           lengths: Sequence[int], after: int) -> dict[str, Any]:
    """One series through a fresh detector: ``{"clean": flagged steps, "jumps": {(position, factor, length):
    {"hit": jumped steps flagged, "extra": flags in the ``after`` steps that follow, beyond the clean replay's}}}``."""
    det, snapshots, clean = detector(early), {}, []
    for t, value in enumerate(series):
        if t in positions:
            snapshots[t] = copy.deepcopy(det)
        clean += feed(det, [value])
    jumps = {}
    for p in positions:
        for factor in factors:
            for length in lengths:
                end = min(p + length + after, len(series))
                flags = feed(copy.deepcopy(snapshots[p]), inject(series, p, factor, length)[p:end])
                jumps[(p, factor, length)] = {"hit": sum(flags[:length]),
                                              "extra": sum(flags[length:]) - sum(clean[p + length:end])}
    return {"clean": [t for t, flag in enumerate(clean) if flag], "jumps": jumps}


def record(tasks: Sequence[str], seeds: Sequence[int], settings: Settings, store: RunStore,
           log=print) -> dict[tuple[str, int], dict[str, Any]]:
    """The stock Trainer's clean run of each (task, seed) (cached in ``store``): its record, whose
    ``["series"]["loss"]`` is the step-loss series."""
    scenarios = [Scenario(f"clean_{task}", f"clean {task}", task, "none") for task in tasks]
    out = {}
    for seed in seeds:  # seed by seed, so an interrupted run resumes from the cache
        for r in run_grid(["stock"], scenarios, [seed], settings, store, log=log, code=code_hashes()):
            out[(r["clean"]["task"], seed)] = r["clean"]
    return out


def summarise(replays: dict[tuple[str, str, int], dict[str, Any]], ns: argparse.Namespace) -> dict[str, Any]:
    """Per variant and task: clean flags, their steps, extra flags after jumps; the share of jumped steps flagged
    per (factor, position) (mean over seeds and lengths), per task and over tasks."""
    out: dict[str, Any] = {}
    for variant in VARIANTS:
        rows: dict[str, Any] = {}
        for task in ns.tasks:
            mine = {seed: replays[(variant, task, seed)] for seed in ns.seeds_list}
            detect = {f"{factor}": {f"{p}": mean(r["jumps"][(p, factor, n)]["hit"] / n for r in mine.values()
                                                 for n in ns.lengths) for p in ns.positions} for factor in ns.factors}
            rows[task] = {"clean_flags": sum(len(r["clean"]) for r in mine.values()),
                          "clean_values": sum(ns.lengths_of[(task, seed)] for seed in mine),
                          "clean_flagged": [[seed, t] for seed, r in mine.items() for t in r["clean"]],
                          "extra_after": sum(j["extra"] for r in mine.values() for j in r["jumps"].values()),
                          "detect": detect}
        rows["all"] = {"detect": {f: {p: mean(rows[task]["detect"][f][p] for task in ns.tasks)
                                      for p in rows[ns.tasks[0]]["detect"][f]} for f in rows[ns.tasks[0]]["detect"]}}
        out[variant] = rows
    return out


def _seeds(seeds: Sequence[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"{len(seeds)} seeds ({seeds[0]}-{seeds[-1]})"


def markdown(result: dict[str, Any]) -> str:
    s, tasks, table, runs = result["settings"], result["tasks"], result["table"], result["runs"]
    positions = [str(p) for p in result["positions"]]
    lines = ["# Early detection: the loss detector on clean step losses with injected jumps", "",
             f"Command: `{result['command']}` ({result['elapsed_s']:.0f} s; {runs['count']} runs, "
             f"{runs['trained_now']} trained by this command and the rest from its cache, {runs['train_s']:.0f} s "
             f"of training in all; code `{result['code']}`; {result['machine'].get('cpu', '')}).", "",
             f"Series: the logged step loss of the stock Trainer's clean runs of the gallery's tasks "
             f"({', '.join(tasks)}; `benchmarks/harness`: {s['steps']} steps, batch {s['batch']} x {s['block']} "
             f"tokens, pretrain lr {s['lr']}, LoRA lr {s['lora_lr']}, SFT lr {s['sft_lr']}), "
             f"{_seeds(result['seeds'])} per task. Detector: the loss detector of `ClipConfig.recommended()` (z 6, "
             f"warmup 20, adapt after 50), with and without `spike_early`. Steps are 0-based optimizer steps (the "
             f"gallery's fault steps).", "",
             "## False positives on the clean series", "",
             "| detector | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for v, rows in table.items():
        cells = [f"{rows[t]['clean_flags']} of {rows[t]['clean_values']}"
                 + (f" (seed, step: {', '.join(f'{a}/{b}' for a, b in rows[t]['clean_flagged'][:6])})"
                    if rows[t]["clean_flagged"] else "") for t in tasks]
        lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    lengths = "-".join(str(n) for n in (result["lengths"][0], result["lengths"][-1]))
    lines += ["", f"## Share of the jumped steps flagged (mean over {_seeds(result['seeds'])} x jumps of "
              f"{lengths} steps)", "", "A jump multiplies the clean loss by the factor for 1-3 steps from the step "
              "in the column (the other steps unchanged).", ""]
    for factor in table["early"]["all"]["detect"]:
        lines += [f"**{factor}x**", "", "| task | detector | " + " | ".join(f"step {p}" for p in positions) + " |",
                  "|---" * (len(positions) + 2) + "|"]
        for task in [*tasks, "all"]:
            for v, rows in table.items():
                values = rows[task]["detect"][factor]
                lines.append(f"| {task if task != 'all' else 'mean of the tasks'} | {v} | "
                             + " | ".join(f"{values[p]:.2f}" for p in positions) + " |")
        lines.append("")
    lines += [f"Extra flags in the {result['after']} clean steps after a jump (beyond the clean replay's), summed "
              "over every jump, seed and task: " + ", ".join(
                  f"{v} {sum(rows[t]['extra_after'] for t in tasks)}" for v, rows in table.items()) + ".", ""]
    return "\n".join(lines)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--positions", nargs="+", type=int, default=list(POSITIONS), help="0-based steps of the jumps")
    p.add_argument("--factors", nargs="+", type=float, default=list(FACTORS))
    p.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
    p.add_argument("--after", type=int, default=20, help="clean steps replayed after a jump (default 20)")
    p.add_argument("--cache", default=CACHE, help="JSON-lines cache of the runs ('none': no cache)")
    p.add_argument("--out", default=_common.RESULTS, help="folder of the .md/.json outputs")
    p.add_argument("--name", default="early_detection", help="output file name")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"Settings.{f.name} (default {f.default})")
    ns = p.parse_args(argv)
    ns.settings = Settings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Settings)})
    ns.seeds_list = list(range(ns.first_seed, ns.first_seed + ns.seeds))
    if min(ns.positions) < 0 or max(ns.positions) + max(ns.lengths) > ns.settings.steps:
        p.error(f"--positions: each jump must end within the {ns.settings.steps} steps")
    if min(ns.lengths) < 1 or min(ns.factors) <= 0:
        p.error("--lengths must be >= 1 and --factors > 0")
    return ns


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse(argv)
    _common.quiet_transformers()
    torch.set_num_threads(ns.threads)
    start, codes = time.perf_counter(), code_hashes()
    store = RunStore(None if ns.cache == "none" else ns.cache)
    cached = len(store.runs)
    runs = record(ns.tasks, ns.seeds_list, ns.settings, store, log=lambda line: print(line, flush=True))
    series = {key: run["series"]["loss"] for key, run in runs.items()}
    ns.lengths_of = {key: len(values) for key, values in series.items()}
    replays = {(v, task, seed): replay(early, values, ns.positions, ns.factors, ns.lengths, ns.after)
               for v, early in VARIANTS.items() for (task, seed), values in series.items()}
    result = {"command": " ".join(["python benchmarks/early_detection.py", *argv]),
              "settings": dataclasses.asdict(ns.settings), "machine": machine.machine_info(),
              "elapsed_s": time.perf_counter() - start,
              "runs": {"count": len(runs), "trained_now": len(store.runs) - cached,
                       "train_s": sum(run["seconds"] for run in runs.values())},
              "code": f"peer={codes['peer']}", "tasks": ns.tasks, "seeds": ns.seeds_list, "positions": ns.positions,
              "factors": ns.factors, "lengths": ns.lengths, "after": ns.after,
              "detector": {v: {"spike_early": early} for v, early in VARIANTS.items()},
              "table": summarise(replays, ns)}
    text = markdown(result)
    os.makedirs(ns.out, exist_ok=True)
    _common.write_json(os.path.join(ns.out, ns.name + ".json"), result)
    _common.write_text(os.path.join(ns.out, ns.name + ".md"), text)
    print(text)
    return result


if __name__ == "__main__":
    main()
