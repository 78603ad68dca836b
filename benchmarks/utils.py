"""Benchmark helpers: the environment line, copy-bandwidth ceiling, JSON output, wall time with a profile.

The environment record, the tables and the median timer are the demo application's
(:mod:`fp4compile.demo.report`, also used by ``fp4compile bench`` and ``fp4compile train``); the benchmarks
import them from there.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import torch

from fp4compile.demo.report import environment, median_ms

__all__ = [
    "copy_bandwidth_gbs", "environment_line", "gpu_environment", "wall_and_profile", "wall_seconds", "write_json",
]  # fmt: skip


def environment_line(env: dict) -> str:
    """``GPU, torch X, Triton Y, CUDA Z, date``: the first line of a benchmark's output and of its ``.md`` table, from
    :func:`fp4compile.demo.report.environment`'s record."""
    return f"{env['device_name']}, torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, {env['date']}"


def gpu_environment(script: str) -> dict:
    """Exit with ``SCRIPT needs a CUDA GPU`` without one; else print :func:`environment_line` and return the record."""
    if not torch.cuda.is_available():
        raise SystemExit(f"{script} needs a CUDA GPU")
    env = environment("cuda")
    print(environment_line(env), flush=True)
    return env


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


def wall_seconds(fn: Callable[[], object], calls: int, warmup: int) -> float:
    """Mean wall seconds per call of ``fn`` over ``calls`` calls after ``warmup`` (the GPU synchronized at both
    ends): where the GPU keeps up, the host's cost of a call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def wall_and_profile(
    step: Callable[[], object], cpu: bool = False, warmup: int = 5, timed: int = 10, profiled: int = 3
):
    """Mean wall seconds per call of ``step`` (after ``warmup`` calls) and a ``torch.profiler`` run of ``profiled``
    calls (CUDA activity, plus CPU with ``cpu``)."""
    from torch.profiler import ProfilerActivity, profile

    wall = wall_seconds(step, timed, warmup)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(profiled):
            step()
        torch.cuda.synchronize()
    return wall, prof

