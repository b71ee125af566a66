"""``GradClipper``: one call per optimizer step that measures, clips and reports.

It selects the parameters to clip (trainable only, exclusions, per-group strategies), computes each
group's norms once with foreach kernels, scales the threshold by the schedule (and any factor the
caller passes, e.g. the spike controller's), guards against non-finite gradients, and returns a
:class:`ClipReport` of device tensors. Nothing leaves the device unless the caller asks
(``report.to_floats()``, one transfer) or ``nonfinite="raise"`` is chosen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

import torch
from torch import Tensor, nn

from ._checks import check_choice, check_int
from .clippers import ClipOutcome, ClipStrategy, scale_grads_
from .norms import combine_norms, grad_norms, to_local
from .schedules import Schedule
from .spikes import SpikeController, SpikeDecision

__all__ = ["GradClipper", "ClipGroup", "ClipReport", "NonFinitePolicy", "NonFiniteGradientError"]

Parameters = Union[nn.Module, Iterable[nn.Parameter], Iterable[tuple[str, nn.Parameter]]]
DEFAULT_GROUP = "default"


class NonFinitePolicy(str, Enum):
    """What to do when the gradient norm is NaN or Inf.

    - ``skip``: report ``skip=True``; the caller must not call ``optimizer.step()`` (the Trainer
      integration does this; one host read per step).
    - ``zero``: zero all gradients of the step (no host sync; the optimizer still steps, so momentum
      and weight decay still move the weights).
    - ``raise``: raise :class:`NonFiniteGradientError` (one host read per step).
    - ``ignore``: do nothing (e.g. fp16 with a GradScaler, which skips such steps itself).
    """

    SKIP = "skip"
    ZERO = "zero"
    RAISE = "raise"
    IGNORE = "ignore"


class NonFiniteGradientError(FloatingPointError):
    """The gradient norm was NaN or Inf and ``nonfinite="raise"`` was chosen."""


@dataclass(frozen=True)
class ClipGroup:
    """Parameters whose name matches one of ``patterns`` (regular expressions, ``re.search``),
    clipped with their own ``strategy`` (own threshold, own statistics).

    Example: ``ClipGroup("embeddings", [r"embed_tokens"], NormClip(5.0))``.
    """

    name: str
    patterns: Sequence[str]
    strategy: ClipStrategy

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == DEFAULT_GROUP:
            raise ValueError(f"ClipGroup `name` must be a non-empty string other than {DEFAULT_GROUP!r}, got {self.name!r}.")
        patterns = (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns)
        if not patterns:
            raise ValueError(f"ClipGroup {self.name!r}: `patterns` is empty.")
        object.__setattr__(self, "patterns", patterns)
        _compile("patterns", patterns)
        if not isinstance(self.strategy, ClipStrategy):
            raise TypeError(f"ClipGroup {self.name!r}: `strategy` must be a ClipStrategy, got {self.strategy!r}.")


def _compile(name: str, patterns: Sequence[str]) -> list[re.Pattern]:
    try:
        return [re.compile(p) for p in patterns]
    except (re.error, TypeError) as error:
        raise ValueError(f"`{name}` holds an invalid regular expression {patterns!r}: {error}") from error


def _zero_if_(condition: Tensor, grads: list[Tensor]) -> None:
    """Zero every gradient where the 0-dim bool ``condition`` holds, without a host sync.

    ``nan_to_num_`` clears the NaN/Inf elements and :func:`scale_grads_` multiplies by ``0``/``1``:
    two cheap passes (a ``masked_fill_`` with a 0-dim mask is about 4x slower on CPU), bit-exact on
    finite steps (``x * 1 == x``). A multiply alone would keep NaN (``NaN * 0``).
    """
    for g in grads:
        to_local(g).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # DTensor: its local shard
    scale_grads_(grads, (~condition).to(torch.float32))


@dataclass
class ClipReport:
    """What :meth:`GradClipper.clip_` did at one step. Tensors are 0-dim and on the device.

    Attributes:
        step: the optimizer step.
        norm: pre-clip norm of all measured gradients.
        norm_post: post-clip norm of all measured gradients.
        threshold: threshold of the default group (after schedule and factor).
        coef: post/pre norm ratio of the default group.
        clipped: whether any group was clipped.
        nonfinite: whether the pre-clip norm was NaN or Inf.
        skip: whether the caller should skip ``optimizer.step()`` (``nonfinite`` under the ``skip`` policy).
        scale: schedule value times factor, the multiplier of the strategies' thresholds.
        names: names of the measured parameters, in the order of ``per_tensor_norms``.
        per_tensor_norms: pre-clip norm of each measured gradient (1-dim).
        groups: each group's :class:`ClipOutcome`.
        spike: the spike controller's :class:`SpikeDecision` (``None`` without a controller).
    """

    step: int
    norm: Tensor
    norm_post: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    nonfinite: Tensor
    skip: Tensor
    scale: Tensor
    names: list[str]
    per_tensor_norms: Tensor
    groups: dict[str, ClipOutcome] = field(default_factory=dict)
    spike: SpikeDecision | None = None

    SCALARS = ("norm", "norm_post", "threshold", "coef", "clipped", "nonfinite", "skip", "scale")

    def to_floats(self) -> dict[str, float]:
        """The scalar fields as Python floats, in one device-to-host transfer."""
        values = torch.stack([getattr(self, k).detach().to(torch.float64).reshape(()) for k in self.SCALARS])
        return dict(zip(self.SCALARS, values.tolist()))


class GradClipper:
    """Clip gradients once per optimizer step with a strategy, a schedule and parameter groups.

    Args:
        strategy: the strategy of the default group (every selected parameter not in a ``groups`` entry).
        schedule: multiplier of every threshold as a function of the step; ``None`` for 1.0.
        groups: :class:`ClipGroup` entries; a parameter goes to the first group whose pattern matches.
        exclude: regular expressions (``re.search`` on parameter names); matching parameters are neither
            measured nor clipped (e.g. ``[r"bias$", r"norm", r"embed"]``).
        include: if given, only parameters matching one of these are measured and clipped
            (e.g. ``[r"lora_"]``).
        trainable_only: only parameters with ``requires_grad`` (LoRA adapters under PEFT).
        nonfinite: a :class:`NonFinitePolicy` value.
        spikes: a :class:`SpikeController`; its factor multiplies every threshold, spike steps stay out
            of adaptive statistics, and ``clip_`` then needs the step ``loss``.
        foreach: passed to the norm computation (``None``: foreach kernels where supported).

    Example::

        clipper = GradClipper(ZScoreClip(z_thresh=2.5), schedule=Cosine(1.0, 0.3, total_steps=1000))
        for step, batch in enumerate(loader):
            model(**batch).loss.backward()
            report = clipper.clip_(model, step=step)
            if not report.skip.item():       # only needed with nonfinite="skip"
                optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(self, strategy: ClipStrategy, schedule: Schedule | None = None, *,
                 groups: Sequence[ClipGroup] = (), exclude: Sequence[str] = (),
                 include: Sequence[str] | None = None, trainable_only: bool = True,
                 nonfinite: str | NonFinitePolicy = NonFinitePolicy.SKIP, spikes: SpikeController | None = None,
                 foreach: bool | None = None):
        if not isinstance(strategy, ClipStrategy):
            raise TypeError(f"`strategy` must be a ClipStrategy (NormClip, ValueClip, AGC, ZScoreClip, "
                            f"QuantileClip), got {strategy!r}.")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"`schedule` must be a Schedule or a callable step -> float, got {schedule!r}.")
        self.strategy = strategy
        self.schedule = schedule
        self.groups = tuple(groups)
        for group in self.groups:
            if not isinstance(group, ClipGroup):
                raise TypeError(f"`groups` must hold ClipGroup entries, got {group!r}.")
            if group.strategy.norm_type != strategy.norm_type:
                raise ValueError(f"ClipGroup {group.name!r} uses norm_type={group.strategy.norm_type}, the "
                                 f"default strategy norm_type={strategy.norm_type}: they must be equal.")
        names = [g.name for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"`groups` names must be unique, got {names}.")
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self._exclude = _compile("exclude", self.exclude)
        self.include = None if include is None else ((include,) if isinstance(include, str) else tuple(include))
        self._include = None if self.include is None else _compile("include", self.include)
        if not isinstance(trainable_only, bool):
            raise TypeError(f"`trainable_only` must be a bool, got {trainable_only!r}.")
        self.trainable_only = trainable_only
        self.nonfinite = check_choice("nonfinite", nonfinite, NonFinitePolicy)
        if spikes is not None and not isinstance(spikes, SpikeController):
            raise TypeError(f"`spikes` must be a SpikeController or None, got {spikes!r}.")
        self.spikes = spikes
        self.foreach = foreach
        self._selection_key: tuple[int, ...] | None = None
        self._selection: dict[str, list[tuple[str, nn.Parameter]]] = {}

    # ----------------------------------------------------------------- parameter selection
    @staticmethod
    def _named(parameters: Parameters) -> list[tuple[str, nn.Parameter]]:
        if isinstance(parameters, nn.Module):
            return list(parameters.named_parameters())
        if isinstance(parameters, Tensor):
            return [("param_0", parameters)]
        items = list(parameters)
        if items and isinstance(items[0], tuple):
            return [(str(n), p) for n, p in items]
        return [(f"param_{i}", p) for i, p in enumerate(items)]

    def select(self, parameters: Parameters) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Map each group name (``"default"`` last) to its ``(name, parameter)`` list."""
        named = self._named(parameters)
        key = tuple((id(p), p.requires_grad) for _, p in named)  # (un)freezing changes the selection
        if key == self._selection_key:
            return self._selection
        selection: dict[str, list[tuple[str, nn.Parameter]]] = {g.name: [] for g in self.groups}
        selection[DEFAULT_GROUP] = []
        compiled = [(g.name, _compile("patterns", g.patterns)) for g in self.groups]
        for name, param in named:
            if self.trainable_only and not param.requires_grad:
                continue
            if self._include is not None and not any(p.search(name) for p in self._include):
                continue
            if any(p.search(name) for p in self._exclude):
                continue
            target = next((g for g, pats in compiled if any(p.search(name) for p in pats)), DEFAULT_GROUP)
            selection[target].append((name, param))
        self._selection_key, self._selection = key, selection
        return selection

    def _strategy_of(self, group: str) -> ClipStrategy:
        if group == DEFAULT_GROUP:
            return self.strategy
        return next(g.strategy for g in self.groups if g.name == group)

    # ----------------------------------------------------------------- the step
    def scale_at(self, step: int) -> float:
        """The schedule's multiplier at ``step`` (1.0 without a schedule)."""
        return 1.0 if self.schedule is None else float(self.schedule(step))

    @torch.no_grad()
    def clip_(self, parameters: Parameters, step: int, *, loss: Tensor | None = None,
              factor: float | Tensor = 1.0, observe: Tensor | None = None) -> ClipReport:
        """Measure and clip the gradients of ``parameters`` in place, after backward (and after
        unscaling fp16 gradients), once per optimizer step.

        Args:
            parameters: a module, parameters, or ``(name, parameter)`` pairs.
            step: the optimizer step (drives the schedule).
            loss: the step loss (0-dim tensor, mean over micro-batches) for the spike controller.
            factor: extra multiplier of the thresholds, float or 0-dim tensor.
            observe: 0-dim bool tensor; False keeps this step out of adaptive statistics.

        Returns:
            A :class:`ClipReport` of device tensors.

        Raises:
            ValueError: no selected parameter has a gradient.
            NonFiniteGradientError: non-finite norm under ``nonfinite="raise"``.
        """
        check_int("step", step, low=0)
        measured = []  # (group, strategy, names, params, grads, norms)
        for group, named in self.select(parameters).items():
            pairs = [(n, p) for n, p in named if p.grad is not None]
            if not pairs:
                continue
            strategy = self._strategy_of(group)
            grads = [p.grad for _, p in pairs]
            measured.append((group, strategy, [n for n, _ in pairs], [p for _, p in pairs], grads,
                             grad_norms(grads, strategy.norm_type, self.foreach)))
        if not measured:
            raise ValueError("No selected parameter has a gradient: call clip_() after backward(), and check "
                             "`include`/`exclude`/`trainable_only` (selected none of the parameters).")
        norm_type = self.strategy.norm_type
        norm = combine_norms([m[5].total for m in measured], norm_type)
        device = norm.device
        nonfinite = ~torch.isfinite(norm)

        # a non-finite step (any group) stays out of every group's statistics
        observe = ~nonfinite if observe is None else observe & ~nonfinite
        decision = None
        scale: float | Tensor = self.scale_at(step)
        if self.spikes is not None:
            decision = self.spikes.step(loss, norm, step)
            factor = decision.factor if isinstance(factor, (int, float)) and factor == 1.0 else decision.factor * factor
            observe = observe & ~decision.spike
        scale = scale * factor if isinstance(factor, Tensor) else scale * float(factor)

        outcomes: dict[str, ClipOutcome] = {}
        for group, strategy, names, params, grads, norms in measured:
            outcomes[group] = strategy.clip_(grads, norms, scale=scale, observe=observe,
                                             params=params if strategy.needs_params else None, names=names)
        norm_post = combine_norms([o.norm_post for o in outcomes.values()], norm_type)
        main = outcomes.get(DEFAULT_GROUP, next(iter(outcomes.values())))
        clipped = torch.stack([o.clipped.to(device) for o in outcomes.values()]).any()

        skip = nonfinite if self.nonfinite is NonFinitePolicy.SKIP else torch.zeros_like(nonfinite)
        if self.nonfinite is NonFinitePolicy.ZERO:
            _zero_if_(nonfinite, [g for *_, grads, _ in measured for g in grads])
        elif self.nonfinite is NonFinitePolicy.RAISE and bool(nonfinite):
            raise NonFiniteGradientError(
                f"step {step}: the gradient norm is {norm.item()}. Pass nonfinite='skip' to skip such steps, "
                f"'zero' to zero their gradients, or 'ignore' to leave them to a GradScaler.")
        per_tensor = [m[5].per_tensor.to(device) for m in measured]
        return ClipReport(step=step, norm=norm, norm_post=norm_post, threshold=main.threshold, coef=main.coef,
                          clipped=clipped, nonfinite=nonfinite, skip=skip,
                          scale=scale.to(device=device, dtype=torch.float32) if isinstance(scale, Tensor)
                          else torch.full((), scale, device=device),
                          names=[n for m in measured for n in m[2]],
                          per_tensor_norms=per_tensor[0] if len(per_tensor) == 1 else torch.cat(per_tensor),
                          groups=outcomes, spike=decision)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """JSON-safe state of every group's strategy and of the spike controller."""
        state = {DEFAULT_GROUP: self.strategy.state_dict()}
        state.update({g.name: g.strategy.state_dict() for g in self.groups})
        return {"strategies": state, "spikes": self.spikes.state_dict() if self.spikes is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (before or after the first step)."""
        strategies = state.get("strategies") if isinstance(state, dict) else None
        expected = {DEFAULT_GROUP, *(g.name for g in self.groups)}
        if not isinstance(strategies, dict) or set(strategies) != expected:
            got = sorted(strategies) if isinstance(strategies, dict) else state
            raise ValueError(f"GradClipper state must hold `strategies` for groups {sorted(expected)}, got {got!r}.")
        for group, strategy_state in strategies.items():
            self._strategy_of(group).load_state_dict(strategy_state)
        if self.spikes is not None and state.get("spikes"):
            self.spikes.load_state_dict(state["spikes"])

    def __repr__(self) -> str:
        return (f"GradClipper(strategy={self.strategy!r}, schedule={self.schedule!r}, groups={list(self.groups)!r}, "
                f"exclude={self.exclude!r}, include={self.include!r}, nonfinite={self.nonfinite.value!r})")
