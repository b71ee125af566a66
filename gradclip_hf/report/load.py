"""Read what a Trainer run logged: ``trainer_state.json`` (its ``log_history``) and ``gradclip_spikes.jsonl``.

No torch and no transformers here (``training_args.bin`` is read by :mod:`.training_args`).

Where the files are:

* ``trainer_state.json``: in the given folder; or, when the folder is an ``output_dir`` without one, in its
  newest ``checkpoint-N/`` (largest N; an older one, with a warning, when the newest cannot be read).
* ``gradclip_spikes.jsonl``: in the ``output_dir``; for a checkpoint folder, in its parent.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..spikefile import read_lines

__all__ = ["Window", "Event", "Run", "load_run", "find_state", "read_spike_file", "STATE_FILE", "SPIKE_FILE"]

STATE_FILE = "trainer_state.json"
SPIKE_FILE = "gradclip_spikes.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _num(value: Any) -> Optional[float]:
    """A logged number as a float (NaN/Inf kept), anything else (None, bool, text, an int too large for a
    float) as ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _int(value: Any) -> Optional[int]:
    number = _num(value)
    return int(number) if number is not None and math.isfinite(number) else None


def _str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


@dataclass
class Window:
    """One training log entry with a ``grad_norm``: the logging window of steps ``first..step``.

    ``grad_norm`` is the pre-clip norm of the window's last step; the ``gradclip/*`` values are ``None``
    for a stock Trainer run (``clip_rate`` is then estimated by the report)."""

    step: int
    first: int
    grad_norm: Optional[float]
    loss: Optional[float] = None
    norm_mean: Optional[float] = None
    norm_max: Optional[float] = None
    norm_post: Optional[float] = None
    threshold: Optional[float] = None
    clip_rate: Optional[float] = None
    nonfinite: Optional[int] = None
    skipped: Optional[int] = None
    spikes: Optional[int] = None

    @property
    def size(self) -> int:
        return self.step - self.first + 1


_WINDOW_KEYS = {"loss": "loss", "norm_mean": "gradclip/norm_mean", "norm_max": "gradclip/norm_max",
                "norm_post": "gradclip/norm_post", "threshold": "gradclip/threshold",
                "clip_rate": "gradclip/clip_rate"}
_COUNT_KEYS = {"nonfinite": "gradclip/nonfinite_steps", "skipped": "gradclip/skipped_steps",
               "spikes": "gradclip/spikes"}


def _indices(value: Any, depth: int = 4) -> Optional[list]:
    """A spike line's dataset indices (per process, per micro-batch: lists of ints or None, at most ``depth``
    lists deep), else ``None``."""
    def fits(node: Any, left: int) -> bool:
        if node is None or (isinstance(node, int) and not isinstance(node, bool)):
            return True
        return isinstance(node, list) and left > 0 and all(fits(item, left - 1) for item in node)

    return value if isinstance(value, list) and fits(value, depth) else None


def _layers(value: Any) -> list[list]:
    """``[[name, norm], ...]`` pairs of a spike line, malformed pairs dropped."""
    pairs = value if isinstance(value, list) else []
    return [[p[0], float(p[1])] for p in pairs
            if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str) and _num(p[1]) is not None]


@dataclass
class Event:
    """One line of ``gradclip_spikes.jsonl``; every field may be missing (``None``)."""

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
    def from_json(cls, obj: dict) -> "Event":
        batch = obj.get("batch") if isinstance(obj.get("batch"), dict) else {}
        floats = {k: _num(obj.get(k)) for k in ("loss", "loss_baseline", "loss_z", "norm", "norm_baseline", "norm_z",
                                                "threshold_before", "threshold_after")}
        skipped = obj.get("skipped") if isinstance(obj.get("skipped"), bool) else None
        return cls(event=_str(obj.get("event")), step=_int(obj.get("step")), kind=_str(obj.get("kind")),
                   action=_str(obj.get("action")), skipped=skipped, top_layers=_layers(obj.get("top_layers")),
                   indices=_indices(batch.get("indices")),
                   fingerprint=_str(batch.get("fingerprint")), text=_str(batch.get("text")), **floats)


