"""Option checks shared by the core and ``ClipConfig``: ONE validation layer, ONE error type.

Every bad option, whatever the mistake (a wrong type, a value out of range, an unknown choice), raises
:class:`OptionError`, which names the option, the value and what is allowed. It subclasses both
``ValueError`` and ``TypeError`` (as numpy's ``AxisError`` subclasses ``ValueError`` and ``IndexError``),
so either ``except`` catches it. Integrations that expose an option under another name (``clip_threshold``
for ``threshold``) rename it with :meth:`OptionError.renamed`, from the structured fields, not the text.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any, Callable, TypeVar

E = TypeVar("E", bound=Enum)
FLOAT32_MAX = 3.4028234663852886e38
MAX_WINDOW = 1_000_000  # sizes of device buffers (histories, warmups): above this a typo, not a window
INT64_MAX = 2**63 - 1  # the largest count a device tensor holds
PREFIX = "clip_"  # how GradClipTrainingArguments, the command line and the Axolotl YAML name the options


class OptionError(ValueError, TypeError):
    """A bad option: ``` `name` must be <allowed>, got <value>. ```

    Attributes:
        name: the option as the user wrote it (after :meth:`renamed`).
        value: the rejected value.
        allowed: what is allowed, in words.
    """

    def __init__(self, name: str, value: Any, allowed: str, note: str = ""):
        self.name, self.value, self.allowed, self.note = name, value, allowed, note
        super().__init__(f"`{name}` must be {allowed}, got {shown(value)}." + (f" {note}" if note else ""))

    def renamed(self, rename: Callable[[str], str]) -> "OptionError":
        """The same error for an option exposed under ``rename(name)`` (e.g. ``clip_`` + name)."""
        return OptionError(rename(self.name), self.value, self.allowed, self.note)


def shown(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for a message: at most ``limit`` characters (a rejected value may be huge)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of more than 4300 digits, a very deep container
        text = f"<{type(value).__name__} that cannot be shown>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UnknownOptionError(OptionError):
    """An option name that does not exist: ``` `name` is not an option of <owner>; did you mean ...? ```"""

    def __init__(self, name: Any, owner: str, known: Iterable[str], prefixed: bool = False):
        self.name, self.value, self.owner, self.note = name, name, owner, ""
        self.allowed = f"an option of {owner}"
        Exception.__init__(self, f"`{name}` is not an option of {owner}{suggest(name, list(known), prefixed)}")

    def renamed(self, rename: Callable[[str], str]) -> "OptionError":
        return self


def _closest(name: str, known: Sequence[str]) -> str | None:
    found = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return found[0] if found else None


def suggest(name: Any, known: Sequence[str], prefixed: bool = False, form: str = "`{}`",
            fallback: str = " (the options: docs/options.md).") -> str:
    """The end of an "unknown option" message: the closest known name (``difflib``), or where the ``clip_``
    prefix is wrong for this entry point (``prefixed``: whether it names the options ``clip_<option>``).
    ``form`` shows a name (``"--{}"`` on a command line); ``fallback``: the end when nothing is close."""
    if not isinstance(name, str):
        return " (option names are strings)."
    bare = name.replace("-", "_").lstrip("_")
    if not prefixed and bare.startswith(PREFIX):
        match = bare[len(PREFIX):] if bare[len(PREFIX):] in known else _closest(bare[len(PREFIX):], known)
        if match:
            return (f": the `{PREFIX}` prefix is for GradClipTrainingArguments, the command line and the Axolotl YAML; "
                    f"here the option is {form.format(match)}.")
    if prefixed and not bare.startswith(PREFIX):
        clip = [k for k in known if k.startswith(PREFIX)]
        match = PREFIX + bare if PREFIX + bare in known else _closest(PREFIX + bare, clip)
        if match:
            return f"; did you mean {form.format(match)}? (here the clipping options take the `{PREFIX}` prefix)"
    match = _closest(bare, known)
    return f"; did you mean {form.format(match)}?" if match else fallback


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_inclusive: bool = True, high_inclusive: bool = True, allow_inf: bool = False,
                 optional: bool = False) -> float | None:
    """``float(value)``: a real number (not a bool), finite in float32 unless ``allow_inf``, in range."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(name, value, "a number" + (" or None" if optional else ""))
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise OptionError(name, value, f"a finite number (at most {FLOAT32_MAX:.4g}, the float32 maximum)") from None
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
        got = "nothing (missing)" if value is _MISSING else shown(value)
        super().__init__(f"saved gradclip state field `{field}` must be {allowed}, got {got}{where}.")

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
    if check is check_int and kwargs.get("high") is None:  # a count held by a device tensor (int64)
        kwargs["high"] = INT64_MAX
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
