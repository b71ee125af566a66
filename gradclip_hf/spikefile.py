"""``gradclip_spikes.jsonl``: the file, its fields, its one writer and its one reader. Plain JSON, no torch.

A run writes one line per spike, non-finite step, listed skip and stop (:class:`gradclip_hf.run.records.EventRecorder`
keeps them on the device and hands them here at logging steps; :func:`append` writes)::

    {"event": "spike" | "nonfinite" | "skip_listed", "step": 1-based optimizer step (train/global_step),
     "kind": "loss" | "norm" | "loss+norm" | "nonfinite" | "listed", "action": "tighten" | ..., "skipped": bool,
     "loss", "norm", "threshold", "top_layers": [[name, norm], ...], "time": unix seconds,
     "loss_baseline", "loss_z", "norm_baseline", "norm_z", "threshold_before", "threshold_after" (spikes),
     "batch": {"indices": [[...] per process] | None, "fingerprint": hex | None, "text": str | None},
     "dropped": {"count", "micro_batches", "positions": [...]} (a step whose micro-batches the micro-batch gate
                dropped: how many of how many, over every process, and their 0-based positions in the step on
                the main process; ``batch`` then names the dropped samples only, ``action`` is "drop", or
                "skip" when none was kept)}

(``None``: not measured) and, when the pack stops the run, a last line
``{"event": "stop", "step", "kind": "spike" | "nonfinite" | "loss_cap", "action": "stop", "reason", "time"}``.

The one reader of the file (``gradclip-hf report`` through :func:`read_records`, and ``clip_skip_steps_from``
through :func:`read_skip_list`, both on :func:`read_lines`), for a file a user hands us, which may be damaged:

- a **torn last line** (a crash in the middle of a write: the last line is not a complete JSON object) is
  skipped with a warning, by every reader;
- any other line that is not a JSON object is skipped with a warning by the report, and refused by
  :func:`read_skip_list` (a skip list from a damaged record could skip the wrong steps);
- a line of any size or nesting depth never raises anything but these (no ``RecursionError``).

A pipe or FIFO (``--clip_skip_steps_from <(grep ... gradclip_spikes.jsonl)``) can be read only once:
:func:`read_skip_list` keeps what it read for the life of the process, so every later ``ClipConfig`` built
from the same path gets the same steps.
"""

from __future__ import annotations

import json
import math
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["FILE_NAME", "VALUES", "SpikeRecord", "SpikeLines", "SkipList", "spike_record", "listed_record",
           "stop_record", "append", "read_lines", "read_records", "read_skip_list", "read_spike_steps"]

FILE_NAME = "gradclip_spikes.jsonl"
MAX_LINE = 4 * 1024 * 1024  # characters of one line (a record is a few kB): a longer one is skipped, never held whole
SKIPPED_EVENTS = ("spike", "nonfinite")  # the events a skip list takes from the file
_READ_ONCE: dict[tuple[int, int], "SkipList"] = {}  # pipes and FIFOs already read, by (device, inode)
# what the detector measured at a spike (beside ``loss``, ``norm`` and ``threshold``, which every record has)
DETECTED = ("loss_baseline", "loss_z", "norm_baseline", "norm_z", "threshold_before", "threshold_after")
VALUES = ("loss", "loss_baseline", "loss_z", "norm", "norm_baseline", "norm_z", "threshold_before", "threshold_after")


# ---------------------------------------------------------------------------------------------- the writer
def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def spike_record(*, nonfinite: bool, step: int, kind: str, action: str, skipped: bool, loss: float, norm: float,
                 threshold: float, top_layers: list, batch: dict, detected: Optional[dict] = None,
                 dropped: Optional[dict] = None) -> dict[str, Any]:
    """The line of a spike or non-finite step (``detected``: the :data:`DETECTED` values of a spike; NaN/Inf as
    ``None``; ``dropped``: the micro-batches the gate dropped)."""
    record = {"event": "nonfinite" if nonfinite else "spike", "step": step, "kind": kind, "action": action,
              "skipped": skipped, "loss": _clean(loss), "norm": _clean(norm), "threshold": _clean(threshold),
              "top_layers": [[name, _clean(value)] for name, value in top_layers], "time": time.time()}
    if detected is not None:
        record.update({key: _clean(detected[key]) for key in DETECTED})
    record["batch"] = {"indices": batch.get("indices"), "fingerprint": batch.get("fingerprint"),
                       "text": batch.get("text")}
    if dropped is not None:
        record["dropped"] = {"count": dropped["count"], "micro_batches": dropped["micro_batches"],
                             "positions": list(dropped["positions"])}
    return record


