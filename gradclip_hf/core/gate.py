"""``MicroBatchGate``: drop a bad micro-batch before its backward, on the device (torch only).

With gradient accumulation one bad sample would otherwise cost the whole step: its micro-batch's gradient is
summed with the good ones, and a loss spike can only skip them all. The gate judges each micro-batch's loss
against its own running baseline (a :class:`~.detectors.SpikeDetector` fed one value per micro-batch) *before*
its backward, and returns a 0/1 device flag: the caller backpropagates ``loss * keep``, so a dropped micro-batch
adds exactly nothing to the gradients, while every process still runs its backward (and joins every collective
of DDP/FSDP). At the optimizer step, :meth:`MicroBatchGate.close` gives, after ONE small all-reduce, what the
step needs (:class:`GateStep`): the factor that turns the kept sum into the mean of the kept micro-batches
(``rescale``, folded into the clip multiplier by :meth:`~.clipper.GradClipper.plan`: no extra pass), whether
anything was kept (nothing kept: the update is skipped), and the mean loss of the kept micro-batches.

Weights: each micro-batch comes with a weight, its share of the step's loss up to a constant (1 each for a mean
per micro-batch; its number of label tokens for a loss summed over tokens and divided by the step's count, as
the Trainer computes it with ``num_items_in_batch``). The step's gradient is the weighted sum of the micro-batch
gradients; the kept gradient times ``rescale = sum(all weights) / sum(kept weights)`` (over every process) is
the weighted mean of the kept ones: by count, or by tokens.

A non-finite loss is never dropped (``NaN * 0`` is still NaN: multiplying cannot remove it): it is kept, its
NaN/Inf gradient reaches the non-finite guard, which skips the whole step (``nonfinite="skip"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .detectors import SpikeDetector

__all__ = ["MicroBatchGate", "GateStep", "MAX_POSITIONS"]

MAX_POSITIONS = 52  # micro-batch positions named per step (a float64 bit mask is exact up to 2**53)
_KEPT_W, _ALL_W, _KEPT_WX, _DROPPED, _JUDGED = range(5)


@dataclass
class GateStep:
    """One optimizer step of the gate, after its all-reduce; 0-dim device tensors unless said.

    Attributes:
        rescale: float32 multiplier of the accumulated gradient that makes it the weighted mean of the kept
            micro-batches (exactly 1 when nothing was dropped, or nothing kept).
        kept: bool, some micro-batch was kept (on some process); ``False``: the update must be skipped.
        loss: the weighted mean loss of the kept micro-batches over every process (NaN when none was kept).
        dropped / micro_batches: micro-batches dropped / judged in this step, over every process (float).
        worst_loss / worst_baseline / worst_z: the dropped micro-batch of this process with the largest z-score
            (NaN where this process dropped none).
        mask: float64 bit mask of the positions (0-based, in the step) this process dropped (the first
            :data:`MAX_POSITIONS`).
        judged: micro-batches this process judged in this step (a host count).
    """

    rescale: Tensor
    kept: Tensor
    loss: Tensor
    dropped: Tensor
    micro_batches: Tensor
    worst_loss: Tensor
    worst_baseline: Tensor
    worst_z: Tensor
    mask: Tensor
    judged: int


class MicroBatchGate:
    """Judges each micro-batch's loss before its backward (see the module docstring).

    Args:
        detector: the micro-batch detector (its own statistics, one value per micro-batch).
        reduce: sum the step's counts over the processes of ``torch.distributed`` (one all-reduce per step).
    """

    def __init__(self, detector: SpikeDetector, reduce: bool = True):
        if not isinstance(detector, SpikeDetector):
            raise TypeError(f"MicroBatchGate needs a SpikeDetector, got {type(detector).__name__}.")
        self.detector, self.reduce = detector, bool(reduce)
        self.last_keep: Tensor | None = None  # the flag of the micro-batch judged last
        self._sums: Tensor | None = None  # float64 [kept weight, all weight, kept weight x loss, dropped, judged]
        self._worst: Tensor | None = None  # float64 [z, loss, baseline] of the worst dropped micro-batch
        self._mask: Tensor | None = None
        self._judged = 0
        self._closed: GateStep | None = None

    @property
    def judged(self) -> int:
        """Micro-batches judged in this step so far (a host count)."""
        return self._judged

    def _start(self, device: torch.device) -> None:
        self._sums = torch.zeros(5, dtype=torch.float64, device=device)
        self._worst = torch.full((3,), math.nan, dtype=torch.float64, device=device)  # no copy from the host
        self._worst[0] = -math.inf
        self._mask = torch.zeros((), dtype=torch.float64, device=device)
        self._judged, self._closed = 0, None

    @torch.no_grad()
    def judge(self, loss: Tensor, weight: float | Tensor = 1.0) -> Tensor:
        """The keep flag (0-dim bool, device) of a micro-batch whose mean loss is ``loss``, judged against the
        micro-batches before it; ``weight``: its share of the step (see the module docstring). No host read."""
        x = loss.detach().reshape(()).to(torch.float64)
        if self._sums is None:
            self._start(x.device)
        spike, z, baseline = self.detector.update(x)
        keep = ~spike
        w = (weight.to(x.device, torch.float64).reshape(()) if isinstance(weight, Tensor)
             else torch.full((), float(weight), dtype=torch.float64, device=x.device))  # no copy from the host
        counted = keep & (w > 0)  # a micro-batch without tokens (weight 0) adds nothing, not its NaN mean
        self._sums += torch.stack([torch.where(keep, w, 0.0), w, torch.where(counted, w * x, 0.0),
                                   spike.to(torch.float64), torch.ones_like(w)])
        worse = spike & (z > self._worst[0])
        self._worst.copy_(torch.where(worse, torch.stack([z, x, baseline.to(torch.float64)]), self._worst))
        if self._judged < MAX_POSITIONS:
            self._mask += spike.to(torch.float64) * float(2 ** self._judged)
        self._judged += 1
        self.last_keep = keep
        return keep

    @torch.no_grad()
    def close(self) -> GateStep | None:
        """The step's :class:`GateStep` (one all-reduce under ``torch.distributed``), ``None`` when no
        micro-batch was judged in this step. Until :meth:`finish`, a second call returns the first's (a backend
        that needs it before the last backward, and the clipper after it, share one)."""
        if self._closed is not None:
            return self._closed
        if self._sums is None:
            return None
        sums = self._sums.clone()
        if self.reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
        kept_w, all_w, dropped, judged = sums[_KEPT_W], sums[_ALL_W], sums[_DROPPED], sums[_JUDGED]
        rescale = torch.where((dropped > 0) & (kept_w > 0), all_w / kept_w.clamp(min=1e-300), 1.0)
        worst = self._worst
        self._closed = GateStep(rescale=rescale.to(torch.float32), kept=(judged > dropped) & (kept_w > 0),
                                loss=sums[_KEPT_WX] / kept_w, dropped=dropped, micro_batches=judged,
                                worst_loss=worst[1], worst_baseline=worst[2],
                                worst_z=torch.where(torch.isfinite(worst[0]), worst[0], math.nan), mask=self._mask,
                                judged=self._judged)
        self._sums = None
        return self._closed

    def finish(self) -> None:
        """The step is over: the next :meth:`judge` starts the next one (and :meth:`close` before it: ``None``)."""
        self._sums, self._closed, self._judged = None, None, 0

    # ------------------------------------------------------------------ state (the detector's)
    def state_dict(self) -> dict[str, Any]:
        return self.detector.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self.detector.load_state_dict(state)
