"""``gradclip_spikes.jsonl``: the record the Trainer integration writes for every spike, non-finite step, listed
skip and stop (see :mod:`gradclip_hf.integrations.transformers.records` for the fields). Plain JSON, no torch.

The one reader of the file (``gradclip-hf report`` and ``clip_skip_steps_from`` both use :func:`read_lines`),
for a file a user hands us, which may be damaged:

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
import os
import stat
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FILE_NAME", "SpikeLines", "SkipList", "read_lines", "read_skip_list", "read_spike_steps"]

FILE_NAME = "gradclip_spikes.jsonl"
MAX_LINE = 4 * 1024 * 1024  # characters of one line (a record is a few kB): a longer one is skipped, never held whole
SKIPPED_EVENTS = ("spike", "nonfinite")  # the events a skip list takes from the file
_READ_ONCE: dict[tuple[int, int], "SkipList"] = {}  # pipes and FIFOs already read, by (device, inode)


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
