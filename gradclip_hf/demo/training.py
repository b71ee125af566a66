"""One run: a method on a scenario's task, with or without its fault, with the Hugging Face Trainer (the demo's
runs, and the benchmark gallery's through ``benchmarks/harness/training.py``, which hands its own tasks, faults,
methods and scenarios in).

:func:`train_one` returns the per-step series (training loss, pre-clip norm, threshold, post-clip
norm), the steps the method flagged and skipped (and where the micro-batch gate dropped micro-batches,
``dropped_steps``), and the final eval loss on the task's held-out
data. Same arguments, same numbers (1 torch thread on CPU). The clean run (``faulted=False``) has the
same initialisation, data order and steps; for batch faults it trains on the clean batches the bad
ones displaced, so it is the same run for every batch fault of a task.
"""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any, Callable, Sequence

from .faults import BATCH_FAULTS, BatchFault, LRFault, NonFiniteFault, StepStream, batch_fault
from .methods import Method, method as get_method
from .scenarios import Scenario, scenario as get_scenario
from .tasks import Settings, task_data, task_model, trainer_arguments

__all__ = ["train_one", "fault_callbacks", "SERIES_KEYS"]

SERIES_KEYS = {"loss": "loss", "grad_norm": "grad_norm", "threshold": "gradclip/threshold",
               "norm_post": "gradclip/norm_post", "spikes": "gradclip/spikes", "skipped": "gradclip/skipped_steps",
               "dropped": "gradclip/dropped_micro_batches"}


def fault_callbacks(sc: Scenario, steps: Sequence[int]) -> list[Any]:
    if sc.fault == "lr":
        return [LRFault(steps, sc.lr_factor)]
    if sc.fault == "nonfinite":
        return [NonFiniteFault(steps)]
    return []


def _series(log_history: list[dict[str, Any]], n: int) -> dict[str, list[float]]:
    series = {k: [math.nan] * n for k in SERIES_KEYS}
    for h in log_history:
        step = h.get("step")
        if "loss" not in h or step is None or not 1 <= step <= n:
            continue
        for name, key in SERIES_KEYS.items():
            value = h.get(key)
            series[name][int(step) - 1] = float(value) if value is not None else math.nan
    return series


def train_one(method: Method | str, scenario: Scenario | str, seed: int, faulted: bool = True,
              settings: Settings = Settings(), *, eval_steps: int | None = None, callbacks: Sequence[Any] = (),
              output_dir: str | None = None, data: Callable[..., Any] = task_data,
              model: Callable[..., Any] = task_model, faults: dict[str, BatchFault] = BATCH_FAULTS,
              **arguments: Any) -> dict[str, Any]:
    """Train one run and return its record (see the module docstring). ``eval_steps``: also evaluate
    every so many steps (``evals``); ``arguments`` override ``TrainingArguments`` keywords (``report_to``,
    ``run_name``, ``use_cpu`` ...); ``callbacks`` are added to the Trainer. ``data(task, settings, seed)``,
    ``model(task, settings, seed)`` and ``faults`` (batch faults by name): the tasks and faults (the demo's)."""
    from transformers.trainer_callback import PrinterCallback

    m = get_method(method) if isinstance(method, str) else method
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    steps = sc.fault_steps(settings.steps) if faulted else []
    task = data(sc.task, settings, seed)
    fault = batch_fault(sc.fault, faults) if sc.batch_fault and steps else None
    stream = StepStream(task.train, settings.batch, steps if fault else (), fault, seed)
    if eval_steps:
        arguments = {"eval_strategy": "steps", "eval_steps": eval_steps, **arguments}
    with tempfile.TemporaryDirectory(prefix="gradclip-run-") as tmp:
        kwargs = trainer_arguments(settings, sc.task, seed, output_dir or tmp, **arguments)
        trainer = m.build(kwargs, model=model(sc.task, settings, seed), train_dataset=stream, eval_dataset=task.eval,
                          data_collator=task.collator)
        trainer.remove_callback(PrinterCallback)
        for callback in [*fault_callbacks(sc, steps), *callbacks]:
            trainer.add_callback(callback)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        eval_loss = float(trainer.evaluate()["eval_loss"])
    series = _series(trainer.state.log_history, settings.steps)
    spikes, skipped = m.flags(trainer, series)
    evals = [[int(h["step"]), float(h["eval_loss"])] for h in trainer.state.log_history if "eval_loss" in h]
    return {"method": m.name, "scenario": sc.name, "task": sc.task, "seed": seed, "faulted": faulted,
            "fault_steps": steps, "eval_loss": eval_loss, "evals": evals,
            "series": {k: series[k] for k in ("loss", "grad_norm", "threshold", "norm_post")},
            "spike_steps": spikes, "skipped_steps": skipped, "clip_rate": m.clip_rate(series),
            "dropped_steps": [t for t, v in enumerate(series["dropped"]) if v > 0],  # the micro-batch gate's
            "seconds": seconds, "steps_done": trainer.state.global_step, "settings": settings.key()}
