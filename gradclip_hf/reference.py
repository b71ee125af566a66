"""Reference tables generated from the code, so the docs cannot drift from it (``docs/options.md``).

``python -m gradclip_hf.reference > docs/options.md`` regenerates the options page; a test checks it is
up to date.
"""

from __future__ import annotations

from dataclasses import MISSING, fields

from .config import ClipConfig

__all__ = ["options_markdown"]


def _default(f) -> str:
    value = f.default_factory() if f.default is MISSING else f.default
    return f"`{value!r}`"


def options_markdown() -> str:
    """Every ``ClipConfig`` option: its ``GradClipTrainingArguments`` flag, default, help and choices."""
    lines = ["# Options", "",
             "Generated from `ClipConfig` by `python -m gradclip_hf.reference > docs/options.md` (a test checks it",
             "is current). Each option is a field of `ClipConfig` and a keyword of `GradClipCallback` (the name in",
             "the first column without `clip_`), a `clip_*` field of `GradClipTrainingArguments` and of any",
             "`with_clip_options(...)` class (a `--clip_*` flag for `HfArgumentParser` and `TrlParser`), and a",
             "top-level `clip_*` key of the Axolotl plugin. Bad values raise `ValueError` at construction, naming",
             "the option as you wrote it, the value and what is allowed; an option that the rest of the",
             "configuration does not use gives one warning. A name that is no option (also a key of a config dict)",
             "raises the same `ValueError` with the closest name (`ClipConfig(stratgy=...)`: did you mean",
             "`strategy`?), and says so where the `clip_` prefix is the mistake. On the command line, parse with",
             "`GradClipArgumentParser` (an `HfArgumentParser`) for the same suggestion and exit status 2",
             "(`--clip_stratgy`: did you mean `--clip_strategy`?) instead of the stock parser's \"Some specified",
             "arguments are not used\" traceback.", "",
             "`max_grad_norm` (the Trainer's) is read as the stock Trainer reads it: 0 (or `None`), a negative",
             "number, `inf` and values above the float32 maximum turn clipping off (norms still measured and logged,",
             "spike actions still act); NaN and non-numbers are refused when the arguments or the Trainer are",
             "built, naming `max_grad_norm` (docs/trainer.md).", "",
             "| flag | default | what it does |", "|---|---|---|"]
    for f in fields(ClipConfig):
        help_text = f.metadata["help"]
        if "choices" in f.metadata:
            help_text += " Choices: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        lines.append(f"| `--clip_{f.name}` | {_default(f)} | {help_text} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # pragma: no cover
    print(options_markdown(), end="")
