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
from collections.abc import Collection, Sequence
from typing import Any

from ..config import ClipConfig, check_max_grad_norm
from ..spikefile import FILE_NAME as SPIKE_FILE
from ..spikeruns import Flagged, describe_run, group_runs

__all__ = ["LAYER_PREFIX", "SPIKE_LAYER_PREFIX", "LayerSelector", "SpikeMessages", "logger", "is_layer_key",
           "describe_threshold"]

logger = logging.getLogger("transformers.gradclip_hf")  # transformers.logging.set_verbosity_* applies
MAX_MESSAGES = 5  # runs of spikes said per logging step; the rest in one summary line

LAYER_PREFIX = "gradclip/layer/"
SPIKE_LAYER_PREFIX = "gradclip/spike_layer/"


def is_layer_key(key: str) -> bool:
    """Per-layer keys: in the logs for the reporters (W&B, TensorBoard, ...), not printed on the console."""
    return LAYER_PREFIX in key or SPIKE_LAYER_PREFIX in key


def describe_threshold(c: ClipConfig, max_grad_norm: Any) -> str:
    """``"strategy norm, threshold 1 (from max_grad_norm=1)"``: the threshold in force and where it came from."""
    threshold = c.resolved_threshold(max_grad_norm)
    if c.threshold is not None:
        source = "set on the pack"
    elif threshold is None:
        source = "none: the strategy sets its own"
    elif math.isinf(threshold):
        off = "no cap" if c.strategy == "zscore" else "no clipping, norms measured"
        source = f"max_grad_norm={check_max_grad_norm(max_grad_norm):g}: {off}"
    else:
        source = f"from max_grad_norm={threshold:g}"
    shown = "none" if threshold is None or math.isinf(threshold) else f"{threshold:g}"
    return f"strategy {c.strategy}, threshold {shown} ({source})"


def _rank(value: float) -> tuple[int, float]:
    """Sort key, largest first: NaN/Inf norms first (they are the culprits), then by size."""
    return (0, 0.0) if not math.isfinite(value) else (1, -value)


class LayerSelector:
    """Picks the layers to log from names and per-tensor norms.

    A layer once among the ``top_k`` stays logged at every later logging step (up to ``STICKY * top_k``
    layers), so each ``gradclip/layer/<name>`` series is continuous from its first point instead of
    appearing only at the steps where that layer happened to rank in the top k.

    Args:
        top_k: the ``top_k`` largest norms (non-finite ones first); 0 for none.
        patterns: regular expressions (``re.search`` on parameter names): matching layers are always logged.
    """

    STICKY = 4

    def __init__(self, top_k: int = 8, patterns: Sequence[str] = ()):
        self.top_k = top_k
        self.patterns = [patterns] if isinstance(patterns, str) else list(patterns or ())
        self._compiled = [re.compile(p) for p in self.patterns]
        self._matched: dict[tuple[str, ...], list[int]] = {}
        self._kept: dict[str, None] = {}  # layers once in the top k, in order of arrival

    @property
    def enabled(self) -> bool:
        return self.top_k > 0 or bool(self.patterns)

    def _pattern_indices(self, names: Sequence[str]) -> list[int]:
        key = tuple(names)
        if key not in self._matched:  # names rarely change: match once
            self._matched = {key: [i for i, n in enumerate(names) if any(p.search(n) for p in self._compiled)]}
        return self._matched[key]

    def _keep(self, names: Sequence[str], order: list[int]) -> list[int]:
        """The layers kept from earlier logging steps (and this one's new top-k entries), by index."""
        for i in order:
            if len(self._kept) >= self.STICKY * self.top_k:
                break
            self._kept.setdefault(names[i])
        position = {n: i for i, n in enumerate(names)} if self._kept else {}
        return [position[n] for n in self._kept if n in position]

    def select(self, names: Sequence[str], values: Sequence[float], prefix: str = LAYER_PREFIX,
               top_k: int | None = None, patterns: bool = True) -> dict[str, float]:
        """``{prefix + name: norm}`` for the top-k layers, those kept from earlier calls (``top_k=None``) and
        the pattern matches, largest first."""
        k = self.top_k if top_k is None else top_k
        if len(names) != len(values):
            return {}
        order = sorted(range(len(values)), key=lambda i: _rank(values[i]))[:k] if k else []
        extra = self._keep(names, order) if top_k is None and k else []
        if patterns and self._compiled:
            extra += self._pattern_indices(names)
        seen = set(order)
        chosen = order + [i for i in dict.fromkeys(extra) if i not in seen]
        return {prefix + names[i]: float(values[i]) for i in chosen}

    @staticmethod
    def top(names: Sequence[str], values: Sequence[float], k: int) -> list[tuple[str, float]]:
        """The ``k`` largest ``(name, norm)`` pairs, non-finite norms first."""
        order = sorted(range(len(values)), key=lambda i: _rank(values[i]))[:k]
        return [(names[i], float(values[i])) for i in order]


