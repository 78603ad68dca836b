"""NVFP4 quantize throughput per named quantizer, next to the GPU's copy bandwidth.

Run on a GPU:  python -m benchmarks.bench_quantize [--out DIR] [--sweep]

GB/s counts the bytes a quantization must move once: the input read once plus the
codes, E4M3 scales and FP32 outer scales written once. Per-tensor-scaled quantizers
also need a max|x| pass over the input before any scale is known, so they read the
input twice; "traffic GB/s" counts that second read, and "floor %" is the share of
copy bandwidth a two-pass quantizer reaches if both passes run at copy speed.
Inputs rotate over three buffers so no call finds its input in L2. "kernel us" times
Python launches back to back (what eager code pays); "graph us" replays the same
launches from CUDA graphs (device time, what torch.compile with CUDA graphs pays);
"api us" is the public ``quantize`` (seed draw, checks) without validation.
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
# (tile rows, warps, 128-column tiles per program or None for the default heuristic)
SWEEP = [(16, 4, None), (32, 4, None), (32, 8, None), (64, 8, None), (32, 4, 1), (32, 4, 16), (64, 4, None)]


def _bytes(spec: QuantSpec, m: int, k: int, in_bytes: int) -> tuple[int, int]:
    """(bytes that must move once, bytes actually moved including the amax pass)."""
    written = m * k // 2 + m * k // 16 + (m * k // 128 * 4 if spec.outer == "block128" else 4)
    logical = m * k * in_bytes + written
    return logical, logical + (m * k * in_bytes if spec.outer == "tensor" else 0)


def bench_spec(spec: QuantSpec, xs: list[torch.Tensor], **launch) -> float:
    """Median ms of the kernel launcher (random streams drawn once) over the rotated inputs."""
    seed = draw_seed(xs[0].device) if spec.stochastic else None
    signs = draw_signs(spec.rotation_size, xs[0].device) if spec.rotation != "none" else None
    return median_ms(lambda i: quantize_triton(xs[i], spec, seed=seed, signs=signs, **launch), n_inputs=len(xs))


def bench_graph(spec: QuantSpec, xs: list[torch.Tensor]) -> float:
    """Median ms of the kernel launcher replayed from CUDA graphs (device time without Python launch cost)."""
    seed = draw_seed(xs[0].device) if spec.stochastic else None
    signs = draw_signs(spec.rotation_size, xs[0].device) if spec.rotation != "none" else None
    for x in xs:  # compile and warm up outside capture
        quantize_triton(x, spec, seed=seed, signs=signs)
    torch.cuda.synchronize()
    graphs = []
    for x in xs:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            quantize_triton(x, spec, seed=seed, signs=signs)
        graphs.append(graph)
    return median_ms(lambda i: graphs[i].replay(), n_inputs=len(graphs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_quantize.json")
    parser.add_argument("--sweep", action="store_true", help="also sweep tile rows and warps per quantizer")
    parser.add_argument("--names", default=",".join(QuantSpec.names()), help="comma-separated quantizer names")
    args = parser.parse_args()
    env = gpu_environment("bench_quantize")
    copy = copy_bandwidth_gbs()
    print(f"copy bandwidth: {copy:.0f} GB/s (read + write)")
    rows, records = [], []
    for m, k in SHAPES:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
        for name in args.names.split(","):
            spec = QuantSpec.named(name)
            ms = bench_spec(spec, xs)
            graph_ms = bench_graph(spec, xs)
            api_ms = median_ms(lambda i: quantize(xs[i], spec, validate=False), n_inputs=len(xs))
            logical, traffic = _bytes(spec, m, k, 2)
            gbs = logical / ms / 1e6
            rec = dict(
                name=name,
                m=m,
                k=k,
                ms=ms,
                graph_ms=graph_ms,
                graph_gbs=logical / graph_ms / 1e6,
                api_ms=api_ms,
                gbs=gbs,
                pct_copy=100 * gbs / copy,
                traffic_gbs=traffic / ms / 1e6,
                floor_pct=100 * logical / traffic,
            )
            if args.sweep:
                sweep = {}
                for bm, warps, tiles in SWEEP:
                    key = f"bm{bm}_w{warps}_t{tiles or 'auto'}"
                    try:
                        sweep[key] = bench_spec(spec, xs, block_rows=bm, num_warps=warps, tiles_per_program=tiles)
                    except Exception as exc:  # e.g. out of registers for large tiles: record and go on
                        sweep[key] = repr(exc)[:80]
                rec["sweep_ms"] = sweep
                print(name, m, k, {key: (f"{v * 1e3:.1f}" if isinstance(v, float) else v) for key, v in sweep.items()})
            records.append(rec)
            rows.append(
                [
                    name,
                    f"{m}x{k}",
                    f"{ms * 1e3:.1f}",
                    f"{graph_ms * 1e3:.1f}",
                    f"{100 * rec['graph_gbs'] / copy:.0f}%",
                    f"{api_ms * 1e3:.1f}",
                    f"{gbs:.0f}",
                    f"{rec['pct_copy']:.0f}%",
                    f"{rec['traffic_gbs']:.0f}",
                    f"{rec['floor_pct']:.0f}%",
                ]
            )
    write_json(f"{args.out}/bench_quantize.json", dict(env=env, copy_gbs=copy, results=records))
    header = ["quantizer", "shape", "kernel us", "graph us", "graph % copy", "api us", "GB/s", "% copy"]
    header += ["traffic GB/s", "floor %"]
    print(format_table(header, rows))
    with open(f"{args.out}/bench_quantize.md", "w") as f:
        f.write(f"{environment_line(env)}; ")
        f.write(f"copy bandwidth {copy:.0f} GB/s (read + write)\n\n{markdown_table(header, rows)}\n")


if __name__ == "__main__":
    main()