def listed_record(step: int) -> dict[str, Any]:
    """The line of a step skipped because ``skip_steps``/``skip_steps_from`` lists it."""
    return {"event": "skip_listed", "step": step, "kind": "listed", "action": "skip", "skipped": True,
            "time": time.time()}


def stop_record(step: int, kind: str, reason: str) -> dict[str, Any]:
    """The last line of a run the pack stopped (``kind``: ``spike``, ``nonfinite`` or ``loss_cap``)."""
    return {"event": "stop", "step": step, "kind": kind, "action": "stop", "reason": reason, "time": time.time()}


def append(path: str, records: list[dict[str, Any]]) -> None:
    """Append ``records`` to the file at ``path``, one JSON line each, and flush (a crash keeps what was
    written)."""
    if not records:
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()


# ---------------------------------------------------------------------------------------------- the reader


@dataclass
class SpikeLines:
    """What :func:`read_lines` found: the JSON objects by line number, the other lines and why."""

    path: str
    records: list[tuple[int, dict]] = field(default_factory=list)
    bad: list[tuple[int, str]] = field(default_factory=list)  # lines before the last that are not JSON objects
    torn: tuple[int, str] | None = None  # the last line, when it is not a complete JSON object

    def warnings(self) -> list[str]:
        """One line per skipped line, ``path:line: why; line skipped``."""
        out = [f"{self.path}:{number}: {why}; line skipped" for number, why in self.bad]
        if self.torn is not None:
            number, why = self.torn
            out.append(f"{self.path}:{number}: {why} (the last line: a write cut short, as a crash leaves it); "
                       f"line skipped")
        return out


