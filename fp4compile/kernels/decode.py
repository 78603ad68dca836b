"""Triton decode of stored NVFP4 tensors: GEMM operands (``code * scale``) and transposed dequantization.

Two uses in the linear layer's backward:

- the saved forward W becomes a GEMM operand again (fp16 ``code * scale``, no outer scale);
- a saved forward quantization is dequantized (``code * scale * outer`` in FP32) straight into
  its transpose, zero-padded along the new last dim (OutControl's W^T, whose outlier columns are then
  replaced; the plain recipes' re-quantizations read the codes in the quantize kernel instead,
  ``quantize.requantize_transposed_triton``, and this is their reference).

Decoding is exact (E2M1 and E4M3 values are exact in FP32 and their product in fp16), so the
results equal ``format.gemm_operand`` / ``format.dequantize`` bit for bit.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..format import NVFP4, TE_RHT_SIGN_MASK, rotation_scale
from .launch import launcher
from .numerics import code_times_scale, fwht, product, sign_vector

__all__ = ["decode_triton"]


@triton.jit
def _decode_kernel(
    codes_ptr,
    scales_ptr,
    outer_ptr,
    signs_ptr,
    out_ptr,
    M,
    N_COLS,
    K,
    stride_om,
    stride_ok,
    OUTER: tl.constexpr,  # 0 none, 1 per tensor, 2 per 1x128 block
    ROTATION: tl.constexpr,  # 0, or 16 / 128: undo the quantization's rotation (format.unrotate)
    LOG_ROTATION: tl.constexpr,
    ROTATION_SCALE: tl.constexpr,
    FIXED_SIGNS: tl.constexpr,  # the signs as a bit mask, or -1: loaded from signs_ptr
    NO_FMA: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,  # 128: one outer block, 8 scale blocks, 64 code bytes per row
):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    col0 = tl.program_id(1) * BK
    r64 = rows.to(tl.int64)[:, None]
    row_ok = (rows < M)[:, None]
    byte_cols = col0 // 2 + tl.arange(0, BK // 2)
    byte_mask = row_ok & (byte_cols < K // 2)[None, :]
    byte = tl.load(codes_ptr + r64 * (K // 2) + byte_cols[None, :], mask=byte_mask, other=0).to(tl.int32)
    scale_cols = col0 // 16 + tl.arange(0, BK // 16)
    scale_mask = row_ok & (scale_cols < K // 16)[None, :]
    scale_bytes = tl.load(scales_ptr + r64 * (K // 16) + scale_cols[None, :], mask=scale_mask, other=0)
    value = code_times_scale(byte, scale_bytes.to(tl.int32), BM, BK // 16)
    if OUTER == 1:
        value = product(value, tl.load(outer_ptr), NO_FMA)  # (rounded: the rotation's adds must not contract it)
    if OUTER == 2:
        value = product(value, tl.load(outer_ptr + r64 * (K // 128) + col0 // 128, mask=row_ok, other=0.0), NO_FMA)
    if ROTATION > 0:  # fwht(y) * scale * signs per chunk, as format.unrotate rounds it
        chunks = tl.reshape(value, [BM * (BK // ROTATION), ROTATION])
        chunks = product(fwht(chunks, BM * (BK // ROTATION), ROTATION, LOG_ROTATION), ROTATION_SCALE, NO_FMA)
        value = tl.reshape(chunks * sign_vector(signs_ptr, FIXED_SIGNS, 0, ROTATION)[None, :], [BM, BK])
    cols = col0 + tl.arange(0, BK)
    mask = row_ok & (cols < N_COLS)[None, :]
    tl.store(out_ptr + r64 * stride_om + cols[None, :] * stride_ok, value.to(out_ptr.dtype.element_ty), mask=mask)


def decode_triton(
    q: NVFP4,
    *,
    with_outer: bool,
    dtype: torch.dtype,
    transpose: bool = False,
    rows: Optional[int] = None,
    cols: Optional[int] = None,
    padded_rows: Optional[int] = None,
    unrotate: bool = False,
) -> torch.Tensor:
    """Decode ``q`` (in the rotated domain unless ``unrotate``).

    Args:
        with_outer: multiply by the outer scales (dequantization) or not (GEMM operand).
        dtype: output dtype (fp16 is exact without outer scales; use FP32 with them).
        transpose: write the [cols, rows] transpose.
        rows, cols: decode only the leading [rows, cols] (crop padding); default all.
        padded_rows: with ``transpose``, the output's last dim (zero-filled beyond ``rows``).
        unrotate: undo a rotation as ``format.dequantize`` does (bit for bit; not with ``transpose``).
    """
    m, k = q.shape
    rotation = q.spec.rotation_size if unrotate else 0
    if rotation and transpose:
        raise ValueError("decode_triton: unrotate and transpose cannot be combined")
    if rotation and not with_outer:
        raise ValueError("decode_triton: unrotate needs with_outer=True (it gives values in the input's domain)")
    rows = m if rows is None else rows
    cols = k if cols is None else cols
    if transpose:
        width = padded_rows or rows
        out = torch.empty(cols, width, dtype=dtype, device=q.codes.device)
        if width > rows:
            out[:, rows:].zero_()
        stride_om, stride_ok = out.stride(1), out.stride(0)
    else:
        out = torch.empty(rows, cols, dtype=dtype, device=q.codes.device)
        stride_om, stride_ok = out.stride(0), out.stride(1)
    outer_kind = 0 if not with_outer else (1 if q.outer.dim() == 0 else 2)
    bm, bk = 32, 128
    grid = (triton.cdiv(rows, bm), triton.cdiv(cols, bk))
    scale_bytes = q.scales.view(torch.uint8)
    # K (the stored row length) drives the addressing; rows and cols bound the decoded region.
    fixed_signs = TE_RHT_SIGN_MASK if rotation and q.signs is None and q.spec.rotation == "rht16_te" else -1
    if rotation and fixed_signs < 0 and q.signs is None:
        raise ValueError(f"decode_triton: {q.spec.short_str()} was quantized without its rotation signs")
    signs = q.signs if rotation and fixed_signs < 0 else None
    args = (q.codes, scale_bytes, q.outer, signs, out, rows, cols, k, stride_om, stride_ok)
    launcher(_decode_kernel)[grid](
        *args,
        OUTER=outer_kind,
        ROTATION=rotation,
        LOG_ROTATION=rotation.bit_length() - 1 if rotation else 0,
        ROTATION_SCALE=rotation_scale(rotation) if rotation else 1.0,
        FIXED_SIGNS=fixed_signs,
        NO_FMA=q.codes.is_cuda,
        BM=bm,
        BK=bk,
    )
    return out
