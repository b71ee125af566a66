"""The methods a demo run can use: the stock Trainer (``none``: no clipping, ``stock``: ``max_grad_norm=1.0``) and
pack configurations (``recommended``, or ``pack:field=value,field=value`` with :class:`~gradclip_hf.ClipConfig`
fields: ``pack:strategy=norm,threshold=1.0,spike_detection=loss,spike_action=skip``). ``recommended`` is whatever
:meth:`ClipConfig.recommended` returns when the run starts. The benchmark gallery adds its peers and candidates
(``benchmarks/harness/methods.py``).

A :class:`Method` is a name, how to build its Trainer, and what its run flagged and clipped.
"""

from __future__ import annotations

import ast
import math
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Method", "METHODS", "method", "pack_config"]


@dataclass(frozen=True)
class Method:
    """``kind``: ``trainer`` (stock ``Trainer`` at ``max_grad_norm``) or ``pack`` (``GradClipTrainer`` with
    ``ClipConfig(**config)``, or ``ClipConfig.recommended()`` when ``config`` is ``None``)."""

    PACK_KINDS: ClassVar[tuple[str, ...]] = ("pack",)

    name: str
    kind: str
    label: str = ""
    max_grad_norm: float = 1.0
    config: tuple[tuple[str, Any], ...] | None = None

    @property
    def is_pack(self) -> bool:
        """A pack configuration."""
        return self.kind in self.PACK_KINDS

    def clip_config(self):
        from ..config import ClipConfig

        if not self.is_pack:
            raise ValueError(f"method {self.name!r} is not a pack configuration.")
        return ClipConfig.recommended() if self.config is None else ClipConfig(**dict(self.config))

    def describe(self) -> dict[str, Any]:
        d = {"name": self.name, "kind": self.kind, "label": self.label or self.name}
        if self.is_pack:
            from ..config import ClipConfig

            default = ClipConfig().to_dict()
            d["config"] = {k: v for k, v in self.clip_config().to_dict().items() if default.get(k) != v}
        elif self.kind == "trainer":
            d["max_grad_norm"] = self.max_grad_norm
        return d

    def build(self, args_kwargs: dict[str, Any], **trainer_kwargs: Any):
        """The Trainer of this method; ``args_kwargs`` become its ``TrainingArguments`` (``max_grad_norm`` is set
        here)."""
        from transformers import Trainer, TrainingArguments

        if self.kind == "trainer":
            return Trainer(args=TrainingArguments(**args_kwargs, max_grad_norm=self.max_grad_norm), **trainer_kwargs)
        if self.kind != "pack":
            raise ValueError(f"method {self.name!r}: kind {self.kind!r} is not 'trainer' or 'pack'.")
        from ..integrations.transformers import GradClipTrainer

        return GradClipTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0), clip_config=self.clip_config(),
                               **trainer_kwargs)

    def flags(self, trainer: Any, series: dict[str, list[float]]) -> tuple[list[int] | None, list[int] | None]:
        """(steps flagged as spikes, steps whose update was skipped), 0-based; ``None`` where the method has no such
        thing."""
        if self.is_pack:
            return ([t for t, v in enumerate(series["spikes"]) if v > 0],
                    [t for t, v in enumerate(series["skipped"]) if v > 0])
        return None, None

    def clip_rate(self, series: dict[str, list[float]]) -> float:
        """The share of steps clipped (``nan``: not known)."""
        if self.is_pack:
            post, pre = series["norm_post"], series["grad_norm"]
            clipped = [b < a * (1 - 1e-6) for a, b in zip(pre, post) if math.isfinite(a) and math.isfinite(b)]
            return sum(clipped) / len(clipped) if clipped else math.nan
        if self.kind == "trainer":
            norms = [v for v in series["grad_norm"] if math.isfinite(v)]
            return sum(v > 1.0 for v in norms) / len(norms) if self.max_grad_norm > 0 and norms else 0.0
        return math.nan


def pack_config(name: str, label: str, **config: Any) -> Method:
    """A named pack configuration."""
    return Method(name, "pack", label, config=tuple(sorted(config.items())))


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("none", "trainer", "no clipping (max_grad_norm=0)", max_grad_norm=0.0),
    Method("stock", "trainer", "stock max_grad_norm=1.0", max_grad_norm=1.0),
    Method("recommended", "pack", "gradclip-hf ClipConfig.recommended()"),
]}


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def method(name: str, methods: dict[str, Method] = METHODS, spec_kinds: tuple[str, ...] = ("pack",),
           cls: type[Method] = Method) -> Method:
    """A method of ``methods``, or ``<kind>:field=value,...`` for a kind of ``spec_kinds`` (validated by
    ``ClipConfig`` now)."""
    if name in methods:
        return methods[name]
    kind, sep, spec = name.partition(":")
    if sep and kind in spec_kinds:
        config = {}
        for part in filter(None, spec.split(",")):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"method {name!r}: {part!r} is not field=value.")
            config[key.strip()] = _value(value.strip())
        m = cls(name, kind, name, config=tuple(sorted(config.items())))
        m.clip_config()
        return m
    specs = ", ".join(f"'{k}:field=value,...'" for k in spec_kinds)
    raise ValueError(f"unknown method {name!r}: one of {sorted(methods)} or {specs}.")
