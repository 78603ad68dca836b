"""NVFP4 quantize throughput per named quantizer, next to the GPU's copy bandwidth.

Run on a GPU:  python -m benchmarks.bench_quantize [--out DIR] [--sweep] [--values] [--transposed] [--names a,b]
               python -m benchmarks.bench_quantize --pair A,B [--out DIR]

Every time is device time: the launches are captured in CUDA graphs and replayed (what torch.compile's
generated code pays; Python's launch cost is not in it), inputs rotate over three buffers and the L2 cache is
flushed before each call. "bytes" counts what a quantization must move once: the input read once plus the
codes, E4M3 scales and FP32 outer scales written once (and with ``--values`` the fp16 GEMM operand
``code * scale``, which the forward's quantizations write). A per-tensor-scaled quantizer also needs max|x|
before any scale is known: "us" runs it as the library does without a caller's amax (an amax pass
over the input, then the quantize pass); "% copy" divides its bytes moved once by that time, and "% copy,
traffic" counts the amax pass's second read of the input. "quantize pass us" is the quantize pass alone,
given the amax (how the training graphs run the unrotated per-tensor quantizers: Inductor computes the amax
as a reduction, fused into the op that produces the input where it can). "api us" is the public
``quantize`` (seed draw, checks, Python launches) without validation. With ``--transposed`` the inputs are
transposed views (unit stride along the rows, as the wgrad operands X^T and dY^T reach the kernels), read in place
by columns (the default), and "through the view us" times the kernel reading them as it reads contiguous input
(``by_columns=False``; on an H200 a contiguous copy first was slower than reading through the view: RESULTS.md,
"Eighth session").

``--pair A,B`` measures what reading a tensor once for two quantizations could save (issue 14: dY's dgrad and
wgrad quantizations): A on the [m, k] input and B on its transposed view (both with the fp16 values), each alone
and B right after A in one CUDA graph, where B finds the input in L2 (50 MB on an H200); "B after A" is that
sequence's time minus A's. A kernel fusing the two saves at most B's read of the input: about "B" minus "B after
A" where the input would not have stayed in L2, little where it does.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.utils import copy_bandwidth_gbs, environment_line, gpu_environment, write_json
from fp4compile import QuantSpec, quantize
from fp4compile.demo.report import format_table, markdown_table, median_ms
from fp4compile.kernels.quantize import quantize_triton
from fp4compile.quantize import draw_seed, draw_signs

SHAPES = [(8192, 4096), (8192, 14336)]
# Launch shapes to time: (tile rows, warps, 128-column tiles per program, blocks as halves in one thread or whole
# across two, pipeline stages of the tile loop); see quantize_triton. "Whole" is for unrotated specs only.
SWEEP = [
    (16, 4, 1, True, 1),
    (16, 4, 4, True, 1),
    (16, 4, 4, True, 2),
    (32, 4, 1, True, 1),
    (16, 4, 1, False, 1),
    (16, 4, 2, False, 1),
    (16, 4, 4, False, 1),
    (32, 4, 1, False, 1),
    (8, 4, 1, True, 1),
    (8, 4, 1, False, 1),
    (16, 8, 1, True, 1),
]


def _bytes(spec: QuantSpec, m: int, k: int, in_bytes: int, values: bool) -> tuple[int, int]:
    """(bytes that must move once, bytes the two-pass quantizer moves: the amax pass reads the input again)."""
    written = m * k // 2 + m * k // 16 + (m * k // 128 * 4 if spec.outer == "block128" else 4)
    logical = m * k * in_bytes + written + (m * k * 2 if values else 0)
    return logical, logical + (m * k * in_bytes if spec.outer == "tensor" else 0)


def _launcher(spec: QuantSpec, xs: list[torch.Tensor], values: bool, given_amax: bool, **launch):
    """``run(i)``: the kernel launcher on input ``i`` (random streams, outputs and amax prepared outside)."""
    seed = draw_seed(xs[0].device) if spec.stochastic else None
    signs = draw_signs(spec.rotation_size, xs[0].device) if spec.rotation != "none" else None
    outs = [torch.empty(x.shape, dtype=torch.float16, device=x.device) if values else None for x in xs]
    amaxes = [x.abs().amax().float() if given_amax else None for x in xs]

    def run(i: int) -> None:
        quantize_triton(xs[i], spec, seed=seed, signs=signs, values=outs[i], amax=amaxes[i], **launch)

    return run


def bench_graph(run, n: int) -> float:
    """Median ms of ``run(i)`` replayed from CUDA graphs (device time without Python's launch cost)."""
    for i in range(n):  # compile and warm up outside capture
        run(i)
    torch.cuda.synchronize()
    graphs = []
    for i in range(n):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run(i)
        graphs.append(graph)
    return median_ms(lambda i: graphs[i].replay(), n_inputs=n)


def bench_pair(first: str, second: str, out: str) -> None:
    """Time quantizer ``first`` on [m, k] inputs and ``second`` on their transposed views, alone and in sequence."""
    env = gpu_environment("bench_quantize --pair")
    spec_a, spec_b = QuantSpec.named(first), QuantSpec.named(second)
    rows, records = [], []
    for m, k in SHAPES:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        run_a = _launcher(spec_a, xs, True, spec_a.outer == "tensor" and spec_a.rotation == "none")
        run_b = _launcher(spec_b, [x.T for x in xs], True, spec_b.outer == "tensor" and spec_b.rotation == "none")
        a_ms = bench_graph(run_a, len(xs))
        b_ms = bench_graph(run_b, len(xs))
        both_ms = bench_graph(lambda i: (run_a(i), run_b(i)), len(xs))
        records.append(dict(m=m, k=k, first=first, second=second, first_ms=a_ms, second_ms=b_ms, both_ms=both_ms))
        rows.append([f"{m}x{k}", f"{a_ms * 1e3:.1f}", f"{b_ms * 1e3:.1f}", f"{both_ms * 1e3:.1f}",
                     f"{(both_ms - a_ms) * 1e3:.1f}"])  # fmt: skip
    write_json(f"{out}/bench_quantize_pair.json", dict(env=env, results=records))
    header = ["shape", f"{first} us", f"{second} (transposed) us", "both us", f"{second} after {first} us"]
    print(format_table(header, rows))
    with open(f"{out}/bench_quantize_pair.md", "w") as f:
        f.write(f"{environment_line(env)}; with fp16 GEMM values\n\n{markdown_table(header, rows)}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_quantize.json")
    parser.add_argument("--sweep", action="store_true", help="also sweep launch shapes (see SWEEP)")
    parser.add_argument("--names", default=",".join(QuantSpec.names()), help="comma-separated quantizer names")
    parser.add_argument("--values", action="store_true", help="also write the fp16 GEMM operand (forward quantizers)")
    parser.add_argument(
        "--transposed",
        action="store_true",
        help="quantize transposed views (as the wgrad operands X^T, dY^T are), by columns and through the view",
    )
    parser.add_argument("--pair", default=None, help="A,B: B on the transposed view right after A (see above)")
    args = parser.parse_args()
    if args.pair:
        bench_pair(*args.pair.split(","), out=args.out)
        return
    env = gpu_environment("bench_quantize")
    copy = copy_bandwidth_gbs()
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write)")
    pct = lambda nbytes, ms: f"{100 * nbytes / ms / 1e6 / copy:.0f}%"  # noqa: E731
    rows, records = [], []
    for m, k in SHAPES:
        if args.transposed:  # [m, k] views of [k, m] buffers: unit stride along the rows
            xs = [torch.randn(k, m, device="cuda", dtype=torch.bfloat16).T for _ in range(3)]
        else:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for name in args.names.split(","):
            spec = QuantSpec.named(name)
            logical, traffic = _bytes(spec, m, k, 2, args.values)
            one_pass = spec.outer == "tensor" and spec.rotation == "none"
            ms = bench_graph(_launcher(spec, xs, args.values, False), len(xs))
            pass_ms = bench_graph(_launcher(spec, xs, args.values, True), len(xs)) if one_pass else None
            api_ms = median_ms(lambda i: quantize(xs[i], spec, validate=False), n_inputs=len(xs))
            rec = dict(name=name, m=m, k=k, values=args.values, bytes=logical, ms=ms, pass_ms=pass_ms, api_ms=api_ms)
            if args.transposed:
                through_view = _launcher(spec, xs, args.values, False, by_columns=False)
                rec["through_view_ms"] = bench_graph(through_view, len(xs))
            rec.update(pct_copy=100 * logical / ms / 1e6 / copy, traffic_pct_copy=100 * traffic / ms / 1e6 / copy)
            if pass_ms is not None:
                rec["pass_pct_copy"] = 100 * logical / pass_ms / 1e6 / copy
            if args.sweep:
                sweep = {}
                for bm, warps, tiles, halves, stages in SWEEP:
                    if not halves and spec.rotation != "none":
                        continue
                    halves = halves and spec.rotation_size != 128  # RHT-128 keeps whole blocks
                    key = f"bm{bm}_w{warps}_t{tiles or 'auto'}_s{stages}{'' if halves else '_whole'}"
                    launch = dict(block_rows=bm, num_warps=warps, tiles_per_program=tiles, halves=halves, stages=stages)
                    try:
                        sweep[key] = bench_graph(_launcher(spec, xs, args.values, one_pass, **launch), len(xs))
                    except Exception as exc:  # e.g. out of registers for large tiles: record and go on
                        sweep[key] = repr(exc)[:80]
                rec["sweep_ms"] = sweep
                print(name, m, k, {key: (f"{v * 1e3:.1f}" if isinstance(v, float) else v) for key, v in sweep.items()})
            records.append(rec)
            two_pass = spec.outer == "tensor"
            rows.append(
                [
                    name,
                    f"{m}x{k}",
                    f"{logical / 2**20:.0f}",
                    f"{ms * 1e3:.1f}",
                    pct(logical, ms),
                    pct(traffic, ms) if two_pass else "-",
                    "-" if pass_ms is None else f"{pass_ms * 1e3:.1f}",
                    "-" if pass_ms is None else pct(logical, pass_ms),
                    f"{api_ms * 1e3:.1f}",
                ]
                + ([f"{rec['through_view_ms'] * 1e3:.1f}"] if args.transposed else [])
            )
    write_json(f"{args.out}/bench_quantize.json", dict(env=env, copy_gbs=copy, results=records))
    header = ["quantizer", "shape", "MiB", "us", "% copy", "% copy, traffic", "quantize pass us", "% copy"]
    header += ["api us"] + (["through the view us"] if args.transposed else [])
    print(format_table(header, rows))
    with open(f"{args.out}/bench_quantize.md", "w") as f:
        f.write(f"{environment_line(env)}; copy bandwidth {copy:.0f} GB/s (read + write)")
        f.write(f"{'; with fp16 GEMM values' if args.values else ''}{'; transposed inputs' if args.transposed else ''}")
        f.write(f"\n\n{markdown_table(header, rows)}\n")


if __name__ == "__main__":
    main()
