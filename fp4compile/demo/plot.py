"""Training-loss plot of ``fp4compile train`` (matplotlib, Agg canvas; no global pyplot state)."""

from __future__ import annotations

import math
import os
from typing import Mapping, Optional, Sequence

__all__ = ["moving_average", "plot_losses", "plot_results"]


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


def plot_losses(
    curves: Mapping[str, Sequence[float]],
    path: str,
    title: str,
    smooth: int = 0,
    bands: Optional[Mapping[str, tuple[Sequence[float], Sequence[float]]]] = None,
    unit: str = "byte",
) -> str:
    """Draw every recipe's per-step training loss on one plot and save it as a PNG at ``path``.

    With a ``bf16`` curve among several, a second panel below shows each other recipe's smoothed loss
    minus bf16's (the curves of the first panel lie on top of each other at this scale).

    Args:
        curves: recipe name -> training loss per step (nats per byte).
        path: the PNG to write (its directory is created).
        title: the plot title.
        smooth: with ``smooth > 1`` the raw curves are drawn faintly and a trailing mean over
            ``smooth`` steps on top of them; the default picks about 1/20 of the run.
        bands: recipe name -> (lowest, highest) curve over several seeds, drawn (smoothed) as a shaded band
            around the recipe's curve (the mean over the seeds).
        unit: what the loss is per (``byte``, or ``token`` with a tokenizer).

    Returns:
        ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with_gap = "bf16" in curves and len(curves) > 1
    figure = Figure(figsize=(8, 7.5 if with_gap else 5), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(2, 1, 1) if with_gap else figure.add_subplot()
    longest = max((len(c) for c in curves.values()), default=0)
    window = smooth if smooth > 0 else max(1, longest // 20)
    smoothed = {name: moving_average(list(losses), window) for name, losses in curves.items()}
    for i, (name, losses) in enumerate(curves.items()):
        color = f"C{i % 10}"
        steps = range(len(losses))
        if bands and name in bands:
            low, high = (moving_average(list(b), window) for b in bands[name])
            axes.fill_between(range(len(low)), low, high, color=color, alpha=0.2, linewidth=0)
        if window > 1:
            axes.plot(steps, losses, color=color, alpha=0.25, linewidth=0.8)
            axes.plot(steps, smoothed[name], color=color, linewidth=1.6, label=name)
        else:
            axes.plot(steps, losses, color=color, linewidth=1.4, label=name)
    axes.set_xlabel("step")
    axes.set_ylabel(f"training loss (nats/{unit})")
    axes.set_title(title + (f"\n(faint: per step; solid: mean of the last {window} steps)" if window > 1 else ""))
    axes.grid(True, alpha=0.3)
    if curves:
        axes.legend()
    if with_gap:
        gap_axes = figure.add_subplot(2, 1, 2, sharex=axes)
        base = smoothed["bf16"]
        for i, name in enumerate(curves):
            if name == "bf16":
                continue
            n = min(len(base), len(smoothed[name]))
            gap = [a - b for a, b in zip(smoothed[name][:n], base[:n])]
            gap_axes.plot(range(n), gap, color=f"C{i % 10}", linewidth=1.4, label=name)
        gap_axes.axhline(0.0, color="C0", linewidth=1.0, label="bf16")
        gap_axes.set_xlabel("step")
        gap_axes.set_ylabel(f"loss - bf16 loss (mean of last {window})" if window > 1 else "loss - bf16 loss")
        gap_axes.grid(True, alpha=0.3)
        gap_axes.legend()
    figure.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_results(results_json: str, path: str) -> str:
    """Draw the ``loss.png`` of a ``fp4compile train`` run from its ``results.json`` (the train command does so too)."""
    import json

    with open(results_json) as f:
        results = json.load(f)
    grouped: dict[str, list[list[float]]] = {}
    for name, run in results["runs"].items():
        recipe = run.get("recipe", name)
        label = recipe + (" +osci" if run.get("osci_reset") is not None else "")
        grouped.setdefault(label, []).append([math.nan if v is None else v for v in run["train_loss"]])
    curves, bands = {}, {}
    for label, runs in grouped.items():  # several seeds: the mean, with the min .. max band
        n = min(len(r) for r in runs)
        curves[label] = [sum(r[i] for r in runs) / len(runs) for i in range(n)]
        if len(runs) > 1:
            bands[label] = ([min(r[i] for r in runs) for i in range(n)], [max(r[i] for r in runs) for i in range(n)])
    params = results["config"]["params"]
    device = results["config"]["device"]
    seeds = results["config"].get("seeds", 1)
    data = "--data text" if results["config"].get("data") else "Python stdlib source"
    model = "model of --hf-config" if results["config"].get("hf_config") else "GPT"
    level = "token-level" if results["config"].get("tokenizer") else "byte-level"
    title = f"{level} {model} ({params / 1e6:.2f}M params) on {data}, {device}"
    if seeds > 1:
        title += f"\nmean of {seeds} seeds (band: min .. max)"
    unit = "token" if results["config"].get("tokenizer") else "byte"
    return plot_losses(curves, path, title=title, bands=bands, unit=unit)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m fp4compile.demo.plot RESULTS_JSON OUT_PNG")
    try:
        print(plot_results(sys.argv[1], sys.argv[2]))
    except (OSError, ValueError) as error:  # a file that cannot be read or written, or is not JSON
        raise SystemExit(f"python -m fp4compile.demo.plot: error: {error}") from error
