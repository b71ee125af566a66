"""``GradClipper``: one call per optimizer step that measures, decides, clips and reports.

It selects the parameters to clip (trainable only, exclusions, per-group strategies), computes each
group's norms once with foreach kernels, scales the threshold by the schedule (and any factor, e.g. the
spike controller's), guards against non-finite gradients in EVERY gradient the optimizer will apply
(selected or not), and returns a :class:`ClipReport` of device tensors. Nothing leaves the device unless
the caller asks (``report.to_floats()``, one transfer) or ``nonfinite="raise"`` is chosen.

Like torch's ``get_total_norm`` and ``clip_grads_with_norm_`` it works in two public steps:
:meth:`GradClipper.plan` measures, decides and updates the statistics, and :meth:`GradClipper.apply_` writes the
multipliers into the gradients (:meth:`GradClipper.clip_` does both). Between them, a caller whose optimizer can
take the multiplier in its own pass (a fused torch optimizer divides by ``grad_scale = 1/coef``; see
:class:`gradclip_hf.run.LocalStep`) asks ``apply_(report, hand_off=True)`` for it instead: one write pass fewer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import torch
from torch import Tensor, nn

from ._checks import OptionError, StateError, check_bool, check_choice, check_int, check_patterns
from .gate import GateStep
from .nonfinite import NonFiniteGradientError, NonFinitePolicy, zero_if_
from .norms import GradNorms, combine_norms, grad_norms
from .schedules import Schedule
from .report import ClipReport, Pending
from .spikes import SpikeController, SpikeDecision
from .strategies import ClipOutcome, ClipStrategy, scale_grads_

__all__ = ["GradClipper", "ClipGroup", "ClipReport", "NonFinitePolicy", "NonFiniteGradientError"]

Parameters = Union[nn.Module, Iterable[nn.Parameter], Iterable[tuple[str, nn.Parameter]]]
DEFAULT_GROUP = "default"


@dataclass(frozen=True)
class ClipGroup:
    """Parameters whose name matches one of ``patterns`` (regular expressions, ``re.search``), clipped with
    their own ``strategy`` (own threshold, own statistics). Example: ``ClipGroup("embeddings", [r"embed_tokens"],
    NormClip(5.0))``."""

    name: str
    patterns: Sequence[str]
    strategy: ClipStrategy

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == DEFAULT_GROUP:
            raise OptionError("name", self.name, f"a non-empty string other than {DEFAULT_GROUP!r}")
        patterns = check_patterns("patterns", self.patterns)
        if not patterns:
            raise OptionError("patterns", self.patterns, "a non-empty list of regular expressions")
        object.__setattr__(self, "patterns", tuple(patterns))
        if not isinstance(self.strategy, ClipStrategy):
            raise OptionError("strategy", self.strategy, "a ClipStrategy")


class _Measured(NamedTuple):
    group: str
    strategy: ClipStrategy
    names: list[str]
    params: list[nn.Parameter]
    grads: list[Tensor]
    norms: GradNorms


class _Selection(NamedTuple):
    groups: dict[str, list[tuple[str, nn.Parameter]]]
    others: list[nn.Parameter]  # not measured nor clipped, but guarded against NaN/Inf


def _named(parameters: Parameters) -> list[tuple[str, nn.Parameter]]:
    if isinstance(parameters, nn.Module):
        return list(parameters.named_parameters())
    if isinstance(parameters, Tensor):
        return [("param_0", parameters)]
    items = list(parameters)
    if items and isinstance(items[0], tuple):
        return [(str(n), p) for n, p in items]
    return [(f"param_{i}", p) for i, p in enumerate(items)]


def _rescaled(m: _Measured, rescale: Tensor) -> _Measured:
    """A group as the micro-batch gate's rescale makes it: the norms scaled; an element-wise strategy's gradients
    too, in place (the one pass the gate adds, for these strategies only: they clip the elements themselves)."""
    if not m.strategy.scalar:
        scale_grads_(m.grads, rescale)
    return m._replace(norms=m.norms.scaled(rescale))


class GradClipper:
    """Clip gradients once per optimizer step with a strategy, a schedule and parameter groups.

    Args:
        strategy: the strategy of the default group (every selected parameter not in a ``groups`` entry).
        schedule: multiplier of every threshold as a function of the step; ``None`` for 1.0.
        groups: :class:`ClipGroup` entries; a parameter goes to the first group whose pattern matches.
        exclude: regular expressions (``re.search`` on parameter names); matching parameters are neither
            measured nor clipped (still guarded against NaN/Inf), e.g. ``[r"bias$", r"norm", r"embed"]``.
        include: if given (non-empty), only parameters matching one of these are measured and clipped.
        trainable_only: only parameters with ``requires_grad`` (LoRA adapters under PEFT).
        nonfinite: a :class:`NonFinitePolicy` value.
        spikes: a :class:`SpikeController`; its factor multiplies every threshold, spike steps stay out of
            adaptive statistics, and ``clip_`` then takes the step ``loss``.
        foreach: passed to the norm computation (``None``: foreach kernels where supported).

    Example::

        clipper = GradClipper(ZScoreClip(z_thresh=2.5), schedule=Cosine(1.0, 0.3, total_steps=1000))
        for step, batch in enumerate(loader):
            model(**batch).loss.backward()
            report = clipper.clip_(model, step=step)
            if not report.skip.item():       # a host read; only needed with nonfinite="skip"
                optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(self, strategy: ClipStrategy, schedule: Schedule | None = None, *,
                 groups: Sequence[ClipGroup] = (), exclude: Sequence[str] = (),
                 include: Sequence[str] | None = None, trainable_only: bool = True,
                 nonfinite: str | NonFinitePolicy = NonFinitePolicy.SKIP, spikes: SpikeController | None = None,
                 foreach: bool | None = None):
        if not isinstance(strategy, ClipStrategy):
            raise OptionError("strategy", strategy, "a ClipStrategy (NormClip, ValueClip, AGC, ZScoreClip, "
                              "QuantileClip, MeasureOnly)")
        if schedule is not None and not callable(schedule):
            raise OptionError("schedule", schedule, "a Schedule, a callable step -> float, or None")
        self.strategy, self.schedule = strategy, schedule
        self.groups = tuple(groups)
        self._check_groups()
        self.exclude = tuple(check_patterns("exclude", exclude))
        self.include = None if include is None else tuple(check_patterns("include", include, nonempty=True))
        self._exclude = [re.compile(p) for p in self.exclude]
        self._include = None if self.include is None else [re.compile(p) for p in self.include]
        self._group_patterns = [(g.name, [re.compile(p) for p in g.patterns]) for g in self.groups]
        self.trainable_only = check_bool("trainable_only", trainable_only)
        self.nonfinite = check_choice("nonfinite", nonfinite, NonFinitePolicy)
        if spikes is not None and not isinstance(spikes, SpikeController):
            raise OptionError("spikes", spikes, "a SpikeController or None")
        self.spikes = spikes
        self.foreach = foreach
        self._selection_key: tuple[Any, ...] | None = None
        self._selection: _Selection | None = None

    def _check_groups(self) -> None:
        for group in self.groups:
            if not isinstance(group, ClipGroup):
                raise OptionError("groups", group, "a list of ClipGroup entries")
            if group.strategy.norm_type != self.strategy.norm_type:
                raise OptionError("groups", group.name, f"groups with the default strategy's norm_type "
                                  f"({self.strategy.norm_type}), not {group.strategy.norm_type}")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise OptionError("groups", names, "groups with unique names")

    # ----------------------------------------------------------------- parameter selection
    def _group_of(self, name: str, param: nn.Parameter) -> str | None:
        if self.trainable_only and not param.requires_grad:
            return None
        if self._include is not None and not any(p.search(name) for p in self._include):
            return None
        if any(p.search(name) for p in self._exclude):
            return None
        return next((g for g, pats in self._group_patterns if any(p.search(name) for p in pats)), DEFAULT_GROUP)

    def select(self, parameters: Parameters) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Map each group name (``"default"`` last) to its ``(name, parameter)`` list."""
        return self._select(parameters).groups

    def _select(self, parameters: Parameters) -> _Selection:
        named = _named(parameters)
        key = tuple((id(p), p.requires_grad) for _, p in named)  # (un)freezing changes the selection
        if key != self._selection_key:
            groups: dict[str, list[tuple[str, nn.Parameter]]] = {g.name: [] for g in self.groups}
            groups[DEFAULT_GROUP] = []
            others = []
            for name, param in named:
                group = self._group_of(name, param)
                (groups[group].append((name, param)) if group is not None else others.append(param))
            self._selection_key, self._selection = key, _Selection(groups, others)
        return self._selection

    def strategy_of(self, group: str) -> ClipStrategy:
        return self.strategy if group == DEFAULT_GROUP else next(g.strategy for g in self.groups if g.name == group)

    def scale_at(self, step: int) -> float:
        """The schedule's multiplier at ``step`` (1.0 without a schedule)."""
        return 1.0 if self.schedule is None else float(self.schedule(step))

    def base_threshold(self, step: int) -> float | None:
        """The default strategy's threshold times the schedule at ``step``, for fixed-threshold strategies."""
        base = self.strategy.base_threshold
        return None if base is None else base * self.scale_at(step)

    # ----------------------------------------------------------------- the step
    def _measure(self, selection: _Selection) -> tuple[list[_Measured], list[Tensor]]:
        measured = []
        for group, named in selection.groups.items():
            pairs = [(n, p) for n, p in named if p.grad is not None]
            if pairs:
                strategy = self.strategy_of(group)
                grads = [p.grad for _, p in pairs]
                measured.append(_Measured(group, strategy, [n for n, _ in pairs], [p for _, p in pairs], grads,
                                          grad_norms(grads, strategy.norm_type, self.foreach)))
        if not measured:
            raise ValueError("No selected parameter has a gradient: call clip_() after backward(), and check "
                             "`include`/`exclude`/`trainable_only` (they selected none of the parameters).")
        return measured, [p.grad for p in selection.others if p.grad is not None]

    @staticmethod
    def _nonfinite(norm: Tensor, others: list[Tensor]) -> Tensor:
        nonfinite = ~torch.isfinite(norm)
        if others:  # the max-abs norm of the rest: NaN/Inf propagate, large finite values cannot overflow
            nonfinite = nonfinite | ~torch.isfinite(grad_norms(others, float("inf")).total.to(norm.device))
        return nonfinite

    def _raise_if(self, nonfinite: Tensor, norm: Tensor, step: int) -> None:
        if self.nonfinite is NonFinitePolicy.RAISE and bool(nonfinite):  # host read: this policy's price
            raise NonFiniteGradientError(
                f"step {step}: a gradient holds NaN or Inf (the measured norm is {norm.item()}); no gradient was "
                f"changed. Pass nonfinite='skip' to skip such steps, 'zero' to zero their gradients, or 'ignore' "
                f"to leave them to a GradScaler.")

    @torch.no_grad()
    def plan(self, parameters: Parameters, step: int, *, loss: Tensor | None = None,
             factor: float | Tensor = 1.0, observe: Tensor | None = None, gate: GateStep | None = None) -> ClipReport:
        """Measure the gradients of ``parameters`` and decide their clip, once per optimizer step, after backward
        (and after unscaling fp16 gradients): the norms, the spike controller, the thresholds and the
        statistics. No scalar multiplier is written yet (:meth:`apply_` does, or the caller hands it to the
        optimizer); element-wise strategies (``ValueClip``, ``AGC``) clip their group in place here.

        Args:
            parameters: a module, parameters, or ``(name, parameter)`` pairs.
            step: optimizer steps done before this one (drives the schedule).
            loss: the step loss (0-dim tensor, mean over micro-batches) for the spike controller.
            factor: extra multiplier of the thresholds, float or 0-dim tensor.
            observe: 0-dim bool tensor; False keeps this step out of adaptive statistics.
            gate: the micro-batch gate's step (:meth:`~.gate.MicroBatchGate.close`): the gradients are the kept
                micro-batches' sum, measured and clipped as their mean (``gate.rescale``, folded into each
                scalar group's multiplier; element-wise groups and unmeasured gradients are rescaled in place);
                the spike controller judges the kept loss; a step with nothing kept stays out of the statistics.

        Raises:
            ValueError: no selected parameter has a gradient.
            NonFiniteGradientError: a NaN/Inf gradient under ``nonfinite="raise"`` (gradients untouched).
        """
        check_int("step", step, low=0)
        measured, others = self._measure(self._select(parameters))
        if gate is not None:
            measured = [_rescaled(m, gate.rescale) for m in measured]
        norm = combine_norms([m.norms.total for m in measured], self.strategy.norm_type)
        nonfinite = self._nonfinite(norm, others)
        self._raise_if(nonfinite, norm, step)
        observe = ~nonfinite if observe is None else observe & ~nonfinite
        if gate is not None:
            observe = observe & gate.kept.to(observe.device)
        decision = None
        if self.spikes is not None:
            decision = self.spikes.decide(self.spikes.observe_loss(loss, step, norm.device, gate), norm)
            factor = decision.factor * factor
            observe = observe & ~(decision.loss_spike | decision.norm_spike)
        scale = self.scale_at(step) * factor
        outcomes = {m.group: self._plan_group(m, scale, observe) for m in measured}
        zero = [g for m in measured for g in m.grads] + others if self.nonfinite is NonFinitePolicy.ZERO else None
        pending = Pending([(m.grads, outcomes[m.group]) for m in measured if m.strategy.scalar], zero, nonfinite,
                           len(measured) == 1 and measured[0].strategy.scalar and not others,
                           None if gate is None else gate.rescale, others if gate is not None else None)
        report = self._report(step, norm, nonfinite, scale, measured, outcomes, decision, pending)
        report.gate = gate
        return report

    @torch.no_grad()
    def apply_(self, report: ClipReport, *, hand_off: bool = False) -> Tensor | None:
        """Write what :meth:`plan` decided into the gradients: each scalar group's multiplier, then (under
        ``nonfinite="zero"``) zeros on a non-finite step. Once per report (a second call does nothing).

        ``hand_off=True``: when one scalar group measures every gradient, its multiplier is not written but
        returned (finite and > 0, 1 on a non-finite step; also ``report.optimizer_coef``) for an optimizer that
        applies it in its own pass (a fused torch optimizer: ``grad_scale = 1 / coef``); otherwise, and
        without ``hand_off``, it is written here and ``None`` is returned."""
        pending, report.pending = report.pending, None
        if pending is None:
            return None
        coef, rescale = None, pending.rescale
        if hand_off and pending.single:
            coef = pending.scaled[0][1].coef.to(torch.float32)
            coef = torch.where(pending.nonfinite | ~(coef > 0), torch.ones_like(coef), coef)
            coef = coef if rescale is None else coef * rescale.to(coef.device)
        else:
            for grads, outcome in pending.scaled:
                scale_grads_(grads, outcome.coef if rescale is None else outcome.coef * rescale.to(outcome.coef.device))
        if rescale is not None and pending.unmeasured:
            scale_grads_(pending.unmeasured, rescale)
        if pending.zero is not None:
            zero_if_(pending.nonfinite, pending.zero)
        report.optimizer_coef = coef
        return coef

    def clip_(self, parameters: Parameters, step: int, *, loss: Tensor | None = None,
              factor: float | Tensor = 1.0, observe: Tensor | None = None) -> ClipReport:
        """Measure and clip the gradients of ``parameters``: :meth:`plan`, then :meth:`apply_` (see them)."""
        report = self.plan(parameters, step, loss=loss, factor=factor, observe=observe)
        self.apply_(report)
        return report

    @staticmethod
    def _plan_group(m: _Measured, scale: float | Tensor, observe: Tensor) -> ClipOutcome:
        if not m.strategy.scalar:
            return m.strategy.clip_(m.grads, m.norms, scale=scale, observe=observe,
                                    params=m.params if m.strategy.needs_params else None, names=m.names)
        return m.strategy.plan(m.norms, scale=scale, observe=observe)

    def skip_of(self, nonfinite: Tensor) -> Tensor:
        """The core's own answer for a step with these non-finite flags: skip its update (``nonfinite="skip"``)."""
        return nonfinite if self.nonfinite is NonFinitePolicy.SKIP else torch.zeros_like(nonfinite)

    def _report(self, step: int, norm: Tensor, nonfinite: Tensor, scale: float | Tensor, measured: list[_Measured],
                outcomes: dict[str, ClipOutcome], decision: SpikeDecision | None, pending: Pending) -> ClipReport:
        device = norm.device
        main = outcomes.get(DEFAULT_GROUP, next(iter(outcomes.values())))
        per_tensor = [m.norms.per_tensor.to(device) for m in measured]
        return ClipReport(
            step=step, norm=norm, nonfinite=nonfinite, skip=self.skip_of(nonfinite),
            norm_post=combine_norms([o.norm_post for o in outcomes.values()], self.strategy.norm_type),
            threshold=main.threshold, coef=main.coef,
            clipped=torch.stack([o.clipped.to(device) for o in outcomes.values()]).any(),
            scale=scale.to(device=device, dtype=torch.float32) if isinstance(scale, Tensor)
            else torch.full((), scale, device=device),
            names=[n for m in measured for n in m.names],
            per_tensor_norms=per_tensor[0] if len(per_tensor) == 1 else torch.cat(per_tensor),
            groups=outcomes, spike=decision, pending=pending)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state of every group's strategy and of the spike controller."""
        state = {DEFAULT_GROUP: self.strategy.state_dict()}
        state.update({g.name: g.strategy.state_dict() for g in self.groups})
        return {"strategies": state, "spikes": self.spikes.state_dict() if self.spikes is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; raises :class:`StateError` naming a field that does not
        fit this clipper (a different strategy, groups or spike settings)."""
        if not isinstance(state, dict):
            raise StateError("clipper", state, "a dict")
        strategies = state.get("strategies")
        expected = {DEFAULT_GROUP, *(g.name for g in self.groups)}
        if not isinstance(strategies, dict) or set(strategies) != expected:
            got = sorted(strategies) if isinstance(strategies, dict) else strategies
            raise StateError("strategies", got, f"a dict with the groups {sorted(expected)}")
        for group, strategy_state in strategies.items():
            try:
                self.strategy_of(group).load_state_dict(strategy_state)
            except StateError as error:
                raise error.within(f"strategies.{group}") from None
            except ValueError as error:  # a state of another kind of strategy
                raise StateError(f"strategies.{group}", strategy_state, f"a state of "
                                 f"{type(self.strategy_of(group)).__name__} ({error})") from None
        if self.spikes is not None:
            spikes = state.get("spikes") or {}
            if not isinstance(spikes, dict):
                raise StateError("spikes", spikes, "a dict (the spike controller's state)")
            for name in ("loss_detector", "norm_detector"):
                if spikes.get(name) is not None and not isinstance(spikes[name], dict):
                    raise StateError(f"spikes.{name}", spikes[name], "a dict (the detector's state)")
            try:
                self.spikes.load_state_dict(spikes)
            except StateError as error:
                raise error.within("spikes") from None

    def __repr__(self) -> str:
        return (f"GradClipper(strategy={self.strategy!r}, schedule={self.schedule!r}, groups={list(self.groups)!r}, "
                f"exclude={self.exclude!r}, include={self.include!r}, nonfinite={self.nonfinite.value!r})")
