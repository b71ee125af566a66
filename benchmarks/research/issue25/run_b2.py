"""Question B, second batch: guard variants, oracle, first-moment guard on the gallery; LR faults not in the
gallery; clean runs with schedules not in the gallery (warm restarts, a long warmup)."""
import sys
from i25lib import Cache, HERE, GALLERY, Settings, custom_scenario, run, setup_threads
from gradclip_hf.experiments.methods import METHODS
import b_methods

setup_threads()
B = Cache(HERE / "cache" / "b.jsonl")
U = Cache(HERE / "cache" / "b_unseen.jsonl")
seeds = [0, 1, 2]


def m_of(name):
    return METHODS[name] if name in METHODS else b_methods.method_for(name)


def go(cache, name, sc, seed, faulted, **kw):
    return run(cache, f"{name}_v1", m_of(name), sc, seed, faulted, extras=b_methods.extras, **kw)


lr_sc, clean_pre = GALLERY["lr_mistake"], GALLERY["garbage_batches"]  # clean pretrain = any pretrain scenario, clean
lr3x30 = custom_scenario("lr3x30", "pretrain", "lr", (150,), length=30, lr_factor=3.0)
lr10x_early = custom_scenario("lr10x_at60", "pretrain", "lr", (60,), length=10, lr_factor=10.0)
lr_to_stock = ["stock", "recommended", "guard_c2", "guard_c2_follow", "undo_esc", "undo1"]
for seed in seeds:
    # 1. gallery: the follow variant everywhere; sensitivity variants, first-moment guard and oracle on lr_mistake
    for sc in GALLERY.values():
        go(B, "guard_c2_follow", sc, seed, False)
        if sc.fault != "none":
            go(B, "guard_c2_follow", sc, seed, True)
    for name in ("guard_c1.5", "guard_c3", "mguard_c2", "oracle_lr"):
        go(B, name, lr_sc, seed, False)
        go(B, name, lr_sc, seed, True)
    # 2. LR faults not in the gallery (clean runs shared with the gallery's pretrain)
    for sc in (lr3x30, lr10x_early):
        for name in lr_to_stock:
            go(B, name, sc, seed, False)
            go(B, name, sc, seed, True)
    # 3. clean runs with other schedules: warm restarts (3 cosine cycles), a 100-step warmup
    for label, settings, args in (("restarts3", Settings(schedule="cosine_with_restarts"), {"lr_scheduler_kwargs": {"num_cycles": 3}}),
                                  ("warmup100", Settings(warmup=100), None)):
        for name in ("stock", "recommended", "guard_c2", "guard_c2_follow", "undo_esc"):
            go(U, name, custom_scenario(label, "pretrain", "none", ()), seed, False, settings=settings, arguments=args,
               label=label)
print("done")