class SpikeMessages:
    """Reads the spike events back at logging steps (one transfer, only when there were spikes) and warns
    once per run of consecutive spike steps (:func:`gradclip_hf.spikeruns.describe_run`), at most
    ``MAX_MESSAGES`` runs per read, then one line for the rest.

    A run that goes on past a logging step is said again when it has doubled since it was last said (a
    20-step burst read every step: lines at 1, 2, 4, 8 and 16 steps, not 20), or when it is seen to end (a
    later run in the same read). The spike file and ``gradclip-hf report`` have every step. ``listed``: the
    steps ``clip_skip_steps``/``clip_skip_steps_from`` skip (their spikes are said to be skipped for that).
    """

    def __init__(self, clipper: Any, owner: str, listed: Collection[int] = ()):
        self.clipper, self.owner = clipper, owner
        self.listed = frozenset(listed)
        self.seen = 0  # events already read (restored on resume)
        self.events: list[Any] = []  # every spike read back in this run
        self._open: list[Flagged] = []  # the last run said, which the next read may continue
        self._said = 0  # its length when it was last said

    def tensors(self) -> dict[str, Any]:
        spikes = self.clipper.spikes
        return {} if spikes is None else {f"spikes/{k}": v for k, v in spikes.events.tensors().items()}

    def flagged(self, event: Any, action: str) -> Flagged:
        """A :class:`~gradclip_hf.core.SpikeEvent` as :mod:`gradclip_hf.spikeruns` summarises it."""
        return Flagged.from_spike_event(event, self.clipper.base_threshold(event.step - 1), action,
                                        event.step in self.listed)

    def show(self, values: dict[str, list[float]], action: str) -> list[Any]:
        """Warn about the spikes since the last call, from the transferred ``values`` (:meth:`tensors`)."""
        spikes = self.clipper.spikes
        if spikes is None:
            return []
        part = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("spikes/")}
        events, total = spikes.parse_events(spikes.events.parse(part, self.seen))
        overwritten = total - self.seen - len(events)
        self.seen = total
        self.events.extend(events)
        runs = group_runs(self.flagged(e, action) for e in events)
        if not runs:
            return events
        said = 0
        first = runs[0]
        if self._open and self._continues(first):
            runs = runs[1:]
            self._open += first
            ended = bool(runs)  # another run follows in this read: this one is over, say its whole extent
            if len(self._open) >= 2 * self._said or (ended and len(self._open) > self._said):
                logger.warning("gradclip: %s", describe_run(self._open))
                self._said, said = len(self._open), 1
        for run in runs[:MAX_MESSAGES - said]:
            logger.warning("gradclip: %s", describe_run(run))
        rest = runs[MAX_MESSAGES - said:]
        if rest or overwritten > 0:
            count = sum(len(r) for r in rest) + max(overwritten, 0)
            logger.warning("gradclip: ... and %d more spike%s up to step %d (every one is in %s).", count,
                           "s" if count > 1 else "", events[-1].step, SPIKE_FILE)
        if runs:
            self._open, self._said = list(runs[-1]), len(runs[-1])
        return events

    def _continues(self, run: list[Flagged]) -> bool:
        last = self._open[-1]
        return run[0].step == last.step + 1 and group_runs([last, run[0]]) == [[last, run[0]]]

