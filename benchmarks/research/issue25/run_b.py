"""Question B: prototypes x the gallery x seeds, cached (cache/b.jsonl)."""
import argparse
from i25lib import Cache, HERE, GALLERY, run, setup_threads
from gradclip_hf.experiments.methods import METHODS
import b_methods

VERSION = "v1"
ap = argparse.ArgumentParser()
ap.add_argument("--methods", nargs="+", required=True)
ap.add_argument("--scenarios", nargs="+", default=list(GALLERY))
ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
ns = ap.parse_args()
setup_threads()
cache = Cache(HERE / "cache" / "b.jsonl")
for seed in ns.seeds:
    for name in ns.methods:
        m = METHODS[name] if name in METHODS else b_methods.method_for(name)
        for sc in ns.scenarios:
            sc = GALLERY[sc]
            kw = dict(extras=b_methods.extras)
            run(cache, f"{name}_{VERSION}", m, sc, seed, False, **kw)
            if sc.fault != "none":
                run(cache, f"{name}_{VERSION}", m, sc, seed, True, **kw)
print("done")
