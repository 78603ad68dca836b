"""Triton kernels of a quantization's residual ``R = x - dequantize(q)``, decoded from the codes as they go.

The Hot-Channel Patch (``hcp_gemms.py``) needs two things of ``R`` on every forward: the sum of ``|R|`` over the
rows of each column (the channel scores), and ``R`` on its few hot columns (the residual columns of its GEMM).
Both read ``x`` and the packed codes and scales and nothing else: no FP32 dequantization of the whole operand is
written and read back. ``R`` is ``x - code * scale * outer`` with the product rounded once (never contracted
with the subtraction), as ``format.dequantize`` rounds it; the sums differ from a torch reduction only in the
order of their additions. Quantizations with a per-tensor outer scale and no rotation (the patch's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..format import NVFP4
from .launch import launcher
from .numerics import dequantized_at

__all__ = ["column_abs_residual_triton", "residual_columns_triton"]

_BM = 64
_BN = 64


@triton.jit
def _residual(x_ptr, codes_ptr, scales_ptr, outer_ptr, rows, cols, ok, K, stride_xm, stride_xk, NO_FMA: tl.constexpr):
    """``x - code * scale * outer`` at the [BM, BN] positions (``rows``, ``cols``) of x [M, K_x] and of the
    quantization's row-major codes [M_p, K/2], scale bytes [M_p, K/16] and per-tensor outer scale; 0 where not
    ``ok``."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=ok, other=0.0).to(tl.float32)
    deq = dequantized_at(codes_ptr, scales_ptr, outer_ptr, rows[:, None], cols[None, :], ok, K, 1, NO_FMA)
    return tl.where(ok, x - deq, 0.0)


@triton.jit
def _column_abs_residual_kernel(
    x_ptr, codes_ptr, scales_ptr, outer_ptr, out_ptr, M, N, K, stride_xm, stride_xk, NO_FMA: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    r = _residual(x_ptr, codes_ptr, scales_ptr, outer_ptr, rows, cols, ok, K, stride_xm, stride_xk, NO_FMA)
    tl.atomic_add(out_ptr + cols, tl.sum(tl.abs(r), axis=0), mask=cols < N)


@triton.jit
def _residual_columns_kernel(
    x_ptr, codes_ptr, scales_ptr, outer_ptr, index_ptr, out_ptr, M, N, K, stride_xm, stride_xk, stride_om,
    NO_FMA: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    j = tl.program_id(1) * BN + tl.arange(0, BN)
    cols = tl.load(index_ptr + j, mask=j < N, other=0).to(tl.int32)
    ok = (rows < M)[:, None] & (j < N)[None, :]
    r = _residual(x_ptr, codes_ptr, scales_ptr, outer_ptr, rows, cols, ok, K, stride_xm, stride_xk, NO_FMA)
    tl.store(out_ptr + rows[:, None] * stride_om + j[None, :], r, mask=ok)


def _check(x: torch.Tensor, q: NVFP4) -> None:
    if q.outer.dim() != 0 or q.spec.rotation != "none":
        raise ValueError(f"residual kernels: a per-tensor quantization without rotation, not {q.spec.short_str()}")
    if x.dim() != 2 or x.shape[0] > q.shape[0] or x.shape[1] > q.shape[1]:
        raise ValueError(f"residual kernels: x {tuple(x.shape)} must lie within its quantization {tuple(q.shape)}")


def column_abs_residual_triton(x: torch.Tensor, q: NVFP4) -> torch.Tensor:
    """FP32 [K]: the sum over the rows of ``x`` [rows, K] of ``|x - dequantize(q)|`` per column, where ``q`` is
    ``x``'s quantization (zero-padded along rows and K)."""
    _check(x, q)
    m, n = x.shape
    out = torch.zeros(n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, _BM), triton.cdiv(n, _BN))
    args = (x, q.codes, q.scales.view(torch.uint8), q.outer, out, m, n, q.shape[1], x.stride(0), x.stride(1))
    launcher(_column_abs_residual_kernel)[grid](*args, NO_FMA=x.is_cuda, BM=_BM, BN=_BN)
    return out


def residual_columns_triton(x: torch.Tensor, q: NVFP4, index: torch.Tensor) -> torch.Tensor:
    """FP32 [rows, len(index)]: ``x - dequantize(q)`` on the columns ``index`` (int64) of ``x`` [rows, K], where
    ``q`` is ``x``'s quantization (zero-padded along rows and K)."""
    _check(x, q)
    m, n = x.shape[0], index.numel()
    out = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, _BM), triton.cdiv(n, _BN))
    args = (x, q.codes, q.scales.view(torch.uint8), q.outer, index, out, m, n, q.shape[1], x.stride(0), x.stride(1))
    launcher(_residual_columns_kernel)[grid](*args, out.stride(0), NO_FMA=x.is_cuda, BM=_BM, BN=_BN)
    return out
