"""The clipping call alone, against ``torch.nn.utils.clip_grad_norm_`` (foreach), on the gradient
tensors of a Qwen2/Llama-like model, scaled down to CPU size.

Per-layer shapes (``h`` hidden, ``i`` intermediate, ``kv`` = key/value heads x head_dim 64, ``V`` vocab),
as in Qwen2.5-0.5B (h 896, i 4864, 2 KV heads, 24 layers, V 151936, tied embeddings, q/k/v biases):

    embed_tokens           V x h            (tied with lm_head: one tensor)
    layers.N.self_attn.q_proj   h x h  + bias h
    layers.N.self_attn.k_proj   kv x h + bias kv
    layers.N.self_attn.v_proj   kv x h + bias kv
    layers.N.self_attn.o_proj   h x h
    layers.N.mlp.gate_proj      i x h
    layers.N.mlp.up_proj        i x h
    layers.N.mlp.down_proj      h x i
    layers.N.input_layernorm    h
    layers.N.post_attention_layernorm  h
    norm                   h

Default here: h 512, i 2816, 8 layers, V 32000 (about 58 M parameters, 12 tensors per layer, 99 tensors);
``--preset qwen0.5b`` uses the real sizes (about 494 M parameters: 2 GB of fp32 gradients).

Every method is called on the same tensors, interleaved (one call of each method per round, order
rotated every round) after untimed warm-up calls (which also fill the adaptive methods' warm-up
statistics, so the timed calls take their steady-state path); the median time of a method is divided
by the median of ``clip_grad_norm_(foreach=True)``. Calls are timed with ``time.perf_counter`` (the CPU
path is synchronous; on CUDA each call is followed by ``torch.cuda.synchronize()``).

Peers: ``zclip`` 1.0.0 (``ZClip.step(model)``), ``smartclip`` 0.1.1 (``smartclip.apply(model, clipper)``,
warm-up gates set to 0/1 so it clips from the first call), ``autoclip`` 0.2.1 (``QuantileClip.step()``,
per-parameter as it defaults to, and ``global_threshold=True``).

A second table times **clip + optimizer step** against ``clip_grad_norm_(foreach=True)`` + the same fused
AdamW step (``fused=True``, the transformers 5.x default), interleaved the same way: the norm pass alone +
the step (the floor: no method can do less), the pack's ``norm`` in place (the drop-in default,
bit-identical to torch) and handed to the optimizer (``apply="optimizer"``), ``recommended`` and ``zscore``
+ spike ``tighten`` (both hand the multiplier and the skip flag to the optimizer as device tensors). Every
method has its own AdamW (own state) over the same parameters (lr 1e-9: the weights barely move).
``--memory`` adds the memory each method's ops allocate in one call (torch profiler, CPU).

    python benchmarks/clip_kernel.py --repeats 30 --out benchmarks/results/clip_kernel
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from _common import median  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

PRESETS = {"small": dict(hidden=512, intermediate=2816, layers=8, vocab=32000, kv=128),
           "qwen0.5b": dict(hidden=896, intermediate=4864, layers=24, vocab=151936, kv=128),
           "tiny": dict(hidden=64, intermediate=176, layers=2, vocab=512, kv=32)}


def model_shapes(hidden: int, intermediate: int, layers: int, vocab: int, kv: int) -> list[tuple[str, tuple]]:
    shapes: list[tuple[str, tuple]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.q_proj.bias", (hidden,)),
                   (p + "self_attn.k_proj.weight", (kv, hidden)), (p + "self_attn.k_proj.bias", (kv,)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.v_proj.bias", (kv,)),
                   (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (intermediate, hidden)), (p + "mlp.up_proj.weight", (intermediate, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, intermediate)),
                   (p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
    shapes.append(("model.norm.weight", (hidden,)))
    return shapes


class Grads(nn.Module):
    """Parameters with the given names and shapes, each with a gradient (a module, as the peers need)."""

    def __init__(self, shapes, device, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = []
        for name, shape in shapes:
            key = name.replace(".", "_")
            p = nn.Parameter((torch.randn(shape, generator=g) * 0.02).to(device))
            p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device)
            self.register_parameter(key, p)
            self.names.append(key)
        self.originals = [p.grad.clone() for p in self.parameters()]

    def reset(self):
        for p, g in zip(self.parameters(), self.originals):
            p.grad.copy_(g)


def methods(model: Grads, which: set[str] | None) -> dict[str, Callable[[int], Any]]:
    from gradclip_hf import AGC, GradClipper, NormClip, QuantileClip, SpikeController, ValueClip, ZScoreClip

    params = list(model.parameters())
    loss = torch.tensor(2.0, device=params[0].device)
    out: dict[str, Callable[[int], Any]] = {
        "torch clip_grad_norm_": lambda i: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True),
        "torch clip_grad_value_": lambda i: torch.nn.utils.clip_grad_value_(params, 1e-3, foreach=True),
    }

    def pack(name, strategy, **kw):
        clipper = GradClipper(strategy, **kw)
        if "spikes" in kw:
            out[name] = lambda i: clipper.clip_(model, step=i, loss=loss)
        else:
            out[name] = lambda i: clipper.clip_(model, step=i)

    pack("pack norm", NormClip(1.0))
    pack("pack value", ValueClip(1e-3))
    pack("pack agc", AGC(clipping=0.05))
    pack("pack zscore", ZScoreClip())
    pack("pack quantile", QuantileClip())
    pack("pack zscore+spike", ZScoreClip(), spikes=SpikeController(warmup_steps=5))
    pack("pack norm nonfinite=zero", NormClip(1.0), nonfinite="zero")
    try:
        from zclip import ZClip
        zc = ZClip()
        out["zclip 1.0.0"] = lambda i: zc.step(model)
    except ImportError:
        pass
    try:
        import smartclip
        for label, make in (("zscore", lambda: smartclip.ZScoreClip(warmup_steps=0, min_history=1)),
                            ("autoclip", lambda: smartclip.AutoClip(warmup_steps=0, min_history=1)),
                            ("agc", lambda: smartclip.AGC(clipping=0.05))):
            sc = make()
            out[f"smartclip 0.1.1 {label}"] = (lambda c: lambda i: smartclip.apply(model, c))(sc)
    except ImportError:
        pass
    try:
        from autoclip.torch import QuantileClip as AutoQuantile
        local = AutoQuantile(params, quantile=0.9, history_length=1000)
        glob = AutoQuantile(params, quantile=0.9, history_length=1000, global_threshold=True)
        out["autoclip 0.2.1 per-param"] = lambda i: local.step()
        out["autoclip 0.2.1 global"] = lambda i: glob.step()
    except ImportError:
        pass
    if which:
        out = {k: v for k, v in out.items() if k == "torch clip_grad_norm_" or any(w in k for w in which)}
    return out


def step_methods(model: Grads) -> dict[str, Callable[[int], Any]]:
    """Clip + fused AdamW step, per method (each with its own optimizer over the same parameters)."""
    from gradclip_hf import ClipConfig
    from gradclip_hf.run import StepGate

    params = list(model.parameters())
    loss = torch.tensor(2.0, device=params[0].device)

    def adamw():
        return torch.optim.AdamW(params, lr=1e-9, fused=True)

    out: dict[str, Callable[[int], Any]] = {}
    ref_opt, floor_opt = adamw(), adamw()
    out["torch clip_grad_norm_ + AdamW(fused)"] = lambda i: (
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), ref_opt.step())
    out["norm pass alone + AdamW(fused) (floor)"] = lambda i: (
        torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True), floor_opt.step())

    def pack(name, config):
        clipper, opt = config.build(total_steps=10**6), adamw()
        gate, defer = StepGate(opt), config.defers_to_optimizer

        def call(i):
            report = clipper.plan(model, step=i, loss=loss)
            coef = clipper.apply_(report, hand_off=defer)
            skip = report.skip | report.spike.act if report.spike is not None else report.skip
            gate.arm(coef=coef, skip=skip)
            opt.step()
        out[name] = call

    pack("pack norm, in place (drop-in) + AdamW(fused)", ClipConfig(threshold=1.0))
    pack("pack norm, apply=optimizer + AdamW(fused)", ClipConfig(threshold=1.0, apply="optimizer"))
    pack("pack recommended + AdamW(fused)", ClipConfig.recommended(threshold=1.0))
    pack("pack zscore + spike tighten + AdamW(fused)", ClipConfig(strategy="zscore", threshold=1.0,
                                                                   spike_detection="loss"))
    return out


def allocated_kib(fn: Callable[[int], Any], step: int) -> float:
    """Memory allocated by the ops of one call (CPU, torch profiler; self allocations, an upper bound of the
    peak of temporaries: the state and gradients already exist)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(step)
    return sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0) / 2 ** 10


