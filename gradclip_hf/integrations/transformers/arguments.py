"""``GradClipTrainingArguments``: ``TrainingArguments`` plus every ``ClipConfig`` option as a ``clip_*`` field.

The fields are DERIVED from :class:`~gradclip_hf.config.ClipConfig` (same defaults, help texts and choices),
so ``HfArgumentParser`` gives ``--clip_strategy zscore --clip_spike_action skip ...`` on the command line.
:func:`with_clip_options` does the same for any ``TrainingArguments`` subclass, e.g. TRL's ``SFTConfig``::

    GradClipSFTConfig = with_clip_options(SFTConfig)
    args, = TrlParser(GradClipSFTConfig).parse_args_and_config()
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import MISSING, field, fields, make_dataclass
from typing import Any, get_type_hints

from transformers import TrainingArguments

from ...config import ClipConfig, option_names
from ...core import OptionError

__all__ = ["GradClipTrainingArguments", "with_clip_options", "PREFIX", "argument_name"]

PREFIX = "clip_"


def argument_name(option: str) -> str:
    """The ``TrainingArguments`` field of a ``ClipConfig`` option: ``threshold`` -> ``clip_threshold``."""
    return PREFIX + option


def _clip_fields() -> list[tuple[str, Any, Any]]:
    hints = get_type_hints(ClipConfig)
    out = []
    for f in fields(ClipConfig):
        default = {"default": f.default} if f.default is not MISSING else {"default_factory": f.default_factory}
        out.append((argument_name(f.name), hints[f.name], field(metadata=dict(f.metadata), **default)))
    return out


class ClipArguments:
    """Behaviour of the derived arguments classes: ``clip_*`` checked at construction (``ValueError``
    naming the ``clip_*`` field), and :meth:`clip_config`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        config = self._clip_options(warn=True)
        try:
            config.resolved_threshold(self.max_grad_norm)
        except OptionError as error:
            raise error.renamed(argument_name) from None

    def _clip_options(self, warn: bool = False) -> ClipConfig:
        options = {name: getattr(self, argument_name(name)) for name in ClipConfig.field_names()}
        with option_names(argument_name), warnings.catch_warnings():
            if not warn:
                warnings.simplefilter("ignore")
            return ClipConfig(**options)

    def clip_config(self) -> ClipConfig:
        """The :class:`ClipConfig` of the ``clip_*`` fields (``clip_threshold=None``: ``max_grad_norm``)."""
        return self._clip_options()


def with_clip_options(base: type, name: str | None = None) -> type:
    """A dataclass subclass of ``base`` (``TrainingArguments`` or a subclass such as TRL's ``SFTConfig``) with
    every ``ClipConfig`` option as a ``clip_*`` field; ``name`` defaults to ``"GradClip" + base.__name__``.
    Define it at module level (the Trainer pickles its arguments into ``training_args.bin``)."""
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"with_clip_options needs a TrainingArguments subclass, got {base!r}.")
    name = name or f"GradClip{base.__name__}"
    cls = make_dataclass(name, _clip_fields(), bases=(ClipArguments, base))
    cls.__module__ = sys._getframe(1).f_globals.get("__name__", __name__)
    cls.__doc__ = (f"``{base.__name__}`` with the gradient-clipping options of ``ClipConfig`` as ``clip_*`` fields "
                   f"(``clip_strategy``, ``clip_threshold``, ``clip_spike_action``, ...). ``clip_threshold`` "
                   f"defaults to ``max_grad_norm``; the Trainer's own clipping is off while the pack clips.")
    return cls


GradClipTrainingArguments = with_clip_options(TrainingArguments, "GradClipTrainingArguments")
