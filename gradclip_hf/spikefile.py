"""``gradclip_spikes.jsonl``: the record the Trainer integration writes for every spike, non-finite step and
listed skip (see :mod:`gradclip_hf.integrations.transformers.records` for the fields). Plain JSON, no torch."""

from __future__ import annotations

import json

__all__ = ["FILE_NAME", "read_spike_steps"]

FILE_NAME = "gradclip_spikes.jsonl"


def read_spike_steps(path: str) -> list[int]:
    """The steps of every spike and non-finite event in a ``gradclip_spikes.jsonl`` (for ``skip_steps_from``).

    Raises:
        ValueError: the file cannot be read, or a line is not a JSON object with an int ``step``.
    """
    steps = set()
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as error:
        raise ValueError(f"cannot read the spike file {path!r}: {error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            step = event["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 1:
                raise ValueError(f"`step` is {step!r}, not an int >= 1")
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path!r} line {number} is not a gradclip spike record ({error}): {line[:120]!r}")
        if event.get("event", "spike") in ("spike", "nonfinite"):
            steps.add(step)
    return sorted(steps)
