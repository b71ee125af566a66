"""Shared pieces of ``gpu_check.py`` (not a public API): the plan of sizes, the run context, recorded checks,
models and data on the device, Trainer arguments, and the host-read counter.

Everything the check takes from the fault gallery comes through the one import line below.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import warnings
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from typing import Any
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

import torch  # noqa: E402

# the stand-ins and the demo's fault machinery (the gallery's pretraining part): their only import here
from gradclip_hf.demo import faults, methods, metrics, scenarios, tasks  # noqa: E402,F401
from gradclip_hf import standins  # noqa: E402


@dataclass
class Plan:
    """Sizes and step counts of every section (``--quick``: tiny; else the GPU sizes); ``--set name=value``."""

    small_hidden: int = 256       # the model of the syncs, fp16 and identity sections
    small_layers: int = 4
    small_block: int = 128
    small_batch: int = 8
    sync_steps: int = 20          # steps per run; the first sync_skip are not counted
    sync_skip: int = 3
    fp16_steps: int = 80
    fp16_spikes: tuple = (44, 56)  # garbage batches: loss spikes the pack skips (after its 20-step warmup)
    fp16_overflow: int = 50        # one step forced to overflow (scale set to the fp32 maximum)
    fp16_burst: tuple = (60, 12)   # (first step, steps): overflow in a row, more than nonfinite_max_consecutive
    fp16_lr: float = 3e-3
    ident_steps: int = 30
    kernel_preset: str = "qwen0.5b"  # clip_kernel.py's shapes: Qwen2.5-0.5B, 494 M parameters
    kernel_repeats: int = 30
    kernel_warmup: int = 10
    trainer_hidden: int = 768     # about 100 M parameters with 12 layers
    trainer_layers: int = 12
    trainer_intermediate: int = 2560
    trainer_heads: int = 12
    trainer_block: int = 512
    trainer_batch: int = 8
    trainer_steps: int = 40       # steps per timed run; the first trainer_untimed are not timed
    trainer_untimed: int = 10
    trainer_repeats: int = 3
    scale_hidden: int = 1152      # 53.7 M parameters with 4 layers (few layers: fewer kernel launches per step)
    scale_layers: int = 4
    scale_heads: int = 9
    scale_block: int = 128
    scale_batch: int = 32         # samples per optimizer step
    scale_ga: int = 4             # accumulation steps of the accumulation fault
    scale_steps: int = 1000
    scale_lr: float = 6e-4
    scale_warmup: int = 50
    scale_fault_length: int = 30
    scale_eval_blocks: int = 64

    def set(self, assignment: str) -> None:
        import ast

        name, sep, value = assignment.partition("=")
        names = {f.name: f for f in fields(self)}
        if not sep or name not in names:
            raise SystemExit(f"--set {assignment!r}: expected name=value with a name among {sorted(names)}")
        kind = type(getattr(self, name))
        setattr(self, name, value if kind is str else kind(ast.literal_eval(value)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


QUICK = dict(small_hidden=32, small_layers=2, small_block=32, small_batch=4, sync_steps=6, sync_skip=2,
             fp16_steps=70, fp16_spikes=(40, 52), fp16_overflow=46, fp16_burst=(56, 11), ident_steps=6,
             kernel_preset="tiny", kernel_repeats=3, kernel_warmup=2, trainer_hidden=32, trainer_layers=2,
             trainer_intermediate=64, trainer_heads=4, trainer_block=32, trainer_batch=4, trainer_steps=6,
             trainer_untimed=2, trainer_repeats=2, scale_hidden=32, scale_layers=2, scale_heads=4, scale_block=32,
             scale_batch=4, scale_ga=2, scale_steps=40, scale_lr=4e-3, scale_warmup=5, scale_fault_length=6,
             scale_eval_blocks=8)


class DeadlineReached(RuntimeError):
    pass


@dataclass
class Context:
    """One check run: the device, the plan, the global deadline (``time.perf_counter()``), a scratch folder."""

    device: str
    plan: Plan
    deadline: float
    tmp: str

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def release(self) -> None:
        """Between sections: free the device memory the last one held."""
        import gc

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


class Checks:
    """Invariants, each recorded as pass / FAIL / skipped with what was seen."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.items.append({"name": name, "status": "pass" if ok else "FAIL", "detail": detail})
        return bool(ok)

    def skip(self, name: str, why: str) -> None:
        self.items.append({"name": name, "status": "skipped", "detail": why})

    @property
    def failed(self) -> list[str]:
        return [c["name"] for c in self.items if c["status"] == "FAIL"]


