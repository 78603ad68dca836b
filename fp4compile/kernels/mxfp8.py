"""Triton MXFP8 quantization and GEMM operand (bit-identical to ``fp4compile/mxfp8.py``).

One pass over ``x`` [rows, K] (any strides; K a multiple of 128): per 1x32 block the E8M0 exponent ``e`` that
``amax / 448`` rounds up to, the elements ``x * 2**-e`` rounded to nearest-even E4M3 (saturating), and per 1x128
block the GEMM operand of ``mxfp8.mxfp8_gemm_operand``: fp16 ``element * 2**(e - E)`` with the FP32 outer scale
``2**E``, ``E`` the largest of the block's four exponents. Optionally also the E4M3 bytes and the exponents
(what OutControl saves for the backward). The torch-op spec materializes FP32 copies and per-element exponents of
the whole operand; OutControl's wgrad runs it on all of dY^T.

Every power of two is built from its bits (``2**d`` for ``d`` down to -149 is exact in FP32, subnormal below
-126, and 0 below -149, as ``torch.exp2`` gives it), and every product is one IEEE multiply, as the spec's.
Non-finite inputs follow the spec too: a block holding a NaN gets the exponent -127 and the NaN stays NaN (its
E4M3 byte 0x7F, or 0xFF where the NaN's sign bit survives the multiply: GPUs return a positive NaN), and an
infinity saturates at 448 with the exponent 0 of the spec's ``frexp``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import launcher
from .numerics import e4m3_byte, e4m3_rne, exact_fp32, join_parts, max_abs

__all__ = ["mxfp8_triton"]

_BM = 16
_E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _pow2(d):
    """FP32 ``2**d`` for int32 ``d <= 127`` (subnormal from -127 to -149, 0 below)."""
    normal = ((tl.maximum(d, -126) + 127) << 23).to(tl.float32, bitcast=True)
    subnormal = (1 << tl.minimum(tl.maximum(d + 149, 0), 22)).to(tl.float32, bitcast=True)
    return tl.where(d >= -126, normal, tl.where(d >= -149, subnormal, 0.0))


@triton.jit
def _ceil_log2(v):
    """The smallest int32 ``e`` with ``2**e >= v`` for positive finite FP32 ``v`` (subnormals scaled by 2**64)."""
    tiny = v < 1.1754943508222875e-38
    w = v * tl.where(tiny, 18446744073709551616.0, 1.0)
    bits = w.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127 + ((bits & 0x7FFFFF) != 0).to(tl.int32)
    return tl.where(tiny, e - 64, e)


@triton.jit
def _load_by_columns(x_ptr, rows, row_ok, col0, stride_xm, stride_xk, BM: tl.constexpr):
    """The [BM, 4, 32] tile at ``col0`` of a transposed view as 32 loads along its (contiguous) rows, each of one
    element of every 1x32 block, joined in registers (a thread then holds whole blocks: no change of layout)."""
    parts = ()
    for j in tl.static_range(32):
        cols = col0 + 32 * tl.arange(0, 4)[None, :] + j
        offs = rows[:, None] * stride_xm + cols * stride_xk
        parts = parts + (exact_fp32(tl.load(x_ptr + offs, mask=row_ok[:, None], other=0.0)),)
    return tl.reshape(join_parts(parts, 32), [BM, 4, 32])


@triton.jit
def _mxfp8_kernel(
    x_ptr, values_ptr, outer_ptr, elements_ptr, exponents_ptr, M, K, stride_xm, stride_xk,
    WRITE_SAVED: tl.constexpr, BY_COLUMNS: tl.constexpr, BM: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    col0 = tl.program_id(1) * 128
    cols = col0 + 32 * tl.arange(0, 4)[:, None] + tl.arange(0, 32)[None, :]  # [4, 32]: the 1x128 block's 1x32 ones
    if BY_COLUMNS:
        x = _load_by_columns(x_ptr, rows, row_ok, col0, stride_xm, stride_xk, BM)
    else:
        offs = rows[:, None, None] * stride_xm + cols[None, :, :] * stride_xk
        x = exact_fp32(tl.load(x_ptr + offs, mask=row_ok[:, None, None], other=0.0))  # [BM, 4, 32]

    amax = max_abs(x)  # [BM, 4], NaN where the block holds one (the spec's amax)
    e = tl.where(amax > 0.0, _ceil_log2(tl.math.div_rn(amax, _E4M3_MAX)), -127)  # -127 for NaN
    e = tl.where(amax == float("inf"), 0, tl.minimum(tl.maximum(e, -127), 127))  # the spec's frexp(inf): 0
    scaled = x * _pow2(-e)[:, :, None]
    nan = scaled != scaled
    magnitude = e4m3_rne(tl.minimum(tl.abs(scaled), _E4M3_MAX))
    sign = scaled.to(tl.int32, bitcast=True) & -2147483648  # kept on zeros: -0.0 (Triton's -x is 0 - x)
    element = tl.where(nan, scaled, (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True))

    top = tl.max(e, axis=1)  # [BM]
    values = element * _pow2(e - top[:, None])[:, :, None]
    out_offs = rows[:, None, None] * K + cols[None, :, :]
    tl.store(values_ptr + out_offs, values.to(tl.float16), mask=row_ok[:, None, None])
    tl.store(outer_ptr + rows * (K // 128) + col0 // 128, _pow2(top), mask=row_ok)
    if WRITE_SAVED:
        byte = tl.where(nan, 127, e4m3_byte(magnitude).to(tl.int32)) | tl.where(sign != 0, 128, 0)
        tl.store(elements_ptr + out_offs, byte.to(tl.uint8), mask=row_ok[:, None, None])
        block_offs = rows[:, None] * (K // 32) + col0 // 32 + tl.arange(0, 4)[None, :]
        tl.store(exponents_ptr + block_offs, e.to(tl.int16), mask=row_ok[:, None])


def mxfp8_triton(
    x: torch.Tensor, saved: bool = False
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """``(values, outer, elements, exponents)`` of ``x`` [rows, K] (bf16, fp16 or fp32; any strides; K a multiple
    of 128): the fp16 GEMM values [rows, K] and FP32 outer scales [rows, K/128] of ``mxfp8_gemm_operand(
    quantize_mxfp8(x))``, and with ``saved`` the MXFP8 tensor itself as E4M3 bytes (uint8 [rows, K]) and int16
    exponents [rows, K/32] (else None, None)."""
    m, k = x.shape
    if k % 128:
        raise ValueError(f"mxfp8_triton: K={k} must be a multiple of 128 (the GEMM's outer blocks)")
    device = x.device
    values = torch.empty(m, k, dtype=torch.float16, device=device)
    outer = torch.empty(m, k // 128, dtype=torch.float32, device=device)
    elements = torch.empty(m, k, dtype=torch.uint8, device=device) if saved else None
    exponents = torch.empty(m, k // 32, dtype=torch.int16, device=device) if saved else None
    if m > 0 and k > 0:
        # a transposed view is read by columns, 32 rows a program (one element per thread and load)
        by_columns = x.stride(0) == 1 and x.stride(1) != 1 and m > 1
        bm = 32 if by_columns else _BM
        grid = (triton.cdiv(m, bm), k // 128)
        args = (x, values, outer, elements, exponents, m, k, x.stride(0), x.stride(1))
        launcher(_mxfp8_kernel)[grid](*args, WRITE_SAVED=saved, BY_COLUMNS=by_columns, BM=bm)
    return values, outer, elements, exponents
