"""Host (CPU) time of one compiled training step, and where it goes: a model small enough that the GPU idles.

Run on a GPU:  python -m benchmarks.profile_host_step [--model llama] [--layers 2] [--batch 1] [--recipes bf16,nvidia]
               [--inductor NAME=VALUE ...] [--rows 40] [--out DIR]

In torch.compile's default mode a step whose kernels finish before the host has enqueued the next ones is bound
by the host: Python, dispatch and kernel launches. ``bench_train_step`` reports the host time of a full-size step,
which includes the time the host waits when the launch queue is full; here the model is cut down (``--layers``,
``--batch``) so that the GPU is idle most of the time and a step's wall time is its host time. For each recipe
(bf16: plain Inductor; others: ``backend="nvfp4"``, same mode and Inductor patches): 20 steps timed after 5
warm-up steps, then a cProfile of 10 steps (which slows the host down), its top ``--rows`` functions by own time
and by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from benchmarks.bench_train_step import MODELS, _patch, make_step
from benchmarks.utils import wall_seconds


def profile(step, steps: int = 10, rows: int = 40) -> str:
    """cProfile of ``steps`` steps: the top ``rows`` functions by own time, then by cumulative time."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--recipes", default="bf16,nvidia", help="comma-separated; bf16 is plain Inductor")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--inductor", action="append", default=[], type=_patch, metavar="NAME=VALUE",
                        help="an Inductor config patch for every variant (repeatable)")  # fmt: skip
    parser.add_argument("--rows", type=int, default=40, help="rows of each cProfile table")
    parser.add_argument("--out", default=None, help="also write the report to DIR/profile_host_step.txt")
    args = parser.parse_args()
    report = []
    for recipe in args.recipes.split(","):
        _, step = make_step(recipe, args.batch, args.mode, args.model, layers=args.layers,
                            inductor=dict(args.inductor))  # fmt: skip
        ms = wall_seconds(step, calls=20, warmup=5) * 1e3
        line = f"{recipe}: {ms:.2f} ms per step ({args.model}, {args.layers} blocks, batch {args.batch}, {args.mode})"
        print(line, flush=True)
        report += [line, profile(step, rows=args.rows)]
    if args.out:
        with open(f"{args.out}/profile_host_step.txt", "w") as f:
            f.write("\n".join(report))


if __name__ == "__main__":
    main()
