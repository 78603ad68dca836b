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

__all__ = ["FINAL_WINDOW", "previous_runs", "results_table", "run_key", "split_key", "write_results"]

#: Steps whose mean training loss is a run's final training loss.
FINAL_WINDOW = 10


def run_key(recipe: str, seed: int, seeds: int) -> str:
    """The key of one run in ``results.json``: the recipe, or ``recipe@seed`` when the run has several seeds."""
    return recipe if seeds == 1 else f"{recipe}@{seed}"


def split_key(key: str) -> tuple[str, Optional[int]]:
    """``(recipe, seed)`` of a run key (seed None for a single-seed run)."""
    recipe, _, seed = key.partition("@")
    return recipe, (int(seed) if seed else None)


def _gap_pct(key: str, runs: dict[str, RecipeRun]) -> Optional[float]:
    """The validation gap of run ``key`` to the bf16 run of the same seed, in percent (None without one)."""
    recipe, seed = split_key(key)
    base_key = "bf16" if seed is None else f"bf16@{seed}"
    if base_key not in runs:
        return None
    base = runs[base_key].val_loss
    return 100.0 * (runs[key].val_loss - base) / base


def _osci_summary(history: list[dict]) -> str:
    """``"12 in 3 resets of 40,960"``: weight elements reset in all of a run's resets, and how many each tracked."""
    if not history:
        return "no reset ran"
    reset = sum(r["reset"] for r in history)
    return f"{reset:,} in {len(history)} resets of {history[-1]['tracked']:,}"


def _seed_summary(runs: dict[str, RecipeRun]) -> str:
    """The table of a several-seed run: per recipe the mean (and spread, min to max) over the seeds."""
    by_recipe: dict[str, list[str]] = {}
    for key in runs:
        by_recipe.setdefault(split_key(key)[0], []).append(key)
    header = ["recipe", "seeds", f"train loss (last {FINAL_WINDOW})", "val loss", "vs bf16 (val), mean",
              "vs bf16 (val), min .. max", "tokens/s"]  # fmt: skip
    rows = []
    for recipe, keys in by_recipe.items():

        def mean(values):
            return sum(values) / len(values)

        gaps = [g for g in (_gap_pct(k, runs) for k in keys) if g is not None and math.isfinite(g)]
        row = [recipe, str(len(keys)), f"{mean([runs[k].final_train_loss for k in keys]):.4f}",
               f"{mean([runs[k].val_loss for k in keys]):.4f}"]  # fmt: skip
        if recipe == "bf16" or not gaps:
            row += ["-", "-"]
        else:
            row += [f"{mean(gaps):+.2f} %", f"{min(gaps):+.2f} .. {max(gaps):+.2f} %"]
        row.append(f"{mean([runs[k].tokens_per_s for k in keys]):,.0f}")
        rows.append(row)
    return format_table(header, rows, align="<" + ">" * (len(header) - 1))


def results_table(runs: dict[str, RecipeRun]) -> str:
    """The final table: recipe, final train loss, val loss, val gap to bf16 (when bf16 ran), tokens/s, the first
    step's seconds, and OsciReset's resets (when it ran); for several seeds, means and spreads per recipe."""
    if any(split_key(key)[1] is not None for key in runs):
        return _seed_summary(runs)
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
            row.append("-" if name == "bf16" else f"{_gap_pct(name, runs):+.2f} %")
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
            "unit": corpus.unit,
            "train_bytes": len(corpus.train),  # elements of the split: bytes, or tokens with --tokenizer
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
                "recipe": split_key(name)[0],
                "seed": config.seed if split_key(name)[1] is None else split_key(name)[1],
                "gap_to_bf16_pct": _finite_or_none(_gap_pct(name, runs)),
                "tokens_per_s": _finite_or_none(run.tokens_per_s),
                "first_step_s": _finite_or_none(run.first_step_s),
                "wall_s": run.wall_s,
                "init_sha256": run.init_sha256,
                "diverged": run.diverged,
                "osci_reset": run.osci_reset,
                "outlier_channels": run.outlier_channels,
            }
            for name, run in runs.items()
        },
        "environment": environment(config.device),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
    return payload


def _resume_config(config: dict) -> dict:
    """What must match for runs to be reused: the configuration without its seed count, run statistics and the
    numerics monitor (which leaves training bit-identical)."""
    return {k: v for k, v in config.items() if k not in ("seeds", "params", "wall_s", "monitor", "monitor_dir")}


def previous_runs(path: str, config: TrainConfig) -> tuple[dict, str]:
    """The runs of an earlier ``results.json`` at ``path`` that this configuration can reuse (JSON, by run key),
    and a line saying what happened to the file: reused, absent, or of another configuration (then it is
    renamed to ``results.previous.json``, so nothing is lost, and nothing is reused)."""
    if not os.path.exists(path):
        return {}, ""
    try:
        with open(path) as f:
            previous = json.load(f)
        same = _resume_config(previous["config"]) == _resume_config(json.loads(json.dumps(dataclasses.asdict(config))))
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same:
        moved = os.path.join(os.path.dirname(path), "results.previous.json")
        os.replace(path, moved)
        return {}, f"{path} holds another configuration's runs: moved to {moved}, training from scratch"
    runs = previous.get("runs", {})
    return runs, f"resuming: {len(runs)} run(s) already in {path} are kept"
