"""Training-loss plot of ``fp4compile train`` (matplotlib, Agg canvas; no global pyplot state)."""

from __future__ import annotations

import os
from typing import Mapping, Sequence

__all__ = ["moving_average", "plot_losses"]


def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values (the first points average what there is so far)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(curves: Mapping[str, Sequence[float]], path: str, title: str, smooth: int = 0) -> str:
    """Draw every recipe's per-step training loss on one plot and save it as a PNG at ``path``.

    Args:
        curves: recipe name -> training loss per step (nats per byte).
        path: the PNG to write (its directory is created).
        title: the plot title.
        smooth: with ``smooth > 1`` the raw curves are drawn faintly and a trailing mean over
            ``smooth`` steps on top of them; the default picks about 1/20 of the run.

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    longest = max((len(c) for c in curves.values()), default=0)
    window = smooth if smooth > 0 else max(1, longest // 20)
    for i, (name, losses) in enumerate(curves.items()):
        color = f"C{i % 10}"
        steps = range(len(losses))
        if window > 1:
            axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(steps, moving_average(list(losses), window), color=color, linewidth=1.6, label=name)
        else:
            axes.plot(steps, losses, color=color, linewidth=1.4, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (nats/byte)")
    axes.set_title(title + (f"\n(faint: per step; solid: mean of the last {window} steps)" if window > 1 else ""))
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png")
    return path
