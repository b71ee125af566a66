"""Exploration for the core (not a ClipConfig option today): how long should the spike detector keep flagging
a run of consecutive spikes before it takes the new level in (``SpikeDetector(adapt_after=10)``)?

A corrupted shard of 30 consecutive bad batches is flagged for ``adapt_after`` steps, then trained on; a
learning-rate mistake leaves the weights damaged, and every step flagged after it is a clean update lost.
This script sets the detector's ``adapt_after`` default for the whole process and runs the gallery's
batch and learning-rate faults with and without their fault (runs are not cached: the source hash does not
see the change).

    python benchmarks/explore_adapt_after.py --adapt-after 10 30 --seeds 3 --methods n_skip_both_f1
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

from gradclip_hf.core import spikes  # noqa: E402
from gradclip_hf.experiments.scenarios import GALLERY  # noqa: E402
from gradclip_hf.experiments.summary import summarise  # noqa: E402
from gradclip_hf.experiments.sweep import RunStore, run_grid  # noqa: E402
from stability import CACHE  # noqa: E402

SCENARIOS = ["garbage_batches", "corrupt_shard", "label_noise_shard", "lr_mistake"]
_ORIGINAL = spikes.SpikeDetector.__init__


def set_adapt_after(n: int) -> None:
    spikes.SpikeDetector.__init__ = functools.partialmethod(_ORIGINAL, adapt_after=n)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapt-after", type=int, nargs="+", default=[10, 30])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["n_skip_both_f1"])
    ns = p.parse_args(argv)
    _common.quiet_transformers()
    torch.set_num_threads(1)
    out = {}
    quiet = lambda line: None  # noqa: E731
    # the stock Trainer has no detector: its runs come from (and go to) the usual cache
    stock = run_grid(["stock"], SCENARIOS, range(ns.seeds), store=RunStore(CACHE), log=quiet)
    for n in ns.adapt_after:
        set_adapt_after(n)
        records = stock + run_grid(ns.methods, SCENARIOS, range(ns.seeds), store=RunStore(), log=quiet)
        table = summarise(records, {s: True for s in SCENARIOS})
        out[n] = {sc: {m: {k: row[k].to_dict() for k in ("damage", "ratio")} for m, row in rows.items() if m != "stock"}
                  for sc, rows in table.items()}
        for sc, rows in table.items():
            for m, row in rows.items():
                if m != "stock":
                    print(f"adapt_after {n:3d}  {sc:18s} {m:16s} damage {row['damage'].text()}  "
                          f"ratio {row['ratio'].text('.2f')}  caught {row['caught']:.0%}", flush=True)
    set_adapt_after(10)
    return out


if __name__ == "__main__":
    main()
