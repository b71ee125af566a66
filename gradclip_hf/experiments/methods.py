"""The methods a run can use: the stock Trainer, peers (zclip, the OLMo-core rule) and pack configurations.

A :class:`Method` is a name and how to build its Trainer. ``METHODS`` holds the named ones; any other
pack configuration is written ``pack:field=value,field=value`` with :class:`~gradclip_hf.ClipConfig`
fields (``pack:strategy=norm,threshold=1.0,spike_detection=loss,spike_action=skip``). ``recommended``
is whatever :meth:`ClipConfig.recommended` returns when the run starts. ``engine:field=value,...`` is the same
configuration on the pack's DeepSpeed path, simulated in-process (:mod:`.engine_sim`: the threshold set
before the step, adaptive statistics one step behind).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

__all__ = ["Method", "METHODS", "method", "build_trainer"]


@dataclass(frozen=True)
class Method:
    """``kind``: ``trainer`` (stock ``Trainer`` at ``max_grad_norm``), ``zclip``, ``olmo``, ``pack``
    (``GradClipTrainer`` with ``ClipConfig(**config)``, or ``ClipConfig.recommended()`` when ``config`` is
    ``None``) or ``engine`` (that configuration on the simulated DeepSpeed path)."""

    name: str
    kind: str
    label: str = ""
    max_grad_norm: float = 1.0
    config: tuple[tuple[str, Any], ...] | None = None

    @property
    def is_pack(self) -> bool:
        """A pack configuration (``pack``, or ``engine``: the same on the simulated DeepSpeed path)."""
        return self.kind in ("pack", "engine")

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


def _pack(name: str, label: str, **config: Any) -> Method:
    return Method(name, "pack", label, config=tuple(sorted(config.items())))


_Z = dict(strategy="zscore", threshold=1.0)
_N = dict(strategy="norm", threshold=1.0)
_SKIP = dict(spike_detection="loss", spike_action="skip")
_BOTH = dict(spike_detection="both", spike_action="skip")

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("none", "trainer", "no clipping (max_grad_norm=0)", max_grad_norm=0.0),
    Method("stock", "trainer", "stock max_grad_norm=1.0", max_grad_norm=1.0),
    Method("zclip", "zclip", "zclip 1.0.0 (defaults)"),
    Method("olmo", "olmo", "OLMo-core rule (skip > 6 sigma of 128 steps, clip 1.0)"),
    Method("recommended", "pack", "gradclip-hf ClipConfig.recommended()"),
    # the candidates of the exploration (explicit, whatever recommended() becomes): z = zscore capped at 1.0,
    # n = norm at 1.0; skip on a loss spike ("both": loss or gradient-norm spike); f = spike_factor (threshold
    # multiplier after a spike, 1 = no tightening), hl = spike_relax_half_life, z4/z8 = spike_z, w = warmup
    _pack("zscore", "zscore cap 1.0 (no spike detection)", **_Z),
    _pack("z_skip", "zscore + loss skip, f 0.5, hl 20 (recommended() before)", **_Z, **_SKIP),
    _pack("z_skip_f1", "zscore + loss skip, f 1", **_Z, **_SKIP, spike_factor=1.0),
    _pack("z_skip_hl5", "zscore + loss skip, f 0.5, hl 5", **_Z, **_SKIP, spike_relax_half_life=5.0),
    _pack("z_skip_both", "zscore + loss/norm skip, f 0.5", **_Z, **_BOTH),
    _pack("z_skip_both_f1", "zscore + loss/norm skip, f 1", **_Z, **_BOTH, spike_factor=1.0),
    _pack("n_skip", "norm + loss skip, f 0.5", **_N, **_SKIP),
    _pack("n_skip_f1", "norm + loss skip, f 1", **_N, **_SKIP, spike_factor=1.0),
    _pack("n_skip_hl5", "norm + loss skip, f 0.5, hl 5", **_N, **_SKIP, spike_relax_half_life=5.0),
    _pack("n_tighten", "norm + loss tighten (no skip), f 0.5", **_N, spike_detection="loss", spike_action="tighten"),
    _pack("n_skip_both", "norm + loss/norm skip, f 0.5", **_N, **_BOTH),
    _pack("n_skip_both_f08", "norm + loss/norm skip, f 0.8", **_N, **_BOTH, spike_factor=0.8),
    _pack("n_skip_both_hl5", "norm + loss/norm skip, f 0.5, hl 5", **_N, **_BOTH, spike_relax_half_life=5.0),
    _pack("n_skip_both_f1", "norm + loss/norm skip, f 1", **_N, **_BOTH, spike_factor=1.0),
    _pack("n_skip_both_f1_z4", "norm + loss/norm skip, f 1, z 4", **_N, **_BOTH, spike_factor=1.0, spike_z=4.0),
    _pack("n_skip_both_f1_z8", "norm + loss/norm skip, f 1, z 8", **_N, **_BOTH, spike_factor=1.0, spike_z=8.0),
    _pack("n_skip_both_f1_w50", "norm + loss/norm skip, f 1, warmup 50", **_N, **_BOTH, spike_factor=1.0,
          spike_warmup_steps=50),
]}


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def method(name: str) -> Method:
    """A named method, or ``pack:field=value,...`` (validated by ``ClipConfig`` now)."""
    if name in METHODS:
        return METHODS[name]
    kind, sep, spec = name.partition(":")
    if sep and kind in ("pack", "engine"):
        config = {}
        for part in filter(None, spec.split(",")):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"method {name!r}: {part!r} is not field=value.")
            config[key.strip()] = _value(value.strip())
        m = Method(name, kind, name, config=tuple(sorted(config.items())))
        m.clip_config()
        return m
    raise ValueError(f"unknown method {name!r}: one of {sorted(METHODS)}, 'pack:field=value,...' or "
                     f"'engine:field=value,...'.")


def _zclip_callback():
    from transformers import TrainerCallback
    from zclip import ZClip

    class ZClipCallback(TrainerCallback):
        """zclip 1.0.0 with its defaults, called just before ``optimizer.step()``."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.zclip = ZClip()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.zclip.step(model)

    return ZClipCallback()


def build_trainer(m: Method, args_kwargs: dict[str, Any], **trainer_kwargs: Any):
    """The Trainer of method ``m``; ``args_kwargs`` become its ``TrainingArguments`` (``max_grad_norm``
    is set here)."""
    from transformers import Trainer, TrainingArguments

    if m.kind == "trainer":
        return Trainer(args=TrainingArguments(**args_kwargs, max_grad_norm=m.max_grad_norm), **trainer_kwargs)
    if m.kind == "zclip":
        trainer = Trainer(args=TrainingArguments(**args_kwargs, max_grad_norm=0.0), **trainer_kwargs)
        trainer.add_callback(_zclip_callback())
        return trainer
    if m.kind == "olmo":
        from .olmo import OlmoSkipTrainer

        return OlmoSkipTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=0.0), **trainer_kwargs)
    if m.kind == "engine":
        from .engine_sim import EngineSimTrainer

        return EngineSimTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0), clip_config=m.clip_config(),
                                **trainer_kwargs)
    from ..integrations.transformers import GradClipTrainer

    return GradClipTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0), clip_config=m.clip_config(),
                           **trainer_kwargs)