@dataclass
class Run:
    """What a run logged, as the report reads it."""

    path: str                      # the folder given
    state_path: str                # the trainer_state.json read
    spike_path: Optional[str]      # the spike file read (None: there is none)
    windows: list[Window]
    events: list[Event]
    evals: list[tuple[int, float]]
    stop_reasons: list[tuple[int, str]]
    global_step: Optional[int] = None
    max_steps: Optional[int] = None
    logging_steps: Optional[int] = None
    strategy: Optional[str] = None  # from the pack's callback state in trainer_state.json, when there
    warnings: list[str] = field(default_factory=list)

    @property
    def output_dir(self) -> str:
        """The run's ``output_dir``: the given folder, or the parent of a checkpoint folder."""
        return _output_dir(self.path)

    @property
    def logs_threshold(self) -> bool:
        return any(w.threshold is not None for w in self.windows)


def _output_dir(path: str) -> str:
    if _CHECKPOINT.match(os.path.basename(os.path.abspath(path))):
        return os.path.normpath(os.path.join(path, os.pardir))
    return os.path.normpath(path)


def _checkpoints(directory: str) -> list[str]:
    """``checkpoint-N`` folders holding a ``trainer_state.json``, newest (largest N) first."""
    found = []
    for name in os.listdir(directory):
        match = _CHECKPOINT.match(name)
        if match and os.path.isfile(os.path.join(directory, name, STATE_FILE)):
            found.append((int(match.group(1)), os.path.join(directory, name, STATE_FILE)))
    return [p for _, p in sorted(found, reverse=True)]


def find_state(path: str) -> list[str]:
    """Candidate ``trainer_state.json`` paths for ``path``, best first. ValueError when there is none."""
    if not os.path.exists(path):
        raise ValueError(f"{path!r} does not exist: pass a Trainer output_dir or one of its checkpoint-N folders.")
    if os.path.isfile(path):
        if os.path.basename(path) != STATE_FILE:
            raise ValueError(f"{path!r} is a file: pass the folder that holds {STATE_FILE} (an output_dir or a "
                             f"checkpoint-N folder), or the {STATE_FILE} itself.")
        return [path]
    top = os.path.join(path, STATE_FILE)
    if os.path.isfile(top):
        return [top]
    candidates = _checkpoints(path)
    if not candidates:
        raise ValueError(f"no {STATE_FILE} in {path!r} and no checkpoint-N folder with one: the Trainer writes it "
                         f"with each checkpoint (save_strategy 'steps' or 'epoch') and on trainer.save_state().")
    return candidates


