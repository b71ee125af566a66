"""Question B costs on the CPU (1 thread): what each prototype adds to an AdamW step, and what a snapshot
holds and costs, for a full fine-tune and for LoRA adapters of the same model shapes.

Shapes: benchmarks/clip_kernel.py's "small" preset (hidden 512, intermediate 2816, 8 layers, vocab 32000;
56 M parameters), fp32. LoRA: rank 16 on q,k,v,o,gate,up,down of every layer.

    PYTHONPATH=/work/main:. python cost_b.py [--repeats 15]
"""

import argparse
import math
import statistics
import time

import torch


def shapes(h=512, i=2816, layers=8, vocab=32000, kv=128):
    out = [(vocab, h), (vocab, h)]  # embeddings, lm head
    for _ in range(layers):
        out += [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i), (h,), (h,)]
    return out + [(h,)]


def lora_shapes(h=512, i=2816, layers=8, kv=128, r=16):
    out = []
    for _ in range(layers):
        for o, inp in ((h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)):
            out += [(r, inp), (o, r)]
    return out


def make(shp, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in shp]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    return ps


def guard_norm(opt):
    """The norm of the update AdamW is about to make (foreach ops; no state written)."""
    grads, ms, vs, steps = [], [], [], []
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    for p in group["params"]:
        st = opt.state[p]
        grads.append(p.grad), ms.append(st["exp_avg"]), vs.append(st["exp_avg_sq"]), steps.append(float(st["step"]) + 1)
    step = steps[0]
    m2 = torch._foreach_lerp(ms, grads, 1 - b1)
    v2 = torch._foreach_mul(vs, b2)
    torch._foreach_addcmul_(v2, grads, grads, 1 - b2)
    torch._foreach_sqrt_(v2)
    torch._foreach_div_(v2, math.sqrt(1 - b2 ** step))
    torch._foreach_add_(v2, group["eps"])
    torch._foreach_div_(m2, v2)
    norms = torch._foreach_norm(m2)
    return torch.linalg.vector_norm(torch.stack(norms)) * group["lr"] / (1 - b1 ** step)


def undo(opt):
    group = opt.param_groups[0]
    b1, b2 = group["betas"]
    ps = group["params"]
    ms = [opt.state[p]["exp_avg"] for p in ps]
    vs = [opt.state[p]["exp_avg_sq"] for p in ps]
    step = float(opt.state[ps[0]]["step"])
    d = torch._foreach_sqrt(vs)
    torch._foreach_div_(d, math.sqrt(1 - b2 ** step))
    torch._foreach_add_(d, group["eps"])
    torch._foreach_addcdiv_(ps, ms, d, group["lr"] / (1 - b1 ** step))


def snapshot_take(ps, opt, slots):
    """Copy weights + optimizer state into preallocated slots (in place)."""
    src = list(ps) + [opt.state[p]["exp_avg"] for p in ps] + [opt.state[p]["exp_avg_sq"] for p in ps]
    with torch.no_grad():
        torch._foreach_copy_(slots, src)


def timeit(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ns = ap.parse_args()
    torch.set_num_threads(1)
    print("| setting | params | snapshot bytes (w + m + v, fp32) | AdamW step ms (fused / foreach) | guard norm pass ms "
          "| guard / fused step | undo pass ms | snapshot copy ms | copy / fused step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, shp in (("full fine-tune (56 M)", shapes()), ("LoRA r16 adapters", lora_shapes())):
        ps = make(shp)
        n = sum(p.numel() for p in ps)
        res = {}
        for kind in ("fused", "foreach"):
            opt = torch.optim.AdamW(ps, lr=1e-4, **{kind: True})
            opt.step()
            res[kind] = timeit(lambda: opt.step(), ns.repeats)
        with torch.no_grad():
            g_ms = timeit(lambda: guard_norm(opt), ns.repeats)
            u_ms = timeit(lambda: undo(opt), ns.repeats)
            slots = [t.detach().clone() for t in (list(ps) + [opt.state[p]["exp_avg"] for p in ps]
                                                  + [opt.state[p]["exp_avg_sq"] for p in ps])]
            s_ms = timeit(lambda: snapshot_take(ps, opt, slots), ns.repeats)
        bytes_ = 3 * 4 * n
        print(f"| {label} | {n / 1e6:.2f} M | {bytes_ / 2**20:.1f} MiB | {res['fused']:.1f} / {res['foreach']:.1f} | "
              f"{g_ms:.1f} | {g_ms / res['fused']:.2f} | {u_ms:.1f} | {s_ms:.1f} | {s_ms / res['fused']:.2f} |", flush=True)
        del ps, opt, slots


if __name__ == "__main__":
    main()
