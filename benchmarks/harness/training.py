"""One run of the gallery: the demo's :func:`gradclip_hf.demo.training.train_one` with the gallery's tasks,
faults, methods and scenarios (see there for the record it returns): an accumulation task runs its micro-batches
(``tasks.accumulation_arguments``), a scenario's ``items`` make its batch fault replace those samples only
(``faults.on_items``), and an oracle is resolved for the run (``methods.resolve``)."""

from __future__ import annotations

from typing import Any

from gradclip_hf.demo.training import SERIES_KEYS, fault_callbacks
from gradclip_hf.demo.training import train_one as demo_train_one

from .faults import BATCH_FAULTS, on_items
from .methods import Method, method as get_method, resolve
from .scenarios import Scenario, scenario as get_scenario
from .tasks import Settings, accumulation_arguments, task_data, task_model

__all__ = ["train_one", "fault_callbacks", "SERIES_KEYS", "run_faults"]


def run_faults(sc: Scenario, settings: Settings) -> dict[str, Any]:
    """The batch faults of a run of ``sc``: the gallery's, with ``sc``'s replacing only its ``items``."""
    if getattr(sc, "items", None) is None or not sc.batch_fault:
        return BATCH_FAULTS
    return {**BATCH_FAULTS, sc.fault: on_items(BATCH_FAULTS[sc.fault], sc.positions(settings.batch))}


def train_one(method: Method | str, scenario: Any, seed: int, faulted: bool = True, settings: Settings = Settings(),
              **kwargs: Any) -> dict[str, Any]:
    """A gallery run (``method``, ``scenario``: names or objects); ``kwargs`` as the demo's ``train_one``."""
    m = get_method(method) if isinstance(method, str) else method
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    kwargs = {**accumulation_arguments(sc.task, settings), **kwargs}
    return demo_train_one(resolve(m, sc, faulted, settings), sc, seed, faulted, settings, data=task_data,
                          model=task_model, faults=run_faults(sc, settings), **kwargs)
