"""The linear-layer benchmark behind ``fp4compile bench`` and ``python -m benchmarks.bench_linear``.

Forward + backward (dX, dW) of one linear layer over bf16 inputs, per recipe, against bf16
``F.linear``; a compiled plain-PyTorch fake-quant baseline (what a researcher writes today:
NVFP4 RTN quantize-dequantize of all six GEMM operands around bf16 matmuls); the bytes autograd
saves per element of x; and the GEMM stage alone (the Triton NVFP4 GEMM against bf16
``torch.mm``). Needs a CUDA GPU.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .report import median_ms

__all__ = ["HEADER", "RECIPES", "SHAPES", "TOKENS", "fake_quant_linear", "run_linear_bench"]

TOKENS = 8192
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (in, out), Llama shapes
RECIPES = ("nvidia", "tetrajet_v2", "quartet_ii", "four_over_six", "naive")
HEADER = ("shape (in x out)", "variant", "fwd+bwd ms", "vs bf16", "saved B/el")


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


def fake_quant_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x @ w^T`` with plain-PyTorch NVFP4 RTN fake quantization of all six operands (forward and backward)."""
    return _FakeQuantLinear.apply(x, w)


def _fwd_bwd_ms(fn, x, w, dy) -> float:
    def step():
        x.grad = w.grad = None
        fn(x, w).backward(dy)

    return median_ms(lambda _: step(), warmup_ms=100, rep_ms=500)


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


def _gemm_tflops(tokens: int, k: int, n: int) -> tuple[float, float]:
    from ..format import gemm_operand
    from ..kernels.gemm import gemm_triton
    from ..quantize import quantize

    a = quantize(torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16), "rtn")
    b = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), "rtn")
    va, vb = gemm_operand(a).half(), gemm_operand(b).half()
    flops = 2 * tokens * n * k
    ours = median_ms(lambda _: gemm_triton(va, vb, a.outer, b.outer, out_dtype=torch.bfloat16))
    xa, xb = va.bfloat16(), vb.bfloat16()
    ref = median_ms(lambda _: torch.mm(xa, xb.T))
    return flops / ours / 1e9, flops / ref / 1e9


def _steady_outlier_state(recipe, in_features: int, device):
    """A layer state past its warm-up, so that the outlier path itself is timed: OutControl's channels already
    selected (a random order), the Hot-Channel Patch's first scoring done."""
    from ..outlier_channels import HotChannelPatch, new_state

    control = recipe.outliers
    state = new_state(in_features, device, control)
    if isinstance(control, HotChannelPatch):
        state.count.fill_(1)
        state.index.copy_(torch.randperm(in_features, device=device)[: state.index.numel()])
    else:
        state.order.copy_(torch.randperm(in_features, device=device))
        state.selected.fill_(True)
        state.count.fill_(control.start + control.window)
    return state


def _recipe_fn(name: str, in_features: int):
    from ..linear import nvfp4_linear
    from ..recipe import Recipe

    recipe = Recipe.named(name)
    if recipe.outliers is None:
        return lambda a, b: nvfp4_linear(a, b, None, name)
    state = _steady_outlier_state(recipe, in_features, "cuda")
    return lambda a, b: nvfp4_linear(a, b, None, name, outlier_state=state)


def run_linear_bench(
    recipes: Sequence[str] = RECIPES,
    baseline: bool = True,
    shapes: Sequence[tuple[int, int]] = SHAPES,
    tokens: int = TOKENS,
    on_row: Optional[Callable[[list[str]], None]] = None,
    compiled: bool = False,
) -> tuple[list[list[str]], list[dict]]:
    """Time every variant at every shape on the current CUDA GPU.

    Args:
        recipes: recipe names to time with ``nvfp4_linear`` (recipes with ``outliers`` are timed past their
            warm-up: OutControl's channels selected, the Hot-Channel Patch's channels scored).
        baseline: also time the compiled fake-quant baseline.
        shapes: ``(in_features, out_features)`` pairs.
        tokens: rows of x.
        on_row: called with each table row as soon as it is measured (e.g. ``print``).
        compiled: time every variant, bf16 ``F.linear`` included, under ``torch.compile`` (Inductor, default mode;
            the NVFP4 ops then decompose into Inductor-launched kernels) instead of eagerly.

    Returns:
        ``(rows, records)``: table rows under :data:`HEADER`, and one dict per measurement
        (``shape``, ``label``, ``ms``, ``ratio``, ``saved_bytes_per_el``; GEMM rows carry
        ``nvfp4_tflops`` and ``bf16_mm_tflops``).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the linear benchmark needs a CUDA GPU and none is available")
    fake = torch.compile(fake_quant_linear)
    rows: list[list[str]] = []
    records: list[dict] = []

    def emit(row: list[str]) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row)

    for d_in, d_out in shapes:
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = (torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) * d_in**-0.5).requires_grad_()
        dy = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
        shape = f"{d_in}x{d_out}"
        wrap = (lambda fn: torch.compile(fn, fullgraph=True)) if compiled else (lambda fn: fn)  # noqa: E731
        bf16 = wrap(F.linear)
        bf16_ms = _fwd_bwd_ms(bf16, x, w, dy)
        candidates = [("bf16 F.linear", bf16)]
        if baseline:
            candidates.append(("fake-quant compiled", fake))
        candidates += [(r, wrap(_recipe_fn(r, d_in))) for r in recipes]
        for label, fn in candidates:
            ms = bf16_ms if label == "bf16 F.linear" else _fwd_bwd_ms(fn, x, w, dy)
            saved = _saved_bytes_per_element(fn, x, w)
            records.append(dict(shape=shape, label=label, ms=ms, ratio=ms / bf16_ms, saved_bytes_per_el=saved))
            emit([shape, label, f"{ms:.3f}", f"{ms / bf16_ms:.2f}x", f"{saved:.3f}"])
        ours, ref = _gemm_tflops(tokens, d_in, d_out)
        records.append(dict(shape=shape, label="gemm", nvfp4_tflops=ours, bf16_mm_tflops=ref))
        emit([shape, "GEMM TFLOP/s (ours / torch.mm)", f"{ours:.0f} / {ref:.0f}", f"{ours / ref:.2f}", ""])
    return rows, records
