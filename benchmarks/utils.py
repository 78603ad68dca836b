"""Shared benchmark helpers: environment record, copy-bandwidth ceiling, timing with rotated inputs."""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from typing import Callable, Sequence

import torch
import triton
from triton.testing import do_bench

__all__ = ["environment", "copy_bandwidth_gbs", "median_ms", "write_json", "format_table", "markdown_table"]


def environment() -> dict:
    """GPU name, library versions and the date, for the results record."""
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def median_ms(fn: Callable[[int], object], n_inputs: int = 1, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """Median time of ``fn(i)`` in ms; ``i`` cycles over ``n_inputs`` input sets so none stays in L2."""
    counter = iter(range(10**9))

    def call() -> None:
        fn(next(counter) % n_inputs)

    return do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def copy_bandwidth_gbs(nbytes: int = 2**31) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda i: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` as indented JSON, creating the directory."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned columns."""
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (for pasting into RESULTS.md unchanged)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def wall_and_profile(
    step: Callable[[], object], cpu: bool = False, warmup: int = 5, timed: int = 10, profiled: int = 3
):
    """Mean wall seconds per call of ``step`` (after ``warmup`` calls) and a ``torch.profiler`` run of ``profiled``
    calls (CUDA activity, plus CPU with ``cpu``)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / timed
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    return wall, prof

