"""Runs of consecutive flagged steps and their one line (``gradclip_hf.spikeruns``): the text the console, the
W&B alert and ``gradclip-hf report`` print for a burst, closed-form cases."""

from __future__ import annotations

import logging

from gradclip_hf.spikeruns import Flagged, describe_run, group_runs


def burst(first=61, n=20, action="skip", **kw):
    """A bad shard: loss 7.21-7.45 against 2.47, 37-39 sigma."""
    return [Flagged(step=first + i, kind="loss", action=action, skipped=action != "tighten",
                    loss=7.21 + 0.24 * i / (n - 1), loss_baseline=2.47, loss_z=37 + 2 * i / (n - 1), norm=4.0,
                    threshold_before=1.0, threshold_after=1.0, **kw) for i in range(n)]


def test_a_burst_is_one_run_and_one_line():
    runs = group_runs(burst())
    assert len(runs) == 1 and len(runs[0]) == 20
    assert describe_run(runs[0]) == ("steps 61-80: 20 loss spikes, loss 7.21-7.45 against 2.47 (37-39 sigma); "
                                     "updates skipped")


def test_one_spike_reads_as_one():
    [run] = group_runs(burst(n=2)[:1])
    assert describe_run(run) == "step 61: loss spike, loss 7.21 against 2.47 (37 sigma); update skipped"


def test_gaps_other_events_and_other_outcomes_start_a_new_run():
    items = burst(n=3) + burst(first=70, n=2) + [Flagged(step=72, event="nonfinite", skipped=True)]
    items += [Flagged(step=73, event="listed", skipped=True, listed=True)]
    runs = group_runs(items)
    assert [(r[0].step, r[-1].step) for r in runs] == [(61, 63), (70, 71), (72, 72), (73, 73)]
    assert describe_run(runs[2]) == "step 72: non-finite gradient (NaN/Inf); update skipped"
    assert describe_run(runs[3]) == ("step 73: listed step; update skipped (listed in clip_skip_steps / "
                                     "clip_skip_steps_from)")
    assert group_runs(burst(n=2) + [Flagged(step=61, kind="loss")])[0][0].loss == 7.21  # one item per step


def test_tightening_norm_spikes_and_mixed_kinds():
    tight = [Flagged(step=10 + i, kind="norm", action="tighten", skipped=False, loss=3.0, norm=9.0 + i,
                     norm_baseline=1.2, norm_z=8.04 + i, threshold_before=1.0 / 2 ** i, threshold_after=0.5 / 2 ** i)
             for i in range(3)]
    assert describe_run(tight) == ("steps 10-12: 3 norm spikes, gradient norm 9-11 against 1.2 (8.0-10.0 sigma); "
                                   "clip threshold 1 -> 0.125; threshold tightened, updates applied")
    mixed = burst(n=3)[:2] + [Flagged(step=63, kind="loss+norm", action="skip", skipped=True, loss=7.3,
                                      loss_baseline=2.47, loss_z=38)]
    assert describe_run(group_runs(mixed)[0]).startswith("steps 61-63: 3 spikes (2 loss, 1 loss+norm), loss 7.21-7.3")


def test_listed_spikes_say_why_they_were_skipped():
    [run] = group_runs(burst(n=4, action="tighten", listed=True))
    assert describe_run(run).endswith("; updates skipped (listed in clip_skip_steps / clip_skip_steps_from)")




class Lines(logging.Handler):
    """The messages a logger emits (its own handler: `transformers` may or may not propagate to the root's)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def read_as_logging_steps(losses, reads):
    """A real clipper with ``recommended()``'s spike controller over the step ``losses``; the spike messages read
    after each 0-based step of ``reads``: ``{step: [where each line says, ...]}``, and the events read."""
    import torch

    from gradclip_hf.config import ClipConfig
    from gradclip_hf.core._state import to_host
    from gradclip_hf.run.messages import SpikeMessages, logger

    clipper = ClipConfig.recommended(spike_warmup_steps=5).build(None, 1.0)
    messages, model, said, lines = SpikeMessages(clipper, "test"), torch.nn.Linear(2, 2), {}, Lines()
    logger.addHandler(lines)
    level, logger.disabled = logger.level, False
    logger.setLevel("WARNING")  # whatever verbosity an earlier test (or a docs snippet) left behind
    try:
        for step, loss in enumerate(losses):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.1)
            clipper.clip_(model, step=step, loss=torch.tensor(loss))
            if step in reads:
                lines.messages.clear()
                messages.show(to_host(messages.tensors()), "skip")
                said[step] = [m.split(":")[1].strip() for m in lines.messages]
    finally:
        logger.removeHandler(lines)
        logger.setLevel(level)
    return said, [e.step for e in messages.events]


def test_the_console_says_a_run_once_then_when_it_doubled_or_ended():
    bad = set(range(30, 40)) | {45, 46}  # 0-based: train/global_step 31-40 and 46-47
    losses = [9.0 if step in bad else 2.0 + 0.01 * (step % 3) for step in range(48)]
    said, events = read_as_logging_steps(losses, (32, 35, 47))  # logging steps 33, 36 and 48
    assert said == {32: ["steps 31-33"],  # a new run: said at once
                    35: ["steps 31-36"],  # it doubled (3 -> 6)
                    47: ["steps 31-40", "steps 46-47"]}  # it ended (another run follows): said whole, once
    assert events == [31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 46, 47]
