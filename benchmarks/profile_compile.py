"""Where the first (compiling) step's time goes: a cProfile of it, summed by compile phase.

Run on a GPU:  python -m benchmarks.profile_compile [--model llama] [--layers 2] [--recipe nvidia] [--out DIR]

The first optimizer step of ``bench_train_step``'s model (fewer blocks with ``--layers``) runs under
cProfile. Reported: the wall time, the cumulative time of the phases that dominate a compile (Dynamo,
AOTAutograd, Inductor lowering and code generation, Triton compilation, and the TTIR generation that
``torch.library.triton_op`` tracing runs per kernel launch for its mutation analysis) with their call
counts, and the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time

import torch

from benchmarks.bench_train_step import make_step

#: (label, file suffix, function name): the phases summed in the report.
PHASES = [
    ("Dynamo frame conversion", "_dynamo/convert_frame.py", "_compile"),
    ("AOTAutograd + Inductor (whole)", "_functorch/aot_autograd.py", "aot_module_simplified"),
    ("Inductor compile_fx_inner", "_inductor/compile_fx.py", "compile_fx_inner"),
    ("Inductor lowering (GraphLowering.run)", "_inductor/graph.py", "run"),
    ("Inductor scheduler + codegen", "_inductor/graph.py", "codegen"),
    ("TTIR for mutation analysis", "_higher_order_ops/triton_kernel_wrap.py", "generate_ttir"),
    ("  of which get_mutated_tensors", "_higher_order_ops/triton_kernel_wrap.py", "get_mutated_tensors"),
    ("Triton make_ir", "triton/compiler/compiler.py", "make_ir"),
    ("Triton compile (to cubin)", "triton/compiler/compiler.py", "compile"),
    ("fp4compile FX pass", "fp4compile/backend.py", "nvfp4_backend"),
]


def phase_table(stats: pstats.Stats) -> list[tuple[str, int, float]]:
    """(label, calls, cumulative seconds) of each phase in ``PHASES`` found in ``stats``."""
    rows = []
    for label, suffix, name in PHASES:
        calls, seconds = 0, 0.0
        for (filename, _, function), (_, ncalls, _, cumtime, _) in stats.stats.items():
            if function == name and filename.endswith(suffix):
                calls += ncalls
                seconds = max(seconds, cumtime)  # recursive entries repeat the outer time
        rows.append((label, calls, seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama", choices=["gpt2", "llama"])
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks (compile time grows with them)")
    parser.add_argument("--recipe", default="nvidia", help="a recipe, or bf16 for plain Inductor")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rows", type=int, default=40, help="top functions listed")
    parser.add_argument("--out", default=None, help="also write the report to DIR/profile_compile_<recipe>.txt")
    args = parser.parse_args()
    _, step = make_step(args.recipe, args.batch, "default", args.model, layers=args.layers)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(step)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    lines = [f"first step of {args.model} ({args.layers} blocks), {args.recipe}: {wall:.1f} s wall", ""]
    lines += [f"{label:34s} {calls:7d} calls {seconds:8.1f} s" for label, calls, seconds in phase_table(stats)]
    stats.sort_stats("cumulative").print_stats(args.rows)
    report = "\n".join(lines) + "\n\n" + stream.getvalue()
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{args.out}/profile_compile_{args.recipe}.txt", "w") as f:
            f.write(report)


if __name__ == "__main__":
    main()
