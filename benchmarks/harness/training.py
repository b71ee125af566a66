"""One run of the gallery: the demo's :func:`gradclip_hf.demo.training.train_one` with the gallery's tasks,
faults, methods and scenarios (see there for the record it returns)."""

from __future__ import annotations

from typing import Any

from gradclip_hf.demo.training import SERIES_KEYS, fault_callbacks
from gradclip_hf.demo.training import train_one as demo_train_one

from .faults import BATCH_FAULTS
from .methods import Method, method as get_method
from .scenarios import scenario as get_scenario
from .tasks import Settings, task_data, task_model

__all__ = ["train_one", "fault_callbacks", "SERIES_KEYS"]


def train_one(method: Method | str, scenario: Any, seed: int, faulted: bool = True, settings: Settings = Settings(),
              **kwargs: Any) -> dict[str, Any]:
    """A gallery run (``method``, ``scenario``: names or objects); ``kwargs`` as the demo's ``train_one``."""
    m = get_method(method) if isinstance(method, str) else method
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    return demo_train_one(m, sc, seed, faulted, settings, data=task_data, model=task_model, faults=BATCH_FAULTS,
                          **kwargs)
