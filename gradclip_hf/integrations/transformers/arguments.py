"""``GradClipTrainingArguments``: ``TrainingArguments`` plus every ``ClipConfig`` option as a ``clip_*`` field.

The fields are DERIVED from :class:`~gradclip_hf.config.ClipConfig` (same defaults, help texts and choices),
so ``HfArgumentParser`` gives ``--clip_strategy zscore --clip_spike_action skip ...`` on the command line.
:func:`with_clip_options` does the same for any ``TrainingArguments`` subclass, e.g. TRL's ``SFTConfig``::

    GradClipSFTConfig = with_clip_options(SFTConfig)
    args, = TrlParser(GradClipSFTConfig).parse_args_and_config()
"""

from __future__ import annotations

import functools
import sys
import warnings
from dataclasses import MISSING, field, fields, make_dataclass
from typing import Any, get_type_hints

from transformers import HfArgumentParser, TrainingArguments

from ...config import ClipConfig, option_names
from ...core import OptionError
from ...core._checks import PREFIX, UnknownOptionError, suggest

__all__ = ["GradClipTrainingArguments", "GradClipArgumentParser", "with_clip_options", "PREFIX", "argument_name"]


def argument_name(option: str) -> str:
    """The ``TrainingArguments`` field of a ``ClipConfig`` option: ``threshold`` -> ``clip_threshold`` (other
    names, such as ``max_grad_norm``, are the Trainer's own: unchanged)."""
    return PREFIX + option if option in ClipConfig.field_names() else option


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


_DERIVED: dict[str, type] = {}  # the classes with_clip_options made that live in this module, by name


def with_clip_options(base: type, name: str | None = None, module: str | None = None) -> type:
    """A dataclass subclass of ``base`` (``TrainingArguments`` or a subclass such as TRL's ``SFTConfig``) with
    every ``ClipConfig`` option as a ``clip_*`` field; ``name`` defaults to ``"GradClip" + base.__name__``.

    The Trainer pickles its arguments into ``training_args.bin``, by reference to the class: ``module`` names the
    module the class is defined in (``module=__name__``, assigned at that module's top level under ``name``);
    without it, the class lives in this module under ``name`` (a later call with the same name replaces it)."""
    if not (isinstance(base, type) and issubclass(base, TrainingArguments)):
        raise TypeError(f"with_clip_options needs a TrainingArguments subclass, got {base!r}.")
    name = name or f"GradClip{base.__name__}"
    if module is not None and not (isinstance(module, str) and module):
        raise OptionError("module", module, "the name of the module the class is defined in (__name__), or None")
    here = sys.modules[__name__]
    if module is None and hasattr(here, name) and _DERIVED.get(name) is not getattr(here, name):
        raise OptionError("name", name, f"a name not already used by {__name__}", "Pass another name=, or "
                          "module=__name__ to define the class in your module.")
    cls = make_dataclass(name, _clip_fields(), bases=(ClipArguments, base))
    cls.__init__ = _suggesting_init(cls)
    cls.__module__ = module or __name__
    if module is None:
        _DERIVED[name] = cls
        setattr(here, name, cls)
    cls.__doc__ = (f"``{base.__name__}`` with the gradient-clipping options of ``ClipConfig`` as ``clip_*`` fields "
                   f"(``clip_strategy``, ``clip_threshold``, ``clip_spike_action``, ...). ``clip_threshold`` "
                   f"defaults to ``max_grad_norm``; the Trainer's own clipping is off while the pack clips.")
    return cls


def _suggesting_init(cls: type) -> Any:
    """``cls``'s dataclass ``__init__``; a keyword that is no field: a ``ValueError`` with the closest name."""
    dataclass_init = cls.__init__
    known = [f.name for f in fields(cls) if f.init]

    @functools.wraps(dataclass_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        for key in kwargs:
            if key not in known:
                raise UnknownOptionError(key, cls.__name__, known, prefixed=True)
        dataclass_init(self, *args, **kwargs)

    return __init__


class GradClipArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` that answers a misspelt option with the closest one, instead of the stock "Some
    specified arguments are not used" traceback: ``--clip_stratgy zscore`` exits with status 2 and
    ``unrecognized argument --clip_stratgy: did you mean `clip_strategy`?``; ``parse_dict`` (and so
    ``parse_json_file``/``parse_yaml_file``) raises a ``ValueError`` with the same suggestion. Use it in place of
    ``HfArgumentParser`` (any dataclasses, e.g. ``GradClipTrainingArguments`` and your script's own)."""

    def _known(self) -> list[str]:
        return [f.name for dtype in self.dataclass_types for f in fields(dtype) if f.init]

    def _unknown_message(self, names: list[str], form: str = "`{}`") -> str:
        known = self._known()
        return "; ".join(name + suggest(name, known, prefixed=True, form=form, fallback=" (see --help)")
                         for name in names)

    def parse_args_into_dataclasses(self, args: Any = None, return_remaining_strings: bool = False,
                                    **kwargs: Any) -> tuple[Any, ...]:
        *outputs, remaining = super().parse_args_into_dataclasses(args=args, return_remaining_strings=True, **kwargs)
        if return_remaining_strings:
            return (*outputs, remaining)
        if remaining:
            options = [r.split("=", 1)[0] for r in remaining if r.startswith("-")]
            if options:
                self.error("unrecognized argument " + self._unknown_message(options, form="--{}"))
            self.error(f"unrecognized arguments: {' '.join(remaining)}")
        return tuple(outputs)

    def parse_dict(self, args: dict[str, Any], allow_extra_keys: bool = False) -> tuple[Any, ...]:
        if not allow_extra_keys:
            known = set(self._known())
            unknown = [key for key in args if key not in known]
            if unknown:
                raise ValueError(f"unknown option {self._unknown_message(unknown)}")
        return super().parse_dict(args, allow_extra_keys=allow_extra_keys)


GradClipTrainingArguments = with_clip_options(TrainingArguments, "GradClipTrainingArguments")
