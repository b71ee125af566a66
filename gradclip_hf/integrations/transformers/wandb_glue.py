"""The W&B extras of a run (histogram, spike table, alerts, end-of-run chart), from values already on the host.

Built only when ``report_to`` names W&B; ``wandb`` itself is imported only then (see ``..wandb``).
"""

from __future__ import annotations

from typing import Any

from ..wandb import names_wandb

__all__ = ["WandbGlue"]


class WandbGlue:
    """Hands a :class:`~gradclip_hf.run.ClipRun`'s logged values to a
    :class:`~gradclip_hf.integrations.wandb.WandbReporter` after each logging step and at train end."""

    def __init__(self, run: Any, report_to: Any, reporter: Any):
        self.run, self.report_to, self.reporter = run, report_to, reporter

    @classmethod
    def create(cls, args: Any, run: Any) -> "WandbGlue | None":
        report_to = getattr(args, "report_to", None)
        if not names_wandb(report_to):
            return None
        from ..wandb import WandbReporter

        config = run.config
        reporter = WandbReporter(histogram_every=config.wandb_histogram_every, alerts=config.wandb_alerts)
        if reporter.histogram_every:
            run.ship_layers = True  # every layer's norm travels in the logging transfer, for the histogram
        return cls(run, report_to, reporter)

    def _wandb_run(self) -> Any:
        from ..wandb import wandb_run

        return wandb_run(self.report_to)

    def _common(self) -> dict[str, Any]:
        clipper, actions = self.run.clipper, self.run.actions
        return {"threshold_base": lambda step: clipper.base_threshold(max(step - 1, 0)),
                "action": actions.action.value, "stop_reason": actions.stop_reason, "listed": actions.listed}

    def after_log(self, state: Any) -> None:
        metrics = self.run.take_unreported()
        if not (metrics or self.run.stop_reason):
            return
        wandb_run = self._wandb_run()
        if wandb_run is None:
            return
        self.reporter.log_step(wandb_run, int(getattr(state, "global_step", 0) or 0), metrics or {},
                               layer_norms=self.run.last_layer_norms if metrics else None,
                               events=self.run.spike_events, spike_layers=self.run.last_spike_layers[:3],
                               records=self.run.recorder.records, **self._common())

    def finish(self, state: Any) -> None:
        wandb_run = self._wandb_run()
        if wandb_run is not None:
            self.reporter.finish(wandb_run, int(getattr(state, "global_step", 0) or 0), **self._common())
