"""The NVFP4 GEMM stage alone: Triton kernel variants vs bf16 ``torch.mm`` (cuBLAS), in TFLOP/s.

Run on a GPU:  python -m benchmarks.bench_gemm [--out DIR] [--methods pointer,tma,gluon] [--gluon-configs ...]

For each Llama shape (tokens 8192) the three GEMMs of a linear layer (forward, dgrad,
wgrad) run on exact fp16 ``code * scale`` operands with per-tensor outer scales (nvidia,
quartet_ii), per-1x128-block outer scales (tetrajet_v2), and per-block scales that repeat a
per-tensor one over all of K with ``uniform_k=K`` (the Hot-Channel Patch's main columns), through
the pointer-load kernel and the persistent TMA kernel. Each variant's output is checked against the
pointer kernel (max relative difference; both accumulate in FP32, only the order differs). ``gluon`` (the
experimental asynchronous-wgmma kernel, per-block outer scales only) runs on the block128 and uniform operands, once
per launch config given with ``--gluon-configs`` (BM:BN:stages:warps, comma-separated).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.utils import environment_line, gpu_environment, write_json
from fp4compile import quantize
from fp4compile.demo.report import format_table, markdown_table, median_ms
from fp4compile.format import gemm_operand
from fp4compile.kernels.gemm import gemm_triton
from fp4compile.kernels.gemm_gluon import DEFAULT_CONFIG, gemm_gluon

TOKENS = 8192
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)


def _operands(m: int, n: int, k: int, spec: str):
    a = quantize(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), spec)
    b = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), spec)
    return gemm_operand(a).half(), gemm_operand(b).half(), a.outer, b.outer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_gemm.json / .md")
    parser.add_argument("--methods", default="pointer,tma", help="kernels to time: pointer, tma, gluon")
    parser.add_argument("--gluon-configs", default=":".join(map(str, DEFAULT_CONFIG)),
                        help="launch configs of the gluon kernel, BM:BN:stages:warps, comma-separated")
    parser.add_argument("--shapes", default=None, help="in x out shapes, comma-separated (default: the Llama ones)")
    args = parser.parse_args()
    methods = args.methods.split(",")
    gluon_configs = [tuple(int(v) for v in c.split(":")) for c in args.gluon_configs.split(",")]
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    env = gpu_environment("bench_gemm")
    rows, records = [], []
    for d_in, d_out in shapes:
        for role, (m, n, k) in [("fwd", (TOKENS, d_out, d_in)), ("dgrad", (TOKENS, d_in, d_out)),
                                ("wgrad", (d_out, d_in, TOKENS))]:
            flops = 2 * m * n * k
            ref_a, ref_b = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(
                n, k, device="cuda", dtype=torch.bfloat16)
            mm = flops / median_ms(lambda _: torch.mm(ref_a, ref_b.T)) / 1e9
            for outer, spec in [("tensor", "rtn"), ("block128", "double_block_rtn"), ("uniform", "rtn")]:
                va, vb, oa, ob = _operands(m, n, k, spec)
                base = gemm_triton(va, vb, oa, ob, method="pointer").float()
                uniform_k = k if outer == "uniform" else 0
                if uniform_k:
                    oa, ob = oa.reshape(1, 1).expand(m, k // 128).contiguous(), ob.reshape(1, 1).expand(n, k // 128)
                    ob = ob.contiguous()
                variants = [(m_, None) for m_ in methods if m_ != "gluon"]
                if "gluon" in methods and outer != "tensor":
                    variants += [("gluon", c) for c in gluon_configs]
                for method, config in variants:
                    if config is None:
                        run = lambda _: gemm_triton(va, vb, oa, ob, method=method, uniform_k=uniform_k)  # noqa: E731
                    else:
                        run = lambda _: gemm_gluon(va, vb, oa, ob, config=config)  # noqa: E731
                        method = "gluon " + ":".join(map(str, config))
                    out = run(None).float()
                    diff = ((out - base).abs().max() / base.abs().max()).item()
                    tf = flops / median_ms(run) / 1e9
                    records.append(dict(shape=f"{d_in}x{d_out}", role=role, outer=outer, method=method,
                                        tflops=tf, mm_tflops=mm, rel_diff_vs_pointer=diff))
                    rows.append([f"{d_in}x{d_out}", role, outer, method, f"{tf:.0f}", f"{mm:.0f}", f"{tf / mm:.2f}",
                                 f"{diff:.1e}"])
                    print(rows[-1], flush=True)
    header = ["shape (in x out)", "GEMM", "outer", "kernel", "TFLOP/s", "torch.mm bf16", "ratio", "rel diff"]
    print(format_table(header, rows))
    write_json(f"{args.out}/bench_gemm.json", dict(env=env, tokens=TOKENS, results=records))
    with open(f"{args.out}/bench_gemm.md", "w") as f:
        f.write(f"{environment_line(env)}\n\n")
        f.write(markdown_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
