"""The demo's six runs through ``gradclip_hf.demo.training.train_one`` (the harness's too), with
TensorBoard and offline W&B logging and one progress bar per run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from dataclasses import asdict
from typing import Any

from .machine import load_now, machine_info

__all__ = ["METHODS", "settings_for", "setup_logging", "train_all", "machine_line", "load_now", "asdict"]

PROJECT = "gradclip-hf-demo"
# (key, label); the key names folders and W&B runs
METHODS = [("none", "no clipping"), ("stock", "stock max_grad_norm=1.0"), ("gradclip", "gradclip-hf recommended")]


def settings_for(ns: argparse.Namespace):
    from .tasks import Settings
    from . import MODEL_SIZES

    return Settings(steps=ns.steps, lr=ns.lr, **MODEL_SIZES[ns.model_size])


def _tensorboard_available() -> bool:
    for module in ("torch.utils.tensorboard", "tensorboardX"):
        try:
            __import__(module)
            return True
        except ImportError:
            continue
    return False


def setup_logging(ns: argparse.Namespace, out: str) -> list[str]:
    """``report_to`` of the runs; sets the W&B environment (offline unless the user set WANDB_MODE)."""
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


def _progress(label: str):
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

    return DemoProgress()


def _method(key: str, label: str, config):
    from .methods import Method, method

    if key != "gradclip":
        return method(key)
    return Method("gradclip", "pack", label, config=tuple(sorted(config.to_dict().items())))


def _finish_wandb(report_to: list[str], eval_loss: float) -> str | None:
    if "wandb" not in report_to:
        return None
    import wandb

    if wandb.run is None:
        return None
    wandb.run.summary["final_eval_loss"] = eval_loss
    folder = os.path.dirname(wandb.run.dir) if wandb.run.dir else None
    wandb.finish()
    return folder


def _one(ns: argparse.Namespace, settings, scenario, m, key: str, label: str, faulted: bool, report_to: list[str],
         out: str) -> dict[str, Any]:
    from transformers import TrainingArguments

    from .training import train_one

    kind = "with_fault" if faulted else "clean"
    tb_dir = os.path.join(out, "tensorboard", key, kind)
    shutil.rmtree(tb_dir, ignore_errors=True)
    os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir  # transformers 5.x reads it when the callback is built
    arguments: dict[str, Any] = dict(report_to=report_to, run_name=f"{label} ({kind.replace('_', ' ')})",
                                     use_cpu=ns.device == "cpu")
    if "logging_dir" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        arguments["logging_dir"] = tb_dir  # transformers 4.x
    callbacks = [] if ns.no_progress else [_progress(f"{label}, {kind.replace('_', ' ')}")]
    run = train_one(m, scenario, ns.seed, faulted, settings, eval_steps=max(10, settings.steps // 10),
                    callbacks=callbacks, **arguments)
    return {**run, "key": key, "label": label, "wandb_dir": _finish_wandb(report_to, run["eval_loss"]),
            "tensorboard_dir": tb_dir}


def train_all(ns: argparse.Namespace, settings, scenario, config, report_to: list[str], out: str) -> list[dict]:
    """Each method with and without the fault: six run records."""
    results = []
    for i, (key, label) in enumerate(METHODS):
        if key == "gradclip" and ns.strategy != "recommended":
            label = f"gradclip-hf {ns.strategy}"
        m = _method(key, label, config)
        print(f"\n[{i + 1}/{len(METHODS)}] {label}", flush=True)
        for faulted in (True, False):
            results.append(_one(ns, settings, scenario, m, key, label, faulted, report_to, out))
    return results


def machine_line(device: str) -> str:
    info = machine_info(("transformers",))
    where = info.get("gpu") if device == "cuda" else f"{info['cpu']}, {info['torch_threads']} torch thread(s)"
    return f"{where}; torch {info['torch']}, transformers {info.get('transformers', '-')}"
