"""``gradclip-hf demo``: no clipping vs the stock ``max_grad_norm=1.0`` vs this pack, on injected loss spikes.

A tiny byte-level Llama is trained with the Hugging Face Trainer on the Python standard library's own
source text (nothing is downloaded) at a learning rate high enough for bad batches to hurt. At known
optimizer steps the whole batch is replaced by random bytes 128-255, which never occur in that ASCII
text (:class:`~gradclip_hf.examples.SpikyByteStream`): a "rare token" batch whose loss and gradient
are a spike. Three runs see exactly the same model initialisation, data order and injections:

* ``none``: ``transformers.Trainer`` with ``max_grad_norm=0`` (no clipping; the norm is still logged);
* ``stock``: ``transformers.Trainer`` with ``max_grad_norm=1.0`` (what most fine-tuning scripts use);
* ``gradclip``: ``GradClipTrainer`` with :meth:`ClipConfig.recommended` (ZClip capped at 1.0 and the
  loss-spike controller, which skips the update of a spike step and tightens the threshold after it),
  or another ``--strategy`` with the same spike controller.

Everything lands in ``--output-dir`` (default ``demo_output``): ``report.md`` (results table),
``loss.png`` and ``norms.png``, ``results.json``, TensorBoard event files under ``tensorboard/<run>``
and offline W&B runs under ``wandb/`` (``WANDB_MODE=offline`` unless set; ``wandb sync ...`` uploads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

__all__ = ["add_arguments", "run_demo", "injection_steps", "spike_metrics", "MODEL_SIZES"]

# model and data shapes per --model-size; the time per step grows about 5x from tiny to small
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden_size=64, layers=2, heads=4, block=64, batch=8),
    "small": dict(hidden_size=128, layers=4, heads=4, block=128, batch=8),
}
# the pack's run with a strategy other than "recommended": the recommended spike controller and these thresholds
STRATEGY_THRESHOLDS: dict[str, float | None] = {"none": None, "norm": 1.0, "value": 0.01, "agc": 0.05,
                                                "zscore": 1.0, "quantile": None}
PRE_STEPS = 5        # clean steps before an injection that make its baseline
RECOVER_TOL = 0.05   # "recovered": clean loss within 5% of that baseline
WINDOW = 20          # steps watched after an injection
SPIKE_WARMUP = 20    # steps the spike detector observes before it flags anything (ClipConfig default)
PROJECT = "gradclip-hf-demo"
ONE_SEED_NOTE = ("One run per method is one sample: on this task the final eval loss moves by about 0.07 from seed to "
                 "seed, often more than the gap between the clipped runs. benchmarks/stability.py compares the methods "
                 "paired over 15 seeds (results in benchmarks/README.md and the README).")


# ---------------------------------------------------------------------------------------------- options
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .config import Strategy, choices

    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run (default 300)")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny",
                        help="tiny: hidden 64, 2 layers, 64-byte blocks (default); small: hidden 128, 4 layers, "
                             "128-byte blocks (about 5x slower)")
    parser.add_argument("--strategy", choices=["recommended", *choices(Strategy)], default="recommended",
                        help="the pack's run: 'recommended' (ClipConfig.recommended(): zscore capped at 1.0 + "
                             "loss-spike controller, skip) or a strategy with the same spike controller")
    parser.add_argument("--threshold", type=float, default=None,
                        help="threshold of the pack's run (default: 1.0, or the strategy's default)")
    parser.add_argument("--spike-action", choices=["tighten", "skip", "rollback", "stop"], default=None,
                        help="spike action of the pack's run (default: the recommended 'skip')")
    parser.add_argument("--injections", type=int, default=3,
                        help="rare-byte batches injected after the spike detector's 20-step warmup (default 3)")
    parser.add_argument("--lr", type=float, default=4e-3, help="AdamW learning rate (default 4e-3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (default) or cuda (an error if CUDA is not available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a tiny model gains nothing from more, and loses a "
                             "lot when the cores are busy)")
    parser.add_argument("--output-dir", default="demo_output", help="where everything goes (default demo_output)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation, data order and rare bytes")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B (TensorBoard only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check(ns: argparse.Namespace, error) -> None:
    import torch

    if ns.steps < 1:
        error(f"--steps must be >= 1, got {ns.steps}")
    if ns.injections < 0:
        error(f"--injections must be >= 0, got {ns.injections}")
    if ns.threads < 1:
        error(f"--threads must be >= 1, got {ns.threads}")
    if ns.lr <= 0:
        error(f"--lr must be > 0, got {ns.lr}")
    if ns.device == "cuda" and not torch.cuda.is_available():
        error(f"--device cuda was asked for, but CUDA is not available here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False). Install a CUDA build of torch on a machine with an NVIDIA "
              f"GPU, or use --device cpu.")


# ---------------------------------------------------------------------------------------------- pieces
def injection_steps(steps: int, count: int, warmup: int = SPIKE_WARMUP) -> list[int]:
    """``count`` injection steps spread over ``[max(warmup + 10, 30% of steps), 80% of steps]``.

    ``[]`` when the run is too short for an injection after the detector's warmup plus a few steps."""
    if count < 1:
        return []
    first, last = max(warmup + 10, int(steps * 0.3)), int(steps * 0.8)
    if first > steps - 3:
        return []
    last = max(first, last)
    if count == 1:  # once the loss has settled: the spike stands out from its baseline
        return [max(first, min(int(steps * 0.6), steps - 5))]
    return sorted({round(first + i * (last - first) / (count - 1)) for i in range(count)})