def time_interleaved(fns: dict[str, Callable[[int], Any]], model: Grads, opts, cuda: bool) -> dict[str, list[float]]:
    names = list(fns)
    for name in names:  # warm-up: kernels, and the adaptive methods' warm-up statistics
        model.reset()
        for i in range(opts.warmup):
            fns[name](i)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(opts.repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            model.reset()  # same gradients for every call (norm > 1: every norm-based method clips)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fns[name](opts.warmup + r)
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return times


def rows_of(times: dict[str, list[float]], base_name: str) -> dict[str, dict[str, float]]:
    base = median(times[base_name])
    return {n: {"ms": 1e3 * median(t), "ratio": median(t) / base, "ms_min": 1e3 * min(t), "ms_max": 1e3 * max(t)}
            for n, t in times.items()}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="small")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds (one call of every method per round)")
    p.add_argument("--warmup", type=int, default=30, help="untimed calls of every method first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--only", default="", help="comma-separated substrings of method names")
    p.add_argument("--no-step", dest="step", action="store_false", help="skip the clip + optimizer step table")
    p.add_argument("--memory", action="store_true", help="memory allocated per call and method (torch profiler, CPU)")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "clip_kernel"),
                   help="output prefix: writes PREFIX.json and PREFIX.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    cuda = opts.device == "cuda"
    shapes = model_shapes(**PRESETS[opts.preset])
    model = Grads(shapes, opts.device)
    n_params = sum(p.numel() for p in model.parameters())
    fns = methods(model, {w.strip() for w in opts.only.split(",") if w.strip()} or None)
    loads = [_common.load_now()]
    t_start = time.perf_counter()
    rows = rows_of(time_interleaved(fns, model, opts, cuda), "torch clip_grad_norm_")
    loads.append(_common.load_now())
    step_rows = {}
    if opts.step:
        step_fns = step_methods(model)
        step_rows = rows_of(time_interleaved(step_fns, model, opts, cuda), "torch clip_grad_norm_ + AdamW(fused)")
        floor = step_rows["norm pass alone + AdamW(fused) (floor)"]["ms"]
        for name, row in step_rows.items():
            row["vs_floor"] = row["ms"] / floor
            if opts.memory and not cuda:
                model.reset()
                row["alloc_kib"] = allocated_kib(step_fns[name], opts.warmup + opts.repeats)
        loads.append(_common.load_now())
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in model.originals])))
    result = {"command": "python benchmarks/clip_kernel.py " + " ".join(argv), "options": vars(opts),
              "machine": _common.machine_info(), "load_during": loads, "elapsed_s": time.perf_counter() - t_start,
              "shapes": PRESETS[opts.preset], "tensors": len(shapes), "parameters": n_params,
              "grad_norm": grad_norm, "results": rows, "step_results": step_rows}
    _common.write_json(opts.out + ".json", result)
    _common.write_text(opts.out + ".md", markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    m, o, s = result["machine"], result["options"], result["shapes"]
    lines = ["# Clipping call alone vs torch.nn.utils.clip_grad_norm_(foreach=True)", "", f"`{result['command']}`", "",
             f"{m['cpu']}, nproc {m['nproc']}, torch {m['torch']} ({m['torch_threads']} threads), device {o['device']}; "
             f"load average {min(result['load_during'])}-{max(result['load_during'])}.", "",
             f"Tensors: preset {o['preset']} (hidden {s['hidden']}, intermediate {s['intermediate']}, {s['layers']} layers, "
             f"vocab {s['vocab']}, kv {s['kv']}): {result['tensors']} tensors, {result['parameters'] / 1e6:.1f} M "
             f"parameters, gradient norm {result['grad_norm']:.2f}. {o['repeats']} interleaved rounds after "
             f"{o['warmup']} warm-up calls each.", "",
             "| method | median ms | min-max ms | ratio to clip_grad_norm_ |", "|---|---|---|---|"]
    for name, r in result["results"].items():
        lines.append(f"| {name} | {r['ms']:.2f} | {r['ms_min']:.2f}-{r['ms_max']:.2f} | {r['ratio']:.2f} |")
    if result.get("step_results"):
        lines += ["", "## Clip + optimizer step vs clip_grad_norm_(foreach=True) + AdamW(fused=True)", "",
                  "| method | median ms | min-max ms | ratio to torch | ratio to the floor | allocated per call (KiB) |",
                  "|---|---|---|---|---|---|"]
        for name, r in result["step_results"].items():
            mem = f"{r['alloc_kib']:.1f}" if "alloc_kib" in r else "-"
            lines.append(f"| {name} | {r['ms']:.2f} | {r['ms_min']:.2f}-{r['ms_max']:.2f} | {r['ratio']:.3f} | "
                         f"{r['vs_floor']:.3f} | {mem} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
