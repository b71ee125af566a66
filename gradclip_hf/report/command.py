"""The ``gradclip-hf report`` command line (arguments and what the command does)."""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable

__all__ = ["DESCRIPTION", "add_arguments", "run_report"]

DESCRIPTION = """\
Report on a Trainer run from what it logged: pre-clip gradient norm percentiles (whole run and per phase:
the first 10 % of steps, then the rest in thirds), the clip rate over time, spikes with their steps and
batches (gradclip_spikes.jsonl), skipped and non-finite steps, the stop reason, a clip threshold suggestion
with its reason, and a PNG of the norm vs the threshold.

PATH is an output_dir (its trainer_state.json, else the one of its newest checkpoint-N/), a checkpoint-N
folder or a trainer_state.json. Works on stock Trainer runs (grad_norm only) and on this pack's runs
(gradclip/* metrics). The advice rules are described in docs/report.md.

Exit status: 0, or 2 when there is nothing to report on (the message names the file and what is missing).
"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", metavar="PATH", help="output_dir, checkpoint-N folder or trainer_state.json")
    parser.add_argument("--threshold", type=float, default=None, metavar="X",
                        help="clip threshold of a run that did not log gradclip/threshold (a stock Trainer run: its "
                             "max_grad_norm; 0: it did not clip). Default: max_grad_norm from the run's "
                             "training_args.bin (the checkpoint's, else the output_dir's; only the run's own), a "
                             "pickle read without importing or running anything it names; else the Trainer default "
                             "1.0 (the report says which). Ignored for runs that logged gradclip/threshold.")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of text")
    chart = parser.add_mutually_exclusive_group()
    chart.add_argument("--png", metavar="FILE", default=None,
                       help="where to write the chart (default: PATH/gradclip_report.png; needs matplotlib)")
    chart.add_argument("--no-png", action="store_true", help="write no chart")
    return parser


def _chart_path(ns: argparse.Namespace) -> str | None:
    """The chart to write: ``--png``, else the default when matplotlib is installed, else none."""
    if ns.no_png:
        return None
    if ns.png:
        return ns.png
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    folder = os.path.dirname(ns.path) if os.path.isfile(ns.path) else ns.path
    return os.path.join(folder, "gradclip_report.png")


def run_report(ns: argparse.Namespace, error: Callable[[str], None]) -> int:
    """Build and print the report; ``error`` (the subcommand parser's) exits with status 2 on bad input."""
    from . import build_report, render_text, to_json

    if ns.threshold is not None and not (math.isfinite(ns.threshold) and ns.threshold >= 0):
        error(f"--threshold must be a finite number >= 0 (0: the run did not clip), got {ns.threshold!r}")
    if ns.png and not ns.no_png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            error("--png needs matplotlib: pip install matplotlib (or pass --no-png)")
    chart = _chart_path(ns)
    try:
        report = build_report(ns.path, threshold=ns.threshold, chart=chart)
    except ValueError as e:
        error(str(e))
        return 2  # pragma: no cover  (error exits)
    if chart is None and not ns.no_png:
        report["warnings"].append("no chart: matplotlib is not installed (pip install matplotlib)")
    print(to_json(report) if ns.json else render_text(report))
    return 0
