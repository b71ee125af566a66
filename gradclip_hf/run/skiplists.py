"""A skip list (``clip_skip_steps``, ``clip_skip_steps_from``) checked against the run that applies it.

A listed step means "the update of the batch this step trains on", which holds only in a rerun with the same
data order that resumed before it. So, with a warning naming the step and the fix (the list is still applied
as given, so every process decides the same):

- at train begin: listed steps at or before the step training starts from (they already happened), steps
  after ``max_steps`` (never reached), and ``TrainingArguments.resume_from_checkpoint`` set while training
  starts at step 0 (the Trainer does not read that argument: a script must pass it to ``train()``);
- at a listed step whose batch fingerprint the spike file recorded: this step's batch compared with it (one
  host read, at that step only, on the main process: the file holds the main process's fingerprint).
"""

from __future__ import annotations

import math
from typing import Any

from ..spikeruns import step_ranges
from .batches import BatchTracker
from .messages import logger

__all__ = ["check_start", "check_batch", "Uncomputed"]

RERUN = "trainer.train(resume_from_checkpoint='<output_dir>/checkpoint-N')"


def _steps(steps: list[int], limit: int = 8) -> str:
    shown = ", ".join(str(s) for s in steps[:limit])
    return shown + (f" and {len(steps) - limit} more" if len(steps) > limit else "")


def check_start(listed: frozenset[int], start: int, max_steps: int, resume_arg: Any, computed: bool = False) -> None:
    """Say once which updates the skip list skips (INFO, as the threshold line; no line per step: the spike
    messages say "listed" where a listed step spikes again), and warn about listed steps this run
    cannot apply as meant (module docstring); ``start`` is the step the run starts from (the checkpoint's
    ``global_step``, 0 for a fresh run); ``computed``: the listed steps' batches are still computed (DeepSpeed)."""
    if not listed:
        return
    ahead = sorted(s for s in listed if s > start and not (max_steps and s > max_steps))
    if ahead:
        plural = "s" if len(ahead) > 1 else ""
        logger.info("gradclip: the skip list (clip_skip_steps / clip_skip_steps_from) skips the update%s of step%s "
                    "%s (%d in all); their batches are consumed %s, so the data order stays the same.",
                    plural, plural, step_ranges(ahead, limit=8), len(ahead),
                    "and computed, the update skipped" if computed else "without being computed")
    if start == 0 and resume_arg:
        logger.warning("gradclip: TrainingArguments.resume_from_checkpoint=%r is set, but training starts at step 0: "
                       "the Trainer does not read that argument itself, so the skip list (steps %s) applies to a "
                       "fresh run. Pass it to train(): trainer.train(resume_from_checkpoint="
                       "args.resume_from_checkpoint).", resume_arg, _steps(sorted(listed)))
    done = sorted(s for s in listed if s <= start)
    if done:
        logger.warning("gradclip: the skip list names step(s) %s, at or before step %d where this run starts: they "
                       "already happened and are not skipped. Resume from a checkpoint before them: %s with N < %d.",
                       _steps(done), start, RERUN, done[0])
    late = sorted(s for s in listed if max_steps and s > max_steps)
    if late:
        logger.warning("gradclip: the skip list names step(s) %s, after max_steps=%d: this run ends before them.",
                       _steps(late), max_steps)


def check_batch(step: int, recorded: str | None, batches: BatchTracker) -> None:
    """At a listed ``step``: warn when its batch is not the one the spike file ``recorded`` (a fingerprint)."""
    if recorded is None:
        return
    mine = batches.fingerprint_now()
    if mine is None or mine == recorded:
        return
    logger.warning("gradclip: step %d: this step's batch (fingerprint %s) is not the batch the spike file recorded "
                   "for step %d (%s): the file comes from a run with another data order (dataset, seed or data_seed, "
                   "batch size, gradient accumulation, number of processes), or this run did not resume where that "
                   "run was. The update is skipped as listed; to skip the recorded batches, rerun with the same data "
                   "settings and %s from a checkpoint before the step.", step, mine, step, recorded, RERUN)


class Uncomputed:
    """Listed steps whose batches the Trainer integration consumed without computing them (no forward, no
    backward: Megatron's ``--iterations-to-skip``), counted on the host for the log row: each added a zero to the
    Trainer's running loss, which divides by every step of the logging window.

    ``step``: the listed step in progress whose batches are not computed; ``steps``: optimizer steps since the last
    log row; ``listed``: those of them not computed."""

    def __init__(self) -> None:
        self.step: int | None = None
        self.steps = self.listed = 0

    def take(self) -> int:
        """The listed steps since the last log row (the counts restart)."""
        listed, self.steps, self.listed = self.listed, 0, 0
        return listed

    def correct(self, logs: dict[str, Any]) -> int:
        """Make ``logs["loss"]`` (the Trainer's mean over the window's steps) the mean over the steps that were
        computed: NaN when none was. Returns the listed steps of the window."""
        steps, listed = self.steps, self.take()
        loss = logs.get("loss")
        if listed and isinstance(loss, (int, float)):
            logs["loss"] = loss * steps / (steps - listed) if steps > listed else math.nan
        return listed
