"""Where the first (compiling) step's time goes: a cProfile of it, summed by compile phase.

Run on a GPU:  python -m benchmarks.profile_compile [--model llama] [--layers 2] [--recipe nvidia] [--out DIR]

The first optimizer step of ``bench_train_step``'s model (fewer blocks with ``--layers``) runs under
cProfile. Reported: the wall time; how often torch generated a kernel's Triton IR to analyse a launch for its
mutations and how long that took (timed directly); cProfile's call counts and own time by library (Dynamo's
frame evaluation can hide calls from cProfile: read those as lower bounds); Dynamo's own compile-phase times;
and the top functions by own time (``--out`` also keeps the raw profile).
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

#: (label, file suffix, function name): functions whose calls are counted (cProfile's call counts are exact;
#: its cumulative times are not, since Dynamo's frame evaluation hides the outer frames).
CALLS = [
    ("launch analyses asked for (fp4compile memo)", "fp4compile/launch_analysis.py", "analyse"),
    ("Triton mutation analyses", "_higher_order_ops/triton_kernel_wrap.py", "identify_accessed_tensors"),
    ("Triton mutation analyses (older torch)", "_higher_order_ops/triton_kernel_wrap.py", "identify_mutated_tensors"),
    ("TTIR generations", "_higher_order_ops/triton_kernel_wrap.py", "generate_ttir"),
    ("Triton compilations", "triton/compiler/compiler.py", "compile"),
    ("Inductor compile_fx_inner", "_inductor/compile_fx.py", "compile_fx_inner"),
]

#: (label, path fragment): where the time is spent, by the file that spends it (cProfile's own time).
AREAS = [
    ("Triton (front end, compiler)", ("/triton/",)),
    ("Inductor", ("/torch/_inductor/",)),
    ("Dynamo", ("/torch/_dynamo/",)),
    ("AOTAutograd", ("/torch/_functorch/",)),
    ("FX, fake tensors, functionalization", ("/torch/fx/", "/torch/_subclasses/", "/torch/_higher_order_ops/")),
    ("sympy", ("/sympy/",)),
    ("fp4compile", ("/fp4compile/",)),
]


def phase_table(stats: pstats.Stats) -> list[str]:
    """Lines: the call counts of ``CALLS`` and the own time of each of ``AREAS`` (the rest: "other")."""
    lines = []
    for label, suffix, name in CALLS:
        calls = sum(v[1] for (f, _, fn), v in stats.stats.items() if fn == name and f.endswith(suffix))
        lines.append(f"{label:40s} {calls:8d} calls")
    totals = {label: 0.0 for label, _ in AREAS}
    other = 0.0
    for (filename, _, _), (_, _, tottime, _, _) in stats.stats.items():
        label = next((lb for lb, fragments in AREAS if any(p in filename for p in fragments)), None)
        if label is None:
            other += tottime
        else:
            totals[label] += tottime
    lines += [f"{label:40s} {seconds:8.1f} s own time" for label, seconds in totals.items()]
    lines.append(f"{'other (builtins, Python, the rest)':40s} {other:8.1f} s own time")
    return lines


class _Timed:
    """Counts and times the calls of one module-level function, replaced by this wrapper while it is in use (a
    benchmark's own instrument, independent of cProfile, which Dynamo's frame evaluation can hide calls from)."""

    def __init__(self, module, name: str):
        self.module, self.name, self.calls, self.seconds = module, name, 0, 0.0
        self.original = getattr(module, name, None)

    def __enter__(self):
        if self.original is not None:
            setattr(self.module, self.name, self)
        return self

    def __exit__(self, *exc):
        if self.original is not None:
            setattr(self.module, self.name, self.original)

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.calls += 1
            self.seconds += time.perf_counter() - start


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
    from torch._higher_order_ops import triton_kernel_wrap

    profiler = cProfile.Profile()
    start = time.perf_counter()
    with _Timed(triton_kernel_wrap, "generate_ttir") as ttir:
        profiler.runcall(step)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    lines = [f"first step of {args.model} ({args.layers} blocks), {args.recipe}: {wall:.1f} s wall", ""]
    lines.append(f"{'TTIR generations (timed directly)':40s} {ttir.calls:8d} calls {ttir.seconds:8.1f} s")
    lines += phase_table(stats)
    lines += ["", "torch._dynamo.utils.compile_times():", torch._dynamo.utils.compile_times(repr="str", aggregate=True)]
    stats.sort_stats("tottime").print_stats(args.rows)
    report = "\n".join(lines) + "\n\n" + stream.getvalue()
    print(report)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(f"{args.out}/profile_compile_{args.recipe}.txt", "w") as f:
            f.write(report)
        stats.dump_stats(f"{args.out}/profile_compile_{args.recipe}.prof")


if __name__ == "__main__":
    main()
