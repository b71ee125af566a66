"""What clipping saves: damage of real fault types against a clean counterfactual, per method, over seeds.

For every seed, method and scenario of the gallery (``benchmarks/harness/scenarios.py``; sources
in benchmarks/README.md) two runs with the Hugging Face Trainer: one with the fault, one without
(same initialisation, data order and steps; the bad batches replaced by the clean batches they
displaced, or no learning-rate mistake). Damage = eval loss with the fault minus eval loss without,
same method and seed. Against the stock ``max_grad_norm=1.0``, paired per seed: the damage ratio
(method's damage / stock's damage; "removed" = 1 - ratio), the damage difference, and the
false-positive cost (clean eval loss minus stock's clean eval loss), each with a 95 % t-interval.

    python benchmarks/stability.py --scenario all --seeds 10
    python benchmarks/stability.py --scenario corrupt_shard --seeds 3 --methods stock olmo recommended

Finished runs are cached (``--cache``, a JSON-lines file keyed by settings, method configuration, fault,
seed and a hash of the source that runs), so an interrupted sweep resumes and a report can be redrawn
without training; ``--cache none`` trains everything again. ``--code pack=HASH,peer=HASH`` redraws a report from
runs made by an earlier source (the hashes a report names), without training them again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

from benchmarks.harness.methods import METHODS, method as get_method  # noqa: E402
from benchmarks.harness.scenarios import GALLERY  # noqa: E402
from benchmarks.harness.summary import summarise  # noqa: E402
from benchmarks.harness.sweep import RunStore, code_hashes, run_grid  # noqa: E402
from benchmarks.harness.tasks import Settings  # noqa: E402
from gradclip_hf.demo import machine  # noqa: E402

DEFAULT_METHODS = ["none", "stock", "zclip", "olmo", "recommended"]
CACHE = os.path.join(_common.RESULTS, "cache", "runs.jsonl")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", default="all", help="'all' or one of: " + ", ".join(GALLERY))
    p.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (default 10)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help="named methods (" + ", ".join(METHODS) + ") or 'pack:field=value,...'")
    p.add_argument("--out", default=_common.RESULTS, help="folder of the .md/.json/.png outputs")
    p.add_argument("--name", default=None, help="output file name (default: stability or stability_<scenario>)")
    p.add_argument("--cache", default=CACHE, help="JSON-lines cache of finished runs ('none': no cache)")
    p.add_argument("--code", default=None, help="use the cached runs of these source hashes ('pack=HASH,peer=HASH', "
                   "as a report names them) instead of the current source's")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--plot-seed", type=int, default=0)
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f"Settings.{f.name} (default {f.default})")
    return p.parse_args(argv)


def settings_from(ns: argparse.Namespace) -> Settings:
    return Settings(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(Settings)})


def scenarios_from(ns: argparse.Namespace) -> list[str]:
    if ns.scenario == "all":
        return list(GALLERY)
    names = [s.strip() for s in ns.scenario.split(",")]
    for name in names:
        if name not in GALLERY:
            raise SystemExit(f"unknown scenario {name!r}; choose from: all, {', '.join(GALLERY)}")
    return names


def code_from(ns: argparse.Namespace) -> dict[str, str]:
    """The source hashes of the runs to use: ``--code`` or the current source's."""
    codes = code_hashes()
    if ns.code:
        for part in ns.code.split(","):
            scope, sep, value = part.partition("=")
            if not sep or scope.strip() not in codes or not value.strip():
                raise SystemExit(f"--code {ns.code!r}: expected 'pack=HASH,peer=HASH'")
            codes[scope.strip()] = value.strip()
    return codes


def _compact(run: dict[str, Any]) -> dict[str, Any]:
    keep = ("method", "scenario", "task", "seed", "faulted", "fault_steps", "eval_loss", "spike_steps",
            "skipped_steps", "clip_rate", "seconds")
    return {k: run[k] for k in (*keep, "dropped_steps") if k in run}


def _jsonable(table: dict[str, Any]) -> dict[str, Any]:
    return {sc: {m: {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in row.items()}
                 for m, row in rows.items()} for sc, rows in table.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = parse(argv)
    _common.quiet_transformers()
    torch.set_num_threads(ns.threads)
    settings, scenarios = settings_from(ns), scenarios_from(ns)
    methods = [get_method(m) for m in ns.methods]
    if "stock" not in ns.methods:
        print("note: without 'stock' in --methods there are no ratios or false-positive costs.", file=sys.stderr)
    store = RunStore(None if ns.cache == "none" else ns.cache)
    start, loads, codes = time.perf_counter(), [machine.load_now()], code_from(ns)
    records = run_grid(methods, scenarios, range(ns.first_seed, ns.first_seed + ns.seeds), settings, store,
                       log=lambda line: print(line, flush=True), code=codes)
    loads.append(machine.load_now())
    table = summarise(records, {s: GALLERY[s].fault != "none" for s in scenarios})
    name = ns.name or ("stability" if ns.scenario == "all" else "stability_" + ns.scenario.replace(",", "+"))
    result = {"command": "python benchmarks/stability.py " + " ".join(argv), "settings": dataclasses.asdict(settings),
              "machine": machine.machine_info(), "load": loads, "elapsed_s": time.perf_counter() - start,
              "code": f"pack={codes['pack']},peer={codes['peer']}", "seeds": list(range(ns.first_seed, ns.first_seed + ns.seeds)),
              "methods": [m.describe() for m in methods],
              "scenarios": {s: {**dataclasses.asdict(GALLERY[s]), "fault_steps": GALLERY[s].fault_steps(settings.steps)}
                            for s in scenarios},
              "table": _jsonable(table),
              "runs": [{"faulted": _compact(r["faulted"]), "clean": _compact(r["clean"])} for r in records]}
    import stability_report

    os.makedirs(ns.out, exist_ok=True)
    text = stability_report.markdown(result)
    _common.write_json(os.path.join(ns.out, name + ".json"), result)
    _common.write_text(os.path.join(ns.out, name + ".md"), text)
    stability_report.plot(records, result, os.path.join(ns.out, name + ".png"), ns.plot_seed)
    print(text)
    return result


if __name__ == "__main__":
    main()
