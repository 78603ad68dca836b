"""Triton NVFP4 quantize kernels for every ``QuantSpec`` (bit-identical to ``format.py``).

One kernel body, specialised by constexpr knobs, runs in two modes:

- ``MODE=0`` (per-tensor outer scale only): each program reduces the NaN-sticky
  max |x| of its tile (after rotation: TE's "post-RHT amax") into one FP32 with
  ``atomic_max``, and with ``PLAIN_AMAX`` the unrotated max |x| into the next
  FP32 (the amax of an unrotated quantization of the same tensor, for free);
- ``MODE=1``: rotate, compute block and outer scales, round the elements (RTN,
  SR, four-over-six, MS-EDEN correction) and write packed codes, E4M3 scale
  bytes and FP32 outer scales.

The input is a tensor in memory, or (``DECODE``) the transpose of a stored
quantization's dequantization, decoded from its codes as the tiles are read: the
backward's re-quantization of a saved forward operand along its other dim, with
no FP32 transpose written in between.

A program walks TILES tiles of [BM, 128]: 128 is the rotation length of RHT-128 and the
TetraJet-v2 outer block, and a multiple of RHT-16 and of the 16-element scale
block. The quantize pass walks the tiles in the reverse order of the amax pass
so that its first tiles are the ones the amax pass left in L2.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..format import NVFP4, TE_RHT_SIGN_MASK, fp32_constants, rotation_scale
from ..spec import QuantSpec
from .launch import launcher
from .numerics import (
    abs_bits,
    dequantized_at,
    e2m1_round,
    e4m3_byte,
    e4m3_rne,
    e4m3_sr,
    from_bits,
    fwht,
    fwht8,
    join_parts,
    max_abs,
    pack_codes,
    pairwise_sum,
    piece_random_bits,
    product,
    reciprocal,
    sign_vector,
)

__all__ = ["abs_max_pair_triton", "quantize_triton", "requantize_transposed_triton"]

_BK = 128
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_ROUNDING = {"rtn": 0, "sr": 1, "eden": 2}


@triton.jit
def _encode_factor(b, outer, NO_FMA: tl.constexpr):
    """1 / (b * outer) clamped to FLT_MAX, and 0 where the block scale is 0 (format.py)."""
    scale = b * outer
    return tl.where(b > 0.0, tl.minimum(reciprocal(tl.where(b > 0.0, scale, 1.0), NO_FMA), _FLT_MAX), 0.0)


@triton.jit
def _load_elements(x_ptr, rows, cols, mask, stride_xm, stride_xk, src_ptrs, SRC_ROWS, SRC_K, DECODE: tl.constexpr,
                   NO_FMA: tl.constexpr):  # fmt: skip
    """FP32 ``x[rows, cols]`` (broadcastable positions), 0 where not ``mask``. With ``DECODE`` (the outer-scale kind
    of a stored quantization, 1 per tensor or 2 per 1x128 block) ``x`` is the transpose of that quantization's
    dequantization, read from its codes, scale bytes and outer scales (``src_ptrs``; rows ``SRC_K`` long), zero
    beyond its first ``SRC_ROWS`` rows."""
    if DECODE:
        codes_ptr, scales_ptr, outer_ptr = src_ptrs
        ok = mask & (cols < SRC_ROWS)
        x = dequantized_at(codes_ptr, scales_ptr, outer_ptr, cols, rows, ok, SRC_K, DECODE, NO_FMA)
    else:
        x = tl.load(x_ptr + rows * stride_xm + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _load_column(x_ptr, rows, row_ok, col0, K, stride_xm, stride_xk, j: tl.constexpr, NB: tl.constexpr, src_ptrs,
                 SRC_ROWS, SRC_K, DECODE: tl.constexpr, NO_FMA: tl.constexpr):  # fmt: skip
    """Element ``j`` of each of the tile's NB blocks, [BM, NB] FP32: for a transposed view, a load along its rows
    (contiguous in memory)."""
    cols = col0 + 16 * tl.arange(0, NB)[None, :] + j
    mask = row_ok[:, None] & (cols < K)
    return _load_elements(x_ptr, rows[:, None], cols, mask, stride_xm, stride_xk, src_ptrs, SRC_ROWS, SRC_K, DECODE,
                          NO_FMA)  # fmt: skip


@triton.jit
def _load_half_by_columns(x_ptr, rows, row_ok, col0, K, stride_xm, stride_xk, FIRST: tl.constexpr, BM, NB, src_ptrs,
                          SRC_ROWS, SRC_K, DECODE: tl.constexpr, NO_FMA: tl.constexpr):  # fmt: skip
    """Elements FIRST .. FIRST+7 of each block as [BM, NB, 8], from eight column loads joined in registers."""
    parts = ()
    for j in tl.static_range(8):
        parts = parts + (_load_column(x_ptr, rows, row_ok, col0, K, stride_xm, stride_xk, FIRST + j, NB, src_ptrs,
                                      SRC_ROWS, SRC_K, DECODE, NO_FMA),)  # fmt: skip
    return tl.reshape(join_parts(parts, 8), [BM, NB, 8])


@triton.jit
def _load_tile(
    x_ptr,
    signs_ptr,
    rows,
    row_ok,
    col0,
    K,
    stride_xm,
    stride_xk,
    ROTATION,
    LOG_ROTATION,
    ROTATION_SCALE,
    FIXED_SIGNS,
    NO_FMA,
    HALVES,
    BY_COLUMNS,
    BM,
    BK,
    src_ptrs,
    SRC_ROWS,
    SRC_K,
    DECODE: tl.constexpr,
):
    """The tile at ``col0`` as FP32 pieces (lo, hi): with HALVES two halves [BM, BK/16, 8] (elements 0-7 and 8-15 of
    each block, so that a thread owns whole blocks: no cross-thread reductions or layout conversions; required by
    RHT-16), else one piece [BM, BK/16, 16] returned twice (required by RHT-128; see the note on pieces in
    numerics). With ``DECODE`` the tile is decoded from a stored quantization (:func:`_load_elements`)."""
    NB: tl.constexpr = BK // 16
    if not HALVES:
        cols = col0 + tl.arange(0, BK)
        mask = row_ok[:, None] & (cols < K)[None, :]
        x = _load_elements(x_ptr, rows[:, None], cols[None, :], mask, stride_xm, stride_xk, src_ptrs, SRC_ROWS, SRC_K,
                           DECODE, NO_FMA)  # fmt: skip
        if ROTATION == 128:
            x = x * sign_vector(signs_ptr, FIXED_SIGNS, 0, BK)[None, :]
            x = product(fwht(x, BM, BK, LOG_ROTATION), ROTATION_SCALE, NO_FMA)
        xb = tl.reshape(x, [BM, NB, 16])
        return xb, xb
    else:
        if BY_COLUMNS:
            # A transposed view: 16 loads, each of one element of every block along the view's rows (contiguous in
            # memory), joined in registers. Loading [BM, NB, 8] through the view instead compiles to a change of
            # layout through shared memory at almost every step of the tile's work (sm_90 SASS: 34-36 barriers
            # per tile, against 1-4 this way).
            lo = _load_half_by_columns(x_ptr, rows, row_ok, col0, K, stride_xm, stride_xk, 0, BM, NB, src_ptrs,
                                       SRC_ROWS, SRC_K, DECODE, NO_FMA)  # fmt: skip
            hi = _load_half_by_columns(x_ptr, rows, row_ok, col0, K, stride_xm, stride_xk, 8, BM, NB, src_ptrs,
                                       SRC_ROWS, SRC_K, DECODE, NO_FMA)  # fmt: skip
        else:
            block_cols = col0 + 16 * tl.arange(0, NB)
            lo_cols = block_cols[None, :, None] + tl.arange(0, 8)[None, None, :]
            offs = rows[:, None, None] * stride_xm + lo_cols * stride_xk
            mask = row_ok[:, None, None] & (block_cols < K)[None, :, None]
            lo = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            hi = tl.load(x_ptr + offs + 8 * stride_xk, mask=mask, other=0.0).to(tl.float32)
        if ROTATION == 16:
            lo = lo * sign_vector(signs_ptr, FIXED_SIGNS, 0, 8)[None, None, :]
            hi = hi * sign_vector(signs_ptr, FIXED_SIGNS, 8, 8)[None, None, :]
            lo, hi = lo + hi, lo - hi
            lo = product(fwht8(lo, BM, NB), ROTATION_SCALE, NO_FMA)
            hi = product(fwht8(hi, BM, NB), ROTATION_SCALE, NO_FMA)
        return lo, hi


@triton.jit
def _outer_from_amax(amax, VMAX_CAP, INV_VMAX, NO_FMA: tl.constexpr):
    """(outer scale, s_enc / vmax) from a region's amax (format.py's formulas)."""
    safe = tl.where(amax == 0.0, 1.0, amax)
    s_enc = tl.where(amax == 0.0, 1.0, tl.minimum(tl.math.div_rn(VMAX_CAP, safe), _FLT_MAX))
    outer = tl.where(amax < float("inf"), reciprocal(s_enc, NO_FMA), float("nan"))
    return outer, s_enc * INV_VMAX


@triton.jit
def _round_piece(x, e, seed_ptr, rows, col0, K, PIECE: tl.constexpr, ROUNDING: tl.constexpr, W, BM, NB):
    """E2M1 (code, value) of one piece scaled by the per-block encode factors ``e`` [BM, NB]."""
    if ROUNDING == 1:
        bits = piece_random_bits(tl.load(seed_ptr), rows, col0, K, PIECE, W, BM, NB)
    else:
        bits = tl.zeros([BM, NB, W], dtype=tl.int32)
    return e2m1_round(x * e[:, :, None], bits, ROUNDING == 1)


@triton.jit
def _piece_sq_error(value, b, outer, x, NO_FMA, W, BM, NB):
    """Per-block sum over one piece of the squared dequantization error (format._block_sq_error)."""
    d = product(value * b[:, :, None], outer, NO_FMA) - x
    return pairwise_sum(product(d, d, NO_FMA), W, BM, NB)


@triton.jit
def _store_piece(codes_ptr, code, rows, row_ok, col0, K, PIECE: tl.constexpr, W, BM, NB):
    """Store one piece's packed codes as 4-byte groups [BM, NB * W / 8, 4]: the bytes one thread packs (8 codes
    of a half block; a whole block lies across two threads), so the store needs no change of layout."""
    G: tl.constexpr = W // 8
    groups = col0 // 8 + 2 * tl.arange(0, NB)[:, None] + PIECE * G + tl.arange(0, G)[None, :]
    groups = tl.reshape(groups, [NB * G])
    offs = rows[:, None, None] * (K // 2) + 4 * groups[None, :, None] + tl.arange(0, 4)[None, None, :]
    mask = row_ok[:, None, None] & (groups < K // 8)[None, :, None]
    tl.store(codes_ptr + offs, tl.reshape(pack_codes(code, W, BM, NB), [BM, NB * G, 4]), mask=mask)


@triton.jit
def _store_values(values_ptr, value, b, rows, row_ok, col0, K, PIECE: tl.constexpr, W, BM, NB):
    """Store ``value * b`` (E2M1 value times E4M3 scale: exact in fp16) for one piece."""
    cols = col0 + 16 * tl.arange(0, NB)[:, None] + PIECE * W + tl.arange(0, W)[None, :]
    offs = rows[:, None, None] * K + cols[None, :, :]
    mask = row_ok[:, None, None] & (cols < K)[None, :, :]
    tl.store(values_ptr + offs, (value * b[:, :, None]).to(tl.float16), mask=mask)


@triton.jit
def _quantize_tile(
    lo,
    hi,
    vmax,
    outer,
    factor,
    rows,
    row_ok,
    col0,
    K,
    seed_ptr,
    codes_ptr,
    scales_ptr,
    values_ptr,
    HALVES: tl.constexpr,
    ROUNDING: tl.constexpr,
    FOUR_OVER_SIX: tl.constexpr,
    WRITE_VALUES: tl.constexpr,
    NO_FMA: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
):
    """Round one tile given its block maxima and outer scale; store packed codes and E4M3 scale bytes.

    With HALVES, ``lo`` and ``hi`` are the two [BM, NB, 8] halves; otherwise ``lo`` is the whole
    [BM, NB, 16] tile and ``hi`` is unused.
    """
    NB: tl.constexpr = BK // 16
    W: tl.constexpr = 8 if HALVES else 16
    raw = tl.minimum(vmax * factor, 448.0)
    b = e4m3_rne(raw)
    e = _encode_factor(b, outer, NO_FMA)
    lo_code, lo_value = _round_piece(lo, e, seed_ptr, rows, col0, K, 0, ROUNDING, W, BM, NB)
    if HALVES:
        hi_code, hi_value = _round_piece(hi, e, seed_ptr, rows, col0, K, 1, ROUNDING, W, BM, NB)
    if FOUR_OVER_SIX:
        b4 = e4m3_rne(raw * 1.5)
        e4 = _encode_factor(b4, outer, NO_FMA)
        lo_code4, lo_value4 = _round_piece(lo, e4, seed_ptr, rows, col0, K, 0, ROUNDING, W, BM, NB)
        err6 = _piece_sq_error(lo_value, b, outer, lo, NO_FMA, W, BM, NB)
        err4 = _piece_sq_error(lo_value4, b4, outer, lo, NO_FMA, W, BM, NB)
        if HALVES:
            hi_code4, hi_value4 = _round_piece(hi, e4, seed_ptr, rows, col0, K, 1, ROUNDING, W, BM, NB)
            err6 += _piece_sq_error(hi_value, b, outer, hi, NO_FMA, W, BM, NB)
            err4 += _piece_sq_error(hi_value4, b4, outer, hi, NO_FMA, W, BM, NB)
            hi_code = tl.where((err4 < err6)[:, :, None], hi_code4, hi_code)
            hi_value = tl.where((err4 < err6)[:, :, None], hi_value4, hi_value)
        lo_code = tl.where((err4 < err6)[:, :, None], lo_code4, lo_code)
        lo_value = tl.where((err4 < err6)[:, :, None], lo_value4, lo_value)
        b = tl.where(err4 < err6, b4, b)
    if ROUNDING == 2:
        u_lo = lo * e[:, :, None]
        num = pairwise_sum(product(u_lo, u_lo, NO_FMA), W, BM, NB)
        den = pairwise_sum(product(u_lo, lo_value, NO_FMA), W, BM, NB)
        if HALVES:
            u_hi = hi * e[:, :, None]
            num += pairwise_sum(product(u_hi, u_hi, NO_FMA), W, BM, NB)
            den += pairwise_sum(product(u_hi, hi_value, NO_FMA), W, BM, NB)
        correction = tl.where(den > 0.0, tl.math.div_rn(num, tl.where(den > 0.0, den, 1.0)), 1.0)
        block_ids = rows[:, None] * (K // 16) + (col0 // 16 + tl.arange(0, NB))[None, :]
        bits20 = tl.randint(tl.load(seed_ptr), block_ids.to(tl.int32)) & 0xFFFFF
        b = e4m3_sr(correction * b, bits20)

    _store_piece(codes_ptr, lo_code, rows, row_ok, col0, K, 0, W, BM, NB)
    if HALVES:
        _store_piece(codes_ptr, hi_code, rows, row_ok, col0, K, 1, W, BM, NB)
    if WRITE_VALUES:
        _store_values(values_ptr, lo_value, b, rows, row_ok, col0, K, 0, W, BM, NB)
        if HALVES:
            _store_values(values_ptr, hi_value, b, rows, row_ok, col0, K, 1, W, BM, NB)
    scale_cols = col0 // 16 + tl.arange(0, NB)
    scale_mask = row_ok[:, None] & (scale_cols < K // 16)[None, :]
    tl.store(scales_ptr + rows[:, None] * (K // 16) + scale_cols[None, :], e4m3_byte(b), mask=scale_mask)


@triton.jit
def _block_max_bits(lo, hi, HALVES: tl.constexpr):
    """NaN-sticky max |x| per block as int32 bits [BM, NB]."""
    if HALVES:
        return abs_bits(tl.maximum(max_abs(lo), max_abs(hi), propagate_nan=tl.PropagateNan.ALL))
    else:
        return abs_bits(max_abs(lo))


@triton.jit
def _nvfp4_quantize_kernel(
    x_ptr,
    codes_ptr,
    scales_ptr,
    outer_ptr,
    amax_ptr,
    signs_ptr,
    seed_ptr,
    values_ptr,
    M,
    K,
    stride_xm,
    stride_xk,
    src_codes_ptr,
    src_scales_ptr,
    src_outer_ptr,
    SRC_ROWS,
    SRC_K,
    MODE: tl.constexpr,
    ROTATION: tl.constexpr,
    LOG_ROTATION: tl.constexpr,
    ROTATION_SCALE: tl.constexpr,
    FIXED_SIGNS: tl.constexpr,
    BLOCK_2D: tl.constexpr,
    OUTER_BLOCK128: tl.constexpr,
    ROUNDING: tl.constexpr,
    FOUR_OVER_SIX: tl.constexpr,
    WRITE_VALUES: tl.constexpr,
    NO_FMA: tl.constexpr,
    HALVES: tl.constexpr,
    BY_COLUMNS: tl.constexpr,
    VMAX_CAP: tl.constexpr,
    INV_VMAX: tl.constexpr,
    REVERSE: tl.constexpr,
    BM: tl.constexpr,
    BK: tl.constexpr,
    TILES: tl.constexpr,
    STAGES: tl.constexpr,
    DECODE: tl.constexpr,
    PLAIN_AMAX: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    if REVERSE:
        pid_m = tl.num_programs(0) - 1 - pid_m
        pid_k = tl.num_programs(1) - 1 - pid_k
    rows = pid_m.to(tl.int64) * BM + tl.arange(0, BM)
    row_ok = rows < M
    first_col = pid_k * (TILES * BK)

    if MODE == 0:
        running = tl.zeros([BM, BK // 16], dtype=tl.int32)
        plain = tl.zeros([BM, BK // 16], dtype=tl.int32)
        for i in tl.range(TILES, num_stages=STAGES):
            lo, hi = _load_tile(
                x_ptr,
                signs_ptr,
                rows,
                row_ok,
                first_col + i * BK,
                K,
                stride_xm,
                stride_xk,
                ROTATION,
                LOG_ROTATION,
                ROTATION_SCALE,
                FIXED_SIGNS,
                NO_FMA,
                HALVES,
                BY_COLUMNS,
                BM,
                BK,
                (src_codes_ptr, src_scales_ptr, src_outer_ptr),
                SRC_ROWS,
                SRC_K,
                DECODE,
            )
            running = tl.maximum(running, _block_max_bits(lo, hi, HALVES))
            if PLAIN_AMAX:  # the same tile, unrotated (the compiler reuses the first load's registers)
                lo, hi = _load_tile(
                    x_ptr,
                    signs_ptr,
                    rows,
                    row_ok,
                    first_col + i * BK,
                    K,
                    stride_xm,
                    stride_xk,
                    0,
                    0,
                    1.0,
                    -1,
                    NO_FMA,
                    HALVES,
                    BY_COLUMNS,
                    BM,
                    BK,
                    (src_codes_ptr, src_scales_ptr, src_outer_ptr),
                    SRC_ROWS,
                    SRC_K,
                    DECODE,
                )
                plain = tl.maximum(plain, _block_max_bits(lo, hi, HALVES))
        tl.atomic_max(amax_ptr, tl.max(tl.max(running, axis=1), axis=0))
        if PLAIN_AMAX:
            tl.atomic_max(amax_ptr + 1, tl.max(tl.max(plain, axis=1), axis=0))
    else:
        if not OUTER_BLOCK128:
            outer, factor = _outer_from_amax(from_bits(tl.load(amax_ptr)), VMAX_CAP, INV_VMAX, NO_FMA)
            if (pid_m == 0) & (pid_k == 0):
                tl.store(outer_ptr, outer)
        for i in tl.range(TILES, num_stages=STAGES):
            tile = (TILES - 1 - i) if REVERSE else i
            col0 = first_col + tile * BK
            lo, hi = _load_tile(
                x_ptr,
                signs_ptr,
                rows,
                row_ok,
                col0,
                K,
                stride_xm,
                stride_xk,
                ROTATION,
                LOG_ROTATION,
                ROTATION_SCALE,
                FIXED_SIGNS,
                NO_FMA,
                HALVES,
                BY_COLUMNS,
                BM,
                BK,
                (src_codes_ptr, src_scales_ptr, src_outer_ptr),
                SRC_ROWS,
                SRC_K,
                DECODE,
            )
            vmax_bits = _block_max_bits(lo, hi, HALVES)
            if BLOCK_2D:
                tile_max = tl.max(tl.reshape(vmax_bits, [BM // 16, 16, BK // 16]), axis=1)
                vmax_bits = tl.reshape(tl.broadcast_to(tile_max[:, None, :], [BM // 16, 16, BK // 16]), [BM, BK // 16])
            if OUTER_BLOCK128:
                outer, factor = _outer_from_amax(
                    from_bits(tl.max(vmax_bits, axis=1, keep_dims=True)), VMAX_CAP, INV_VMAX, NO_FMA
                )
                outer_mask = row_ok[:, None] & (col0 < K)
                tl.store(outer_ptr + rows[:, None] * (K // 128) + col0 // 128, outer, mask=outer_mask)
            _quantize_tile(
                lo,
                hi,
                from_bits(vmax_bits),
                outer,
                factor,
                rows,
                row_ok,
                col0,
                K,
                seed_ptr,
                codes_ptr,
                scales_ptr,
                values_ptr,
                HALVES,
                ROUNDING,
                FOUR_OVER_SIX,
                WRITE_VALUES,
                NO_FMA,
                BM,
                BK,
            )


# Rows per program: 16, one 16x16 tile (H200, bench_quantize --sweep: twice as fast as 32 rows with the fp16 values
# written, from the occupancy of the smaller register file). RHT-128 with 1x16 blocks and four-over-six read along
# rows fill all 255 registers of sm_90 at 16 rows and spill (``python -m benchmarks.quantize_sass``), yet 16 rows
# stay: at 8 rows, spill-free, they ran slower on an H200 (bench_quantize --values --sweep, 8192x4096: ms_eden 336 us
# against 298, sr_4over6 146 against 120, rtn_4over6 102 against 96).
_TILE_ROWS = 16


# The quantize pass runs one 128-column tile per program: on an H200 (bench_quantize --values --sweep, 16-row
# tiles) no larger count was faster (8192x14336 double_block_rtn: 284 us at 1 tile, 318 at 4), and pipelining the
# loads of several tiles (stages=2) was 13-50 % slower. The amax pass aims for fewer, larger programs: each ends
# with one atomic max on the same address.
_QUANTIZE_TILES = 1
_AMAX_PROGRAMS = 2048


def _tiles_per_program(m: int, k: int, bm: int, target_programs: int) -> int:
    """128-column tiles per program: about ``target_programs`` programs, at most the row's tiles."""
    row_panels = triton.cdiv(m, bm)
    n_tiles = triton.cdiv(k, _BK)
    return max(1, min(n_tiles, triton.next_power_of_2(max(1, row_panels * n_tiles // target_programs))))


def quantize_triton(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    seed: Optional[torch.Tensor] = None,
    signs: Optional[torch.Tensor] = None,
    block_rows: Optional[int] = None,
    num_warps: int = 4,
    tiles_per_program: Optional[int] = None,
    halves: Optional[bool] = None,
    stages: int = 1,
    by_columns: Optional[bool] = None,
    values: Optional[torch.Tensor] = None,
    amax: Optional[torch.Tensor] = None,
) -> NVFP4:
    """Quantize ``x`` [m, k] with the Triton kernels.

    Args:
        x: bf16, fp16 or fp32 tensor on a CUDA device (or on the CPU under TRITON_INTERPRET=1), any
            strides (a transposed view is read in place, by columns: see ``by_columns``).
        spec: the quantizer; shapes are assumed checked by :func:`fp4compile.quantize`.
        seed: int64 [1] tensor on ``x.device`` (required when ``spec.stochastic``).
        signs: float32 rotation signs on ``x.device`` (required with a random rotation). For ``rht16_te``
            None selects TransformerEngine's fixed signs compiled into the kernel: no device tensor, so
            nothing is cached on the GPU (a cached tensor would leak into a CUDA-graph memory pool); the
            result's ``signs`` is then None.
        block_rows, num_warps, tiles_per_program: launch shape of the quantize pass (tuning; defaults from
            measurements; the amax pass keeps its own tiles per program).
        halves: hold each 16-element block as two 8-element halves in one thread (RHT-16 needs it: its default),
            or False for a whole block across two threads (the loads of one instruction contiguous; RHT-128 needs
            it; the default of unrotated specs too: on an H200 with the fp16 values written it took 71-79 % of
            the halves' time, bench_quantize --values --sweep; transposed views read by columns keep halves). A
            tuning knob for unrotated specs: the same bits.
        stages: with several tiles per program, how many tiles' loads are in flight (Triton's software
            pipelining through shared memory; 1: none). Tuning only: the same bits.
        by_columns: load a tile as 16 loads of one element per block along ``x``'s rows, joined in registers (for a
            transposed view, whose rows are contiguous in memory), or as two loads along its columns. The default:
            by columns when ``x``'s rows have unit stride and its columns do not (that layout needs ``halves``; RHT-128
            keeps loading along the columns). Tuning only: the same bits.
        values: optional fp16 [m, k] output, filled with the GEMM operand ``code * scale`` in the
            rotated domain (exact in fp16; the outer scales are left to the GEMM).
        amax: for a per-tensor spec, ``max |x|`` after the spec's rotation as an FP32 [] tensor computed by the
            caller (for an unrotated spec a graph reduction that Inductor can fuse into the op producing ``x``;
            or from :func:`abs_max_pair_triton`): the kernel's amax pass is skipped. Must be exactly that maximum
            (any NaN for input with NaN).

    Returns:
        The :class:`NVFP4` quantization, bit-identical to ``format.quantize_reference``.
    """
    launch = dict(block_rows=block_rows, num_warps=num_warps, tiles_per_program=tiles_per_program, halves=halves,
                  stages=stages, by_columns=by_columns)  # fmt: skip
    return _quantize(x, x.shape, x.device, x.dtype, spec, None, seed, signs, values, amax, **launch)


def requantize_transposed_triton(
    q: NVFP4,
    rows: int,
    cols: int,
    padded_rows: int,
    spec: QuantSpec,
    *,
    seed: Optional[torch.Tensor] = None,
    signs: Optional[torch.Tensor] = None,
    values: Optional[torch.Tensor] = None,
) -> NVFP4:
    """``spec``'s quantization of the FP32 transpose of ``q``'s dequantization cropped to [rows, cols], zero-padded
    to [cols, padded_rows] (the re-quantization of a saved forward operand along its other dim), read from ``q``'s
    codes, scale bytes and outer scales as it goes: no FP32 transpose is written and read back. Bit-identical to
    :func:`quantize_triton` of ``decode_triton(q, with_outer=True, dtype=torch.float32, transpose=True, rows=rows,
    cols=cols, padded_rows=padded_rows)``, with that FP32 tensor's dtype.

    Args:
        q: an unrotated quantization [R, C] (row-major codes) with ``0 < rows <= R``, ``0 < cols <= C``,
            ``padded_rows >= rows`` (a valid length along K for ``spec``).
        spec, seed, signs, values: as :func:`quantize_triton`.
    """
    if q.spec.rotation != "none":
        raise ValueError(f"requantize_transposed_triton: the source must be unrotated, not {q.spec.short_str()}")
    if not (0 < rows <= q.shape[0] and 0 < cols <= q.shape[1] and padded_rows >= rows):
        raise ValueError(f"requantize_transposed_triton: [{rows}, {cols}] padded to {padded_rows} rows must lie "
                         f"within the source's {tuple(q.shape)}")  # fmt: skip
    return _quantize(None, (cols, padded_rows), q.codes.device, torch.float32, spec, (q, rows), seed, signs, values)


def _quantize(
    x: Optional[torch.Tensor], shape: tuple[int, int], device: torch.device, dtype: torch.dtype, spec: QuantSpec,
    source: Optional[tuple[NVFP4, int]], seed: Optional[torch.Tensor], signs: Optional[torch.Tensor],
    values: Optional[torch.Tensor], amax: Optional[torch.Tensor] = None, block_rows: Optional[int] = None,
    num_warps: int = 4, tiles_per_program: Optional[int] = None, halves: Optional[bool] = None, stages: int = 1,
    by_columns: Optional[bool] = None,
) -> NVFP4:  # fmt: skip
    """The launches of :func:`quantize_triton` (``x``) or :func:`requantize_transposed_triton` (``x`` None,
    ``source`` the quantization and its valid rows): the input [m, k] is ``shape``; the rest as
    :func:`quantize_triton` takes them."""
    m, k = shape
    codes = torch.empty(m, k // 2, dtype=torch.uint8, device=device)
    scales = torch.empty(m, k // 16, dtype=torch.uint8, device=device)
    per_tensor = spec.outer == "tensor"
    outer = (
        torch.empty((), dtype=torch.float32, device=device)
        if per_tensor
        else torch.empty(m, k // 128, dtype=torch.float32, device=device)
    )
    if amax is not None and not per_tensor:
        raise ValueError(f"quantize_triton: amax= is for per-tensor specs, not {spec.short_str()}")
    if amax is not None:
        amax_bits = amax.to(torch.float32).reshape(1).view(torch.int32)
    else:
        amax_bits = torch.zeros(1, dtype=torch.int32, device=device) if per_tensor else None
    constants, bm = _launch_constants(spec, signs, m, x, source is not None, values is not None, device, block_rows,
                                      num_warps, halves, by_columns)  # fmt: skip
    tiles = tiles_per_program or _QUANTIZE_TILES
    amax_tiles = _tiles_per_program(m, k, bm, _AMAX_PROGRAMS)
    # Pointers a specialization never reads are None (not a stand-in tensor: an alias of an output would
    # confuse the mutation analysis of the traced launch, see kernels/launch.py).
    args = (
        x,
        codes,
        scales,
        outer,
        amax_bits,
        signs,
        seed,
        values,
        m,
        k,
        x.stride(0) if x is not None else 0,
        x.stride(1) if x is not None else 0,
    )
    if source is None:
        args += (None, None, None, 0, 0)
        constants["DECODE"] = 0
    else:
        q, source_rows = source
        args += (q.codes, q.scales.view(torch.uint8), q.outer, source_rows, q.shape[1])
        constants["DECODE"] = 1 if q.outer.dim() == 0 else 2
    grid = lambda tiles: (triton.cdiv(m, bm), triton.cdiv(triton.cdiv(k, _BK), tiles))  # noqa: E731
    kernel = launcher(_nvfp4_quantize_kernel)
    if m > 0 and per_tensor and amax is None:
        kernel[grid(amax_tiles)](*args, MODE=0, REVERSE=False, TILES=amax_tiles, STAGES=stages, **constants)
    if m > 0:
        kernel[grid(tiles)](*args, MODE=1, REVERSE=per_tensor, TILES=tiles, STAGES=stages, **constants)
    else:
        outer.fill_(1.0)
    return NVFP4(
        codes=codes,
        scales=scales.view(torch.float8_e4m3fn),
        outer=outer,
        spec=spec,
        signs=signs,
        seed=seed,
        dtype=dtype,
    )


def _launch_constants(
    spec: QuantSpec, signs: Optional[torch.Tensor], m: int, x: Optional[torch.Tensor], decoded: bool,
    write_values: bool, device: torch.device, block_rows: Optional[int], num_warps: int, halves: Optional[bool],
    by_columns: Optional[bool],
) -> tuple[dict, int]:  # fmt: skip
    """The kernel's constexpr knobs for quantizing by ``spec`` (all but MODE, REVERSE, TILES, STAGES, DECODE) and
    the rows per program, with the launch-shape choices of :func:`quantize_triton` checked."""
    vmax_cap, inv_vmax = fp32_constants(spec)
    rot = spec.rotation_size
    if signs is None and rot and spec.rotation != "rht16_te":
        raise ValueError(f"quantize_triton: spec {spec.short_str()} needs rotation signs")
    fixed_signs = TE_RHT_SIGN_MASK if signs is None and spec.rotation == "rht16_te" else -1
    # a decoded source is the transpose of a row-major quantization: read by columns like a transposed view
    transposed_view = decoded or (x.stride(0) == 1 and x.stride(1) != 1 and m > 1)
    if by_columns is None:
        by_columns = transposed_view and rot != 128 and halves is not False
    if by_columns and (halves is False or rot == 128):
        raise ValueError("quantize_triton: by_columns=True needs halves=True (and a spec without RHT-128)")
    if halves is None:
        halves = rot == 16 or by_columns
    elif halves != (rot != 128) and rot:
        raise ValueError(f"quantize_triton: {spec.short_str()} needs halves={rot != 128}")
    bm = block_rows or _TILE_ROWS
    constants = dict(
        ROTATION=rot,
        LOG_ROTATION=int(math.log2(rot)) if rot else 0,
        ROTATION_SCALE=rotation_scale(rot) if rot else 1.0,
        FIXED_SIGNS=fixed_signs,
        BLOCK_2D=spec.block == "16x16",
        OUTER_BLOCK128=spec.outer != "tensor",
        ROUNDING=_ROUNDING[spec.rounding],
        FOUR_OVER_SIX=spec.scale_rule == "4over6",
        WRITE_VALUES=write_values,
        NO_FMA=device.type == "cuda",
        HALVES=halves,
        BY_COLUMNS=by_columns,
        VMAX_CAP=vmax_cap,
        INV_VMAX=inv_vmax,
        BM=bm,
        BK=_BK,
        PLAIN_AMAX=False,
        num_warps=num_warps,
    )
    return constants, bm


def abs_max_pair_triton(x: torch.Tensor, spec: QuantSpec, signs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP32 [2]: ``max |x|`` after ``spec``'s rotation (the amax that :func:`quantize_triton` of ``x`` by ``spec``
    takes) and ``max |x|`` unrotated (the amax of any unrotated per-tensor quantization of ``x`` or of its
    transpose), from one amax pass over ``x``: each program takes the unrotated maximum of the same tile (loaded
    again in the source; compiled for sm_90 the pass has the same 16 global loads per thread as the amax pass
    alone, for 384 SASS instructions instead of 328, no spills). Each maximum equals what the kernel's own amax
    pass, or the graph reduction, finds (a NaN where ``x`` holds one).

    Args:
        x: a non-empty tensor as :func:`quantize_triton` takes it (any strides).
        spec: a per-tensor spec with a rotation (RHT-16 or RHT-128).
        signs: the rotation signs, as :func:`quantize_triton` takes them.
    """
    if spec.outer != "tensor" or spec.rotation == "none":
        raise ValueError(f"abs_max_pair_triton: spec must be per-tensor and rotated, not {spec.short_str()}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"abs_max_pair_triton: x must be a non-empty 2-D tensor, not {tuple(x.shape)}")
    m, k = x.shape
    constants, bm = _launch_constants(spec, signs, m, x, False, False, x.device, None, 4, None, None)
    constants.update(PLAIN_AMAX=True, DECODE=0)
    bits = torch.zeros(2, dtype=torch.int32, device=x.device)
    tiles = _tiles_per_program(m, k, bm, _AMAX_PROGRAMS)
    grid = (triton.cdiv(m, bm), triton.cdiv(triton.cdiv(k, _BK), tiles))
    args = (x, None, None, None, bits, signs, None, None, m, k, x.stride(0), x.stride(1), None, None, None, 0, 0)
    launcher(_nvfp4_quantize_kernel)[grid](*args, MODE=0, REVERSE=False, TILES=tiles, STAGES=1, **constants)
    return bits.view(torch.float32)
