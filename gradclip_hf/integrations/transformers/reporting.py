"""Reporting on the host: per-layer gradient norms in the logs (which layers, under which keys) and the
spike messages. Every message starts with ``gradclip:`` and names steps as ``train/global_step`` does.

The core already computes the pre-clip norm of every measured gradient (``ClipReport.per_tensor_norms``);
the runner ships that vector to the host together with the window's scalars in its one transfer per
logging step, and these helpers turn it into ``gradclip/layer/<name>`` (and, after a spike,
``gradclip/spike_layer/<name>``) entries. Host-side only: no tensor here.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any

__all__ = ["LAYER_PREFIX", "SPIKE_LAYER_PREFIX", "LayerSelector", "SpikeMessages", "logger", "is_layer_key"]

logger = logging.getLogger("transformers.gradclip_hf")  # transformers.logging.set_verbosity_* applies
MAX_MESSAGES = 5  # spike messages per logging step; the rest in one summary line

LAYER_PREFIX = "gradclip/layer/"
SPIKE_LAYER_PREFIX = "gradclip/spike_layer/"


def is_layer_key(key: str) -> bool:
    """Per-layer keys: in the logs for the reporters (W&B, TensorBoard, ...), not printed on the console."""
    return LAYER_PREFIX in key or SPIKE_LAYER_PREFIX in key


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


class SpikeMessages:
    """Reads the spike events back at logging steps (one transfer, only when there were spikes) and writes
    one warning per spike, at most ``MAX_MESSAGES`` per read, then one line for the rest."""

    def __init__(self, clipper: Any, owner: str):
        self.clipper, self.owner = clipper, owner
        self.seen = 0  # events already read (restored on resume)
        self.events: list[Any] = []  # every spike read back in this run

    def tensors(self) -> dict[str, Any]:
        spikes = self.clipper.spikes
        return {} if spikes is None else {f"spikes/{k}": v for k, v in spikes.events.tensors().items()}

    def show(self, values: dict[str, list[float]], action: str) -> list[Any]:
        """Warn about the spikes since the last call, from the transferred ``values`` (:meth:`tensors`)."""
        spikes = self.clipper.spikes
        if spikes is None:
            return []
        part = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("spikes/")}
        events, total = spikes.parse_events(spikes.events.parse(part, self.seen))
        overwritten = total - self.seen - len(events)
        self.seen = total
        for event in events[:MAX_MESSAGES]:
            logger.warning("gradclip: %s", event.describe(self.clipper.base_threshold(event.step - 1), action))
        rest = len(events) + overwritten - min(len(events), MAX_MESSAGES)
        if rest > 0 and events:
            logger.warning("gradclip: ... and %d more spikes up to step %d.", rest, events[-1].step)
        self.events.extend(events)
        return events