def _lines(f: Any) -> Any:
    """``(number, line)`` of a text file, in bounded reads; a line longer than :data:`MAX_LINE` as ``None``."""
    number = 0
    while True:
        line = f.readline(MAX_LINE + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE and not line.endswith("\n"):
            while line and not line.endswith("\n"):  # the rest of it, in bounded reads
                line = f.readline(MAX_LINE + 1)
            line = None
        yield number, line


def _parse(line: str | None) -> tuple[Any, str]:
    if line is None:
        return None, f"longer than {MAX_LINE:,} characters"
    try:
        obj = json.loads(line)
    except RecursionError:
        return None, "JSON nested too deeply"
    except json.JSONDecodeError as error:
        return None, f"not JSON ({error.msg})"
    except ValueError as error:  # an int of more than 4300 digits
        return None, f"not readable JSON ({error})"
    return obj, "" if isinstance(obj, dict) else "not a JSON object"


def read_lines(path: str) -> SpikeLines:
    """Every line of a spike file, read once (see the module docstring).

    Raises:
        ValueError: the file cannot be opened or read.
    """
    out = SpikeLines(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in _lines(f):
                if line is not None and not line.strip():
                    continue
                if out.torn is not None:  # a bad line with lines after it is not torn: damaged
                    out.bad.append(out.torn)
                    out.torn = None
                obj, why = _parse(line)
                if why:
                    out.torn = (number, why)
                else:
                    out.records.append((number, obj))
    except OSError as error:
        raise ValueError(f"cannot read the spike file {path!r}: {error}") from None
    return out


@dataclass(frozen=True)
class SkipList:
    """The steps of a spike file's spike and non-finite events, with the batch fingerprint each one recorded."""

    steps: frozenset = frozenset()
    fingerprints: dict = field(default_factory=dict)  # step -> the recorded batch fingerprint (hex)
    warnings: tuple = ()  # lines skipped (a torn last line)


def _step_of(path: str, number: int, event: dict) -> int:
    step = event.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{path!r} line {number} is not a gradclip spike record (`step` is {step!r}, not an int "
                         f">= 1): {json.dumps(event)[:120]!r}")
    return step


def read_skip_list(path: str) -> SkipList:
    """The steps ``skip_steps_from`` skips: every ``spike`` and ``nonfinite`` event of the file (a torn last line
    is skipped, and named in ``warnings``). A pipe or FIFO is read once per process (module docstring).

    Raises:
        ValueError: the file cannot be read, or a line other than a torn last one is not a spike record.
    """
    try:
        info = os.stat(path)
    except OSError as error:
        raise ValueError(f"cannot read the spike file {path!r}: {error}") from None
    key = None if stat.S_ISREG(info.st_mode) else (info.st_dev, info.st_ino)
    if key is not None and key in _READ_ONCE:
        return _READ_ONCE[key]
    lines = read_lines(path)
    if lines.bad:
        number, why = lines.bad[0]
        raise ValueError(f"{path!r} line {number} is not a gradclip spike record ({why}); only a torn last line is "
                         f"skipped. Remove or repair the line.")
    steps, fingerprints = set(), {}
    for number, event in lines.records:
        step = _step_of(path, number, event)
        if event.get("event", "spike") in SKIPPED_EVENTS:
            steps.add(step)
            batch = event.get("batch")
            if isinstance(batch, dict) and isinstance(batch.get("fingerprint"), str):
                fingerprints[step] = batch["fingerprint"]
    result = SkipList(frozenset(steps), fingerprints, tuple(lines.warnings()))
    if key is not None:
        _READ_ONCE[key] = result
    return result


def read_spike_steps(path: str) -> list[int]:
    """The steps of every spike and non-finite event in a ``gradclip_spikes.jsonl`` (see :func:`read_skip_list`)."""
    return sorted(read_skip_list(path).steps)


# ---------------------------------------------------------------------------------------------- typed records
def as_float(value: Any) -> Optional[float]:
    """A JSON number as a float (NaN/Inf kept), anything else (None, bool, text, an int too large for a float)
    as ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def as_int(value: Any) -> Optional[int]:
    number = as_float(value)
    return int(number) if number is not None and math.isfinite(number) else None


def as_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


def _indices(value: Any, depth: int = 4) -> Optional[list]:
    """A line's dataset indices (per process, per micro-batch: lists of ints or None, at most ``depth`` lists
    deep), else ``None``."""
    def fits(node: Any, left: int) -> bool:
        if node is None or (isinstance(node, int) and not isinstance(node, bool)):
            return True
        return isinstance(node, list) and left > 0 and all(fits(item, left - 1) for item in node)

    return value if isinstance(value, list) and fits(value, depth) else None


def _layers(value: Any) -> list[list]:
    """``[[name, norm], ...]`` pairs of a line, malformed pairs dropped."""
    pairs = value if isinstance(value, list) else []
    return [[p[0], float(p[1])] for p in pairs
            if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and as_float(p[1]) is not None]


@dataclass(frozen=True)
class SpikeRecord:
    """One line of the file as read back; every field may be missing (``None``)."""

    event: Optional[str] = None
    step: Optional[int] = None
    kind: Optional[str] = None
    action: Optional[str] = None
    skipped: Optional[bool] = None
    loss: Optional[float] = None
    loss_baseline: Optional[float] = None
    loss_z: Optional[float] = None
    norm: Optional[float] = None
    norm_baseline: Optional[float] = None
    norm_z: Optional[float] = None
    threshold_before: Optional[float] = None
    threshold_after: Optional[float] = None
    top_layers: list = field(default_factory=list)
    indices: Any = None
    fingerprint: Optional[str] = None
    text: Optional[str] = None

    @classmethod
    def from_json(cls, obj: dict) -> "SpikeRecord":
        """A line's JSON object, each field checked (a value of the wrong type is ``None``)."""
        batch = obj.get("batch") if isinstance(obj.get("batch"), dict) else {}
        skipped = obj.get("skipped") if isinstance(obj.get("skipped"), bool) else None
        return cls(event=as_str(obj.get("event")), step=as_int(obj.get("step")), kind=as_str(obj.get("kind")),
                   action=as_str(obj.get("action")), skipped=skipped, top_layers=_layers(obj.get("top_layers")),
                   indices=_indices(batch.get("indices")), fingerprint=as_str(batch.get("fingerprint")),
                   text=as_str(batch.get("text")), **{k: as_float(obj.get(k)) for k in VALUES})


def read_records(path: str) -> tuple[list[SpikeRecord], list[str]]:
    """The records of a spike file and one warning per line skipped (a torn last line, a line too long, nested
    too deeply or not a JSON object; see :func:`read_lines`); a file that cannot be read: no records, one
    warning."""
    try:
        lines = read_lines(path)
    except ValueError as e:
        return [], [str(e)]
    return [SpikeRecord.from_json(obj) for _, obj in lines.records], lines.warnings()
