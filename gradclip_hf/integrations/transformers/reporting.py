"""Per-layer gradient norms in the Trainer logs: which layers to log, under which keys.

The core already computes the pre-clip norm of every measured gradient (``ClipReport.per_tensor_norms``);
the runner ships that vector to the host together with the window's scalars in its one transfer per
logging step, and these helpers turn it into ``gradclip/layer/<name>`` (and, after a spike,
``gradclip/spike_layer/<name>``) entries. Host-side only: no tensor here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

__all__ = ["LAYER_PREFIX", "SPIKE_LAYER_PREFIX", "LayerSelector"]

LAYER_PREFIX = "gradclip/layer/"
SPIKE_LAYER_PREFIX = "gradclip/spike_layer/"


def _rank(value: float) -> tuple[int, float]:
    """Sort key, largest first: NaN/Inf norms first (they are the culprits), then by size."""
    return (0, 0.0) if not math.isfinite(value) else (1, -value)


class LayerSelector:
    """Picks the layers to log from names and per-tensor norms.

    Args:
        top_k: the ``top_k`` largest norms (non-finite ones first); 0 for none.
        patterns: regular expressions (``re.search`` on parameter names): matching layers are always logged.
    """

    def __init__(self, top_k: int = 8, patterns: Sequence[str] = ()):
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"`log_layers_top_k` must be an int >= 0, got {top_k!r}.")
        self.top_k = top_k
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns or ())
        self._compiled = [re.compile(p) for p in self.patterns]
        self._matched: dict[tuple[str, ...], list[int]] = {}

    @property
    def enabled(self) -> bool:
        return self.top_k > 0 or bool(self.patterns)

    def _pattern_indices(self, names: Sequence[str]) -> list[int]:
        key = tuple(names)
        if key not in self._matched:  # names rarely change: match once
            self._matched = {key: [i for i, n in enumerate(names) if any(p.search(n) for p in self._compiled)]}
        return self._matched[key]

    def select(self, names: Sequence[str], values: Sequence[float], prefix: str = LAYER_PREFIX,
               top_k: int | None = None, patterns: bool = True) -> dict[str, float]:
        """``{prefix + name: norm}`` for the top-k layers and the pattern matches, largest first."""
        k = self.top_k if top_k is None else top_k
        if len(names) != len(values):
            return {}
        order = sorted(range(len(values)), key=lambda i: _rank(values[i]))[:k] if k else []
        chosen = list(order)
        if patterns and self._compiled:
            seen = set(order)
            chosen += [i for i in self._pattern_indices(names) if i not in seen]
        return {prefix + names[i]: float(values[i]) for i in chosen}

    @staticmethod
    def top(names: Sequence[str], values: Sequence[float], k: int) -> list[tuple[str, float]]:
        """The ``k`` largest ``(name, norm)`` pairs, non-finite norms first."""
        order = sorted(range(len(values)), key=lambda i: _rank(values[i]))[:k]
        return [(names[i], float(values[i])) for i in order]
