"""Shared machinery of the issue-25 research (scratch; imports the package read-only from /work/main).

* custom method kinds for the harness (``CUSTOM`` builders, patched into ``training.build_trainer``);
* recording Trainer subclasses: per-sample losses of every training micro-batch (nll sum, tokens), and
  diagnostics per optimizer step (update norm, first-moment norm);
* a cached runner (``run``) keyed by my method's version string, scenario spec, seed, faulted, settings.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from gradclip_hf.experiments import training
from gradclip_hf.experiments.methods import Method, build_trainer as _orig_build, method as get_method
from gradclip_hf.experiments.scenarios import GALLERY, Scenario
from gradclip_hf.experiments.tasks import Settings

HERE = Path(__file__).resolve().parent
CUSTOM: dict[str, Callable[..., Any]] = {}
LAST: dict[str, Any] = {}  # the last trainer built (extras are read from it after train_one)


def _patched_build(m: Method, args_kwargs: dict[str, Any], **trainer_kwargs: Any):
    if m.kind in CUSTOM:
        trainer = CUSTOM[m.kind](m, args_kwargs, **trainer_kwargs)
    else:
        trainer = _orig_build(m, args_kwargs, **trainer_kwargs)
    LAST["trainer"] = trainer
    return trainer


training.build_trainer = _patched_build


# ---------------------------------------------------------------- recording
def per_sample_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLL, token count) per row, causal shift, -100 ignored."""
    lg = logits[:, :-1].float()
    lb = labels[:, 1:].to(lg.device)
    nll = F.cross_entropy(lg.reshape(-1, lg.size(-1)), lb.reshape(-1), ignore_index=-100, reduction="none")
    nll = nll.view(lb.shape)
    mask = lb != -100
    return (nll * mask).sum(1), mask.sum(1)


class RecordMixin:
    """Records per-sample (nll_sum, tokens) of each training micro-batch: ``self.rec[step] = [[s, n], ...]``."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            with torch.no_grad():
                s, n = per_sample_nll(outputs.logits, inputs["labels"])
            rec = self.__dict__.setdefault("rec", {})
            rec.setdefault(int(self.state.global_step), []).extend(
                [[float(a), int(b)] for a, b in zip(s.tolist(), n.tolist())])
        return (loss, outputs) if return_outputs else loss


def _flat_params(optimizer):
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


class UpdateDiag(TrainerCallback):
    """Per optimizer step (0-based): norm of the applied update, of Adam's first moment, of exp_avg_sq's sqrt,
    and the LR of group 0. Host reads: diagnostics only."""

    def __init__(self):
        self.rows: dict[int, dict[str, float]] = {}
        self._before = None

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self._before = [p.detach().clone() for p in _flat_params(optimizer)]
        self._lr = optimizer.param_groups[0]["lr"]

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        params = _flat_params(optimizer)
        with torch.no_grad():
            upd = math.sqrt(sum(float((p - b).pow(2).sum()) for p, b in zip(params, self._before)))
            m = math.sqrt(sum(float(optimizer.state[p]["exp_avg"].pow(2).sum()) for p in params
                              if p in optimizer.state and "exp_avg" in optimizer.state[p]))
        self.rows[int(state.global_step)] = {"update": upd, "m": m, "lr": float(self._lr)}
        self._before = None


# ---------------------------------------------------------------- methods
def recorded_stock(m: Method, args_kwargs, **kw):
    from transformers import Trainer, TrainingArguments

    cls = type("RecTrainer", (RecordMixin, Trainer), {})
    return cls(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0), **kw)


CUSTOM["rec_stock"] = recorded_stock


def recorded_pack(m: Method, args_kwargs, **kw):
    from transformers import TrainingArguments

    from gradclip_hf.integrations.transformers import GradClipTrainer

    cls = type("RecPack", (RecordMixin, GradClipTrainer), {})
    cfg = m.clip_config() if m.kind == "pack" else Method(m.name, "pack", config=m.config).clip_config()
    return cls(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0), clip_config=cfg, **kw)


CUSTOM["rec_pack"] = recorded_pack


# ---------------------------------------------------------------- scenarios
def custom_scenario(name: str, task: str, fault: str, steps: tuple[int, ...], length: int = 1,
                    lr_factor: float = 1.0, total: int = 300) -> Scenario:
    """A scenario whose faults begin at the given 0-based steps (fractions chosen to round to them)."""
    sc = Scenario(name, name, task, fault, starts=tuple(s / total for s in steps), length=length, lr_factor=lr_factor)
    want = sorted({t for s in steps for t in range(s, s + length)})
    assert sc.fault_steps(total) == want, (sc.fault_steps(total), want)
    return sc


# ---------------------------------------------------------------- cached runner
class Cache:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.runs: dict[str, dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    e = json.loads(line)
                    self.runs[e["key"]] = e["run"]

    def put(self, key, run):
        self.runs[key] = run
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"key": key, "run": run}) + "\n")


def key_of(tag: str, sc: Scenario, seed: int, faulted: bool, settings: Settings, arguments=None, key_extra=None) -> str:
    fault = {k: v for k, v in asdict(sc).items() if k not in ("title", "name")} if faulted and sc.fault != "none" \
        else "clean-" + sc.task
    spec = {"tag": tag, "fault": fault, "seed": seed, "settings": asdict(settings)}
    if arguments:
        spec["arguments"] = arguments
    if key_extra:
        spec["extra"] = key_extra
    spec = json.dumps(spec, sort_keys=True)
    return hashlib.sha1(spec.encode()).hexdigest()[:16]


def run(cache: Cache, tag: str, m: Method, sc: Scenario, seed: int, faulted: bool, settings: Settings = Settings(),
        callbacks_factory: Callable[[], list] | None = None, extras: Callable[[Any, list], dict] | None = None,
        log=print, arguments: dict | None = None, label: str | None = None, key_extra=None) -> dict:
    """One run (cached by ``tag``: change the tag when the method's code changes)."""
    key = key_of(tag, sc, seed, faulted, settings, arguments, key_extra)
    if key in cache.runs:
        return cache.runs[key]
    cbs = callbacks_factory() if callbacks_factory else []
    t0 = time.perf_counter()
    rec = training.train_one(m, sc, seed, faulted, settings, callbacks=cbs, **(arguments or {}))
    trainer = LAST.get("trainer")
    rec["extra"] = extras(trainer, cbs) if extras else {}
    rec["tag"] = tag
    rec["variant"] = label or ""
    rec["settings_full"] = asdict(settings)
    cache.put(key, rec)
    log(f"{tag:28s} {(label or '') + ' ' + (sc.name if faulted else 'clean ' + sc.task):30s} seed {seed} eval {rec['eval_loss']:.4f} "
        f"{time.perf_counter() - t0:.1f}s", flush=True)
    return rec


def setup_threads():
    torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore")
