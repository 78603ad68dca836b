"""Where the time of one quantized linear fwd+bwd goes: CUDA kernel times from torch.profiler.

Run on a GPU:  python -m benchmarks.profile_linear [--recipe nvidia] [--shape 4096x4096] [--compiled]

Recipes with ``outliers`` run past their warm-up (OutControl's channels selected, the Hot-Channel Patch's first
scoring done), so that the outlier path itself is profiled. ``--compiled`` profiles the linear under
``torch.compile`` (Inductor, default mode), where the kernel table lists Inductor's fused kernels by name.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.utils import wall_and_profile
from fp4compile.demo.bench import _steady_outlier_state
from fp4compile.linear import nvfp4_linear
from fp4compile.recipe import Recipe

TOKENS = 8192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="nvidia")
    parser.add_argument("--shape", default="4096x4096", help="in x out")
    parser.add_argument("--rows", type=int, default=25, help="rows of the kernel table")
    parser.add_argument("--compiled", action="store_true", help="the linear under torch.compile (Inductor)")
    args = parser.parse_args()
    d_in, d_out = map(int, args.shape.split("x"))
    x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * d_in**-0.5).requires_grad_()
    dy = torch.randn(TOKENS, d_out, device="cuda", dtype=torch.bfloat16)

    recipe = Recipe.named(args.recipe)
    state = _steady_outlier_state(recipe, d_in, "cuda") if recipe.outliers is not None else None

    def linear(x, w):
        return nvfp4_linear(x, w, None, args.recipe, outlier_state=state)

    forward = torch.compile(linear, fullgraph=True) if args.compiled else linear

    def step():
        x.grad = w.grad = None
        forward(x, w).backward(dy)

    wall, prof = wall_and_profile(step)
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events) / 3
    mode = "compiled" if args.compiled else "eager"
    print(f"{args.recipe} {args.shape} ({mode}): wall {wall * 1e3:.3f} ms/step, CUDA kernels {kernel_us / 1e3:.3f} ms")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
