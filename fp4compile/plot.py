"""Heatmaps of the per-layer NVFP4 numerics log (matplotlib, Agg canvas; no global pyplot state).

The log is JSON lines (or CSV with the header ``step,layer,slot,stat,value``), one row per
(step, layer, GEMM operand slot, stat).
``python -m fp4compile.plot numerics.jsonl [--out DIR] [--stats snr_db,scale_zero]`` writes
``DIR/numerics_<stat>.png`` for each stat: one heatmap per slot, layers down, steps across.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from typing import Optional, Sequence

from .recipe import SLOTS

__all__ = ["FRACTIONS", "color_limits", "heatmap", "main", "plot_numerics", "read_rows", "stat_matrix"]

_KEYS = ("step", "layer", "slot", "stat", "value")


def _csv_value(text: str):
    text = text.strip()
    if text.lower() in ("", "null", "none"):
        return None
    if " " in text:
        return [int(v) if v.lstrip("-").isdigit() else float(v) for v in text.split()]
    return float(text)


def read_rows(path: str) -> list[dict]:
    """Read the rows of a numerics log: ``.csv`` by suffix, JSON lines otherwise (blank lines skipped).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming file and line for a malformed row.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"numerics file not found: {path}")
    rows = []
    with open(path, newline="") as f:
        is_csv = path.lower().endswith(".csv")
        lines = enumerate(csv.DictReader(f), start=2) if is_csv else enumerate(f, start=1)
        for lineno, line in lines:
            try:
                if is_csv:
                    row = {key: line[key] for key in _KEYS}
                    row["value"] = _csv_value(row["value"] or "")
                elif not line.strip():
                    continue
                else:
                    row = json.loads(line)
                    if not isinstance(row, dict) or not all(key in row for key in _KEYS):
                        raise ValueError(f"not a JSON object with the keys {', '.join(_KEYS)}")
                row["step"] = int(row["step"])
                row["layer"], row["slot"], row["stat"] = str(row["layer"]), str(row["slot"]), str(row["stat"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{lineno}: malformed numerics row ({error})") from error
            rows.append(row)
    return rows


def _number(value) -> Optional[float]:
    """``value`` as a float (null -> NaN), or None where it is not a scalar number (a list, a string)."""
    if value is None:
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _available(rows: Sequence[dict]) -> list[str]:
    """The stats with at least one finite numeric value, in first-appearance order."""
    numbers = ((r["stat"], _number(r["value"])) for r in rows)
    return list(dict.fromkeys(stat for stat, value in numbers if value is not None and not math.isnan(value)))


def stat_matrix(rows: Sequence[dict], stat: str, slot: str):
    """``(layers, steps, matrix)`` of ``stat`` at ``slot``: layers in first-appearance order, steps sorted,
    ``matrix[i, j]`` the value of layer i at step j (NaN where null or absent)."""
    import numpy as np

    cells = {(r["layer"], r["step"]): _number(r["value"]) for r in rows if r["stat"] == stat and r["slot"] == slot}
    cells = {key: value for key, value in cells.items() if value is not None}
    layers = list(dict.fromkeys(layer for layer, _ in cells))
    steps = sorted({step for _, step in cells})
    row_of, column_of = {layer: i for i, layer in enumerate(layers)}, {step: j for j, step in enumerate(steps)}
    matrix = np.full((len(layers), len(steps)), np.nan)
    for (layer, step), value in cells.items():
        matrix[row_of[layer], column_of[step]] = value
    return layers, steps, matrix


#: Statistics that are fractions: their colour scale starts at 0, so that a panel of zeros reads as "none".
FRACTIONS = ("scale_zero", "scale_subnormal", "elem_saturated", "scale_saturated", "top_share")


def color_limits(stat: str, matrix) -> Optional[tuple[float, float]]:
    """The colour limits of one panel, or None for matplotlib's (the data's range): fractions from 0 to their
    largest value (to 1 where every value is 0), and 0 to 1 for a panel without a value."""
    import numpy as np

    if np.isnan(matrix).all():
        return 0.0, 1.0
    if stat in FRACTIONS:
        top = float(np.nanmax(matrix))
        return 0.0, top if top > 0 else 1.0
    return None


def heatmap(rows: Sequence[dict], stat: str, path: str, title: Optional[str] = None) -> str:
    """Write one PNG at ``path`` with a heatmap of ``stat`` (layers x steps) per slot that has it; returns ``path``."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    available = _available(rows)
    if stat not in available:
        raise ValueError(f"no numeric rows for stat {stat!r}; available stats: {', '.join(available) or 'none'}")
    rows = [r for r in rows if r["stat"] == stat]
    seen = dict.fromkeys(r["slot"] for r in rows if _number(r["value"]) is not None)
    slots = [s for s in SLOTS if s in seen] + [s for s in seen if s not in SLOTS]
    ncols = min(len(slots), 3)
    nrows = math.ceil(len(slots) / ncols)
    n_layers = max(len(stat_matrix(rows, stat, s)[0]) for s in slots)
    figure = Figure(figsize=(5.5 * ncols, nrows * max(2.5, 1.2 + 0.22 * n_layers)), dpi=100)
    FigureCanvasAgg(figure)
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    for i, slot in enumerate(slots):
        layers, steps, matrix = stat_matrix(rows, stat, slot)
        axes = figure.add_subplot(nrows, ncols, i + 1)
        image = axes.imshow(np.ma.masked_invalid(matrix), aspect="auto", interpolation="nearest", cmap=cmap)
        limits = color_limits(stat, matrix)
        if limits is not None:
            image.set_clim(*limits)
        figure.colorbar(image, ax=axes, label=stat)
        ticks = range(0, len(steps), max(1, math.ceil(len(steps) / 8)))
        axes.set_xticks(list(ticks), [str(steps[j]) for j in ticks])
        axes.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 12 else 9)
        axes.set_xlabel("step")
        axes.set_title(slot)
    figure.suptitle((title or f"{stat} per layer and step") + " (grey: null or missing)")
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, format="png")
    return path


def plot_numerics(
    path: str, out_dir: str, stats: Sequence[str] = ("snr_db", "scale_zero"), strict: bool = False
) -> list[str]:
    """Write ``out_dir/numerics_<stat>.png`` for each of ``stats`` with numeric data in the log at ``path``.

    Stats without data are skipped with a warning (with ``strict``, any raises); ``ValueError`` listing the
    available stats if none has data. Returns the paths written.
    """
    rows = read_rows(path)
    available = _available(rows)
    missing = [stat for stat in stats if stat not in available]
    if missing and (strict or len(missing) == len(stats)):
        raise ValueError(
            f"{path}: no numeric rows for stat {', '.join(missing)}; available stats: {', '.join(available)}"
        )
    for stat in missing:
        warnings.warn(f"{path}: no numeric rows for stat {stat!r}, skipped", stacklevel=2)
    name = os.path.basename(path)
    return [
        heatmap(rows, stat, os.path.join(out_dir, f"numerics_{stat}.png"), title=f"{stat} per layer and step: {name}")
        for stat in stats
        if stat in available
    ]


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI: ``python -m fp4compile.plot LOG [--out DIR] [--stats a,b]``; errors exit with status 2."""
    parser = argparse.ArgumentParser(prog="python -m fp4compile.plot", description=__doc__.splitlines()[0])
    parser.add_argument("log", help="numerics log (.jsonl, or .csv)")
    parser.add_argument("--out", help="output directory (default: the log's directory)")
    parser.add_argument("--stats", help="comma-separated stats to plot, all required (default: snr_db,scale_zero)")
    args = parser.parse_args(argv)
    stats = [s for s in (args.stats or "snr_db,scale_zero").split(",") if s]
    out_dir = args.out or os.path.dirname(os.path.abspath(args.log))
    try:
        paths = plot_numerics(args.log, out_dir, stats, strict=bool(args.stats))
    except (OSError, ValueError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    for p in paths:
        print(p)


if __name__ == "__main__":
    main()
