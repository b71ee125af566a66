"""Read an offline W&B run back with wandb's own reader: ``wandb leet inspect --json`` (wandb >= 0.31).

It prints one JSON object per record of the run's ``.wandb`` transaction log (``{"num", "type", <type>: ...}``);
history items come flattened, nested values joined with ``.`` (``gradclip/layer_norms._type``). ``--summary
--json`` prints the run's state (``finished`` once the ``exit`` record is written) and latest values.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from typing import Any


def wandb_cli() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "wandb")
    return here if os.path.exists(here) else (shutil.which("wandb") or "wandb")


def run_dir(root: str) -> str:
    runs = glob.glob(os.path.join(str(root), "wandb", "offline-run-*"))
    assert len(runs) == 1, f"expected one offline run under {root}, found {runs}"
    return runs[0]


def inspect(path: str, *options: str) -> str:
    proc = subprocess.run([wandb_cli(), "leet", "inspect", "--json", *options, path], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def summary(path: str) -> dict[str, Any]:
    """``wandb leet inspect --summary --json``: state, step, summary (latest values), config, ..."""
    return json.loads(inspect(path, "--summary"))


def read_run(root: str, timeout: float = 30.0) -> dict[str, Any]:
    """Wait until the run is ``finished`` (wandb's core process may still be writing after ``wandb.finish()``
    returns), then read its records: ``history`` (the items of each history record), ``alerts``, ``metrics``
    (``define_metric`` records), ``kinds`` (count of each record type)."""
    path, deadline = run_dir(root), time.monotonic() + timeout
    while summary(path).get("state") != "finished" and time.monotonic() < deadline:
        time.sleep(0.3)
    records = [json.loads(line) for line in inspect(path).splitlines() if line.strip()]
    kinds = Counter(r["type"] for r in records)
    return {"history": [r["history"]["item"] for r in records if r["type"] == "history"],
            "alerts": [r["alert"] for r in records if r["type"] == "alert"],
            "metrics": [r["metric"] for r in records if r["type"] == "metric"], "kinds": dict(kinds)}
