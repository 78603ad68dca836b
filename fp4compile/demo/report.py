"""What the demo commands and ``benchmarks/`` report with: the run's environment, tables and a median timer.

- :func:`environment`: library versions, the device's name, CPU threads and the date, for a results file;
- :func:`format_table` (and :func:`format_row`, one line of it): a plain-text table with a rule under the header;
- :func:`markdown_table`: the same as GitHub markdown;
- :func:`median_ms`: the median time of a call, rotating over input sets (``triton.testing.do_bench`` on CUDA).
"""

from __future__ import annotations

import datetime
import itertools
import platform
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

__all__ = ["device_name", "environment", "format_row", "format_table", "markdown_table", "median_ms"]

#: The most calls :func:`median_ms` makes in its warm-up, and again timed, without a GPU.
_MAX_CPU_CALLS = 1000


def device_name(device: str) -> str:
    """The GPU's name for ``"cuda"``; else the CPU's model name (from ``/proc/cpuinfo`` where there is one)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def environment(device: Optional[str] = None) -> dict:
    """Library versions, the device and its name, CPU threads and the date and time, for a results file.

    Args:
        device: ``"cpu"`` or ``"cuda"`` (default: ``"cuda"`` where a GPU is available, else ``"cpu"``).

    Returns:
        ``torch``, ``triton``, ``fp4compile``, ``python``, ``device``, ``device_name``, ``cuda`` (torch's CUDA
        version, None in a CPU build), ``threads`` (torch's CPU threads) and ``date`` (ISO 8601, to the second,
        with the UTC offset).
    """
    from .. import __version__

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "torch": torch.__version__,
        "triton": _triton_version(),
        "fp4compile": __version__,
        "python": platform.python_version(),
        "device": device,
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def format_row(cells: Sequence[object], widths: Sequence[int], align: str = ">", sep: str = "  ") -> str:
    """One line of a :func:`format_table`: ``str()`` of each cell padded to its column's width.

    Args:
        cells: one per column.
        widths: the columns' widths; a longer cell is not cut (the line grows).
        align: ``"<"`` (left) or ``">"`` (right) per column, or one character for every column.
        sep: the text between two columns.
    """
    if len(cells) != len(widths):
        raise ValueError(f"{len(cells)} cells for {len(widths)} columns: {list(cells)}")
    if len(align) == 1:
        align = align * len(widths)
    if len(align) != len(widths) or set(align) - {"<", ">"}:
        raise ValueError(f"align must be '<' or '>', once or once per column ({len(widths)}), got {align!r}")
    padded = (str(c).ljust(w) if a == "<" else str(c).rjust(w) for c, w, a in zip(cells, widths, align))
    return sep.join(padded)


def format_table(
    header: Sequence[object],
    rows: Sequence[Sequence[object]],
    align: str = ">",
    widths: Optional[Sequence[int]] = None,
    sep: str = "  ",
) -> str:
    """A plain-text table: the header, a rule of dashes under each column, one line per row.

    Args:
        header: the column titles.
        rows: the cells of each row (``str()`` of each).
        align: ``"<"`` (left) or ``">"`` (right) per column, or one character for every column (default: all right).
        widths: the least width of each column (default: as wide as its longest title or cell).
        sep: the text between two columns (the rule runs on through it where ``sep`` is empty).
    """
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    least = [0] * len(header) if widths is None else list(widths)
    for row in [least, *cells[1:]]:
        if len(row) != len(header):
            raise ValueError(f"{len(row)} widths or cells for {len(header)} columns: {row}")
    widths = [max(w, *(len(row[i]) for row in cells)) for i, w in enumerate(least)]
    lines = [format_row(row, widths, align, sep) for row in cells]
    lines.insert(1, sep.join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(header: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table (for pasting into a README or RESULTS.md unchanged)."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def median_ms(fn: Callable[[int], object], n_inputs: int = 1, warmup_ms: int = 25, rep_ms: int = 200) -> float:
    """The median time of one call ``fn(i)`` in milliseconds.

    ``i`` cycles over ``range(n_inputs)``, so that a benchmark can rotate over ``n_inputs`` input sets and none
    stays in the L2 cache; ``fn`` may ignore it. With a CUDA GPU the calls are timed by
    ``triton.testing.do_bench`` (CUDA events, the L2 cache flushed before each call); without one by the wall
    clock. Either way about ``warmup_ms`` of calls run untimed first, then about ``rep_ms`` of timed calls (without
    a GPU at most 1,000 of each).
    """
    if n_inputs < 1:
        raise ValueError(f"n_inputs must be at least 1, got {n_inputs}")
    counter = itertools.count()

    def call() -> None:
        fn(next(counter) % n_inputs)

    if torch.cuda.is_available():
        from triton.testing import do_bench

        return do_bench(call, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    start = time.perf_counter()
    call()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(min(int(warmup_ms / estimate_ms), _MAX_CPU_CALLS)):
        call()
    times = []
    for _ in range(min(max(1, int(rep_ms / estimate_ms)), _MAX_CPU_CALLS)):
        tic = time.perf_counter()
        call()
        times.append((time.perf_counter() - tic) * 1e3)
    return statistics.median(times)
