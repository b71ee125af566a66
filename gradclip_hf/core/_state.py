"""Device state shared by strategies, detectors and the spike controller: created lazily on the data's
device, loaded from a JSON-safe dict (validated at once, applied at first use), ring buffers written
without a host sync."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from ._checks import StateError


def stats_dtype(device: torch.device) -> torch.dtype:
    """float64 statistics (as reference implementations keep Python floats); float32 where a device has no
    float64 (mps)."""
    return torch.float32 if device.type == "mps" else torch.float64


def ring_write_(ring: Tensor, position: Tensor, value: Tensor, keep: Tensor) -> None:
    """Write ``value`` (a 0-dim value, or a row of a 2-dim ring) at ``ring[position % len(ring)]`` where the
    0-dim bool ``keep`` holds; the caller advances ``position``. No host sync."""
    index = (position % ring.shape[0]).view(1)
    current = ring.index_select(0, index)
    ring.index_copy_(0, index, torch.where(keep, value.reshape(current.shape).to(ring.dtype), current))


def to_host(named: dict[str, Tensor]) -> dict[str, list[float]]:
    """Named device tensors as named lists of floats, in ONE device-to-host transfer (float64: exact for
    integers below 2**53)."""
    if not named:
        return {}
    flat = [t.detach().reshape(-1).to(torch.float64) for t in named.values()]
    values = torch.cat([f.to(flat[0].device) for f in flat]).tolist()
    out, at = {}, 0
    for name, tensor in zip(named, flat):
        out[name] = values[at: at + tensor.numel()]
        at += tensor.numel()
    return out


def floats_or_none(values: Tensor) -> list[float | None]:
    """A 1-dim tensor as Python floats, NaN as ``None`` (JSON-safe)."""
    return [None if math.isnan(v) else v for v in values.tolist()]


class DeviceState(ABC):
    """Mixin: ``self._device_state(device)`` gives the tensors, made by :meth:`_fresh` on first use and
    filled from a state loaded with :meth:`load_state_dict` (checked when loaded, applied then)."""

    _tensors: dict[str, Tensor] | None = None
    _pending: dict[str, Any] | None = None

    @abstractmethod
    def _fresh(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """New tensors: the state before any step."""

    @abstractmethod
    def _fill(self, tensors: dict[str, Tensor], state: dict[str, Any]) -> None:
        """Copy a saved ``state`` into ``tensors``; raise :class:`StateError` naming a bad field."""

    @abstractmethod
    def _export(self, tensors: dict[str, Tensor]) -> dict[str, Any]:
        """JSON-safe state of ``tensors`` (one device-to-host transfer)."""

    def _device_state(self, device: torch.device) -> dict[str, Tensor]:
        if self._tensors is None:
            tensors = self._fresh(device, stats_dtype(device))
            if self._pending is not None:
                self._fill(tensors, self._pending)
                self._pending = None
            self._tensors = tensors
        return self._tensors

    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state (``{}`` before the first step, unless a state was loaded)."""
        if self._tensors is None:
            return dict(self._pending) if self._pending else {}
        return self._export(self._tensors)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Check ``state`` now (:class:`StateError` naming the field) and apply it at the next step;
        ``{}``/``None`` resets to the fresh state."""
        if state is not None and not isinstance(state, dict):
            raise StateError(type(self).__name__, state, "a dict")
        if state:
            try:
                self._fill(self._fresh(torch.device("cpu"), torch.float64), dict(state))
            except StateError:
                raise
            except (TypeError, ValueError, OverflowError, RuntimeError, IndexError, KeyError) as error:
                raise StateError(type(self).__name__, state, f"a saved state of {type(self).__name__} "
                                 f"({type(error).__name__}: {error})") from None
        self._pending = dict(state) if state else None
        self._tensors = None


class EventLog:
    """A device ring buffer of event rows (named float fields), written without a host sync where a 0-dim
    bool says so, and read back at logging steps in one transfer.

    Args:
        fields: the names of a row's values (NaN for "not measured").
        capacity: rows kept between two reads; older ones are overwritten (the count still says how many).
    """

    def __init__(self, fields: tuple[str, ...], capacity: int):
        self.fields, self.capacity = fields, capacity
        self.rows: Tensor | None = None
        self.count: Tensor | None = None
        self._start = 0

    def reset(self, count: int = 0) -> None:
        """Forget the rows; the next event is number ``count`` (restored from a checkpoint)."""
        self.rows, self.count, self._start = None, None, count

    def record(self, values: list[Tensor], when: Tensor) -> None:
        """Append the row ``values`` (0-dim tensors, in ``fields`` order) where ``when`` holds."""
        if self.rows is None:
            device = when.device
            dtype = stats_dtype(device)
            self.rows = torch.full((self.capacity, len(self.fields)), math.nan, dtype=dtype, device=device)
            self.count = torch.full((), self._start, dtype=torch.int64, device=device)
        row = torch.stack([v.to(device=self.rows.device, dtype=self.rows.dtype).reshape(()) for v in values])
        ring_write_(self.rows, self.count, row, when)
        self.count.add_(when.to(torch.int64))

    def total(self) -> int:
        """Events recorded so far (a host read)."""
        return self._start if self.count is None else int(self.count.item())

    def tensors(self) -> dict[str, Tensor]:
        """What :meth:`parse` needs, for a :func:`to_host` transfer shared with other values."""
        return {} if self.rows is None else {"count": self.count, "rows": self.rows}

    def read(self, since: int) -> tuple[list[dict[str, float]], int]:
        """``(rows, total)``: the rows numbered ``since`` and later that are still kept (at most ``capacity``,
        the newest), as dicts, and the total number recorded, in one device-to-host transfer. ``total -
        since - len(rows)`` events were overwritten before this read."""
        return self.parse(to_host(self.tensors()), since)

    def parse(self, values: dict[str, list[float]], since: int) -> tuple[list[dict[str, float]], int]:
        """:meth:`read` from values already on the host (``values["count"]``, ``values["rows"]``)."""
        if not values:
            return [], self._start
        total, values = int(values["count"][0]), values["rows"]
        width = len(self.fields)
        rows = []
        for number in range(max(since, total - self.capacity), total):
            at = (number % self.capacity) * width
            rows.append(dict(zip(self.fields, values[at: at + width])))
        return rows, total
