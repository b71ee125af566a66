"""Deprecated: the optimizer gate is :class:`gradclip_hf.run.StepGate` (``gradclip_hf.run.gate``) since the
per-run machinery moved to :mod:`gradclip_hf.run`. This name keeps working, with a ``DeprecationWarning``."""

from __future__ import annotations

import warnings
from typing import Any

_MOVED = ("StepGate", "supports_grad_scale")


def __getattr__(name: str) -> Any:
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"gradclip_hf.integrations.optim.{name} moved to gradclip_hf.run.{name}; the old name will be "
                  f"removed.", DeprecationWarning, stacklevel=2)
    from ..run import gate

    return getattr(gate, name)
