"""Collect loss series for question A (and update diagnostics for B): stock Trainer runs with per-sample
losses recorded. Clean pretrain/lora/sft seeds 0..N-1; lr_mistake; real garbage batches at early steps."""
import sys
from i25lib import (Cache, HERE, Method, GALLERY, UpdateDiag, custom_scenario, run, setup_threads)

setup_threads()
cache = Cache(HERE / "cache" / "collect.jsonl")
STOCK = Method("rec_stock", "rec_stock")
TAG = "rec_stock_v1"
n_seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 10


def cbs():
    return [UpdateDiag()]


def extras(trainer, callbacks):
    return {"rec": {str(k): v for k, v in getattr(trainer, "rec", {}).items()},
            "diag": {str(k): v for k, v in callbacks[0].rows.items()}}


clean = {t: custom_scenario(f"clean_{t}", t, "none", ()) for t in ("pretrain", "lora", "sft")}
early = [custom_scenario(f"garbage_{task}_{s}", task, "garbage", (s,))
         for task, steps in (("pretrain", (10, 15, 26, 50, 150)), ("lora", (10, 26, 150)), ("sft", (10, 26, 150)))
         for s in steps]
for seed in range(n_seeds):
    for t, sc in clean.items():
        run(cache, TAG, STOCK, sc, seed, False, callbacks_factory=cbs, extras=extras)
    if seed < 3:
        run(cache, TAG, STOCK, GALLERY["lr_mistake"], seed, True, callbacks_factory=cbs, extras=extras)
        for sc in early:
            run(cache, TAG, STOCK, sc, seed, True, callbacks_factory=cbs, extras=extras)
print("done")