def _read_state(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except RecursionError:
        raise ValueError(f"cannot read {path!r}: its JSON is nested too deeply for a Trainer state file") from None
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError, an int of more than 4300 digits
        raise ValueError(f"cannot read {path!r}: {e}") from None
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{path!r} has no 'log_history' list: it is not a Trainer state file.")
    return state


def _windows(history: list, logging_steps: Optional[int]) -> list[Window]:
    entries = {}
    for entry in history:
        if isinstance(entry, dict) and "grad_norm" in entry and _int(entry.get("step")) is not None:
            entries[_int(entry["step"])] = entry  # a step logged twice (resumed run): the last one counts
    windows, previous = [], None
    for step in sorted(entries):
        entry = entries[step]
        first = previous + 1 if previous is not None else max(1, step - (logging_steps or 1) + 1)
        values = {attr: _num(entry.get(key)) for attr, key in _WINDOW_KEYS.items()}
        counts = {attr: _int(entry.get(key)) for attr, key in _COUNT_KEYS.items()}
        windows.append(Window(step=step, first=first, grad_norm=_num(entry["grad_norm"]), **values, **counts))
        previous = step
    return windows


def _strategy(state: dict) -> Optional[str]:
    """The clip strategy from a stateful callback's saved config (the pack's callback saves one), if any."""
    callbacks = state.get("stateful_callbacks")
    for saved in (callbacks.values() if isinstance(callbacks, dict) else []):
        for item in (saved if isinstance(saved, list) else [saved]):
            if not isinstance(item, dict):
                continue
            run, args = item.get("run"), item.get("args")
            config = run.get("config") if isinstance(run, dict) else args.get("config") if isinstance(args, dict) else None
            if isinstance(config, dict) and isinstance(config.get("strategy"), str):
                return config["strategy"]
    return None


def read_spike_file(path: str) -> tuple[list[Event], list[str]]:
    """The events of a ``gradclip_spikes.jsonl`` and one warning per line skipped (the one reader of the file,
    :func:`gradclip_hf.spikefile.read_lines`: a torn last line, a line too long, nested too deeply or not a JSON
    object is skipped there with a warning)."""
    try:
        lines = read_lines(path)
    except ValueError as e:
        return [], [str(e)]
    return [Event.from_json(obj) for _, obj in lines.records], lines.warnings()


def _load_state(path: str) -> tuple[str, dict, list[str]]:
    """The newest readable candidate state file; an unreadable newer checkpoint is named in a warning."""
    errors: list[str] = []
    for candidate in find_state(path):
        try:
            state = _read_state(candidate)
        except ValueError as e:
            errors.append(str(e))
            continue
        return candidate, state, [f"{e}; read an older checkpoint instead" for e in errors]
    more = f" (and {len(errors) - 1} older checkpoint(s) cannot be read either)" if len(errors) > 1 else ""
    raise ValueError(errors[0] + more)


def _no_log_cause(state: dict, logging_steps: Optional[int]) -> str:
    """Why a run logged no training step, for the error: most often logging_steps larger than the steps run."""
    steps = _int(state.get("global_step"))
    if logging_steps and steps is not None and logging_steps > steps:
        return (f"logging_steps is {logging_steps} but this state stops at step {steps}: the Trainer logs every "
                f"logging_steps steps (default 500), so it never logged; set logging_steps (e.g. 10) and run again")
    return "logging_strategy 'no', or it stopped before its first log"


def load_run(path: str) -> Run:
    """Read a run from its ``output_dir``, one of its ``checkpoint-N`` folders or a ``trainer_state.json``.

    Raises ValueError naming the file and what is missing when there is nothing to report on."""
    state_path, state, warnings = _load_state(path)
    folder = os.path.dirname(state_path) if os.path.isfile(path) else path
    history = state["log_history"]
    logging_steps = _int(state.get("logging_steps"))
    windows = _windows(history, logging_steps)
    if not windows:
        raise ValueError(f"{state_path!r} has {len(history)} log entries but none with a 'grad_norm': the run logged "
                         f"no gradient norms to report on ({_no_log_cause(state, logging_steps)}).")
    evals = [(_int(h.get("step")) or 0, float(h["eval_loss"])) for h in history
             if isinstance(h, dict) and _num(h.get("eval_loss")) is not None]
    stops = [(_int(h.get("step")) or 0, h["gradclip/stop_reason"]) for h in history
             if isinstance(h, dict) and isinstance(h.get("gradclip/stop_reason"), str)]
    spike_path = os.path.join(_output_dir(folder), SPIKE_FILE)
    events: list[Event] = []
    if os.path.isfile(spike_path):
        events, bad = read_spike_file(spike_path)
        warnings.extend(bad)
    else:
        spike_path = None
    return Run(path=folder, state_path=state_path, spike_path=spike_path, windows=windows, events=events,
               evals=evals, stop_reasons=stops, global_step=_int(state.get("global_step")),
               max_steps=_int(state.get("max_steps")), logging_steps=logging_steps, strategy=_strategy(state),
               warnings=warnings)