# ---------------------------------------------------------------------------------------------- models, data
def llama(ctx: Context, seed: int, hidden: int, layers: int, heads: int = 4, intermediate: int | None = None,
          positions: int = 512):
    """A byte-level Llama built directly on the device (its initialisation runs there: fast for 100 M)."""
    with torch.device(ctx.device):
        return standins.tiny_llama(seed, hidden_size=hidden, layers=layers, heads=heads,
                                 intermediate_size=intermediate, max_position_embeddings=max(positions, 256))


def small_model(ctx: Context, seed: int = 0):
    p = ctx.plan
    return llama(ctx, seed, p.small_hidden, p.small_layers, heads=4, positions=2 * p.small_block)


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def text_blocks(block: int, blocks: int):
    """At least ``blocks`` byte-level blocks of standard-library text (cycled by the streams if fewer)."""
    return standins.ByteLMDataset(standins.stdlib_text(min(block * blocks + 1, 4_500_000)), block_size=block)


def trainer_args(ctx: Context, output_dir: str, cls=None, precision: str = "bf16", **overrides: Any):
    """Quiet, deterministic TrainingArguments on the context's device, the fused AdamW (transformers' default)."""
    options: dict[str, Any] = dict(use_cpu=not ctx.cuda, optim="adamw_torch_fused", bf16=precision == "bf16",
                                   fp16=precision == "fp16" and ctx.cuda, dataloader_pin_memory=ctx.cuda)
    options.update(overrides)
    return _common.trainer_args(output_dir, cls=cls, **options)


def deadline_callback(ctx: Context):
    """Stops a Trainer run at the global deadline (the run is then reported as cut short)."""
    from transformers import TrainerCallback

    class Deadline(TrainerCallback):
        hit = False

        def on_step_end(self, args, state, control, **kwargs):
            if ctx.left() <= 0:
                self.hit = control.should_training_stop = True
            return control

    return Deadline()


def quiet(trainer):
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def max_abs_diff(a, b) -> float:
    """Largest absolute difference between two lists of tensors (one host read)."""
    diffs = [(x.detach().float() - y.detach().float()).abs().max() for x, y in zip(a, b)]
    return float(torch.stack(diffs).max()) if diffs else 0.0


def finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


# ---------------------------------------------------------------------------------------------- host reads
_PACK = os.sep + "gradclip_hf" + os.sep
_STANDINS = (_PACK + "demo" + os.sep, _PACK + "standins.py")
_TORCH = os.sep + "torch" + os.sep
_READS = ("item", "__bool__", "tolist", "__float__", "__int__", "__index__")


def _short(path: str) -> str:
    for marker in ("site-packages" + os.sep, _common.ROOT + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def attribute(stack: list[traceback.FrameSummary]) -> dict[str, Any]:
    """Where a host read was made: the innermost frame outside torch (and outside this counter); the pack made
    it when that frame is in gradclip_hf (the gallery's stand-ins left out). A read inside the model's forward
    under the pack's ``training_step`` is the model's; one inside torch called by the pack is the pack's."""
    here = os.path.abspath(__file__)
    frames = [f for f in stack if f.filename != here and "warnings.py" not in f.filename]
    f = ([f for f in frames if _TORCH not in f.filename] or frames)[-1]
    pack = _PACK in f.filename and not any(part in f.filename for part in _STANDINS)
    return {"pack": pack, "site": f"{_short(f.filename)}:{f.lineno} {f.name}: {(f.line or '').strip()}"}


class HostReads:
    """Every host read of a tensor value, with who caused it (:func:`attribute`).

    CUDA: each synchronizing call, from ``torch.cuda.set_sync_debug_mode("warn")`` (one warning per sync).
    CPU (no such mode): each Python-level read (``Tensor.item``, ``__bool__``, ``tolist``, ``__float__``,
    ``__int__``, ``__index__``), the reads that are syncs on a device.
    """

    def __init__(self, cuda: bool):
        self.cuda, self.events = cuda, []
        self._stack = ExitStack()

    def _record(self) -> None:
        self.events.append(attribute(traceback.extract_stack()[:-2]))

    def __enter__(self) -> "HostReads":
        if self.cuda:
            self._stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("always")
            warnings.showwarning = self._show
            torch.cuda.set_sync_debug_mode("warn")
            self._stack.callback(torch.cuda.set_sync_debug_mode, "default")
        else:
            for name in _READS:
                original = getattr(torch.Tensor, name)
                self._stack.enter_context(mock.patch.object(torch.Tensor, name, self._counted(original)))
        return self

    def _counted(self, original):
        def read(tensor, *args, **kwargs):
            self._record()
            return original(tensor, *args, **kwargs)
        return read

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" in str(message).lower():
            self._record()

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events
