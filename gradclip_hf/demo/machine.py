"""What the numbers were measured on: CPU/GPU, torch threads, library versions, load average."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

__all__ = ["machine_info", "load_now", "describe"]


def _cpu() -> str:
    cpu = platform.processor() or platform.machine() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        return cpu


def load_now() -> float:
    """The 1-minute load average (nan where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return math.nan


def _load_averages() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [math.nan] * 3


def machine_info(libraries: tuple[str, ...] = ("transformers", "accelerate", "peft", "zclip")) -> dict[str, Any]:
    """CPU, GPU, torch threads, Python and the versions of ``libraries`` (those installed)."""
    import torch

    info: dict[str, Any] = {"cpu": _cpu(), "nproc": os.cpu_count(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                            "load_avg": _load_averages()}
    for name in libraries:
        try:
            module = __import__(name)
            info[name] = getattr(module, "__version__", "?")
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe(info: dict[str, Any]) -> str:
    """One line: ``"AMD EPYC ..., nproc 2, 1 torch thread(s), torch 2.13.0+cpu, transformers 5.23.0"``."""
    where = info.get("gpu") or info["cpu"]
    return (f"{where}, nproc {info['nproc']}, {info['torch_threads']} torch thread(s), torch {info['torch']}, "
            f"transformers {info.get('transformers', '-')}")
