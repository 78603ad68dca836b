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
import gc
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

__all__ = ["gemm_triton", "gluon_preferred"]


@triton.jit
def _tile_coords(tile, grid_m, in_group, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile number ``tile`` in grouped order, ``in_group = GROUP_M * grid_n`` tiles a group:
    consecutive tiles walk down GROUP_M tile rows, then on to the next tile column, so that neighbouring programs
    share operand tiles in L2."""
    group = tile // in_group
    first_m = group * GROUP_M
    size_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % in_group) % size_m
    pid_n = (tile % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _block_scales(outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, kb, K):
    """``outer_a[m, kb] * outer_b[n, kb]`` for the tile's rows and columns."""
    oa = tl.load(outer_a_ptr + rm.to(tl.int64) * (K // 128) + kb, mask=m_ok, other=0.0)
    ob = tl.load(outer_b_ptr + rn.to(tl.int64) * (K // 128) + kb, mask=n_ok, other=0.0)
    return oa[:, None] * ob[None, :]


@triton.jit
def _k_step(acc, a, b, outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, k0, K, BLOCK_OUTER: tl.constexpr):
    """``acc + a @ b`` for the K step at ``k0`` (a [BM, BK], b [BK, N]). With per-1x128-block outer scales the
    step's partial product is first scaled by ``outer_a[m, kb] * outer_b[n, kb]``, kb = k0 // 128 (BK divides 128)."""
    if BLOCK_OUTER:
        acc += tl.dot(a, b) * _block_scales(outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, k0 // 128, K)
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _uniform_scaled(acc, outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, K, K_UNIFORM):
    """With per-block outer scales of which the first ``K_UNIFORM`` columns (a multiple of 128) repeat each row's
    first block's scales: after the unscaled accumulation of those columns, their sum scaled once (as per-tensor
    scales are), before the remaining K steps add their scaled partial products (:func:`_k_step`). The unscaled
    steps run in a loop of their own, so that it pipelines as a plain GEMM's does."""
    if K_UNIFORM > 0:
        acc = acc * _block_scales(outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, 0, K)
    return acc


@triton.jit
def _epilogue(
    acc,
    c_ptr,
    outer_a_ptr,
    outer_b_ptr,
    bias_ptr,
    rm,
    rn,
    m_ok,
    n_ok,
    stride_cm,
    stride_cn,
    BLOCK_OUTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Per-tensor outer scales (per-block ones were applied in the K steps), bias, one rounding to C's dtype, store."""
    if not BLOCK_OUTER:
        acc = acc * (tl.load(outer_a_ptr) * tl.load(outer_b_ptr))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _autotune_configs(shapes, pre_hook=None) -> list[triton.Config]:
    """One config per (BM, BN, BK, stages, warps), with grouped tile order over 8 tile rows."""
    return [
        triton.Config(
            {"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps, pre_hook=pre_hook
        )
        for bm, bn, bk, stages, warps in shapes
    ]


# Config space of the pointer kernel, (BM, BN, BK, stages, warps), timed per key by the autotuner on the GPU. The
# choices: large Hopper fp16 tensor-core tiles with 8 warps in the style of Triton's matmul tutorials (the first is
# the tutorial's 128x256x64, 3 stages, 8 warps), one 4-warp variant, BK 64 or 128 (BK must divide 128 so that a
# per-block outer scale is constant over a K step; 128 is one outer block per step), fewer stages where a tile needs
# more shared memory. Measured throughput on H100: benchmarks/RESULTS.md.
_POINTER_SHAPES = [
    (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 8),
    (128, 128, 64, 4, 4), (128, 256, 128, 2, 8), (128, 128, 128, 3, 8), (64, 256, 128, 3, 8),
]  # fmt: skip


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
    K_UNIFORM,
    BLOCK_OUTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UNIFORM: tl.constexpr,
    EVEN_K: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Pointer loads (any strides), one program per output tile."""
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    pid_m, pid_n = _tile_coords(pid, grid_m, GROUP_M * grid_n, GROUP_M)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_first = K_UNIFORM if UNIFORM else 0
    for k0 in range(0, k_first, BK):  # per-block scales equal to the first block's: accumulate unscaled
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    if UNIFORM:
        acc = _uniform_scaled(acc, outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, K, K_UNIFORM)
    for k0 in range(k_first, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=m_ok[:, None] & (rk[None, :] < K - k0), other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & (rk[:, None] < K - k0), other=0.0)
        acc = _k_step(acc, a, b, outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, k0, K, BLOCK_OUTER)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    _epilogue(
        acc, c_ptr, outer_a_ptr, outer_b_ptr, bias_ptr, rm, rn, m_ok, n_ok, stride_cm, stride_cn, BLOCK_OUTER, HAS_BIAS
    )


_gemm_tuned = triton.autotune(
    configs=_autotune_configs(_POINTER_SHAPES), key=["M", "N", "K", "BLOCK_OUTER", "HAS_BIAS", "UNIFORM", "EVEN_K"]
)(triton.jit(_gemm_body.fn))
_gemm_fixed = _gemm_body  # one small shape, launched by gemm_triton(autotune=False) (the interpreter)


def _set_block_shapes(nargs: dict) -> None:
    """Autotune pre-hook: the TMA descriptors' block shapes follow the config being run."""
    nargs["a_desc"].block_shape = [nargs["BM"], nargs["BK"]]
    nargs["b_desc"].block_shape = [nargs["BK"], nargs["BN"]] if nargs["B_KMAJOR"] else [nargs["BN"], nargs["BK"]]


# Config space of the TMA kernel, (BM, BN, BK, stages, warps): the pointer kernel's shapes (see above) with 8 warps
# and BM >= 128, for the same reasons; the pre-hook sizes the TMA descriptors' blocks to each config.
_TMA_SHAPES = [
    (128, 256, 64, 3, 8), (128, 256, 64, 4, 8), (256, 128, 64, 3, 8),
    (128, 128, 64, 4, 8), (128, 128, 128, 3, 8), (128, 256, 128, 2, 8),
]  # fmt: skip


@triton.jit
def _b_tile(b_desc, n0, k0, B_KMAJOR: tl.constexpr):
    """B's [BK, BN] tile at (k0, n0) for ``a @ b``: a [BN, BK] block transposed, or with ``B_KMAJOR`` (the descriptor
    is over the [K, N] tensor underneath B) a [BK, BN] block as it is."""
    if B_KMAJOR:
        tile = b_desc.load([k0, n0])
    else:
        tile = b_desc.load([n0, k0]).T
    return tile


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
    K_UNIFORM,
    stride_am,
    stride_bn,
    BLOCK_OUTER: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    UNIFORM: tl.constexpr,
    NUM_SMS: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    GROUP_M: tl.constexpr,
    DEVICE_DESC: tl.constexpr = False,
    B_KMAJOR: tl.constexpr = False,
):
    """Persistent variant: TMA tile loads, one program per SM walking the output tiles.

    ``a_desc`` and ``b_desc`` are host-side tensor descriptors of A and B (the autotuned launch, whose pre-hook sizes
    their blocks), or with ``DEVICE_DESC`` the operands' pointers, from which each program builds its descriptors
    (rows ``stride_am`` / ``stride_bn`` apart): the launch Inductor makes from a traced graph, whose argument
    analysis and launcher take pointers, not descriptors. With ``B_KMAJOR`` B [N, K] is a transposed view and its
    descriptor is the [K, N] tensor underneath (rows ``stride_bn`` apart, [BK, BN] blocks): the dgrad's W^T."""
    if DEVICE_DESC:
        a_desc = tl.make_tensor_descriptor(a_desc, shape=[M, K], strides=[stride_am, 1], block_shape=[BM, BK])
        if B_KMAJOR:
            b_desc = tl.make_tensor_descriptor(b_desc, shape=[K, N], strides=[stride_bn, 1], block_shape=[BK, BN])
        else:
            b_desc = tl.make_tensor_descriptor(b_desc, shape=[N, K], strides=[stride_bn, 1], block_shape=[BN, BK])
    grid_m = tl.cdiv(M, BM)
    grid_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    in_group = GROUP_M * grid_n
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, grid_m, in_group, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        k_first = K_UNIFORM // BK if UNIFORM else 0
        for ki in range(k_first):  # per-block scales equal to the first block's: accumulate unscaled
            a = a_desc.load([pid_m * BM, ki * BK])
            acc = tl.dot(a, _b_tile(b_desc, pid_n * BN, ki * BK, B_KMAJOR), acc)
        if UNIFORM:
            acc = _uniform_scaled(acc, outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, K, K_UNIFORM)
        for ki in range(k_first, k_tiles):
            a = a_desc.load([pid_m * BM, ki * BK])
            b = _b_tile(b_desc, pid_n * BN, ki * BK, B_KMAJOR)
            acc = _k_step(acc, a, b, outer_a_ptr, outer_b_ptr, rm, rn, m_ok, n_ok, ki * BK, K, BLOCK_OUTER)
        _epilogue(acc, c_ptr, outer_a_ptr, outer_b_ptr, bias_ptr, rm, rn, m_ok, n_ok, stride_cm, stride_cn,
                  BLOCK_OUTER, HAS_BIAS)  # fmt: skip


_gemm_tma = triton.autotune(
    configs=_autotune_configs(_TMA_SHAPES, _set_block_shapes),
    key=["M", "N", "K", "BLOCK_OUTER", "HAS_BIAS", "UNIFORM", "B_KMAJOR"],
)(_gemm_tma_body)


def _tma_rows(t: torch.Tensor) -> bool:
    """Unit-stride rows whose pitch and start are 16-byte aligned (what a TMA descriptor needs), read off the
    strides and storage offset (which a traced, fake tensor has too) of a 2-D tensor whose storage is aligned."""
    size = t.element_size()
    aligned = (t.stride(0) * size) % 16 == 0 and (t.storage_offset() * size) % 16 == 0
    return t.dim() == 2 and t.stride(1) == 1 and aligned


def _tma_ready(t: torch.Tensor) -> bool:
    """:func:`_tma_rows` of a real tensor, its address checked too."""
    return _tma_rows(t) and t.data_ptr() % 16 == 0


def _check_uniform(uniform_k: int, block_outer: bool, k: int) -> None:
    """``uniform_k`` must be a multiple of 128 in (0, K] and needs per-block outer scales (see :func:`gemm_triton`)."""
    if uniform_k and (not block_outer or uniform_k % 128 or not 0 < uniform_k <= k):
        raise ValueError(f"uniform_k={uniform_k} needs per-block outer scales and a multiple of 128 in (0, K={k}]")


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=8)
def _hopper_index_with_gluon(device_index: int) -> bool:
    if torch.cuda.get_device_capability(device_index) != (9, 0):
        return False
    try:
        from . import gemm_gluon  # noqa: F401
    except (ImportError, AttributeError):
        return False
    return True


def _hopper_with_gluon(device: torch.device) -> bool:
    """Whether CUDA ``device`` is a Hopper GPU (sm_90: the Gluon kernel's wgmma is Hopper's) and the installed Triton
    has the Gluon API the kernel uses (False without CUDA: a trace with fake CUDA tensors on a CPU machine)."""
    if not torch.cuda.is_available():
        return False
    return _hopper_index_with_gluon(device.index if device.index is not None else torch.cuda.current_device())


def gluon_preferred(a: torch.Tensor, b: torch.Tensor, outer_a: torch.Tensor, uniform_k: int) -> bool:
    """Whether ``gemm_triton(method="auto")`` runs the GEMM on the Gluon kernel (``kernels/gemm_gluon.py``): per-block
    outer scales without uniform leading columns, non-empty fp16 operands whose own rows TMA can read, on a Hopper
    GPU. There it overlaps each K step's wgmma with the scaling of the step before, which Triton's kernel cannot
    (Triton waits for every wgmma whose result is scaled: ``wgmma.wait_group 0`` in its K loop): 393-424 against
    312-321 TFLOP/s on an H200 at Llama shapes (benchmarks/RESULTS.md, "Ninth session"). With uniform leading columns
    Triton's kernel, which accumulates them unscaled, is faster (612). Reads layouts only, so it answers for traced
    tensors too (``kernels/gemm_traced.py``)."""
    if not (a.is_cuda and outer_a.dim() == 2 and not uniform_k and a.dtype == b.dtype == torch.float16):
        return False
    if not (min(a.shape[0], b.shape[0], a.shape[1]) > 0 and _tma_rows(a) and _tma_rows(b)):
        return False
    return _hopper_with_gluon(a.device)


def _launch_tuned(kernel, grid, args: tuple, kwargs: dict) -> None:
    """Launch the autotuned ``kernel``, and when that launch autotuned (a new shape: its config cache grew)
    collect the garbage the timing left.

    A config that fails to compile or launch raises inside Triton's autotuner, and the exception's frames, which
    hold this launch's tensors (its output among them), can end up in reference cycles that only the garbage
    collector frees. Under CUDA graphs that breaks the warm-up: CUDA-graph trees take the output, which the caller
    has long dropped, for live, collect garbage, then find it freed ("storage data ptrs are not allocated in
    pool"; benchmarks/RESULTS.md, "CUDA graphs and the outlier paths"). The cost: one full collection per GEMM
    shape and process (0.2-0.25 s with a compiled 4-layer Llama in the process, on a CPU machine), on the first
    step only; other launches pay one ``len``."""
    tuned = len(kernel.cache)
    kernel[grid](*args, **kwargs)
    if len(kernel.cache) != tuned:
        gc.collect()


def gemm_triton(
    a: torch.Tensor,
    b: torch.Tensor,
    outer_a: torch.Tensor,
    outer_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    autotune: bool = True,
    method: str = "auto",
    uniform_k: int = 0,
) -> torch.Tensor:
    """``(a @ b^T) * outer`` (+ bias) with FP32 accumulation.

    Args:
        a: fp16 [M, K] exact operand values (any strides); b: fp16 [N, K] (any strides);
            K a multiple of 16 (of 128 with per-block outer scales).
        outer_a, outer_b: FP32 scalars (per tensor) or contiguous [M, K/128] / [N, K/128] (double block).
        bias: optional [N] added before the one rounding to ``out_dtype``.
        autotune: pick the tile shape by timing (GPU); ``False`` uses one fixed shape (interpreter).
        method: ``"tma"`` (persistent kernel with TMA loads; needs unit-stride rows, B's or those of the [K, N]
            tensor under a transposed B), ``"pointer"`` (pointer loads, any strides), ``"gluon"`` (per-block outer
            scales only: the Gluon kernel with an asynchronous wgmma, ``kernels/gemm_gluon.py``, Hopper only; it
            scales every K block, ``uniform_k`` included), or ``"auto"``: Gluon where :func:`gluon_preferred` says
            so and the operands' addresses are 16-byte aligned, else TMA where the operands allow it, else pointers.
        uniform_k: with per-block outer scales, how many leading K columns (a multiple of 128) have each row's
            first block's scales in every block (a per-tensor scale repeated, as the Hot-Channel Patch's main
            columns): they accumulate unscaled and are scaled once, as per-tensor scales are, instead of every
            K step (the same value, rounded in another order).
    """
    if method not in ("auto", "tma", "pointer", "gluon"):
        raise ValueError(f"method must be 'auto', 'tma', 'pointer' or 'gluon', got {method!r}")
    m, k = a.shape
    n = b.shape[0]
    block_outer = outer_a.dim() == 2
    _check_uniform(uniform_k, block_outer, k)
    if method == "auto" and gluon_preferred(a, b, outer_a, uniform_k) and _tma_ready(a) and _tma_ready(b):
        method = "gluon"
    if method == "gluon":
        if not (block_outer and _tma_ready(a) and _tma_ready(b)):
            raise ValueError("method='gluon' needs per-block outer scales and operands with unit-stride, 16-byte "
                             "aligned rows")  # fmt: skip
        from .gemm_gluon import gemm_gluon

        return gemm_gluon(a, b, outer_a, outer_b, bias, out_dtype)
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    args = (a, b, c, outer_a, outer_b, bias if bias is not None else outer_a, m, n, k)
    args += (a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1), uniform_k)
    flags = dict(BLOCK_OUTER=block_outer, HAS_BIAS=bias is not None, UNIFORM=uniform_k > 0)
    b_kmajor = not _tma_ready(b) and _tma_ready(b.T)  # a transposed view of a row-major [K, N] tensor
    tma_ok = autotune and _tma_ready(a) and (_tma_ready(b) or b_kmajor)
    if method == "tma" and not tma_ok:
        raise ValueError("method='tma' needs autotune and operands with unit-stride, 16-byte aligned rows")
    if tma_ok and method != "pointer":
        sms = _num_sms(a.device.index if a.device.index is not None else torch.cuda.current_device())
        a_desc = TensorDescriptor.from_tensor(a, [1, 16])  # block shapes are set per config by the pre-hook
        b_desc = TensorDescriptor.from_tensor(b.T if b_kmajor else b, [1, 16])
        grid = lambda meta: (min(sms, triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"])),)  # noqa: E731
        b_rows = b.stride(1) if b_kmajor else b.stride(0)
        tma_args = (a_desc, b_desc, *args[2:9], c.stride(0), c.stride(1), uniform_k, a.stride(0), b_rows)
        _launch_tuned(_gemm_tma, grid, tma_args, dict(flags, NUM_SMS=sms, B_KMAJOR=b_kmajor))
        return c
    flags["EVEN_K"] = k % 128 == 0
    if autotune:
        grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
        _launch_tuned(_gemm_tuned, grid, args, flags)
    else:
        bm, bn = 32, 32
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
        _gemm_fixed[grid](*args, **flags, BM=bm, BN=bn, BK=64, GROUP_M=4)
    return c
