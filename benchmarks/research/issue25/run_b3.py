"""Question B, third batch: follow-variants of the update guard on lr_mistake, lr10x_at60 and warm restarts."""
from i25lib import Cache, HERE, GALLERY, Settings, custom_scenario, run, setup_threads
import b_methods

setup_threads()
B = Cache(HERE / "cache" / "b.jsonl")
U = Cache(HERE / "cache" / "b_unseen.jsonl")
lr10x_early = custom_scenario("lr10x_at60", "pretrain", "lr", (60,), length=10, lr_factor=10.0)
restarts = custom_scenario("restarts3", "pretrain", "none", ())
for seed in (0, 1, 2):
    for name in ("guard_c3_follow", "guard_c1.5_follow", "guard_c2_follow_a7"):
        m = b_methods.method_for(name)
        for sc in (GALLERY["lr_mistake"], lr10x_early):
            run(B, f"{name}_v1", m, sc, seed, False, extras=b_methods.extras)
            run(B, f"{name}_v1", m, sc, seed, True, extras=b_methods.extras)
        run(U, f"{name}_v1", m, restarts, seed, False, extras=b_methods.extras, settings=Settings(schedule="cosine_with_restarts"),
            arguments={"lr_scheduler_kwargs": {"num_cycles": 3}}, label="restarts3")
print("done")
