"""gradclip-hf demo: what a fault costs with no clipping, with the stock max_grad_norm=1.0, and with this pack.

A tiny byte-level Llama is trained with the Hugging Face Trainer on the Python standard library's own
source text (nothing is downloaded). One fault of the benchmark gallery hits the run: by default a
corrupted shard, 30 consecutive batches of the same text written in the wrong encoding (UTF-16). Each method is
trained twice from the same initialisation, on the same data and for the same steps: once with the
fault and once without it (the bad batches replaced by the clean batches they displaced). The damage
of the fault is the difference of the two final eval losses, so seed noise cancels out.

Methods: "no clipping" (Trainer, max_grad_norm=0), "stock" (Trainer, max_grad_norm=1.0) and the pack
(GradClipTrainer with ClipConfig.recommended(), or the --strategy/--threshold/--spike-action given).

Everything lands in --output-dir (default demo_output): report.md (results), loss.png and norms.png,
results.json, TensorBoard logs under tensorboard/ and offline W&B runs under wandb/ (WANDB_MODE=offline
unless set; "wandb sync DIR" uploads one). benchmarks/stability.py measures the same over 10 seeds and
the whole fault gallery.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Any

__all__ = ["add_arguments", "run_demo", "pack_config", "warmup_note", "MODEL_SIZES", "STRATEGY_THRESHOLDS"]

# Settings fields per --model-size; the time per step grows about 5x from tiny to small
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(hidden=64, layers=2, block=64, batch=8),
    "small": dict(hidden=128, layers=4, block=128, batch=8),
}
# the pack's run with a strategy other than "recommended": the recommended spike controller and these thresholds
STRATEGY_THRESHOLDS: dict[str, float | None] = {"none": None, "norm": 1.0, "value": 0.01, "agc": 0.05,
                                                "zscore": 1.0, "quantile": None}
# steps after the detectors' warmup before their statistics forget the first, steep part of the loss curve
# (measured: a fault 23 steps after a 25-step warmup is flagged, one 7 steps after it is not)
SETTLE = 20
DEMO_SCENARIOS = ("garbage_batches", "corrupt_shard", "label_noise_shard", "lr_mistake", "nonfinite")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from ..options import Strategy, choices
    from .tasks import Settings

    parser.add_argument("--scenario", choices=DEMO_SCENARIOS, default="corrupt_shard",
                        help="the fault (benchmarks/README.md describes each; default corrupt_shard)")
    parser.add_argument("--steps", type=int, default=Settings.steps, help=f"optimizer steps per run (default {Settings.steps})")
    parser.add_argument("--model-size", choices=sorted(MODEL_SIZES), default="tiny",
                        help="tiny: hidden 64, 2 layers, 64-byte blocks (default); small: hidden 128, 4 layers, "
                             "128-byte blocks (about 5x slower)")
    parser.add_argument("--strategy", choices=["recommended", *choices(Strategy)], default="recommended",
                        help="the pack's run: 'recommended' (ClipConfig.recommended()) or this strategy with the "
                             "recommended spike detection")
    parser.add_argument("--threshold", type=float, default=None,
                        help="threshold of the pack's run (default: the recommended one, or the strategy's default)")
    parser.add_argument("--spike-action", choices=["tighten", "skip", "rollback", "stop"], default=None,
                        help="spike action of the pack's run (default: the recommended one)")
    parser.add_argument("--lr", type=float, default=Settings.lr,
                        help=f"AdamW peak learning rate, cosine schedule (default {Settings.lr})")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cpu (default) or cuda (an error if CUDA is not available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a tiny model gains nothing from more, and loses a lot "
                             "when the cores are busy)")
    parser.add_argument("--output-dir", default="demo_output", help="where everything goes (default demo_output)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation, data order and bad bytes (default 0)")
    parser.add_argument("--no-wandb", action="store_true", help="do not log to W&B (TensorBoard only)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _check(ns: argparse.Namespace, error) -> None:
    """Exit through ``error`` (argparse's ``parser.error``) on a bad option."""
    import torch

    if ns.steps < 10:
        error(f"--steps must be >= 10, got {ns.steps}")
    if ns.threads < 1:
        error(f"--threads must be >= 1, got {ns.threads}")
    if ns.lr <= 0:
        error(f"--lr must be > 0, got {ns.lr}")
    if ns.threshold is not None and ns.threshold <= 0:
        error(f"--threshold must be > 0, got {ns.threshold}")
    if ns.device == "cuda" and not torch.cuda.is_available():
        error(f"--device cuda was asked for, but CUDA is not available here (torch {torch.__version__}, "
              f"torch.cuda.is_available() is False). Install a CUDA build of torch on a machine with an NVIDIA "
              f"GPU, or use --device cpu.")


def pack_config(ns: argparse.Namespace):
    """The pack run's ``ClipConfig``: ``ClipConfig.recommended()`` with the demo's overrides."""
    from ..config import ClipConfig

    overrides: dict[str, Any] = {}
    if ns.strategy != "recommended":
        overrides.update(strategy=ns.strategy, threshold=STRATEGY_THRESHOLDS[ns.strategy])
    if ns.threshold is not None:
        overrides["threshold"] = ns.threshold
    if ns.spike_action is not None:
        overrides["spike_action"] = ns.spike_action
    return ClipConfig.recommended(**overrides)


def warmup_note(config, scenario, steps: int) -> str | None:
    """A warning when the first fault step falls inside the warmup of the pack's detectors (``None``: fine)."""
    fault_steps = scenario.fault_steps(steps)
    warmups = [config.zscore_warmup_steps if config.strategy == "zscore" else 0,
               config.spike_warmup_steps if config.spike_detection != "off" else 0]
    warmup = max(warmups)
    if not fault_steps or not warmup or fault_steps[0] >= warmup + SETTLE:
        return None
    need = math.ceil((warmup + SETTLE) / min(scenario.starts))
    return (f"warning: with --steps {steps} the first fault comes at step {fault_steps[0]}, within the pack's "
            f"{warmup}-step detector warmup (+{SETTLE} steps to settle): it is not flagged there, and a spike let "
            f"through spoils the detector's statistics for the next ones. Use --steps {need} "
            f"or more.")


def run_demo(ns: argparse.Namespace, command: str = "gradclip-hf demo") -> dict[str, Any]:
    """Train the six runs, write the report and charts, print the summary; returns the results."""
    if ns.no_wandb:
        os.environ["WANDB_MODE"] = "disabled"  # before transformers reads it (it prints a line in offline mode)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from .scenarios import scenario as get_scenario
    from . import report, runs

    if ns.device == "cpu":
        torch.set_num_threads(ns.threads)
    sc, config = get_scenario(ns.scenario), pack_config(ns)
    note = warmup_note(config, sc, ns.steps)
    if note:
        print(note, file=sys.stderr)
    out = os.path.abspath(ns.output_dir)
    os.makedirs(out, exist_ok=True)
    settings = runs.settings_for(ns)
    report_to = runs.setup_logging(ns, out)
    print(f"gradclip-hf demo: {ns.model_size} Llama, {ns.steps} steps, lr {ns.lr}, seed {ns.seed}; fault: "
          f"{sc.title}, at steps {report.steps_text(sc.fault_steps(ns.steps))}. 3 methods x (with, without the fault) "
          f"= 6 runs; output in {ns.output_dir}/", flush=True)
    start, load_before = time.perf_counter(), runs.load_now()
    results = runs.train_all(ns, settings, sc, config, report_to, out)
    result = {"command": command, "options": vars(ns), "scenario": sc.name, "title": sc.title,
              "fault_steps": sc.fault_steps(ns.steps), "settings": runs.asdict(settings),
              "pack_config": config.to_dict(), "pack_expr": report.pack_expr(ns, config),
              "machine": runs.machine_line(ns.device), "elapsed_s": time.perf_counter() - start,
              "load_before": load_before, "load_after": runs.load_now(), "runs": results, "note": note}
    result["summary"] = report.summary(result)
    charts = report.write(result, out)
    report.print_summary(result, charts, out)
    return result
