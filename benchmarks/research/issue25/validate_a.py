"""Question A in real Trainer runs: the recommended candidate (today's EMA rule OR LowDiff z 6 AND 1.5x) as the
pack's loss detector (SpikeDetector.update patched in this process), against stock and recommended(), on
early faults and on the gallery (3 seeds).

    python validate_a.py base     # stock + recommended (unpatched) on the early faults
    python validate_a.py newdet   # the patched detector on the early faults and the gallery
"""
import sys
import torch
from i25lib import Cache, HERE, GALLERY, Method, custom_scenario, run, setup_threads
from gradclip_hf.experiments.methods import METHODS

setup_threads()
B = Cache(HERE / "cache" / "b.jsonl")
EARLY = [custom_scenario("garbage_pretrain_15", "pretrain", "garbage", (15,)),
         custom_scenario("garbage_pretrain_26", "pretrain", "garbage", (26,)),
         custom_scenario("garbage_pretrain_50", "pretrain", "garbage", (50,)),
         custom_scenario("utf16_pretrain_20x10", "pretrain", "utf16_shard", (20,), length=10),
         custom_scenario("garbage_lora_10", "lora", "garbage", (10,)),
         custom_scenario("garbage_sft_10", "sft", "garbage", (10,))]


def flags(trainer, callbacks):
    return {}


mode = sys.argv[1]
if mode == "newdet":
    from detectors import EMA, Either, LowDiff
    from gradclip_hf.core.spikes import SpikeDetector

    DET = Either(first=EMA(), second=LowDiff(min_ratio=1.5))

    def update(self, value):
        st = self.__dict__.get("_i25")
        if st is None:
            st = self._i25 = DET.fresh((), value.device, torch.float64)
        spike, z, base = DET.update(st, value.detach())
        return spike, z.to(value.dtype), base.to(value.dtype)

    SpikeDetector.update = update
    methods = {"newdet": Method("newdet", "pack", "recommended + LowDiff early rule", config=None)}
    scenarios = list(GALLERY.values()) + EARLY
else:
    methods = {"stock": METHODS["stock"], "recommended": METHODS["recommended"]}
    scenarios = EARLY
for seed in (0, 1, 2):
    for name, m in methods.items():
        for sc in scenarios:
            run(B, f"{name}_v1", m, sc, seed, False)
            if sc.fault != "none":
                run(B, f"{name}_v1", m, sc, seed, True)
print("done")
