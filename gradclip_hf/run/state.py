"""A run's state in checkpoints: what :meth:`~.run.ClipRun.state_dict` saves (the statistics, the counters, the
options of the run, why it stopped) and how a resumed run loads it back, every field checked."""

from __future__ import annotations

import copy
from typing import Any

from ..core import StateError
from ..core._checks import check_int, state_field

__all__ = ["run_state", "load_run_state", "RESET_HINT"]

RESET_HINT = ("to start the statistics fresh instead, set reset_statistics=True (clip_reset_statistics in "
              "GradClipTrainingArguments, on the command line and in the Axolotl YAML)")


def run_state(run: Any) -> dict[str, Any]:
    """A run's state (a :class:`~.run.ClipRun`), JSON-safe: the clipper's statistics, the counters, the learning-rate
    guard's averages, and the options of the run (for readers such as ``gradclip-hf report``; never loaded back:
    the options of the resumed run win)."""
    state = {"clipper": run.clipper.state_dict(), "skipped_steps": run.skipped_steps,
             "rollbacks": run.actions.rollbacks, "events_seen": run.messages.seen,
             "watchdogs": run.actions.state_dict()}
    if run.stop_reason is not None:  # why this run ended (read by people and reports; not loaded back)
        state.update(stop_reason=run.stop_reason, stop_step=run.actions.stop_step)
    if run.given_config is not None:
        state["config"] = run.given_config.to_dict()
    if run.lr_guard is not None:
        state["lr_guard"] = run.lr_guard.state_dict()
    return state


def load_run_state(run: Any, state: dict[str, Any], source: str) -> None:
    """Restore :func:`run_state`'s output into ``run``, every field checked; ``StateError`` names the field, the value
    and ``source`` (where it came from) and says how to start the statistics fresh (``reset_statistics``)."""
    try:
        if not isinstance(state, dict) or not isinstance(state.get("clipper"), dict):
            raise StateError("clipper", state.get("clipper", state) if isinstance(state, dict) else state,
                             "present (a dict)")
        try:
            clipper_state = copy.deepcopy(state["clipper"])
        except RecursionError:
            raise StateError("clipper", "<nested too deeply>", "a clipper state") from None
        try:
            run.clipper.load_state_dict(clipper_state)
        except StateError as error:
            raise error.within("clipper") from None
        counts = {key: state_field(state, key, check_int, low=0, high=2**53) if key in state else 0
                  for key in ("skipped_steps", "rollbacks", "events_seen")}
        _check_stop(state)  # the stop of the run that saved it: checked, not loaded (this run goes on)
        watchdogs = state.get("watchdogs", {"nonfinite_run": 0, "loss_cap_run": 0})  # absent: saved before 24.6
        if not isinstance(watchdogs, dict):
            raise StateError("watchdogs", watchdogs, "a dict (the watchdogs' current runs) or absent")
        try:
            run.actions.load_state_dict(watchdogs)
        except StateError as error:
            raise error.within("watchdogs") from None
        run.skipped_steps, run.actions.rollbacks, run.messages.seen = counts.values()
        if run.lr_guard is not None and state.get("lr_guard") is not None:  # absent: saved without it
            run.lr_guard.load_state_dict(state["lr_guard"])
    except StateError as error:
        raise StateError(f"run.{error.field}", error.value, error.allowed, f"{source}; {RESET_HINT}") from None


def _check_stop(state: dict[str, Any]) -> None:
    reason, step = state.get("stop_reason"), state.get("stop_step")
    if reason is not None and not isinstance(reason, str):
        raise StateError("stop_reason", reason, "a str or absent")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= 2**53):
        raise StateError("stop_step", step, "an int >= 1 or absent")
