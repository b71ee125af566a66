"""One record per spike, non-finite step, listed skip and stop: ``<output_dir>/gradclip_spikes.jsonl``.

:class:`EventRecorder` keeps the flagged steps on the device (an :class:`~gradclip_hf.core._state.EventLog`
row and the batch's fingerprints, see :mod:`.batches`), reads them back at logging steps (only when the
window had a flagged step) or when its rings would fill, and has :mod:`gradclip_hf.spikefile` (the file's
fields, its writer and its reader) write one line per event, appended and flushed by the main process, so a
crash keeps what was written.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..core._state import EventLog
from ..core.gate import MAX_POSITIONS
from .. import spikefile
from .batches import BatchTracker, batch_fingerprint

__all__ = ["EventRecorder"]
TOP = 3
_FIELDS = ("step", "nonfinite", "spike", "skipped", "loss", "norm", "threshold", "dropped_mask",
           *(f"{kind}{i}" for i in range(TOP) for kind in ("layer", "layer_norm")))


class EventRecorder:
    """Device record of flagged steps and the JSONL writer (see the module docstring).

    Args:
        output_dir: where the file goes (``None``: no file, records kept in memory only).
        samples: samples per optimizer step on this process; capacity: flagged steps kept between reads.
        main_process: this process writes the file.
        decode: ``token ids -> text`` (the Trainer's ``processing_class``), or ``None``.
    """

    def __init__(self, output_dir: str | None, samples: int, capacity: int, main_process: bool, decode: Any = None):
        self.path = os.path.join(output_dir, spikefile.FILE_NAME) if output_dir and main_process else None
        self.capacity = capacity
        self.log = EventLog(_FIELDS, capacity)
        self.batches = BatchTracker(samples, capacity)
        self.decode = decode
        self.seen = 0
        self._listed: list[dict[str, Any]] = []
        self.records: list[dict[str, Any]] = []  # every record of this run (for the W&B table)

    def record_step(self, report: Any, loss: Tensor | None, skip: Tensor, names_count: int) -> None:
        """End of a step: record it where it was a spike or non-finite (device work only)."""
        spike = report.spike.spike if report.spike is not None else torch.zeros_like(report.nonfinite)
        flag = spike | report.nonfinite
        whole = None  # with the micro-batch gate: a step-level flag names every sample, a drop only its own
        if report.gate is not None and report.spike is not None:
            whole = report.spike.loss_spike | report.spike.norm_spike | report.nonfinite
        self.batches.record(flag, report.step + 1, whole)
        device = report.norm.device
        top = torch.topk(torch.nan_to_num(report.per_tensor_norms.float(), nan=math.inf),
                         k=min(TOP, names_count))
        layers = [torch.full((), math.nan, device=device)] * (2 * TOP)
        for i in range(top.values.numel()):
            layers[2 * i], layers[2 * i + 1] = top.indices[i].float(), top.values[i]
        loss = report.spike.loss if report.spike is not None else loss
        mask = report.gate.mask if report.gate is not None else torch.full((), math.nan, device=device)
        values = [torch.full((), float(report.step + 1), device=device), report.nonfinite, spike, skip,
                  loss if loss is not None else torch.full((), math.nan, device=device), report.norm,
                  report.threshold, mask, *layers]
        self.log.record(values, flag)

    @property
    def pending(self) -> bool:
        """Listed skips not written yet (known on the host)."""
        return bool(self._listed)

    def add_listed(self, step: int) -> None:
        """A step skipped because ``skip_steps`` lists it (known on the host: written at the next flush)."""
        self._listed.append(spikefile.listed_record(step))

    def add_stop(self, step: int, kind: str, reason: str) -> None:
        """The pack stopped the run at ``step``: written now (the events before it are written already)."""
        record = spikefile.stop_record(step, kind, reason)
        self.write([record])
        self.records.append(record)

    def tensors(self) -> dict[str, Tensor]:
        """Everything :meth:`flush` reads, named, for one shared transfer."""
        named = {f"log/{k}": v for k, v in self.log.tensors().items()}
        named.update({f"batches/{k}": v for k, v in self.batches.tensors().items()})
        return named

    def flush(self, values: dict[str, list[float]], spike_events: list[Any], names: list[str], action: str,
              threshold_base: Any) -> list[dict]:
        """The new records from the transferred ``values`` (:meth:`tensors`): batches matched, lines written."""
        listed, self._listed = self._listed, []
        self.write(listed)
        self.records.extend(listed)
        part = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("log/")}
        rows, total = self.log.parse(part, self.seen)
        part = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("batches/")}
        batches = {b["number"]: b for b in self.batches.parse(part, self.seen, total)}
        first = total - len(rows)
        self.seen = total
        if not rows:
            return []
        by_step = {e.step: e for e in spike_events}
        records = [self._record(row, batches.get(first + i), by_step.get(int(row["step"])), names, action,
                                threshold_base) for i, row in enumerate(rows)]
        self._gather_indices(records)
        self.write(records)
        self.records.extend(records)
        return records

    def _record(self, row: dict, batch: dict | None, event: Any, names: list[str], action: str,
                threshold_base: Any) -> dict[str, Any]:
        nonfinite, step = bool(row["nonfinite"]), int(row["step"])
        top = [[names[int(row[f"layer{i}"])], row[f"layer_norm{i}"]] for i in range(TOP)
               if math.isfinite(row[f"layer{i}"]) and int(row[f"layer{i}"]) < len(names)]
        detected = None
        if event is not None:
            base = threshold_base(step) if callable(threshold_base) else None
            detected = {"loss_baseline": event.loss_baseline, "loss_z": event.loss_z,
                        "norm_baseline": event.norm_baseline, "norm_z": event.norm_z,
                        "threshold_before": None if base is None else base * event.factor_before,
                        "threshold_after": None if base is None else base * event.factor_after}
        prints = batch["prints"] if batch else []
        outcome = event.outcome if event is not None and not nonfinite else None
        dropped = None
        if event is not None and event.dropped:
            mask = int(row["dropped_mask"]) if math.isfinite(row["dropped_mask"]) else 0
            dropped = {"count": event.dropped, "micro_batches": event.micro_batches,
                       "positions": [i for i in range(MAX_POSITIONS) if mask >> i & 1]}
        return spikefile.spike_record(
            nonfinite=nonfinite, step=step, kind="nonfinite" if nonfinite else (event.kind if event is not None
                                                                                 else "loss"),
            action="skip" if nonfinite and bool(row["skipped"]) else (outcome or action), skipped=bool(row["skipped"]),
            loss=row["loss"], norm=row["norm"], threshold=row["threshold"], top_layers=top, detected=detected,
            batch={"indices": self.batches.indices(prints, step), "fingerprint": batch_fingerprint(prints),
                   "text": self._text(batch["tokens"]) if batch else None}, dropped=dropped)

    def _text(self, tokens: list[int]) -> str | None:
        if self.decode is None or not tokens:
            return None
        try:
            return str(self.decode(tokens))[:300]
        except Exception:  # a tokenizer that cannot decode these ids: the fingerprint still identifies the batch
            return None

    @staticmethod
    def _gather_indices(records: list[dict]) -> None:
        """Every process's indices of each record, on every process (one collective per read with records)."""
        mine = [r["batch"]["indices"] for r in records]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mine)
        else:
            gathered = [mine]
        for i, record in enumerate(records):
            per_rank = [ranks[i] if i < len(ranks) else None for ranks in gathered]
            record["batch"]["indices"] = per_rank if any(x is not None for x in per_rank) else None

    def write(self, records: list[dict[str, Any]]) -> None:
        if self.path is not None:
            spikefile.append(self.path, records)
