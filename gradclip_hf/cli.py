"""The gradclip-hf command line (also python -m gradclip_hf).

  demo    what a fault costs with no clipping, the stock max_grad_norm=1.0 and this pack's recommended
          configuration: a tiny Llama trained on the Python standard library's text, each method with and
          without the fault. Writes demo_output/report.md, charts, TensorBoard logs and offline W&B runs.
  report  what a Trainer run's gradient norms, clip rate and spikes were, and a clip threshold suggestion,
          from its trainer_state.json and gradclip_spikes.jsonl (stock Trainer runs too).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each subcommand's parser (for its ``error``), by name."""
    from . import __version__
    from .demo import add_arguments
    from .report import command as report

    parser = argparse.ArgumentParser(prog="gradclip-hf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"gradclip-hf {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="what a fault costs with no clipping, stock max_grad_norm=1 and the pack "
                          "(tiny Llama on Python stdlib text; about 1-2 minutes on 2 CPU cores)",
                          description=__import__("gradclip_hf.demo", fromlist=["x"]).__doc__,
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(demo)
    rep = sub.add_parser("report", help="gradient norms, clip rate, spikes and a clip threshold suggestion for a "
                         "Trainer run (its output_dir or checkpoint)", description=report.DESCRIPTION,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_arguments(rep)
    return parser, {"demo": demo, "report": rep}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradclip-hf`` console script (``setup.cfg``) and ``python -m gradclip_hf``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = _parsers()
    ns = parser.parse_args(argv)
    if ns.command == "demo":
        from .demo import _check, run_demo

        _check(ns, commands["demo"].error)
        command = "gradclip-hf " + " ".join(argv)
        run_demo(ns, command)
        return 0
    if ns.command == "report":
        from .report.command import run_report

        return run_report(ns, commands["report"].error)
    parser.error(f"unknown command {ns.command!r}")  # pragma: no cover
    return 2  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
