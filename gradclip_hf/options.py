"""The vocabulary of the options (torch only, imports no other option module): the allowed values of each choice
option as ``str`` Enums, the one-option checks :class:`~gradclip_hf.config.ClipConfig` keeps next to each field
(``field(metadata={"help": ..., "choices": ..., "check": fn})``), and how errors name an option
(:func:`option_names`).

A check is ``check(name, value) -> clean value``; it raises :class:`~gradclip_hf.core.OptionError` (a
``ValueError``) naming the option, the value and what is allowed. Checks that involve several options are in
:mod:`gradclip_hf._config_checks`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import field
from enum import Enum
from typing import Any, Callable, Optional

from .core._checks import MAX_WINDOW, OptionError, check_choice, check_int, check_number
from .spikefile import SkipList, read_skip_list

__all__ = ["Strategy", "ScheduleName", "SpikeDetection", "Apply", "SpikeGate", "choices", "option", "option_names",
           "display_name", "SpikeFilePath", "Check"]

Check = Callable[[str, Any], Any]


class Strategy(str, Enum):
    NONE, NORM, VALUE, AGC, ZSCORE, QUANTILE = "none", "norm", "value", "agc", "zscore", "quantile"


class ScheduleName(str, Enum):
    CONSTANT, LINEAR, COSINE, WARMUP, PIECEWISE = "constant", "linear", "cosine", "warmup", "piecewise"


class SpikeDetection(str, Enum):
    OFF, LOSS, NORM, BOTH = "off", "loss", "norm", "both"


class Apply(str, Enum):
    AUTO, OPTIMIZER, GRADS = "auto", "optimizer", "grads"


class SpikeGate(str, Enum):
    """Where a loss spike is judged and acted on: the ``step`` loss (a spike holds back the whole update, per
    ``spike_action``), or each ``micro_batch``'s loss before its backward (a spiking one is dropped)."""

    STEP, MICRO_BATCH = "step", "micro_batch"


def choices(enum: type[Enum]) -> list[str]:
    """The allowed values of a ``str`` Enum (for ``argparse`` ``choices``)."""
    return [member.value for member in enum]


class FieldMetadata(Mapping):
    """An option's field metadata: ``help`` and ``choices``, listed, and ``check``, held but not listed
    (``metadata["check"]``): ``HfArgumentParser`` and TRL's parser pass every listed key of a field's metadata
    to ``argparse``, which takes ``help`` and ``choices`` but no check, so ``HfArgumentParser(ClipConfig)``
    keeps working."""

    def __init__(self, check: Check, **listed: Any):
        self._check, self._listed = check, listed

    def __getitem__(self, key: str) -> Any:
        return self._check if key == "check" else self._listed[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._listed)

    def __len__(self) -> int:
        return len(self._listed)

    def copy(self) -> dict[str, Any]:  # what ``MappingProxyType.copy()`` (transformers 4.x's parser) returns
        return dict(self._listed)


def option(default: Any, help: str, check: Check, enum: Optional[type[Enum]] = None) -> Any:
    """One option's dataclass field: its default, and in its metadata (:class:`FieldMetadata`) the help text,
    the allowed values (``HfArgumentParser`` reads ``help`` and ``choices``) and its check (``ClipConfig``
    runs it)."""
    listed: dict[str, Any] = {"help": help}
    if enum is not None:
        listed["choices"] = choices(enum)
    metadata = FieldMetadata(check, **listed)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_OPTION_NAME: ContextVar[Callable[[str], str]] = ContextVar("gradclip_option_name", default=lambda name: name)


@contextmanager
def option_names(rename: Callable[[str], str]):
    """Inside this block, errors and warnings of ``ClipConfig`` name each option as ``rename(name)`` (e.g.
    ``clip_threshold`` for ``GradClipTrainingArguments``)."""
    token = _OPTION_NAME.set(rename)
    try:
        yield
    finally:
        _OPTION_NAME.reset(token)


def display_name() -> Callable[[str], str]:
    """How options are named in messages here (see :func:`option_names`)."""
    return _OPTION_NAME.get()


# ---------------------------------------------------------------------------------------------- checks
def choice(enum: type[Enum]) -> Check:
    return lambda n, v: check_choice(n, v, enum).value


def positive(optional: bool = False, allow_inf: bool = False) -> Check:
    return lambda n, v: check_number(n, v, low=0.0, low_inclusive=False, optional=optional, allow_inf=allow_inf)


def unit(low_open: bool = True, high_open: bool = False) -> Check:
    return lambda n, v: check_number(n, v, low=0.0, high=1.0, low_inclusive=not low_open,
                                     high_inclusive=not high_open)


def integer(low: int, high: int = MAX_WINDOW, optional: bool = False) -> Check:
    return lambda n, v: check_int(n, v, low=low, high=high, optional=optional)


def ints(n: str, v: Any) -> list[int]:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise OptionError(n, v, "a list of ints")
    return [check_int(n, b, low=1) for b in v]


def floats(n: str, v: Any) -> list[float]:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise OptionError(n, v, "a list of numbers")
    return [check_number(n, x, low=0.0, low_inclusive=False) for x in v]


class SpikeFilePath(str):
    """The ``skip_steps_from`` path, with what was read from it (once: a pipe can be read only once)."""

    skip: SkipList


def spike_file(n: str, v: Any) -> Optional[SpikeFilePath]:
    """A ``gradclip_spikes.jsonl`` to take a skip list from: read now (a bad file is an error now)."""
    if v is None or isinstance(v, SpikeFilePath):
        return v
    if not isinstance(v, str) or not v:
        raise OptionError(n, v, "a path to a gradclip_spikes.jsonl, or None")
    try:
        skip = read_skip_list(v)
    except ValueError as error:
        raise OptionError(n, v, "a readable gradclip_spikes.jsonl", str(error)) from None
    for warning in skip.warnings:
        warnings.warn(f"`{n}`: {warning}", UserWarning, stacklevel=2)
    if not skip.steps:
        warnings.warn(f"`{n}`={v!r} lists no spike or non-finite step (listed skips are not carried over): nothing "
                      f"will be skipped because of it.", UserWarning, stacklevel=2)
    path = SpikeFilePath(v)
    path.skip = skip
    return path
