"""Charts any run can get without W&B (matplotlib, imported when a chart is drawn; the ``Agg`` backend).

:func:`norms_chart` draws the pre-clip gradient norm against the clip threshold over optimizer steps (log
y): the chart of ``gradclip-hf report`` and of the demo's ``norms.png``.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

__all__ = ["norms_chart"]

Series = Optional[Sequence[Optional[float]]]


def _positive(values: Sequence[Optional[float]]) -> list[float]:
    """Values a log axis can show; anything else (None, NaN, Inf, <= 0) becomes a gap."""
    return [v if v is not None and math.isfinite(v) and v > 0 else math.nan for v in values]


def _at(steps: Sequence[int], norms: Sequence[Optional[float]], marks: Sequence[int],
        recorded: Optional[Mapping[int, float]] = None) -> tuple[list, list, list]:
    """Marks at the norm recorded for their step (``recorded``: the spike file's), else at their step's plotted
    norm, else (``unplaced``) at the top of the axes."""
    by_step = dict(zip(steps, _positive(norms)))
    by_step.update({s: v for s, v in zip(recorded or {}, _positive(list((recorded or {}).values())))
                    if not math.isnan(v)})
    placed = [(s, by_step[s]) for s in marks if not math.isnan(by_step.get(s, math.nan))]
    unplaced = [s for s in marks if math.isnan(by_step.get(s, math.nan))]
    return [s for s, _ in placed], [y for _, y in placed], unplaced


def _marks(ax, steps, norms, spikes, skipped, nonfinite, spike_norms=None) -> None:
    top = ax.get_xaxis_transform()  # x in steps, y in axes fraction
    xs, ys, unplaced = _at(steps, norms, sorted(set(spikes)), spike_norms)
    if xs:
        ax.scatter(xs, ys, marker="v", s=60, color="red", zorder=5, label="spike (at its pre-clip norm)")
    if unplaced:
        ax.scatter(unplaced, [0.97] * len(unplaced), marker="v", s=60, color="red", zorder=5, transform=top,
                   label=None if xs else "spike (norm not logged)")
    for i, step in enumerate(sorted(set(skipped))):
        ax.axvspan(step - 0.5, step + 0.5, color="tab:purple", alpha=0.25, lw=0,
                   label="update skipped (the optimizer got nothing)" if i == 0 else None)
    if nonfinite:
        ax.scatter(sorted(set(nonfinite)), [0.03] * len(set(nonfinite)), marker="x", s=50, color="black", zorder=5,
                   transform=top, label="non-finite norm")


def _series(ax, steps, norms, threshold, norm_post, norm_max) -> None:
    ax.plot(steps, _positive(norms), lw=0.9, color="tab:gray", label="pre-clip norm (grad_norm)")
    if norm_max is not None and any(v is not None for v in norm_max):
        ax.plot(steps, _positive(norm_max), ".", ms=3, color="tab:brown", label="window max (gradclip/norm_max)")
    if norm_post is not None and any(v is not None for v in norm_post):
        ax.plot(steps, _positive(norm_post), lw=0.9, color="tab:green", label="post-clip norm")
    if isinstance(threshold, (int, float)):
        if 0 < threshold < math.inf:
            ax.axhline(threshold, lw=1.2, color="tab:orange", ls="--", label=f"threshold {threshold:g}")
    elif threshold is not None:
        ax.plot(steps, _positive(threshold), lw=1.2, color="tab:orange", ls="--", label="threshold")


def norms_chart(path: str, steps: Sequence[int], norms: Sequence[Optional[float]], *,
                threshold: Union[None, float, Sequence[Optional[float]]] = None, norm_post: Series = None,
                norm_max: Series = None, spikes: Sequence[int] = (), skipped: Sequence[int] = (),
                nonfinite: Sequence[int] = (), spike_norms: Optional[Mapping[int, float]] = None,
                lines: Optional[Mapping[str, Sequence[int]]] = None,
                title: str = "gradient norms and threshold", dpi: int = 100) -> str:
    """Write a PNG of the pre-clip norm vs the threshold over optimizer ``steps``; return ``path``.

    Args:
        steps, norms: the logged steps and their pre-clip norms (``grad_norm``); NaN/Inf/None are gaps.
        threshold: a constant (a horizontal line) or one value per step (a dashed curve); None: no line.
        norm_post: post-clip norms per step (``gradclip/norm_post``), drawn when given; ``None`` at a step whose
            update was skipped (the optimizer got nothing: a gap, not the threshold).
        norm_max: the largest norm of each logging window (``gradclip/norm_max``), dots, when windows are
            longer than one step.
        spikes: steps of detected spikes: red triangles at the norm ``spike_norms`` records for the step (the
            spike file's), else at the step's logged norm, else at the top of the chart.
        skipped: steps whose update was skipped: shaded.  nonfinite: steps with a NaN/Inf norm: crosses.
        lines: ``{label: steps}`` drawn as dotted vertical lines (the demo's injected batches).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    try:
        _series(ax, steps, norms, threshold, norm_post, norm_max)
        for label, where in (lines or {}).items():
            for i, step in enumerate(where):
                ax.axvline(step, color="black", ls=":", lw=0.9, label=label if i == 0 else None)
        _marks(ax, list(steps), norms, spikes, skipped, nonfinite, spike_norms)
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("gradient norm")
        ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path
