"""Triton kernel of the monitor's raw measurement of one quantized operand (``operand_sums_reference`` on the GPU).

One launch reads the operand, its dequantization, its packed E2M1 codes and E4M3 scale bytes once and adds its
tile's sums and counts into two small buffers with atomics: the squared norm of every column, the total squared
norm and squared error, max |x| (as FP32 bits, NaN-sticky), and five integer counts of blocks and elements. The
counts and the max equal the reference's exactly; the FP32 sums equal it up to the order of the additions.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .numerics import abs_bits, code_times_scale, from_bits, product

__all__ = ["operand_sums_triton"]

_BR = 64  # rows per program
_BB = 8  # 16-element blocks per program (128 columns)


@triton.jit
def _operand_sums_kernel(
    t_ptr,
    deq_ptr,
    codes_ptr,
    scales_ptr,
    outer_ptr,
    columns_ptr,
    tail_ptr,
    amax_bits_ptr,
    counts_ptr,
    rows,
    k,
    stride_tr,
    stride_tk,
    stride_dr,
    stride_dk,
    stride_cr,
    stride_sr,
    stride_or,
    OUTER: tl.constexpr,  # 0: deq is read from deq_ptr; 1 / 2: decoded here with a per-tensor / per-1x128 outer
    NO_FMA: tl.constexpr,
    BR: tl.constexpr,
    BB: tl.constexpr,
):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    col = tl.program_id(1) * BB * 16 + tl.arange(0, BB * 16)
    row_ok = r < rows
    ok = row_ok[:, None] & (col[None, :] < k)
    x = tl.load(t_ptr + r[:, None] * stride_tr + col[None, :] * stride_tk, mask=ok, other=0.0).to(tl.float32)

    # 16-element blocks' scale bytes, and the packed codes: element 2j in the low nibble of byte j, 2j + 1 in the
    # high one
    block = tl.program_id(1) * BB + tl.arange(0, BB)
    block_ok = row_ok[:, None] & (block[None, :] < (k + 15) // 16)
    scale = tl.load(scales_ptr + r[:, None] * stride_sr + block[None, :], mask=block_ok, other=1).to(tl.int32)
    j = tl.program_id(1) * BB * 8 + tl.arange(0, BB * 8)
    low_ok = row_ok[:, None] & (2 * j[None, :] < k)
    byte = tl.load(codes_ptr + r[:, None] * stride_cr + j[None, :], mask=low_ok, other=0).to(tl.int32)
    high_ok = row_ok[:, None] & (2 * j[None, :] + 1 < k)

    if OUTER == 0:
        deq = tl.load(deq_ptr + r[:, None] * stride_dr + col[None, :] * stride_dk, mask=ok, other=0.0)
    else:  # code * scale * outer, as the decode kernel computes it
        value = code_times_scale(byte, scale, BR, BB)
        if OUTER == 1:
            outer = tl.load(outer_ptr)
        else:  # this program's 128 columns are one outer block of each row
            outer = tl.load(outer_ptr + r * stride_or + tl.program_id(1), mask=row_ok, other=0.0)[:, None]
        deq = tl.where(ok, product(value, outer, NO_FMA), 0.0)
    column_sq = tl.sum(x * x, axis=0)
    diff = x - deq
    tl.atomic_add(columns_ptr + col, column_sq, mask=col < k)
    tl.atomic_add(tail_ptr, tl.sum(column_sq, axis=0))
    tl.atomic_add(tail_ptr + 1, tl.sum(tl.sum(diff * diff, axis=1), axis=0))
    bits = abs_bits(x)
    tl.atomic_max(amax_bits_ptr, tl.max(tl.max(bits, axis=1), axis=0))

    # the largest |x| of each block (a NaN block is not "nonzero", as NaN > 0 is false) against its scale byte
    block_max = from_bits(tl.max(tl.reshape(bits, [BR, BB, 16]), axis=2))
    nonzero = block_ok & (block_max > 0)
    flushed = nonzero & (scale == 0)
    subnormal = block_ok & ((scale & 0x78) == 0) & (scale != 0)
    scale_saturated = block_ok & (scale == 0x7E)
    # |code| 7 is 6
    saturated = (low_ok & ((byte & 7) == 7)).to(tl.int32) + (high_ok & (((byte >> 4) & 7) == 7)).to(tl.int32)
    tl.atomic_add(counts_ptr + 0, tl.sum(tl.sum(nonzero.to(tl.int32), axis=1), axis=0).to(tl.int64))
    tl.atomic_add(counts_ptr + 1, tl.sum(tl.sum(flushed.to(tl.int32), axis=1), axis=0).to(tl.int64))
    tl.atomic_add(counts_ptr + 2, tl.sum(tl.sum(subnormal.to(tl.int32), axis=1), axis=0).to(tl.int64))
    tl.atomic_add(counts_ptr + 3, tl.sum(tl.sum(saturated, axis=1), axis=0).to(tl.int64))
    tl.atomic_add(counts_ptr + 4, tl.sum(tl.sum(scale_saturated.to(tl.int32), axis=1), axis=0).to(tl.int64))


def operand_sums_triton(
    t: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    *,
    deq: Optional[torch.Tensor] = None,
    outer: Optional[torch.Tensor] = None,
    out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw measurement of ``t`` [rows, K] (any strides) against its quantization's ``codes`` / ``scales``
    (padded, row-major, E4M3 scales as bytes or ``float8_e4m3fn``), in one kernel launch.

    The dequantization is either given, ``deq`` FP32 [rows, K] with unit stride along K (a rotated quantization,
    its rotation undone), or decoded in the kernel from the codes, scales and ``outer`` (the quantization's outer
    scales: per tensor [] or per 1x128 block [padded rows, padded K / 128]).

    Returns ``(column_sq, tail, counts)`` as ``operand_sums_reference`` does: FP32 [K] squared column norms,
    FP32 [3] = (sum x^2, sum (x - deq)^2, max |x|), int64 [5] = (blocks holding a nonzero, of them with scale 0,
    blocks with a subnormal scale, elements at +-6, blocks with scale 448). With ``out`` the kernel adds into
    those three zeroed buffers (unit stride; the monitor measures many operands into one allocation), else
    into new ones (two more launches).
    """
    rows, k = t.shape
    if (deq is None) == (outer is None):
        raise ValueError("operand_sums_triton: give either deq (a rotated quantization) or outer (decoded here)")
    if deq is not None and (deq.shape != t.shape or deq.dtype != torch.float32 or deq.stride(1) != 1):
        raise ValueError(f"operand_sums_triton: deq must be FP32 {tuple(t.shape)} with unit stride along K")
    if codes.stride(1) != 1 or scales.stride(1) != 1:
        raise ValueError("operand_sums_triton: codes and scales must be row-major")
    if outer is not None and outer.dim() not in (0, 2):
        raise ValueError(f"operand_sums_triton: outer must be per tensor or per 1x128 block, got {tuple(outer.shape)}")
    if out is None:
        floats = torch.zeros(k + 3, dtype=torch.float32, device=t.device)
        out = (floats[:k], floats[k:], torch.zeros(5, dtype=torch.int64, device=t.device))
    columns, tail, counts = out
    shapes = [(columns, (k,), torch.float32), (tail, (3,), torch.float32), (counts, (5,), torch.int64)]
    if any(b.shape != shape or b.dtype != dtype or b.stride(0) != 1 for b, shape, dtype in shapes):
        raise ValueError(f"operand_sums_triton: out must be FP32 [{k}], FP32 [3] and int64 [5] with unit stride")
    grid = (triton.cdiv(rows, _BR), triton.cdiv(triton.cdiv(k, 16), _BB))
    _operand_sums_kernel[grid](
        t,
        deq,
        codes,
        scales.view(torch.uint8),
        outer,
        columns,
        tail,
        tail[2:].view(torch.int32),
        counts,
        rows,
        k,
        t.stride(0),
        t.stride(1),
        0 if deq is None else deq.stride(0),
        0 if deq is None else deq.stride(1),
        codes.stride(0),
        scales.stride(0),
        outer.stride(0) if outer is not None and outer.dim() == 2 else 0,
        OUTER=0 if outer is None else (1 if outer.dim() == 0 else 2),
        NO_FMA=t.is_cuda,
        BR=_BR,
        BB=_BB,
        num_warps=8,
    )
    return columns, tail, counts
