"""The demo's charts: ``loss.png`` (each method with and without the fault, and the gap between them) and
``norms.png`` (the pack's run: pre- and post-clip norm, threshold, flagged spikes, skipped updates)."""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

__all__ = ["plot", "smooth"]

COLORS = {"none": "tab:red", "stock": "tab:blue", "gradclip": "tab:green"}


def smooth(values: list[float], window: int = 9) -> list[float]:
    """Trailing mean over ``window`` finite values (nan where there are none)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1):i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else math.nan)
    return out


def _shade(ax, fault_steps: list[int], label: bool = False) -> None:
    for i, s in enumerate(fault_steps):
        ax.axvspan(s + 0.5, s + 1.5, color="red", alpha=0.18, lw=0, label="fault" if label and i == 0 else None)


def _pair(runs: list[dict[str, Any]], key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return (next(r for r in runs if r["key"] == key and r["faulted"]),
            next(r for r in runs if r["key"] == key and not r["faulted"]))


def _loss_chart(result: dict[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    runs, steps = result["runs"], result["fault_steps"]
    keys = list(dict.fromkeys(r["key"] for r in runs))
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, len(keys), height_ratios=[3, 2])
    top = [fig.add_subplot(grid[0, i]) for i in range(len(keys))]
    for ax in top[1:]:
        ax.sharey(top[0])
    gap_ax = fig.add_subplot(grid[1, :])
    rows = {r["key"]: r for r in result["summary"]["rows"]}
    for ax, key in zip(top, keys):
        faulted, clean = _pair(runs, key)
        x = range(1, len(clean["series"]["loss"]) + 1)
        fault_free = [math.nan if t in steps else v for t, v in enumerate(faulted["series"]["loss"])]
        ax.plot(x, smooth(clean["series"]["loss"]), color="0.45", lw=1.3, label="without the fault")
        ax.plot(x, smooth(fault_free), color=COLORS.get(key, "tab:purple"), lw=1.5, label="with the fault")
        _shade(ax, steps, label=True)
        ax.set_title(f"{faulted['label']}\ndamage {rows[key]['damage']:+.4f} eval loss", fontsize=9)
        ax.set_xlabel("optimizer step")
        gap = [a - b for a, b in zip(faulted["series"]["loss"], clean["series"]["loss"])]
        gap = [math.nan if t in steps else v for t, v in enumerate(gap)]
        gap_ax.plot(x, smooth(gap), color=COLORS.get(key, "tab:purple"), lw=1.4, label=faulted["label"])
    finite = [v for r in runs for t, v in enumerate(r["series"]["loss"]) if t >= len(r["series"]["loss"]) // 5
              and math.isfinite(v) and t not in steps]
    if finite:
        top[0].set_ylim(min(finite) * 0.95, statistics.median(finite) * 1.6)
    top[0].set_ylabel("training loss (9-step mean)")
    top[0].legend(fontsize=8)
    gap_ax.axhline(0, color="black", lw=0.7)
    _shade(gap_ax, steps)
    gap_ax.set_ylabel("with minus without the fault")
    gap_ax.set_xlabel("optimizer step (shaded: fault steps, their own loss left out)")
    gap_ax.legend(fontsize=8)
    fig.suptitle("Training loss on the same batches, with and without the fault", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _norms_chart(result: dict[str, Any], path: str) -> None:
    import matplotlib.pyplot as plt

    pack, _ = _pair(result["runs"], "gradclip")
    s, steps = pack["series"], result["fault_steps"]
    x = range(1, len(s["grad_norm"]) + 1)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    ax.plot(x, s["grad_norm"], lw=0.9, color="tab:gray", label="pre-clip norm (grad_norm)")
    ax.plot(x, s["norm_post"], lw=0.9, color="tab:green", label="post-clip norm")
    ax.plot(x, s["threshold"], lw=1.2, color="tab:orange", ls="--", label="threshold")
    _shade(ax, steps, label=True)
    for marks, marker, color, label in ((pack["spike_steps"] or [], "v", "red", "spike flagged"),
                                        (pack["skipped_steps"] or [], "x", "black", "update skipped")):
        ys = [s["grad_norm"][t] if math.isfinite(s["grad_norm"][t]) else max(filter(math.isfinite, s["grad_norm"]))
              for t in marks]
        if marks:
            ax.scatter([t + 1 for t in marks], ys, marker=marker, s=60, color=color, zorder=5, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"{pack['label']}, run with the fault: gradient norms and threshold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot(result: dict[str, Any], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    paths = [os.path.join(out, "loss.png"), os.path.join(out, "norms.png")]
    _loss_chart(result, paths[0])
    _norms_chart(result, paths[1])
    return paths
