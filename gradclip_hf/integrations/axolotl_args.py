"""``GradClipArgs``: the Axolotl YAML keys of the plugin, a pydantic model DERIVED from ``ClipConfig``.

Every ``ClipConfig`` option is a top-level key ``clip_<name>`` with the same default and help text (and the
same name as the ``GradClipTrainingArguments`` field). Each value is checked by ``ClipConfig``'s own check
of that option, before pydantic's type check, and the options together by building the ``ClipConfig``, so
the errors are the ones ``GradClipTrainingArguments`` raises (``ValueError`` naming ``clip_<name>``, the
value and what is allowed; pydantic reports it as a ``ValidationError``, also a ``ValueError``). pydantic only: importing this module does not import Axolotl.
"""

from __future__ import annotations

import warnings
from dataclasses import MISSING, fields
from typing import Any, Mapping, get_type_hints

from pydantic import BaseModel, Field, ValidationInfo, create_model, field_validator, model_validator

from ..config import OPTION_CHECKS, ClipConfig, option_names
from ..core import OptionError
from ..core._checks import suggest

__all__ = ["GradClipArgs", "PREFIX", "key", "clip_config", "unknown_keys", "unknown_message"]

PREFIX = "clip_"
TRAINER_DEFAULT_MAX_GRAD_NORM = 1.0  # Axolotl forwards max_grad_norm only when set: TrainingArguments' default


def key(option: str) -> str:
    """The YAML key of a ``ClipConfig`` option: ``threshold`` -> ``clip_threshold`` (other names, such as
    ``max_grad_norm``, are Axolotl's own: unchanged)."""
    return PREFIX + option if option in ClipConfig.field_names() else option


def unknown_message(unknown: list[str]) -> str:
    """What is wrong with each unknown ``clip_*`` key: the closest option (``clip_stratgy``: ``clip_strategy``)."""
    known = [key(name) for name in ClipConfig.field_names()]
    return "; ".join(name + suggest(name, known, prefixed=True) for name in unknown)


def unknown_keys(cfg: Mapping[str, Any]) -> list[str]:
    """``clip_*`` keys of a raw config that are no option (Axolotl would drop them without a word)."""
    known = {key(name) for name in ClipConfig.field_names()}
    return sorted(k for k in cfg if isinstance(k, str) and k.startswith(PREFIX) and k not in known)


def clip_config(cfg: Mapping[str, Any], warn: bool = False) -> ClipConfig:
    """The ``ClipConfig`` of the ``clip_*`` keys of ``cfg`` (absent keys: the defaults); errors and warnings
    name the keys. Checks the threshold against ``cfg``'s ``max_grad_norm`` like the Trainer arguments do."""
    given = {name: cfg[key(name)] for name in ClipConfig.field_names() if key(name) in cfg}
    max_grad_norm = cfg.get("max_grad_norm")
    with option_names(key), warnings.catch_warnings():
        if not warn:
            warnings.simplefilter("ignore")
        config = ClipConfig(**given)
    try:
        config.resolved_threshold(TRAINER_DEFAULT_MAX_GRAD_NORM if max_grad_norm is None else max_grad_norm)
    except OptionError as error:
        raise error.renamed(key) from None
    return config


class _ClipArgsBase(BaseModel):
    @model_validator(mode="after")
    def _check_combinations(self) -> "_ClipArgsBase":
        """The options together (``ClipConfig``'s combination checks and warnings, the threshold against
        ``max_grad_norm`` when Axolotl's config has it)."""
        clip_config({**self.__dict__, "max_grad_norm": getattr(self, "max_grad_norm", None)}, warn=True)
        return self


def _check_option(cls: Any, value: Any, info: ValidationInfo) -> Any:
    """One option, before pydantic's type check: ``ClipConfig``'s own check (the same error, renamed)."""
    name = info.field_name[len(PREFIX):]
    try:
        return OPTION_CHECKS[name](name, value)
    except OptionError as error:
        raise error.renamed(key) from None


def _field(f: Any) -> Any:
    extra = {"choices": f.metadata["choices"]} if "choices" in f.metadata else None
    if f.default is MISSING:
        return Field(default_factory=f.default_factory, description=f.metadata["help"], json_schema_extra=extra)
    return Field(default=f.default, description=f.metadata["help"], json_schema_extra=extra)


def _build() -> type[BaseModel]:
    hints = get_type_hints(ClipConfig)
    definitions = {key(f.name): (hints[f.name], _field(f)) for f in fields(ClipConfig)}
    check = field_validator(*definitions, mode="before")(_check_option)
    model = create_model("GradClipArgs", __base__=_ClipArgsBase, __module__=__name__,
                         __validators__={"_check_option": check}, **definitions)
    model.__doc__ = ("Gradient-clipping options of gradclip-hf as Axolotl YAML keys (clip_strategy, clip_threshold, "
                     "clip_spike_detection, ...); see docs/options.md.")
    return model


GradClipArgs = _build()