def spike_metrics(loss: list[float], injections: list[int], window: int = WINDOW) -> dict[str, Any]:
    """Worst clean training loss after an injection, and steps until it is back within 5% of its baseline.

    ``loss[t]`` is the training loss of optimizer step ``t``. Per injection: the baseline is the mean of
    the ``PRE_STEPS`` clean steps before it; "worst" is the max loss in the ``window`` steps after it
    (the injected step itself left out: its loss is the bad batch's); "recover" counts steps until the
    loss is within 5% of the baseline (``None``: not within the window)."""
    worst, recover = [], []
    for s in injections:
        before = [loss[t] for t in range(max(0, s - PRE_STEPS), s) if t not in injections and math.isfinite(loss[t])]
        after = [loss[t] for t in range(s + 1, min(len(loss), s + 1 + window)) if t not in injections]
        if not before or not after:
            continue
        base = statistics.fmean(before)
        worst.append(max(after) if all(math.isfinite(v) for v in after) else math.inf)
        recover.append(next((i + 1 for i, v in enumerate(after) if v <= base * (1 + RECOVER_TOL)), None))
    return {"worst_loss": max(worst) if worst else math.nan, "worst_losses": worst,
            "recover_steps": None if any(r is None for r in recover) else max(recover, default=0),
            "recoveries": recover}


