"""Option checks shared by the core and ``ClipConfig``: ONE validation layer, ONE error type.

Every bad option, whatever the mistake (a wrong type, a value out of range, an unknown choice), raises
:class:`OptionError`, which names the option, the value and what is allowed. It subclasses both
``ValueError`` and ``TypeError`` (as numpy's ``AxisError`` subclasses ``ValueError`` and ``IndexError``),
so either ``except`` catches it. Integrations that expose an option under another name (``clip_threshold``
for ``threshold``) rename it with :meth:`OptionError.renamed`, from the structured fields, not the text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from enum import Enum
from typing import Any, Callable, TypeVar

E = TypeVar("E", bound=Enum)
FLOAT32_MAX = 3.4028234663852886e38
MAX_WINDOW = 1_000_000  # sizes of device buffers (histories, warmups): above this a typo, not a window


class OptionError(ValueError, TypeError):
    """A bad option: ``` `name` must be <allowed>, got <value>. ```

    Attributes:
        name: the option as the user wrote it (after :meth:`renamed`).
        value: the rejected value.
        allowed: what is allowed, in words.
    """

    def __init__(self, name: str, value: Any, allowed: str, note: str = ""):
        self.name, self.value, self.allowed, self.note = name, value, allowed, note
        super().__init__(f"`{name}` must be {allowed}, got {value!r}." + (f" {note}" if note else ""))

    def renamed(self, rename: Callable[[str], str]) -> "OptionError":
        """The same error for an option exposed under ``rename(name)`` (e.g. ``clip_`` + name)."""
        return OptionError(rename(self.name), self.value, self.allowed, self.note)


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, allow_inf: bool = False,
                 optional: bool = False) -> float | None:
    """``float(value)``: a real number (not a bool), finite in float32 unless ``allow_inf``, in range."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, value, "a number" + (" or None" if optional else ""))
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf) or (math.isfinite(value) and abs(value) > FLOAT32_MAX):
        raise OptionError(name, value, f"a finite number (at most {FLOAT32_MAX:.4g}, the float32 maximum)")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise OptionError(name, value, f"{'>=' if low_inclusive else '>'} {low:g}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise OptionError(name, value, f"{'<=' if high_inclusive else '<'} {high:g}")
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              optional: bool = False) -> int | None:
    """``value``: an ``int`` (not a bool) in ``[low, high]``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise OptionError(name, value, "an int" + (" or None" if optional else ""))
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(b for b in (low is not None and f">= {low}", high is not None and f"<= {high:,}") if b)
        raise OptionError(name, value, f"an int {bounds}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise OptionError(name, value, "True or False")
    return value


def check_choice(name: str, value: Any, enum: type[E]) -> E:
    """The member of the ``str`` Enum ``enum`` named by ``value`` (case-insensitive)."""
    if isinstance(value, enum):
        return value
    if isinstance(value, str):
        try:
            return enum(value.lower())
        except ValueError:
            pass
    raise OptionError(name, value, "one of " + ", ".join(repr(member.value) for member in enum))


def check_norm_type(value: Any, name: str = "norm_type") -> float:
    """``p`` of a norm: any number ``>= 1``, or ``inf`` (also as the string ``"inf"``)."""
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    value = check_number(name, value, allow_inf=True) if not isinstance(value, str) else value
    if not isinstance(value, float) or value < 1.0:
        raise OptionError(name, value, ">= 1 or inf")
    return value


def check_patterns(name: str, value: Any, *, optional: bool = False, nonempty: bool = False) -> list[str] | None:
    """A list of non-empty, valid regular expressions (a single string is one pattern)."""
    if value is None and optional:
        return None
    if isinstance(value, str):
        value = [value]
    allowed = "a list of regular expressions" + (" or None" if optional else "")
    if not isinstance(value, Sequence) or not all(isinstance(v, str) for v in value):
        raise OptionError(name, value, allowed)
    if nonempty and not value:
        raise OptionError(name, value, f"a non-empty list of regular expressions (None selects every parameter)")
    if any(v == "" for v in value):
        raise OptionError(name, value, "a list of non-empty regular expressions (an empty pattern matches every name)")
    for pattern in value:
        try:
            re.compile(pattern)
        except re.error as error:
            raise OptionError(name, value, f"a list of valid regular expressions ({pattern!r}: {error})") from None
    return list(value)


def compile_patterns(name: str, patterns: Sequence[str]) -> list[re.Pattern]:
    return [re.compile(p) for p in check_patterns(name, patterns)]


class StateError(ValueError):
    """A field of a saved state (a checkpoint) that cannot be loaded: names the field path, the value,
    what is allowed and, once the integration knows it, where the state came from."""

    def __init__(self, field: str, value: Any, allowed: str, source: str = ""):
        self.field, self.value, self.allowed, self.source = field, value, allowed, source
        where = f" (in {source})" if source else ""
        shown = "nothing (missing)" if value is _MISSING else repr(value)
        super().__init__(f"saved gradclip state field `{field}` must be {allowed}, got {shown}{where}.")

    def within(self, prefix: str = "", source: str = "") -> "StateError":
        """The same error for a field nested under ``prefix`` and/or loaded from ``source``."""
        field = f"{prefix}.{self.field}" if prefix else self.field
        return StateError(field, self.value, self.allowed, source or self.source)


_MISSING = object()


def state_field(state: Any, key: str, check: Callable[..., Any], **kwargs: Any) -> Any:
    """``check(key, state[key], **kwargs)``, raising :class:`StateError` for a missing or bad field."""
    if not isinstance(state, dict):
        raise StateError(key, state, "inside a dict")
    if key not in state:
        raise StateError(key, _MISSING, "present")
    try:
        return check(key, state[key], **kwargs)
    except OptionError as error:
        raise StateError(key, error.value, error.allowed) from None


def check_floats(name: str, value: Any, *, allow_none: bool = False, length: int | None = None) -> list[float | None]:
    """A list of finite numbers (``None`` entries where ``allow_none``), of ``length`` if given."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise OptionError(name, value, "a list of numbers")
    out: list[float | None] = []
    for item in value:
        if item is None and allow_none:
            out.append(None)
        else:
            out.append(check_number(name, item, allow_inf=False))
    if length is not None and len(out) != length:
        raise OptionError(name, value, f"a list of {length} numbers")
    return out
