"""Host (CPU) cost of launching one quantized linear fwd+bwd: per-call microseconds and a cProfile breakdown.

Run on a GPU:  python -m benchmarks.profile_host [--recipe nvidia] [--shape 768x2304] [--out DIR]

Small shapes make the GPU finish before the host enqueues the next kernel, so the loop time is
the host cost. A training step of a model with many small linears is bound by this cost.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

import torch

from benchmarks.utils import wall_seconds
from fp4compile.kernels.gemm import gemm_triton
from fp4compile.kernels.quantize import quantize_triton
from fp4compile.linear import nvfp4_linear
from fp4compile.quantize import draw_seed
from fp4compile.spec import QuantSpec


def _host_us(fn, n: int = 200) -> float:
    return wall_seconds(fn, n, warmup=10) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="nvidia")
    parser.add_argument("--shape", default="768x2304", help="in x out")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--out", default=None, help="also write the report to DIR/profile_host_<recipe>.txt")
    args = parser.parse_args()
    d_in, d_out = map(int, args.shape.split("x"))
    x = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * d_in**-0.5).requires_grad_()
    dy = torch.randn(args.tokens, d_out, device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = w.grad = None
        nvfp4_linear(x, w, None, args.recipe).backward(dy)

    xd = x.detach()
    vals = torch.empty(xd.shape, dtype=torch.float16, device="cuda")
    a = torch.randn(args.tokens, d_in, device="cuda", dtype=torch.float16)
    b = torch.randn(d_out, d_in, device="cuda", dtype=torch.float16)
    one = torch.ones((), device="cuda")
    lines = [f"host cost, {args.recipe}, x [{args.tokens}, {d_in}], w [{d_out}, {d_in}]:"]
    pieces = {
        "linear fwd+bwd": step,
        "linear fwd (no grad)": lambda: nvfp4_linear(xd, w.detach(), None, args.recipe),
        "quantize_triton rtn": lambda: quantize_triton(xd, QuantSpec.named("rtn"), values=vals),
        "quantize_triton rht16_sr_te": lambda: quantize_triton(
            xd, QuantSpec.named("rht16_sr_te"), seed=draw_seed(xd.device), values=vals
        ),
        "gemm_triton (tma)": lambda: gemm_triton(a, b, one, one, None, torch.bfloat16),
        "draw_seed": lambda: draw_seed(xd.device),
        "torch.empty": lambda: torch.empty(args.tokens, d_in, device="cuda"),
        "bf16 F.linear fwd+bwd": lambda: torch.nn.functional.linear(x, w).backward(dy),
    }
    for name, fn in pieces.items():
        lines.append(f"  {name:28s} {_host_us(fn):8.1f} us/call")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(100):
        step()
    torch.cuda.synchronize()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)
    text = "\n".join(lines) + "\n\ncProfile of 100 fwd+bwd calls:\n" + stream.getvalue()
    print(text)
    if args.out:
        with open(f"{args.out}/profile_host_{args.recipe}.txt", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