def _datasets(size: dict[str, int], seed: int):
    import torch

    from .examples import ByteLMDataset, stdlib_text

    train_bytes, eval_bytes = 300_000, 40_000
    text = stdlib_text(train_bytes + eval_bytes)
    train = ByteLMDataset(text[:train_bytes], block_size=size["block"])
    held_out = ByteLMDataset(text[train_bytes:], block_size=size["block"], num_blocks=64)
    order = torch.randperm(len(train.blocks), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
    train.blocks = [train.blocks[i] for i in order]
    return train, held_out


def _pack_config(ns: argparse.Namespace):
    from .config import ClipConfig

    overrides: dict[str, Any] = {}
    if ns.strategy != "recommended":
        overrides["strategy"] = ns.strategy
        overrides["threshold"] = STRATEGY_THRESHOLDS[ns.strategy]
    if ns.threshold is not None:
        overrides["threshold"] = ns.threshold
    if ns.spike_action is not None:
        overrides["spike_action"] = ns.spike_action
    return ClipConfig.recommended(**overrides)


def _overrides(config) -> dict[str, Any]:
    from .config import ClipConfig

    default = ClipConfig().to_dict()
    return {k: v for k, v in config.to_dict().items() if default.get(k) != v}


def _pack_expr(ns: argparse.Namespace) -> str:
    from .config import ClipConfig

    recommended = ClipConfig.recommended().to_dict()
    extra = {k: v for k, v in _pack_config(ns).to_dict().items() if recommended.get(k) != v}
    return "ClipConfig.recommended(" + ", ".join(f"{k}={v!r}" for k, v in extra.items()) + ")"


def _methods(ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(key, label): the key names directories and W&B runs."""
    pack = "gradclip-hf recommended" if ns.strategy == "recommended" else f"gradclip-hf {ns.strategy}+spike"
    return [("none", "no clipping"), ("stock", "stock max_grad_norm=1.0"), ("gradclip", pack)]


def _progress_callback(label: str, show: bool):
    """The Trainer's tqdm bar, named after the run, without printing every log dict under it."""
    from transformers.trainer_callback import ProgressCallback

    class DemoProgress(ProgressCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            super().on_train_begin(args, state, control, **kwargs)
            if self.training_bar is not None:
                self.training_bar.set_description(label)

        def on_log(self, args, state, control, logs=None, **kwargs):
            return control

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
            return control  # no second bar for the few eval batches

    return DemoProgress() if show else None


def _tensorboard_available() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
        return True
    except ImportError:
        try:
            import tensorboardX  # noqa: F401
            return True
        except ImportError:
            return False


# ---------------------------------------------------------------------------------------------- one run
def _train_one(key: str, label: str, ns: argparse.Namespace, size: dict[str, int], train, held_out,
               injections: list[int], report_to: list[str], out: str, scratch: str) -> dict[str, Any]:
    import transformers
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from .examples import SpikyByteStream, tiny_llama
    from .integrations.transformers import GradClipTrainer, GradClipTrainingArguments
    from .integrations.transformers.arguments import argument_name

    tb_dir = os.path.join(out, "tensorboard", key)
    shutil.rmtree(tb_dir, ignore_errors=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir  # transformers 5.x reads it when the callback is built
    stream = SpikyByteStream(train, spike_steps=injections, samples_per_step=size["batch"], seed=ns.seed)
    model = tiny_llama(ns.seed, hidden_size=size["hidden_size"], layers=size["layers"], heads=size["heads"],
                       max_position_embeddings=max(256, size["block"]))
    eval_every = max(10, ns.steps // 10)
    common: dict[str, Any] = dict(
        output_dir=scratch, run_name=label, report_to=report_to, max_steps=ns.steps,
        per_device_train_batch_size=size["batch"], per_device_eval_batch_size=32, learning_rate=ns.lr,
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, weight_decay=0.0, logging_steps=1,
        eval_strategy="steps", eval_steps=eval_every, save_strategy="no", seed=ns.seed, data_seed=ns.seed,
        use_cpu=ns.device == "cpu", dataloader_num_workers=0, optim="adamw_torch", disable_tqdm=ns.no_progress)
    if "logging_dir" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        common["logging_dir"] = tb_dir  # transformers 4.x
    if key == "gradclip":
        config = _pack_config(ns)
        options = {argument_name(k): v for k, v in config.to_dict().items()}
        args = GradClipTrainingArguments(**common, **options)
        trainer = GradClipTrainer(model=model, args=args, train_dataset=stream, eval_dataset=held_out)
    else:
        args = TrainingArguments(max_grad_norm=0.0 if key == "none" else 1.0, **common)
        trainer = Trainer(model=model, args=args, train_dataset=stream, eval_dataset=held_out)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    progress = _progress_callback(label, not ns.no_progress)
    if progress is not None:
        trainer.add_callback(progress)
    start = time.perf_counter()
    trainer.train()
    final_eval = trainer.evaluate()
    seconds = time.perf_counter() - start
    wandb_dir = None
    if "wandb" in report_to:
        import wandb

        if wandb.run is not None:
            wandb.run.summary["final_eval_loss"] = final_eval.get("eval_loss")
            wandb_dir = os.path.dirname(wandb.run.dir) if wandb.run.dir else None
            wandb.finish()
    n = ns.steps
    series = {k: [math.nan] * n for k in ("loss", "grad_norm", "norm_post", "threshold", "clip_rate")}
    evals: list[tuple[int, float]] = []
    for h in trainer.state.log_history:
        step = h.get("step")
        if "eval_loss" in h:
            evals.append((int(step), float(h["eval_loss"])))
        if "loss" not in h or step is None or not 1 <= step <= n:
            continue
        i = int(step) - 1
        series["loss"][i] = float(h["loss"])
        series["grad_norm"][i] = float(h.get("grad_norm", math.nan))
        series["norm_post"][i] = float(h.get("gradclip/norm_post", math.nan))
        series["threshold"][i] = float(h.get("gradclip/threshold", math.nan))
        series["clip_rate"][i] = float(h.get("gradclip/clip_rate", math.nan))
    runner = getattr(trainer, "clip_run", None)
    if key == "stock":  # the stock Trainer clips when the pre-clip norm exceeds max_grad_norm
        series["threshold"] = [1.0] * n
        series["norm_post"] = [min(v, 1.0) if math.isfinite(v) else v for v in series["grad_norm"]]
        clipped = [v > 1.0 for v in series["grad_norm"] if math.isfinite(v)]
        clip_rate = sum(clipped) / len(clipped) if clipped else math.nan
    elif key == "none":
        clip_rate = 0.0
    else:
        rates = [v for v in series["clip_rate"] if math.isfinite(v)]
        clip_rate = statistics.fmean(rates) if rates else math.nan
    return {"key": key, "label": label, "final_eval_loss": float(final_eval.get("eval_loss", math.nan)),
            "evals": evals, "series": series, "clip_rate": clip_rate,
            "spikes_detected": sorted(e.step - 1 for e in runner.spike_events) if runner is not None else None,
            "skipped_steps": runner.skipped_steps if runner is not None else 0,
            "clipper_calls": runner.num_clips if runner is not None else 0,
            "steps_done": trainer.state.global_step, "seconds": seconds, "wandb_dir": wandb_dir,
            "tensorboard_dir": tb_dir, "transformers": transformers.__version__,
            **spike_metrics(series["loss"], injections)}


# ---------------------------------------------------------------------------------------------- report
def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else format(value, spec))
    return str(value)


def _rows(runs: list[dict[str, Any]], injections: list[int]) -> list[list[str]]:
    rows = []
    for r in runs:
        recover = r["recover_steps"]
        if injections and recover is None:
            recover_text = f">{WINDOW}"
        else:
            recover_text = _fmt(recover) if injections else "-"
        spikes = r["spikes_detected"]
        if spikes is None:
            spikes_text = "- (no detector)"
        else:
            hits = sum(s in injections for s in spikes)
            spikes_text = f"{len(spikes)} ({hits}/{len(injections)} injections)"
        rows.append([r["label"], _fmt(r["final_eval_loss"]), _fmt(r["worst_loss"], ".3f") if injections else "-",
                     recover_text, f"{100 * r['clip_rate']:.0f}%" if math.isfinite(r["clip_rate"]) else "-",
                     spikes_text, str(r["skipped_steps"])])
    return rows


HEADERS = ["method", "final eval loss", "worst loss after injection", "steps to recover", "clip rate",
           "spikes detected", "skipped steps"]


def _table_text(runs: list[dict[str, Any]], injections: list[int]) -> str:
    rows = [HEADERS] + _rows(runs, injections)
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(result: dict[str, Any]) -> str:
    runs, injections, o = result["runs"], result["injections"], result["options"]
    size = MODEL_SIZES[o["model_size"]]
    best = min(runs, key=lambda r: r["final_eval_loss"] if math.isfinite(r["final_eval_loss"]) else math.inf)
    lines = ["# gradclip-hf demo: gradient clipping under injected loss spikes", "",
             f"`{result['command']}`", "",
             f"Tiny byte-level Llama ({o['model_size']}: hidden {size['hidden_size']}, {size['layers']} layers, "
             f"{size['block']}-byte blocks, batch {size['batch']}) trained with the Hugging Face Trainer on the Python "
             f"standard library's source text, AdamW lr {o['lr']} (constant after 10 warmup steps), {o['steps']} steps, "
             f"seed {o['seed']}, device {o['device']}. Rare-byte batches (random bytes 128-255, never seen in the "
             f"ASCII training text) replace the whole batch at steps {injections or 'none'}; all three runs see the "
             f"same initialisation, data and injections. Eval: 64 held-out clean blocks.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in _rows(runs, injections):
        if row[0] == best["label"]:
            row[1] = f"**{row[1]}**"
        lines.append("| " + " | ".join(row) + " |")
    lines += ["",
              "- **final eval loss**: mean loss on the held-out clean blocks after the last step (lowest in bold).",
              f"- **worst loss after injection**: the highest clean training loss in the {WINDOW} steps after an "
              f"injection (the injected step itself left out), worst over injections.",
              f"- **steps to recover**: steps after an injection until the training loss is within "
              f"{int(RECOVER_TOL * 100)}% of the mean of the {PRE_STEPS} steps before it (worst over injections; "
              f">{WINDOW}: not within {WINDOW} steps).",
              "- **clip rate**: fraction of steps whose gradients were scaled down (stock: pre-clip norm > 1.0).",
              "- **spikes detected**: steps the loss-spike controller flagged; **skipped steps**: optimizer updates "
              "it skipped.", "",
              ONE_SEED_NOTE, "",
              f"The pack's run: `GradClipTrainer` with `{result['pack_expr']}`, i.e. the `ClipConfig` fields that "
              f"differ from the defaults: `{json.dumps(result['pack_overrides'])}`.", "",
              "![training loss per method](loss.png)", "", "![gradient norms of the pack's run](norms.png)", "",
              f"TensorBoard: `tensorboard --logdir {os.path.join(o['output_dir'], 'tensorboard')}`"]
    syncs = [r["wandb_dir"] for r in runs if r.get("wandb_dir")]
    if syncs:
        lines += ["", "W&B (offline runs; upload with):", "", "```"] + [f"wandb sync {d}" for d in syncs] + ["```"]
    lines += ["", f"{result['machine']}; {result['elapsed_s']:.0f} s in all "
              f"(load average {result['load_before']} before, {result['load_after']} after)."]
    return "\n".join(lines) + "\n"


def _smooth(values: list[float], window: int = 5) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else math.nan)
    return out


def _plot(result: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, injections = result["runs"], result["injections"]
    colors = {"none": "tab:red", "stock": "tab:blue", "gradclip": "tab:green"}
    paths = []

    fig, (ax, ax_eval) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    for r in runs:
        # the injected steps' own losses (~6-8, the bad batch's) are left out: the curves show clean batches
        loss = [math.nan if t in injections else v for t, v in enumerate(r["series"]["loss"])]
        steps = range(1, len(loss) + 1)
        ax.plot(steps, loss, lw=0.6, alpha=0.35, color=colors[r["key"]])
        ax.plot(steps, _smooth(loss), lw=1.6, color=colors[r["key"]], label=f"{r['label']} (5-step mean)")
        if r["evals"]:
            ax_eval.plot([s for s, _ in r["evals"]], [v for _, v in r["evals"]], "o-", ms=3, color=colors[r["key"]],
                         label=r["label"])
    finite = [v for r in runs for t, v in enumerate(r["series"]["loss"])
              if t >= len(r["series"]["loss"]) // 10 and t not in injections and math.isfinite(v)]
    if finite:  # the first steps (loss ~5.5) would squash the curves
        ax.set_ylim(min(finite) * 0.95, min(max(finite) * 1.05, statistics.median(finite) * 2.2))
    for a in (ax, ax_eval):
        for i, s in enumerate(injections):
            a.axvline(s + 1, color="black", ls=":", lw=0.9, label="injected rare-byte batch" if i == 0 and a is ax else None)
    ax.set_ylabel("training loss")
    ax.set_title("Clean training loss per method (dotted: injected rare-byte batches, their own loss left out)")
    ax.legend(fontsize=8)
    ax_eval.set_ylabel("held-out eval loss")
    ax_eval.set_xlabel("optimizer step")
    fig.tight_layout()
    path = os.path.join(out, "loss.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)

    pack = next(r for r in runs if r["key"] == "gradclip")
    s = pack["series"]
    steps = range(1, len(s["grad_norm"]) + 1)
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(steps, s["grad_norm"], lw=0.9, color="tab:gray", label="pre-clip norm (grad_norm)")
    ax.plot(steps, s["norm_post"], lw=0.9, color="tab:green", label="post-clip norm")
    ax.plot(steps, s["threshold"], lw=1.2, color="tab:orange", ls="--", label="threshold")
    for i, step in enumerate(injections):
        ax.axvline(step + 1, color="black", ls=":", lw=0.9, label="injected rare-byte batch" if i == 0 else None)
    detected = pack["spikes_detected"] or []
    if detected:
        ys = [s["grad_norm"][d] if d < len(s["grad_norm"]) else math.nan for d in detected]
        ax.scatter([d + 1 for d in detected], ys, marker="v", s=60, color="red", zorder=5, label="spike detected")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"{pack['label']}: gradient norms and threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out, "norms.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------- main
def _machine(device: str) -> str:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    where = torch.cuda.get_device_name(0) if device == "cuda" else f"{cpu}, {torch.get_num_threads()} torch thread(s)"
    return f"{where}; torch {torch.__version__}"


def _load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


def _setup_logging(ns: argparse.Namespace, out: str) -> list[str]:
    """``report_to`` for the runs; sets the W&B environment (offline unless the user set WANDB_MODE)."""
    report_to = []
    if _tensorboard_available():
        report_to.append("tensorboard")
    else:
        print("TensorBoard is not installed (pip install tensorboard): no TensorBoard logs.", file=sys.stderr)
    if ns.no_wandb or os.environ.get("WANDB_MODE", "").lower() == "disabled" or os.environ.get(
            "WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return report_to
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("wandb is not installed (pip install wandb): no W&B logs.", file=sys.stderr)
        return report_to
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_DIR", out)
    os.environ.setdefault("WANDB_PROJECT", PROJECT)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.makedirs(os.environ["WANDB_DIR"], exist_ok=True)
    return ["wandb", *report_to]


def run_demo(ns: argparse.Namespace, command: str = "gradclip-hf demo") -> dict[str, Any]:
    """Train the three runs, write the report and charts, print the summary; returns the results."""
    import torch

    if ns.device == "cpu":
        torch.set_num_threads(ns.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_warning()
    out = os.path.abspath(ns.output_dir)
    os.makedirs(out, exist_ok=True)
    size = MODEL_SIZES[ns.model_size]
    injections = injection_steps(ns.steps, ns.injections)
    if ns.injections and not injections:
        print(f"note: {ns.steps} steps are too few for an injection after the spike detector's {SPIKE_WARMUP}-step "
              f"warmup (use --steps {SPIKE_WARMUP + 13} or more): no injections.", file=sys.stderr)
    report_to = _setup_logging(ns, out)
    train, held_out = _datasets(size, ns.seed)
    start, load_before = time.perf_counter(), _load()
    print(f"gradclip-hf demo: {ns.model_size} Llama, {ns.steps} steps x 3 runs, lr {ns.lr}, injected rare-byte "
          f"batches at steps {injections or 'none'}, device {ns.device}; output in {ns.output_dir}/", flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="gradclip-demo-") as scratch:  # the Trainers' output_dir (nothing saved)
        for i, (key, label) in enumerate(_methods(ns)):
            print(f"\n[{i + 1}/3] {label}", flush=True)
            runs.append(_train_one(key, label, ns, size, train, held_out, injections, report_to, out,
                                   os.path.join(scratch, key)))
    result = {"command": command, "options": {**vars(ns), "output_dir": ns.output_dir}, "injections": injections,
              "pack_config": _pack_config(ns).to_dict(), "pack_overrides": _overrides(_pack_config(ns)),
              "pack_expr": _pack_expr(ns), "machine": _machine(ns.device),
              "elapsed_s": time.perf_counter() - start, "load_before": load_before, "load_after": _load(),
              "runs": runs}
    charts = _plot(result, out)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(_markdown(result))
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, default=str)
    _print_summary(result, charts, out)
    return result


def _print_summary(result: dict[str, Any], charts: list[str], out: str) -> None:
    runs, injections = result["runs"], result["injections"]
    pack = next(r for r in runs if r["key"] == "gradclip")
    print(f"\nSummary ({result['elapsed_s']:.0f} s; injected rare-byte batches at steps {injections or 'none'}):\n")
    print(_table_text(runs, injections))
    print(f"\n{pack['label']}: {pack['clipper_calls']} clips (one per optimizer step), "
          f"spikes detected at steps {pack['spikes_detected'] or 'none'}, {pack['skipped_steps']} update(s) skipped.")
    print(ONE_SEED_NOTE)
    rel = os.path.relpath(out) if not os.path.relpath(out).startswith("..") else out
    print(f"\nReport: {os.path.join(rel, 'report.md')}   charts: {', '.join(os.path.join(rel, os.path.basename(c)) for c in charts)}")
    print(f"TensorBoard: tensorboard --logdir {os.path.join(rel, 'tensorboard')}")
    syncs = [r["wandb_dir"] for r in runs if r.get("wandb_dir")]
    if syncs:
        print(f"W&B ({os.environ.get('WANDB_MODE', 'online')} runs, project {os.environ.get('WANDB_PROJECT', PROJECT)}); "
              f"upload with:")
        for d in syncs:
            d = os.path.relpath(d) if not os.path.relpath(d).startswith("..") else d
            print(f"  wandb sync {d}")


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="gradclip-hf demo", description=__doc__,
                                                   formatter_class=argparse.RawDescriptionHelpFormatter))
    ns = parser.parse_args(argv)
    _check(ns, parser.error)
    run_demo(ns, "gradclip-hf demo " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0
