"""Stability under injected "rare token" batches: what clipping exists for.

A tiny byte-level Llama is trained with the Hugging Face Trainer on the Python standard library's
source text at a high learning rate. At known optimizer steps the whole batch is replaced by random
bytes 128-255, which never occur in the (ASCII) training text (``SpikyByteStream``): the loss and the
gradient of such a step are a spike. Every method sees exactly the same data, model initialisation
and injections for a given seed; seeds change the initialisation, the order of the clean blocks and
the rare bytes.

Methods: no clipping, the stock ``max_grad_norm=1.0``, the peers ``zclip`` 1.0.0 and ``autoclip``
0.2.1 (wired into the same Trainer by a callback in ``on_pre_optimizer_step`` with the Trainer's own
clipping off), and this pack's strategies and spike actions through ``GradClipTrainer``.

Per method (over seeds): final eval loss on held-out clean blocks (other standard-library files),
worst post-injection excursion of the clean train loss (max over injections of the max loss in the
``--window`` steps after the injection minus the mean loss of the 5 steps before it), steps to
recover (first step after the injection whose clean loss is within 5% of that pre-injection mean;
worst over injections), and diverged runs (a NaN loss, or a final eval loss above 2x the best run).

    python benchmarks/stability.py --seeds 5 --steps 300 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

PRE_STEPS = 5       # clean steps before an injection that make its baseline
RECOVER_TOL = 0.05  # "recovered": clean loss within 5% of the baseline


# ---------------------------------------------------------------------------------------------- methods
def _peer_callback(make: Callable[[Any], Callable[[Any], None]]):
    """A TrainerCallback that clips with a peer package in on_pre_optimizer_step (before optimizer.step())."""
    from transformers import TrainerCallback

    class PeerClip(TrainerCallback):
        def __init__(self):
            self.clip = None

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.clip = make(model)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.clip(model)

    return PeerClip()


def zclip_callback():
    from zclip import ZClip

    def make(model):
        zclip = ZClip()  # the package defaults: alpha 0.97, z_thresh 2.5, max_grad_norm 1.0, warmup 25
        return zclip.step
    return _peer_callback(make)


def autoclip_callback(quantile: float = 0.9):
    from autoclip.torch import QuantileClip

    def make(model):
        # global_threshold=True: the paper's AutoClip (one threshold for the global norm); the package's
        # default (False) clips every parameter tensor separately
        clipper = QuantileClip([p for p in model.parameters() if p.requires_grad], quantile=quantile,
                               history_length=1000, global_threshold=True)
        return lambda _model: clipper.step()
    return _peer_callback(make)


def _pack(**options):
    return ("pack", options)


# name -> ("stock", max_grad_norm) | ("peer", callback factory) | ("pack", GradClipTrainingArguments options)
METHODS: dict[str, tuple[str, Any]] = {
    "none": ("stock", 0.0),
    "stock max_grad_norm=1": ("stock", 1.0),
    "zclip 1.0.0": ("peer", zclip_callback),
    "autoclip 0.2.1 (q=0.9)": ("peer", autoclip_callback),
    "pack zscore": _pack(clip_strategy="zscore", clip_threshold=1.0),
    "pack quantile (q=0.9)": _pack(clip_strategy="quantile"),
    "pack norm+spike tighten": _pack(clip_strategy="norm", clip_threshold=1.0, clip_spike_detection="loss",
                                     clip_spike_action="tighten"),
    "pack norm+spike skip": _pack(clip_strategy="norm", clip_threshold=1.0, clip_spike_detection="loss",
                                  clip_spike_action="skip"),
    "recommended (zscore+spike skip)": ("pack", "recommended"),
    "pack zscore+spike rollback": _pack(clip_strategy="zscore", clip_threshold=1.0, clip_spike_detection="loss",
                                        clip_spike_action="rollback", clip_spike_snapshot_every=25),
}
DEFAULT_METHODS = list(METHODS)
SHORT = {"none": "none", "stock": "stock max_grad_norm=1", "zclip": "zclip 1.0.0",
         "autoclip": "autoclip 0.2.1 (q=0.9)", "zscore": "pack zscore", "quantile": "pack quantile (q=0.9)",
         "norm_tighten": "pack norm+spike tighten", "norm_skip": "pack norm+spike skip",
         "recommended": "recommended (zscore+spike skip)", "rollback": "pack zscore+spike rollback"}


def recommended_options() -> dict[str, Any]:
    from gradclip_hf import ClipConfig
    from gradclip_hf.integrations.transformers.arguments import argument_name

    return {argument_name(k): v for k, v in ClipConfig.recommended().to_dict().items()}


# ---------------------------------------------------------------------------------------------- data
def datasets(opts):
    from gradclip_hf.examples import ByteLMDataset, stdlib_text

    text = stdlib_text(opts.train_bytes + opts.eval_bytes)
    train = ByteLMDataset(text[: opts.train_bytes], block_size=opts.block)
    held_out = ByteLMDataset(text[opts.train_bytes:], block_size=opts.block, num_blocks=opts.eval_blocks)
    return train, held_out


def shuffled(dataset, seed: int):
    out = copy.copy(dataset)
    order = torch.randperm(len(dataset.blocks), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    out.blocks = [dataset.blocks[i] for i in order]
    return out


def injection_steps(steps: int, count: int) -> list[int]:
    """``count`` injections spread over the second to the last-but-one sixth of the run."""
    first, last = int(steps * 0.25), int(steps * 0.8)
    if count == 1:
        return [first]
    return [round(first + i * (last - first) / (count - 1)) for i in range(count)]


# ---------------------------------------------------------------------------------------------- one run
def run(method: str, seed: int, opts, train, held_out, tmp: str) -> dict[str, Any]:
    from transformers import Trainer
    from transformers.trainer_callback import PrinterCallback

    from gradclip_hf.examples import SpikyByteStream, tiny_llama
    from gradclip_hf.integrations.transformers import GradClipTrainer, GradClipTrainingArguments

    kind, spec = METHODS[method]
    injections = injection_steps(opts.steps, opts.injections)
    stream = SpikyByteStream(shuffled(train, seed), spike_steps=injections, samples_per_step=opts.batch, seed=seed)
    model = tiny_llama(seed, hidden_size=opts.hidden, layers=opts.layers, heads=4,
                       max_position_embeddings=max(256, opts.block))
    common = dict(max_steps=opts.steps, per_device_train_batch_size=opts.batch, per_device_eval_batch_size=32,
                  learning_rate=opts.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=opts.lr_warmup,
                  logging_steps=1, seed=seed, data_seed=seed, weight_decay=0.0)
    out_dir = os.path.join(tmp, f"{method}-{seed}".replace(" ", "_"))
    if kind == "pack":
        options = recommended_options() if spec == "recommended" else dict(spec)
        args = _common.trainer_args(out_dir, cls=GradClipTrainingArguments, **common, **options)
        trainer = GradClipTrainer(model=model, args=args, train_dataset=stream, eval_dataset=held_out)
    else:
        args = _common.trainer_args(out_dir, max_grad_norm=spec if kind == "stock" else 0.0, **common)
        trainer = Trainer(model=model, args=args, train_dataset=stream, eval_dataset=held_out)
        if kind == "peer":
            trainer.add_callback(spec())
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    eval_loss = float(trainer.evaluate()["eval_loss"])
    loss = [math.nan] * opts.steps
    grad_norm = [math.nan] * opts.steps
    for h in trainer.state.log_history:
        if "loss" in h and "step" in h and 1 <= h["step"] <= opts.steps:
            loss[h["step"] - 1] = float(h["loss"])
            grad_norm[h["step"] - 1] = float(h.get("grad_norm", math.nan))
    skipped = getattr(getattr(trainer, "clip_run", None), "skipped_steps", 0)
    return {"method": method, "seed": seed, "eval_loss": eval_loss, "loss": loss, "grad_norm": grad_norm,
            "injections": injections, "train_seconds": seconds, "skipped_steps": skipped,
            "steps_done": trainer.state.global_step}


def spike_metrics(loss: list[float], injections: list[int], window: int) -> dict[str, Any]:
    excursions, recoveries = [], []
    for s in injections:
        before = [loss[t] for t in range(max(0, s - PRE_STEPS), s) if t not in injections]
        after = [loss[t] for t in range(s + 1, min(len(loss), s + 1 + window)) if t not in injections]
        if not before or not after:
            continue
        base = statistics.fmean(before)
        excursions.append(max(after) - base)
        back = next((i + 1 for i, v in enumerate(after) if v <= base * (1 + RECOVER_TOL)), None)
        recoveries.append(back)
    return {"excursion": max(excursions) if excursions else math.nan, "excursions": excursions,
            "recover": None if any(r is None for r in recoveries) else max(recoveries, default=0),
            "recoveries": recoveries}


# ---------------------------------------------------------------------------------------------- report
def summarise(runs: list[dict[str, Any]], methods: list[str], window: int) -> dict[str, dict[str, Any]]:
    finite = [r["eval_loss"] for r in runs if math.isfinite(r["eval_loss"])]
    best = min(finite) if finite else math.nan
    table = {}
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        evals = [r["eval_loss"] for r in rs]
        spikes = [spike_metrics(r["loss"], r["injections"], window) for r in rs]
        diverged = [r["seed"] for r in rs if not math.isfinite(r["eval_loss"]) or any(not math.isfinite(v) for v in r["loss"])
                    or r["eval_loss"] > 2 * best]
        recov = [s["recover"] for s in spikes]
        finite_evals = [e for e in evals if math.isfinite(e)]
        table[method] = {
            "eval_mean": statistics.fmean(finite_evals) if finite_evals else math.nan,
            "eval_std": statistics.stdev(finite_evals) if len(finite_evals) > 1 else 0.0,
            "eval_min": min(finite_evals, default=math.nan), "eval_max": max(finite_evals, default=math.nan),
            "excursion_worst": max((s["excursion"] for s in spikes), default=math.nan),
            "excursion_median": _common.median([s["excursion"] for s in spikes]),
            "recover_median": _common.median([window + 1 if r is None else r for r in recov]),
            "not_recovered_runs": sum(r is None for r in recov),
            "diverged": diverged, "evals": evals, "skipped_steps": [r["skipped_steps"] for r in rs],
            "seconds": statistics.fmean(r["train_seconds"] for r in rs)}
    return table


def paired(runs: list[dict[str, Any]], methods: list[str], reference: str) -> dict[str, dict[str, Any]]:
    """Per seed, eval loss of ``reference`` minus that of each other method (same data, init, injections)."""
    ev: dict[str, dict[int, float]] = {}
    for r in runs:
        ev.setdefault(r["method"], {})[r["seed"]] = r["eval_loss"]
    out = {}
    for m in methods:
        if m == reference or m not in ev or reference not in ev:
            continue
        seeds = sorted(set(ev[m]) & set(ev[reference]))
        diffs = [ev[reference][s] - ev[m][s] for s in seeds]
        out[m] = {"mean": statistics.fmean(diffs) if diffs else math.nan,
                  "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                  "wins": sum(d < 0 for d in diffs), "seeds": len(diffs)}
    return out


def markdown(result: dict[str, Any]) -> str:
    o, m, table = result["options"], result["machine"], result["table"]
    window = o["window"]
    lines = ["# Stability under injected rare-byte batches", "", f"`{result['command']}`", "",
             f"{m['cpu']}, nproc {m['nproc']}, torch {m['torch']}, transformers {m.get('transformers')}; load "
             f"average {min(result['load_during'])}-{max(result['load_during'])}; {result['elapsed_s']:.0f} s in all.", "",
             f"Tiny Llama (hidden {o['hidden']}, {o['layers']} layers), byte-level, block {o['block']}, batch {o['batch']}, "
             f"AdamW lr {o['lr']} (constant after {o['lr_warmup']} warmup steps), {o['steps']} steps, seeds "
             f"0..{o['seeds'] - 1}; rare-byte batches injected at steps {result['injections']}. Eval: "
             f"{o['eval_blocks']} held-out clean blocks. Excursion: max clean train loss in the {window} steps after an "
             f"injection minus the mean of the {PRE_STEPS} steps before (worst over injections and seeds). Recover: "
             f"steps until the clean loss is within {int(RECOVER_TOL * 100)}% of that mean (median over seeds of the "
             f"worst injection; {window + 1} = not within {window} steps).", "",
             "| method | final eval loss (mean ± std) | min-max | worst excursion | median excursion | "
             "steps to recover | not recovered runs | diverged seeds | s/run |",
             "|---|---|---|---|---|---|---|---|---|"]
    best = min(table, key=lambda k: table[k]["eval_mean"] if math.isfinite(table[k]["eval_mean"]) else math.inf)
    for method, r in table.items():
        name = f"**{method}**" if method == best else method
        lines.append(f"| {name} | {r['eval_mean']:.4f} ± {r['eval_std']:.4f} | {r['eval_min']:.4f}-{r['eval_max']:.4f} | "
                     f"{r['excursion_worst']:.3f} | {r['excursion_median']:.3f} | {r['recover_median']:g} | "
                     f"{r['not_recovered_runs']} | {len(r['diverged'])}{' ' + str(r['diverged']) if r['diverged'] else ''} | "
                     f"{r['seconds']:.1f} |")
    lines += ["", f"Lowest mean final eval loss: **{best}**."]
    rec = next((k for k in table if k.startswith("recommended")), None)
    if rec is not None:
        verdicts = []
        for peer in ("stock max_grad_norm=1", "zclip 1.0.0"):
            if peer in table:
                better = table[rec]["eval_mean"] < table[peer]["eval_mean"]
                verdicts.append(f"{'lower' if better else 'NOT lower'} than {peer} "
                                f"({table[rec]['eval_mean']:.4f} vs {table[peer]['eval_mean']:.4f})")
        verdicts.append(f"diverged seeds: {len(table[rec]['diverged'])}")
        lines += ["", f"Target (recommended): mean final eval loss " + "; ".join(verdicts) + "."]
        pairs = result.get("paired") or {}
        if pairs:
            lines += ["", f"Paired by seed (same init, data and injections): eval loss of {rec} minus the other method "
                          f"(negative: recommended better).", "", "| other method | mean diff | std | recommended better |",
                      "|---|---|---|---|"]
            for m, p in pairs.items():
                lines.append(f"| {m} | {p['mean']:+.4f} | {p['std']:.4f} | {p['wins']}/{p['seeds']} seeds |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], runs: list[dict[str, Any]], path: str, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    cmap = plt.get_cmap("tab10")
    for i, method in enumerate(result["table"]):
        r = next((r for r in runs if r["method"] == method and r["seed"] == seed), None)
        if r is None:
            continue
        steps = list(range(len(r["loss"])))
        clean = [math.nan if s in r["injections"] else v for s, v in zip(steps, r["loss"])]
        ax_loss.plot(steps, clean, lw=0.9, color=cmap(i % 10), label=method)
        ax_norm.plot(steps, r["grad_norm"], lw=0.9, color=cmap(i % 10), label=method)
    for ax in (ax_loss, ax_norm):
        for s in result["injections"]:
            ax.axvline(s, color="red", ls=":", lw=0.8)
    ax_loss.set_ylabel("clean train loss (injection steps left out)")
    ax_loss.set_ylim(top=min(ax_loss.get_ylim()[1], 4.0))
    ax_norm.set_ylabel("pre-clip grad norm")
    ax_norm.set_yscale("log")
    ax_norm.set_xlabel("optimizer step (red: injected rare-byte batch)")
    ax_loss.legend(fontsize=7, ncol=2)
    ax_loss.set_title(f"seed {seed}: tiny Llama on stdlib bytes, lr {result['options']['lr']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- main
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--methods", default="all",
                   help="'all' or comma-separated short names: " + ", ".join(SHORT))
    p.add_argument("--out", default=_common.RESULTS, help="folder for stability.md/.png/.json")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lr_warmup", type=int, default=20)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--injections", type=int, default=4)
    p.add_argument("--window", type=int, default=20, help="steps after an injection that are watched")
    p.add_argument("--train_bytes", type=int, default=400_000)
    p.add_argument("--eval_bytes", type=int, default=100_000)
    p.add_argument("--eval_blocks", type=int, default=128)
    p.add_argument("--plot_seed", type=int, default=0)
    p.add_argument("--report_only", default=None, help="rebuild stability.md/.png from this stability.json")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a tiny model, least hurt by a busy machine)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = parse(argv)
    if opts.report_only:
        import json

        with open(opts.report_only) as f:
            saved = json.load(f)
        runs = saved.pop("runs")
        methods = list(saved["table"])
        rec = next((m for m in methods if m.startswith("recommended")), None)
        if rec is not None:
            saved["paired"] = paired(runs, methods, rec)
        _common.write_json(os.path.join(opts.out, "stability.json"), {**saved, "runs": runs})
        _common.write_text(os.path.join(opts.out, "stability.md"), markdown(saved))
        plot(saved, runs, os.path.join(opts.out, "stability.png"), seed=saved["options"]["plot_seed"])
        print(markdown(saved))
        return saved
    _common.quiet_transformers()
    torch.set_num_threads(opts.threads)
    if opts.methods == "all":
        methods = DEFAULT_METHODS
    else:
        methods = []
        for key in opts.methods.split(","):
            key = key.strip()
            name = SHORT.get(key, key)
            if name not in METHODS:
                raise SystemExit(f"unknown method {key!r}; choose from {list(SHORT)}")
            methods.append(name)
    train, held_out = datasets(opts)
    runs, loads = [], [_common.load_now()]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(opts.seeds):
            for method in methods:
                r = run(method, seed, opts, train, held_out, tmp)
                runs.append(r)
                print(f"seed {seed} {method:34s} eval {r['eval_loss']:.4f}  {r['train_seconds']:.1f}s", flush=True)
            loads.append(_common.load_now())
    elapsed = time.perf_counter() - t0
    result = {"command": "python benchmarks/stability.py " + " ".join(argv), "options": vars(opts),
              "machine": _common.machine_info(), "load_during": loads, "elapsed_s": elapsed,
              "injections": injection_steps(opts.steps, opts.injections),
              "table": summarise(runs, methods, opts.window)}
    rec = next((m for m in methods if m.startswith("recommended")), None)
    if rec is not None:
        result["paired"] = paired(runs, methods, rec)
    os.makedirs(opts.out, exist_ok=True)
    _common.write_json(os.path.join(opts.out, "stability.json"), {**result, "runs": runs})
    _common.write_text(os.path.join(opts.out, "stability.md"), markdown(result))
    plot(result, runs, os.path.join(opts.out, "stability.png"), seed=min(opts.plot_seed, opts.seeds - 1))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
