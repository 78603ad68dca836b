"""Quantized linear fwd+bwd per recipe vs bf16 ``F.linear``, a compiled fake-quant baseline, and the GEMM stage.

Run on a GPU:  python -m benchmarks.bench_linear [--out DIR] [--recipes nvidia,quartet_ii]

Times are medians of forward + backward (dX, dW) over bf16 inputs, tokens 8192, at
Llama shapes. "fake-quant compiled" is what a researcher writes today: plain-PyTorch
NVFP4 quantize-dequantize of all six GEMM operands (RTN, per-tensor scale) around bf16
matmuls, under ``torch.compile``. The GEMM stage compares the Triton NVFP4 GEMM (exact
fp16 operands, FP32 accumulation, outer scales in the epilogue) with bf16 ``torch.mm``.
"Saved B/el" is the bytes autograd keeps for backward per element of x (weights excluded).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks.utils import environment, format_table, markdown_table, median_ms, write_json
from fp4compile import quantize
from fp4compile.format import gemm_operand
from fp4compile.kernels.gemm import gemm_triton
from fp4compile.linear import nvfp4_linear

TOKENS = 8192
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]  # (in, out)
RECIPES = ("nvidia", "tetrajet_v2", "quartet_ii", "four_over_six", "naive")


def _fake_nvfp4(t: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch NVFP4 RTN quantize-dequantize along the last dim (the researcher's baseline)."""
    m, k = t.shape
    tf = t.float().view(m, k // 16, 16)
    s_enc = 2688.0 / tf.abs().amax().clamp(min=1e-30)
    scale = (tf.abs().amax(-1, keepdim=True) * (s_enc / 6)).clamp(max=448).to(torch.float8_e4m3fn).float()
    v = (tf * torch.where(scale > 0, s_enc / scale, 0.0)).clamp(-6, 6)
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))
    return (torch.sign(v) * torch.round(a / step) * step * scale / s_enc).view(m, k).to(t.dtype)


class _FakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return _fake_nvfp4(x) @ _fake_nvfp4(w).T

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = _fake_nvfp4(dy) @ _fake_nvfp4(w.T.contiguous()).T
        dw = _fake_nvfp4(dy.T.contiguous()) @ _fake_nvfp4(x.T.contiguous()).T
        return dx, dw


def _fake_quant_linear(x, w):
    return _FakeQuantLinear.apply(x, w)


def _fwd_bwd_ms(fn, x, w, dy) -> float:
    def step(_):
        x.grad = w.grad = None
        fn(x, w).backward(dy)

    return median_ms(step, warmup_ms=100, rep_ms=500)


def _saved_bytes(fn, x, w) -> int:
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fn(x, w)
    return sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != w.data_ptr())


def _saved_bytes_per_element(fn, x, w) -> float:
    """Saved bytes per element of x: the difference between x and x with twice the rows, so whatever the
    layer saves for its weight cancels."""
    x2 = torch.cat([x.detach(), x.detach()]).requires_grad_()
    return (_saved_bytes(fn, x2, w) - _saved_bytes(fn, x, w)) / x.numel()


def _gemm_tflops(k: int, n: int) -> tuple[float, float]:
    a = quantize(torch.randn(TOKENS, k, device="cuda", dtype=torch.bfloat16), "rtn")
    b = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), "rtn")
    va, vb = gemm_operand(a).half(), gemm_operand(b).half()
    flops = 2 * TOKENS * n * k
    ours = median_ms(lambda _: gemm_triton(va, vb, a.outer, b.outer, out_dtype=torch.bfloat16))
    xa, xb = va.bfloat16(), vb.bfloat16()
    ref = median_ms(lambda _: torch.mm(xa, xb.T))
    return flops / ours / 1e9, flops / ref / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_linear.json / .md")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes")
    parser.add_argument("--no-baseline", action="store_true", help="skip the compiled fake-quant baseline")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear needs a CUDA GPU")
    env = environment()
    print(f"{env['gpu']}  torch {env['torch']}  triton {env['triton']}  {env['date']}")
    fake = torch.compile(_fake_quant_linear)
    rows, records = [], []
    for d_in, d_out in SHAPES:
        x = torch.randn(TOKENS, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * d_in**-0.5).requires_grad_()
        dy = torch.randn(TOKENS, d_out, device="cuda", dtype=torch.bfloat16)
        shape = f"{d_in}x{d_out}"
        bf16_ms = _fwd_bwd_ms(F.linear, x, w, dy)
        candidates = [("bf16 F.linear", F.linear)]
        if not args.no_baseline:
            candidates.append(("fake-quant compiled", fake))
        candidates += [(r, lambda a, b, r=r: nvfp4_linear(a, b, None, r)) for r in args.recipes.split(",")]
        for label, fn in candidates:
            ms = bf16_ms if label == "bf16 F.linear" else _fwd_bwd_ms(fn, x, w, dy)
            saved = _saved_bytes_per_element(fn, x, w)
            records.append(dict(shape=shape, label=label, ms=ms, ratio=ms / bf16_ms, saved_bytes_per_el=saved))
            rows.append([shape, label, f"{ms:.3f}", f"{ms / bf16_ms:.2f}x", f"{saved:.3f}"])
            print(rows[-1], flush=True)
        ours, ref = _gemm_tflops(d_in, d_out)
        records.append(dict(shape=shape, label="gemm", nvfp4_tflops=ours, bf16_mm_tflops=ref))
        rows.append([shape, "GEMM TFLOP/s (ours / torch.mm)", f"{ours:.0f} / {ref:.0f}", f"{ours / ref:.2f}", ""])
        print(rows[-1], flush=True)
    header = ["shape (in x out)", "variant", "fwd+bwd ms", "vs bf16", "saved B/el"]
    print(format_table(header, rows))
    write_json(f"{args.out}/bench_linear.json", dict(env=env, tokens=TOKENS, results=records))
    with open(f"{args.out}/bench_linear.md", "w") as f:
        f.write(f"{env['gpu']}, torch {env['torch']}, Triton {env['triton']}, CUDA {env['cuda']}, {env['date']}; ")
        f.write(f"tokens {TOKENS}, bf16\n\n{markdown_table(header, rows)}\n")


if __name__ == "__main__":
    main()
