"""Quantized linear fwd+bwd per recipe vs bf16 ``F.linear``, a compiled fake-quant baseline, and the GEMM stage.

Run on a GPU:  python -m benchmarks.bench_linear [--out DIR] [--recipes nvidia,quartet_ii]

Times are medians of forward + backward (dX, dW) over bf16 inputs, tokens 8192, at
Llama shapes. "fake-quant compiled" is what a researcher writes today: plain-PyTorch
NVFP4 quantize-dequantize of all six GEMM operands (RTN, per-tensor scale) around bf16
matmuls, under ``torch.compile``. The GEMM stage compares the Triton NVFP4 GEMM (exact
fp16 operands, FP32 accumulation, outer scales in the epilogue) with bf16 ``torch.mm``.
"Saved B/el" is the bytes autograd keeps for backward per element of x (weights excluded).
The measuring code is ``fp4compile.demo.bench`` (also run by ``fp4compile bench``).
"""

from __future__ import annotations

import argparse

from benchmarks.utils import environment_line, gpu_environment, write_json
from fp4compile.demo.bench import HEADER, RECIPES, TOKENS, run_linear_bench
from fp4compile.demo.report import format_table, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_linear.json / .md")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    parser.add_argument("--no-baseline", action="store_true", help="skip the compiled fake-quant baseline")
    parser.add_argument(
        "--compiled", action="store_true", help="time every variant under torch.compile (bf16 F.linear included)"
    )
    args = parser.parse_args()
    env = gpu_environment("bench_linear")
    rows, records = run_linear_bench(
        args.recipes.split(","), baseline=not args.no_baseline, on_row=lambda row: print(row, flush=True),
        compiled=args.compiled,
    )  # fmt: skip
    print(format_table(HEADER, rows))
    stem = "bench_linear_compiled" if args.compiled else "bench_linear"
    write_json(f"{args.out}/{stem}.json", dict(env=env, tokens=TOKENS, compiled=args.compiled, results=records))
    with open(f"{args.out}/{stem}.md", "w") as f:
        f.write(f"{environment_line(env)}; ")
        mode = "torch.compile (default mode)" if args.compiled else "eager"
        f.write(f"tokens {TOKENS}, bf16, {mode}\n\n{markdown_table(HEADER, rows)}\n")


if __name__ == "__main__":
    main()
