"""Run a grid of (method, scenario, seed), faulted and clean, with a cache of finished runs on disk.

A run's cache key holds everything its numbers depend on: the settings, the method's resolved
configuration (so ``recommended`` is rerun when :meth:`ClipConfig.recommended` changes), the task,
the fault (clean runs of a task share one key: they are the same run), the seed, and a hash of the
source that runs: for the pack's methods the package but its reporting, and this harness's training code (any
change to the clipping code reruns them); for the methods that run none of the pack's clipping code (the stock
Trainer, zclip, the OLMo-core rule, the micro-batch oracle: ``PEER_KINDS``) only the harness, the demo's training
code and the stand-ins, so a change to the package does not rerun them. An oracle enters the key resolved for its
run (the steps or micro-batches it drops). The cache is a JSON-lines file; an interrupted sweep resumes where it
stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

from .methods import Method, method as get_method, resolve
from .scenarios import Scenario, scenario as get_scenario
from .tasks import Settings
from .training import train_one

__all__ = ["code_hash", "code_hashes", "RunStore", "run_key", "run_grid", "PEER_KINDS"]

# method kinds that run none of the pack's clipping code (resolved kinds: ``drop`` is the micro-batch oracle)
PEER_KINDS = ("trainer", "zclip", "olmo", "drop")

# files that cannot change a run's numbers (reporting, statistics, the demo's command line and report)
# (scenarios and methods enter the key by their fields instead)
_NOT_RUN_CODE = {"gradclip_hf/demo/__init__.py", "gradclip_hf/demo/runs.py", "gradclip_hf/demo/report.py",
                 "gradclip_hf/demo/charts.py", "gradclip_hf/demo/metrics.py", "gradclip_hf/demo/machine.py",
                 "gradclip_hf/demo/scenarios.py", "gradclip_hf/demo/methods.py", "gradclip_hf/cli.py",
                 "benchmarks/harness/stats.py", "benchmarks/harness/sweep.py", "benchmarks/harness/summary.py",
                 "benchmarks/harness/scenarios.py", "benchmarks/harness/methods.py", "benchmarks/harness/__init__.py"}
_NOT_RUN_FOLDERS = ("gradclip_hf/report/",)


def code_hash(scope: str = "pack") -> str:
    """sha1 (10 hex digits) of the Python source that runs, less the files in ``_NOT_RUN_CODE`` and
    ``_NOT_RUN_FOLDERS``: ``scope="pack"``: the package's and this harness's; ``"peer"``: this harness's, the demo's
    and the stand-ins' (what a ``PEER_KINDS`` method runs)."""
    if scope not in ("pack", "peer"):
        raise ValueError(f"`scope` must be 'pack' or 'peer', got {scope!r}.")
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha1()
    package = [root / "gradclip_hf" / "standins.py", *(root / "gradclip_hf" / "demo").rglob("*.py")] \
        if scope == "peer" else list((root / "gradclip_hf").rglob("*.py"))
    paths = [*package, *(root / "benchmarks" / "harness").rglob("*.py")]
    for path in sorted(paths):
        rel = path.relative_to(root).as_posix()
        if rel in _NOT_RUN_CODE or rel.startswith(_NOT_RUN_FOLDERS):
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:10]


def code_hashes() -> dict[str, str]:
    """``{"pack": code_hash("pack"), "peer": code_hash("peer")}``."""
    return {scope: code_hash(scope) for scope in ("pack", "peer")}


def run_key(m: Method, sc: Scenario, seed: int, faulted: bool, settings: Settings, code: str | dict[str, str]) -> str:
    """The cache key of one run; ``code``: a source hash, or ``{"pack": ..., "peer": ...}`` (by ``m``'s kind)."""
    m = resolve(m, sc, faulted, settings)
    if isinstance(code, dict):
        code = code["peer" if m.kind in PEER_KINDS else "pack"]
    fault = {k: v for k, v in asdict(sc).items() if k != "title"} if faulted and sc.fault != "none" else "clean"
    spec = json.dumps({"method": m.describe(), "task": sc.task, "fault": fault, "seed": seed,
                       "settings": asdict(settings), "code": code}, sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


class RunStore:
    """Finished runs by key, kept in memory and appended to ``path`` (JSON lines; ``None``: memory only)."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path else None
        self.runs: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            with open(self.path) as f:
                for line in f:
                    if line.strip():
                        entry = json.loads(line)
                        self.runs[entry["key"]] = entry["run"]

    def get(self, key: str) -> dict[str, Any] | None:
        return self.runs.get(key)

    def put(self, key: str, run: dict[str, Any]) -> None:
        self.runs[key] = run
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"key": key, "run": run}) + "\n")


def _get_or_train(store: RunStore, m: Method, sc: Scenario, seed: int, faulted: bool, settings: Settings,
                  code: str | dict[str, str], log: Callable[[str], None]) -> dict[str, Any]:
    key = run_key(m, sc, seed, faulted, settings, code)
    run = store.get(key)
    if run is None:
        start = time.perf_counter()
        run = train_one(m, sc, seed, faulted, settings)
        store.put(key, run)
        log(f"seed {seed} {m.name:16s} {sc.name if faulted else 'clean ' + sc.task:18s} "
            f"eval {run['eval_loss']:.4f}  {time.perf_counter() - start:.1f}s")
    return run


def run_grid(methods: Iterable[str | Method], scenarios: Iterable[str | Scenario], seeds: Iterable[int],
             settings: Settings = Settings(), store: RunStore | None = None,
             log: Callable[[str], None] = print, code: str | dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Every (seed, method, scenario): ``{"method", "scenario", "seed", "faulted", "clean"}`` (run records;
    for a scenario without a fault both are the clean run). Seed by seed, so a partial sweep is usable.
    ``code``: the source hashes of the runs to use (default: this source's, :func:`code_hashes`)."""
    store = store if store is not None else RunStore()
    ms = [get_method(m) if isinstance(m, str) else m for m in methods]
    scs = [get_scenario(s) if isinstance(s, str) else s for s in scenarios]
    code = code or code_hashes()
    out = []
    for seed in seeds:
        for m in ms:
            for sc in scs:
                clean = _get_or_train(store, m, sc, seed, False, settings, code, log)
                faulted = clean if sc.fault == "none" else _get_or_train(store, m, sc, seed, True, settings, code, log)
                out.append({"method": m.name, "scenario": sc.name, "seed": seed, "faulted": faulted, "clean": clean})
    return out
