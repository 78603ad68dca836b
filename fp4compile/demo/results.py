"""``results.json`` and the results table of ``fp4compile train`` (layout in ``train.py``'s docstring)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import TYPE_CHECKING, Optional

from .report import environment, format_table

if TYPE_CHECKING:
    from .corpus import Corpus
    from .train import RecipeRun, TrainConfig

__all__ = ["FINAL_WINDOW", "results_table", "write_results"]

#: Steps whose mean training loss is a run's final training loss.
FINAL_WINDOW = 10


def _gap_pct(run: RecipeRun, runs: dict[str, RecipeRun]) -> Optional[float]:
    if "bf16" not in runs:
        return None
    base = runs["bf16"].val_loss
    return 100.0 * (run.val_loss - base) / base


def _osci_summary(history: list[dict]) -> str:
    """``"12 in 3 resets of 40,960"``: weight elements reset in all of a run's resets, and how many each tracked."""
    if not history:
        return "no reset ran"
    reset = sum(r["reset"] for r in history)
    return f"{reset:,} in {len(history)} resets of {history[-1]['tracked']:,}"


def results_table(runs: dict[str, RecipeRun]) -> str:
    """The final table: recipe, final train loss, val loss, val gap to bf16 (when bf16 ran), tokens/s, the first
    step's seconds, and OsciReset's resets (when it ran)."""
    with_gap = "bf16" in runs
    header = ["recipe", f"train loss (last {FINAL_WINDOW})", "val loss"]
    header += ["vs bf16 (val)"] if with_gap else []
    header += ["tokens/s", "1st step s"]
    with_osci = any(run.osci_reset is not None for run in runs.values())
    header += ["OsciReset resets"] if with_osci else []
    rows = []
    for name, run in runs.items():
        row = [name + (" +osci" if run.osci_reset is not None else ""), f"{run.final_train_loss:.4f}"]
        row.append(f"{run.val_loss:.4f}")
        if with_gap:
            row.append("-" if name == "bf16" else f"{_gap_pct(run, runs):+.2f} %")
        row += [f"{run.tokens_per_s:,.0f}", f"{run.first_step_s:.1f}"]
        if with_osci:
            row.append("-" if run.osci_reset is None else _osci_summary(run.osci_reset))
        if run.diverged:
            row[0] += " (diverged)"
        rows.append(row)
    return format_table(header, rows, align="<" + ">" * (len(header) - 1))


def _finite_or_none(value: float) -> Optional[float]:
    return value if value is not None and math.isfinite(value) else None


def write_results(
    path: str, config: TrainConfig, corpus: Corpus, runs: dict[str, RecipeRun], params: int, wall_s: float
) -> dict:
    """Write ``results.json`` (layout in the module docstring) and return what was written."""
    payload = {
        "config": {**dataclasses.asdict(config), "params": params, "wall_s": wall_s},
        "corpus": {
            "root": corpus.root,
            "train_bytes": len(corpus.train),
            "val_bytes": len(corpus.val),
            "train_files": list(corpus.train_files),
            "val_files": list(corpus.val_files),
        },
        "runs": {
            name: {
                "train_loss": [_finite_or_none(v) for v in run.train_loss],
                "final_train_loss": _finite_or_none(run.final_train_loss),
                "val_loss": _finite_or_none(run.val_loss),
                "val_curve": [[s, _finite_or_none(v)] for s, v in run.val_curve],
                "gap_to_bf16_pct": _finite_or_none(_gap_pct(run, runs)),
                "tokens_per_s": _finite_or_none(run.tokens_per_s),
                "first_step_s": _finite_or_none(run.first_step_s),
                "wall_s": run.wall_s,
                "init_sha256": run.init_sha256,
                "diverged": run.diverged,
                "osci_reset": run.osci_reset,
            }
            for name, run in runs.items()
        },
        "environment": environment(config.device),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
    return payload
