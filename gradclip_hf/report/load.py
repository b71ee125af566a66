"""Read what a Trainer run logged: ``trainer_state.json`` (its ``log_history``) and ``gradclip_spikes.jsonl``.

No torch and no transformers here (``training_args.bin`` is read by :mod:`.training_args`).

Where the files are:

* ``trainer_state.json``: in the given folder; or, when the folder is an ``output_dir`` without one, in its
  newest ``checkpoint-N/`` (largest N; an older one, with a warning, when the newest cannot be read).
* ``gradclip_spikes.jsonl``: in the ``output_dir``; for a checkpoint folder, in its parent.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ..spikefile import FILE_NAME as SPIKE_FILE
from ..spikefile import SpikeRecord, as_float, as_int, read_records

__all__ = ["Window", "Run", "load_run", "find_state", "STATE_FILE", "SPIKE_FILE"]

STATE_FILE = "trainer_state.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


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


@dataclass
class Run:
    """What a run logged, as the report reads it."""

    path: str                      # the folder given
    state_path: str                # the trainer_state.json read
    spike_path: Optional[str]      # the spike file read (None: there is none)
    windows: list[Window]
    events: list[SpikeRecord]
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
        if isinstance(entry, dict) and "grad_norm" in entry and as_int(entry.get("step")) is not None:
            entries[as_int(entry["step"])] = entry  # a step logged twice (resumed run): the last one counts
    windows, previous = [], None
    for step in sorted(entries):
        entry = entries[step]
        first = previous + 1 if previous is not None else max(1, step - (logging_steps or 1) + 1)
        values = {attr: as_float(entry.get(key)) for attr, key in _WINDOW_KEYS.items()}
        counts = {attr: as_int(entry.get(key)) for attr, key in _COUNT_KEYS.items()}
        windows.append(Window(step=step, first=first, grad_norm=as_float(entry["grad_norm"]), **values, **counts))
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
    steps = as_int(state.get("global_step"))
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
    logging_steps = as_int(state.get("logging_steps"))
    windows = _windows(history, logging_steps)
    if not windows:
        raise ValueError(f"{state_path!r} has {len(history)} log entries but none with a 'grad_norm': the run logged "
                         f"no gradient norms to report on ({_no_log_cause(state, logging_steps)}).")
    evals = [(as_int(h.get("step")) or 0, float(h["eval_loss"])) for h in history
             if isinstance(h, dict) and as_float(h.get("eval_loss")) is not None]
    stops = [(as_int(h.get("step")) or 0, h["gradclip/stop_reason"]) for h in history
             if isinstance(h, dict) and isinstance(h.get("gradclip/stop_reason"), str)]
    spike_path = os.path.join(_output_dir(folder), SPIKE_FILE)
    events: list[SpikeRecord] = []
    if os.path.isfile(spike_path):
        events, bad = read_records(spike_path)
        warnings.extend(bad)
    else:
        spike_path = None
    return Run(path=folder, state_path=state_path, spike_path=spike_path, windows=windows, events=events,
               evals=evals, stop_reasons=stops, global_step=as_int(state.get("global_step")),
               max_steps=as_int(state.get("max_steps")), logging_steps=logging_steps, strategy=_strategy(state),
               warnings=warnings)
