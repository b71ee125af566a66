"""The methods of the gallery: the demo's (the stock Trainer, ``recommended``, ``pack:...``), the peers (zclip, the
OLMo-core rule), the candidates of the exploration, ``engine:field=value,...``: a pack configuration on the
pack's DeepSpeed path, simulated in-process (:mod:`.engine_sim`: the threshold set before the step, adaptive
statistics one step behind), and the oracles, perfect detectors that know the scenario's fault:

* ``oracle``: skip exactly the fault steps (the pack's norm clipping at ``max_grad_norm``, as stock, with
  ``skip_steps`` = the fault's optimizer steps, numbered from 1 as the pack numbers them): the best any
  whole-step skip can do;
* ``oracle_micro``: drop exactly the bad micro-batches and rescale the kept gradient to their mean
  (:mod:`.oracle`, on the stock Trainer; a step with nothing kept is skipped): the best any micro-batch gate can
  do. Without accumulation (one micro-batch per step) it is a step skip.

An oracle is resolved per run (:func:`resolve`); its clean run (no fault) skips nothing: the pack's ``norm`` run
for ``oracle``, the stock run itself for ``oracle_micro`` (the same Trainer code path, bit for bit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from gradclip_hf.demo import methods as demo

__all__ = ["Method", "METHODS", "method", "resolve", "ORACLES"]

ORACLES = ("oracle", "oracle_micro")


@dataclass(frozen=True)
class Method(demo.Method):
    """A demo method, or ``kind`` ``zclip``, ``olmo``, ``engine`` (a pack configuration on the simulated
    DeepSpeed path), ``oracle`` / ``oracle_micro`` (resolved per run by :func:`resolve`) or ``drop`` (a resolved
    micro-batch oracle: ``config`` holds ``("drop", ((step, micro-batch), ...))``)."""

    PACK_KINDS: ClassVar[tuple[str, ...]] = ("pack", "engine")

    def build(self, args_kwargs: dict[str, Any], **trainer_kwargs: Any):
        from transformers import Trainer, TrainingArguments

        if self.kind == "zclip":
            trainer = Trainer(args=TrainingArguments(**args_kwargs, max_grad_norm=0.0), **trainer_kwargs)
            trainer.add_callback(_zclip_callback())
            return trainer
        if self.kind == "olmo":
            from .olmo import OlmoSkipTrainer

            return OlmoSkipTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=0.0), **trainer_kwargs)
        if self.kind == "drop":
            from .oracle import MicroDropTrainer

            return MicroDropTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=self.max_grad_norm),
                                    drop=dict(self.config or ())["drop"], **trainer_kwargs)
        if self.kind in ORACLES:
            raise ValueError(f"method {self.name!r} knows the fault: resolve it for a run first (methods.resolve).")
        if self.kind == "engine":
            from .engine_sim import EngineSimTrainer

            return EngineSimTrainer(args=TrainingArguments(**args_kwargs, max_grad_norm=1.0),
                                    clip_config=self.clip_config(), **trainer_kwargs)
        return super().build(args_kwargs, **trainer_kwargs)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.kind == "drop":
            d.update(max_grad_norm=self.max_grad_norm, drop=[list(p) for p in dict(self.config or ())["drop"]])
        return d

    def flags(self, trainer: Any, series: dict[str, list[float]]) -> tuple[list[int] | None, list[int] | None]:
        if self.kind == "olmo":
            return list(trainer.rule.skipped), list(trainer.rule.skipped)
        if self.kind == "drop":
            return sorted({t for t, _ in trainer.dropped}), list(trainer.skipped)
        return super().flags(trainer, series)

    def clip_rate(self, series: dict[str, list[float]]) -> float:
        if self.kind in ("olmo", "drop"):  # they clip at 1.0
            norms = [v for v in series["grad_norm"] if math.isfinite(v)]
            return sum(v > 1.0 for v in norms) / len(norms) if norms else math.nan
        return super().clip_rate(series)


def _pack(name: str, label: str, **config: Any) -> Method:
    return Method(name, "pack", label, config=tuple(sorted(config.items())))


_Z = dict(strategy="zscore", threshold=1.0)
_N = dict(strategy="norm", threshold=1.0)
_SKIP = dict(spike_detection="loss", spike_action="skip")
_BOTH = dict(spike_detection="both", spike_action="skip")

METHODS: dict[str, Method] = {m.name: m for m in [
    *(Method(m.name, m.kind, m.label, m.max_grad_norm, m.config) for m in demo.METHODS.values()),
    Method("zclip", "zclip", "zclip 1.0.0 (defaults)"),
    Method("olmo", "olmo", "OLMo-core rule (skip > 6 sigma of 128 steps, clip 1.0)"),
    Method("oracle", "oracle", "oracle: skip exactly the fault steps (pack norm clip at 1.0 + skip_steps)"),
    Method("oracle_micro", "oracle_micro", "oracle: drop exactly the bad micro-batches, rescale the kept ones (clip 1.0)"),
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
    # issue 25: the micro-batch gate (each micro-batch judged before its backward; the step skipped only when none
    # is kept); with one micro-batch per step it is the step skip
    _pack("rec_gate", "recommended() + micro-batch gate", **_N, **_SKIP, spike_factor=1.0, spike_adapt_after=50,
          spike_gate="micro_batch"),
    _pack("n_skip_f1_gate", "norm + loss skip, f 1, micro-batch gate", **_N, **_SKIP, spike_factor=1.0,
          spike_gate="micro_batch"),
    # issue 25.5 / 25.6: recommended() without the early-training rule (as before 25.5), and with the
    # learning-rate guard (each step's learning rate capped at 2x its running average)
    _pack("rec_no_early", "recommended() without the early rule", **_N, **_SKIP, spike_factor=1.0,
          spike_adapt_after=50, spike_early=False),
    _pack("rec_lrguard", "recommended() + lr_guard 2", **_N, **_SKIP, spike_factor=1.0, spike_adapt_after=50,
          lr_guard=2.0),
    _pack("rec_no_lrguard", "recommended() without lr_guard", **_N, **_SKIP, spike_factor=1.0, spike_adapt_after=50),
]}


def method(name: str) -> Method:
    """A named method, or ``pack:field=value,...`` / ``engine:field=value,...`` (validated by ``ClipConfig``
    now)."""
    return demo.method(name, METHODS, spec_kinds=("pack", "engine"), cls=Method)


def resolve(m: Method, sc: Any, faulted: bool, settings: Any) -> Method:
    """``m`` for one run of scenario ``sc`` (``faulted`` or its clean counterfactual) under ``settings``: an oracle
    becomes the method that skips or drops exactly what the fault hits (nothing in a clean run); any other
    method is itself."""
    if m.kind not in ORACLES:
        return m
    if m.kind == "oracle":
        steps = sc.fault_steps(settings.steps) if faulted else []
        config = (("skip_steps", tuple(t + 1 for t in steps)),) if steps else ()
        return Method(m.name, "pack", m.label, m.max_grad_norm, config=(("strategy", "norm"), *config))
    if not faulted:  # nothing to drop: the stock Trainer's run, bit for bit (the same cached run)
        return METHODS["stock"]
    bad = sc.bad_micro_batches(settings.steps, settings.batch)
    return Method(m.name, "drop", m.label, m.max_grad_norm,
                  config=(("drop", tuple((t, k) for t, ks in sorted(bad.items()) for k in ks)),))


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
