"""Triton NVFP4 GEMM on Hopper: fp16 tensor cores over exact ``code * scale`` operands.

``C = (A B^T) * outer`` where A [M, K] and B [N, K] hold E2M1 x E4M3 products (exact in
fp16, see ``format.gemm_operand``), accumulated in FP32. Outer scales are either one
FP32 per operand (applied once in the epilogue) or one per 1x128 K-block (TetraJet-v2
double block: each 128-wide K-step's partial product is scaled by ``outer_a[m, kb] *
outer_b[n, kb]`` before it is added). Bias is added in the epilogue, then one rounding
to the output dtype.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["gemm_triton"]


def _configs() -> list[triton.Config]:
    shapes = [  # (BM, BN, BK, stages, warps)
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 64, 4, 4),
        (128, 256, 128, 2, 8),
        (128, 128, 128, 3, 8),
        (64, 256, 128, 3, 8),
    ]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for bm, bn, bk, stages, warps in shapes
    ]


@triton.jit
def _gemm_body(
    a_ptr,
    b_ptr,
    c_ptr,
    outer_a_ptr,
    outer_b_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_am,
    stride_ak,
    stride_bn,
    stride_bk,
    stride_cm,
    stride_cn,
    BLOCK_OUTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & (rk[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & (rk[:, None] < K - k0), other=0.0)
        if BLOCK_OUTER:
            kb = k0 // 128
            oa = tl.load(outer_a_ptr + rm.to(tl.int64) * (K // 128) + kb, mask=m_ok, other=0.0)
            ob = tl.load(outer_b_ptr + rn.to(tl.int64) * (K // 128) + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * (oa[:, None] * ob[None, :])
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    if not BLOCK_OUTER:
        acc = acc * (tl.load(outer_a_ptr) * tl.load(outer_b_ptr))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_gemm_tuned = triton.autotune(configs=_configs(), key=["M", "N", "K", "BLOCK_OUTER", "HAS_BIAS", "EVEN_K"])(
    triton.jit(_gemm_body.fn)
)
_gemm_fixed = _gemm_body


def _tma_configs() -> list[triton.Config]:
    shapes = [  # (BM, BN, BK, stages, warps)
        (128, 256, 64, 3, 8),
        (128, 256, 64, 4, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 128, 3, 8),
        (128, 256, 128, 2, 8),
    ]
    return [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps,
                      pre_hook=_set_block_shapes)
        for bm, bn, bk, stages, warps in shapes
    ]


def _set_block_shapes(nargs: dict) -> None:
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BN"], nargs["BK"]]


@triton.jit
def _gemm_tma_body(
    a_desc,
    b_desc,
    c_ptr,
    outer_a_ptr,
    outer_b_ptr,
    bias_ptr,
    M,
    N,
    K,
    stride_cm,
    stride_cn,
    BLOCK_OUTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Persistent variant: TMA tile loads, one program per SM walking the output tiles."""
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    in_group = GROUP_M * grid_n
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_SMS, flatten=True):
        group = tile // in_group
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % in_group) % size_m
        pid_n = (tile % in_group) // size_m
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pid_m * BM, ki * BK])
            b = b_desc.load([pid_n * BN, ki * BK])
            if BLOCK_OUTER:
                kb = (ki * BK) // 128
                oa = tl.load(outer_a_ptr + rm.to(tl.int64) * (K // 128) + kb, mask=m_ok, other=0.0)
                ob = tl.load(outer_b_ptr + rn.to(tl.int64) * (K // 128) + kb, mask=n_ok, other=0.0)
                acc += tl.dot(a, b.T) * (oa[:, None] * ob[None, :])
            else:
                acc = tl.dot(a, b.T, acc)
        if not BLOCK_OUTER:
            acc = acc * (tl.load(outer_a_ptr) * tl.load(outer_b_ptr))
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_gemm_tma = triton.autotune(configs=_tma_configs(), key=["M", "N", "K", "BLOCK_OUTER", "HAS_BIAS"])(_gemm_tma_body)


def _tma_ready(t: torch.Tensor) -> bool:
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def gemm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    outer_a: torch.Tensor,
    outer_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    autotune: bool = True,
    method: str = "auto",
) -> torch.Tensor:
    """``(a @ b^T) * outer`` (+ bias) with FP32 accumulation.

    Args:
        a: fp16 [M, K] exact operand values (any strides); b: fp16 [N, K] (any strides);
            K a multiple of 16 (of 128 with per-block outer scales).
        outer_a, outer_b: FP32 scalars (per tensor) or contiguous [M, K/128] / [N, K/128] (double block).
        bias: optional [N] added before the one rounding to ``out_dtype``.
        autotune: pick the tile shape by timing (GPU); ``False`` uses one fixed shape (interpreter).
        method: ``"tma"`` (persistent kernel with TMA loads; needs unit-stride rows), ``"pointer"``
            (pointer loads, any strides), or ``"auto"`` (TMA where the operands allow it).
    """
    if method not in ("auto", "tma", "pointer"):
        raise ValueError(f"method must be 'auto', 'tma' or 'pointer', got {method!r}")
    m, k = a.shape
    n = b.shape[0]
    block_outer = outer_a.dim() == 2
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    args = (a, b, c, outer_a, outer_b, bias if bias is not None else outer_a, m, n, k)
    args += (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1))
    tma_ok = autotune and _tma_ready(a) and _tma_ready(b)
    if method == "tma" and not tma_ok:
        raise ValueError("method='tma' needs autotune and operands with unit-stride, 16-byte aligned rows")
    if tma_ok and method != "pointer":
        sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
        a_desc = TensorDescriptor.from_tensor(a, [1, 16])  # block shapes are set per config by the pre-hook
        b_desc = TensorDescriptor.from_tensor(b, [1, 16])
        grid = lambda meta: (min(sms, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)  # noqa: E731
        _gemm_tma[grid](a_desc, b_desc, *args[2:9], c.stride(0), c.stride(1), BLOCK_OUTER=block_outer,
                        HAS_BIAS=bias is not None, NUM_SMS=sms)
        return c
    flags = dict(BLOCK_OUTER=block_outer, HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0)
    if autotune:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _gemm_tuned[grid](*args, **flags)
    else:
        bm, bn = 32, 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _gemm_fixed[grid](*args, **flags, BM=bm, BN=bn, BK=64, GROUP_M=4)
    return c
