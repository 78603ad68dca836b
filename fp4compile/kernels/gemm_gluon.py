"""The NVFP4 GEMM with per-1x128-block outer scales in Gluon, with an asynchronous wgmma (Hopper).

``C = sum_kb (A_kb B_kb^T) * (outer_a[:, kb] outer_b[:, kb]^T)`` (+ bias), as ``kernels/gemm.py``'s block-scaled
path computes it. There each K step's partial product must be complete before it is scaled, and Triton waits
for every wgmma (``wgmma.wait_group 0`` in the sm_90 PTX, also when the partial product is carried to the next
iteration and scaled there). Here step k's wgmma runs while step k-1's partial product is
scaled and added: two partial products alternate in registers (step k's wgmma writes into the registers of step
k-2's, already added), a step's scales are loaded after the next step's wgmma is issued, and a ring of TMA loads
with mbarriers runs ``STAGES - 1`` steps ahead: ``wgmma.wait_group 1`` in the K loop (a CPU test compiles it for
sm_90). On an H200 it equals the float64 emulation and runs at 393-424 TFLOP/s at Llama shapes against 312-321 for
the Triton kernel (benchmarks/RESULTS.md, "Ninth session"): ``gemm_triton(method="auto")`` uses it for block-scaled
GEMMs on Hopper (``gemm.gluon_preferred``).

Newer Gluon returns a token from an asynchronous ``warpgroup_mma`` and the finished tensor from
``warpgroup_mma_wait``; older Gluon returns the tensor from ``warpgroup_mma`` and nothing from the wait. The
kernel handles both (``WAIT_RETURNS``, from what the installed Triton provides).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper as _hopper
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["DEFAULT_CONFIG", "descriptor", "gemm_gluon"]

_WAIT_RETURNS = hasattr(_hopper, "warpgroup_mma_init")
_BK = 128
#: (BM, BN, stages, warps): three FP32 [BM, BN] tiles live in registers (the sum and two partial products). 128x128
#: with 8 warps spills for sm_90 (255 registers, a 72-byte stack) and is still the fastest config measured on an H200
#: (393-424 TFLOP/s at Llama shapes, against 214-236 for the spill-free 128x64 and 312-321 for the Triton TMA kernel;
#: benchmarks/RESULTS.md, "Ninth session"); 128x128 with 4 stages needs more shared memory than an SM has.
DEFAULT_CONFIG = (128, 128, 3, 8)


@gluon.jit
def _load_step(a_desc, b_desc, a_smem, b_smem, bars, off_m, off_n, step, slot, pred, BK: gl.constexpr):
    """TMA loads of K step ``step``'s A and B tiles into ring slot ``slot`` (none where ``pred`` is false)."""
    nbytes: gl.constexpr = a_desc.block_type.nbytes + b_desc.block_type.nbytes
    mbarrier.expect(bars.index(slot), nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [off_m, step * BK], bars.index(slot), a_smem.index(slot), pred=pred)
    tma.async_copy_global_to_shared(b_desc, [off_n, step * BK], bars.index(slot), b_smem.index(slot), pred=pred)


@gluon.jit
def _step_scales(oa_ptr, ob_ptr, off_m, off_n, M, N, kb, BM: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):
    """``outer_a[rows, kb]`` and ``outer_b[cols, kb]`` from K-block-major copies [K/128, M] and [K/128, N]."""
    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
    oa = gl.load(oa_ptr + kb * M + rows, mask=rows < M, other=0.0)
    ob = gl.load(ob_ptr + kb * N + cols, mask=cols < N, other=0.0)
    return oa, ob


@gluon.jit
def _finish(prev, WAIT_RETURNS: gl.constexpr, OUTSTANDING: gl.constexpr):
    """The partial product of the wgmma ``prev`` once at most ``OUTSTANDING`` wgmmas are still in flight."""
    if WAIT_RETURNS:
        done = warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=[prev])
    else:
        warpgroup_mma_wait(num_outstanding=OUTSTANDING, deps=[prev])
        done = prev
    return done


@gluon.jit
def _block_scaled_gemm_kernel(
    a_desc, b_desc, c_ptr, oa_ptr, ob_ptr, bias_ptr, M, N, K, stride_cm,
    HAS_BIAS: gl.constexpr, WAIT_RETURNS: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr,
    STAGES: gl.constexpr, GROUP_M: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    gl.static_assert(BK == 128, "one K step per outer block")
    # grouped tile order (as kernels/gemm.py's): consecutive programs walk down GROUP_M tile rows, then on to the
    # next tile column, so that they share operand tiles in L2
    pid = gl.program_id(0)
    grid_m = gl.cdiv(M, BM)
    in_group = GROUP_M * gl.cdiv(N, BN)
    first_m = (pid // in_group) * GROUP_M
    size_m = gl.minimum(grid_m - first_m, GROUP_M)
    off_m = (first_m + (pid % in_group) % size_m) * BM
    off_n = ((pid % in_group) // size_m) * BN
    k_steps = K // BK
    a_smem = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, BK], a_desc.layout)
    b_smem = gl.allocate_shared_memory(b_desc.dtype, [STAGES, BN, BK], b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    for i in gl.static_range(STAGES - 1):  # steps 0 .. STAGES-2 into slots 0 .. STAGES-2
        _load_step(a_desc, b_desc, a_smem, b_smem, bars, off_m, off_n, i, i, i < k_steps, BK)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                 instr_shape=[16, BN, 16])  # fmt: skip
    zero = gl.zeros([BM, BN], gl.float32, layout=mma)
    acc = gl.zeros([BM, BN], gl.float32, layout=mma)
    mbarrier.wait(bars.index(0), 0)
    prev = warpgroup_mma(a_smem.index(0), b_smem.index(0).permute((1, 0)), zero, use_acc=False, is_async=True)
    # slot STAGES-1 has been free from the start: step STAGES-1 goes there
    _load_step(a_desc, b_desc, a_smem, b_smem, bars, off_m, off_n, STAGES - 1, STAGES - 1, STAGES - 1 < k_steps, BK)
    free = zero
    for k in range(1, k_steps):
        slot = k % STAGES
        mbarrier.wait(bars.index(slot), (k // STAGES) & 1)
        cur = warpgroup_mma(a_smem.index(slot), b_smem.index(slot).permute((1, 0)), free, use_acc=False,
                            is_async=True)  # fmt: skip
        oa, ob = _step_scales(oa_ptr, ob_ptr, off_m, off_n, M, N, k - 1, BM, BN, mma)
        done = _finish(prev, WAIT_RETURNS, 1)  # step k-1 finished, step k in flight
        acc += done * (oa[:, None] * ob[None, :])
        # step k-1's slot is free: step k + STAGES - 1 goes there
        _load_step(a_desc, b_desc, a_smem, b_smem, bars, off_m, off_n, k + STAGES - 1, (k - 1) % STAGES,
                   k + STAGES - 1 < k_steps, BK)  # fmt: skip
        prev = cur
        free = done
    oa, ob = _step_scales(oa_ptr, ob_ptr, off_m, off_n, M, N, k_steps - 1, BM, BN, mma)
    acc += _finish(prev, WAIT_RETURNS, 0) * (oa[:, None] * ob[None, :])
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, mma))
    cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
    if HAS_BIAS:
        acc += gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    gl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)


def descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """The TMA descriptor of ``t``'s [rows, 128] tiles (fp16, NVMMA shared layout)."""
    layout = gl.NVMMASharedLayout.get_default_for([rows, _BK], gl.float16)
    return TensorDescriptor.from_tensor(t, [rows, _BK], layout)


def gemm_gluon(
    a: torch.Tensor,
    b: torch.Tensor,
    outer_a: torch.Tensor,
    outer_b: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: tuple[int, int, int, int] = DEFAULT_CONFIG,
) -> torch.Tensor:
    """``sum_kb (a_kb @ b_kb^T) * outer`` (+ bias) with per-1x128-block outer scales, FP32 accumulation.

    Args:
        a, b: fp16 [M, K] and [N, K] exact operand values on a Hopper GPU, unit-stride rows 16-byte aligned, K a
            multiple of 128.
        outer_a, outer_b: FP32 [M, K/128] and [N, K/128] outer scales.
        bias: optional [N], added before the one rounding to ``out_dtype``.
        config: (BM, BN, stages, warps) of the launch (:data:`DEFAULT_CONFIG`).
    """
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != torch.float16 or b.dtype != torch.float16:
        raise ValueError(f"gemm_gluon: the operands must be fp16 exact values, not {a.dtype} and {b.dtype}")
    if k % _BK or b.shape[1] != k or outer_a.shape != (m, k // _BK) or outer_b.shape != (n, k // _BK):
        raise ValueError(
            f"gemm_gluon: a {tuple(a.shape)}, b {tuple(b.shape)} with outer scales {tuple(outer_a.shape)} and "
            f"{tuple(outer_b.shape)}: K must be a multiple of 128 and each operand needs one scale per 1x128 block"
        )
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    oa_t, ob_t = outer_a.T.contiguous(), outer_b.T.contiguous()  # K-block major: one base address per step
    bm, bn, stages, warps = config
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _block_scaled_gemm_kernel[grid](
        descriptor(a, bm), descriptor(b, bn), c, oa_t, ob_t, bias if bias is not None else oa_t, m, n, k,
        c.stride(0), HAS_BIAS=bias is not None, WAIT_RETURNS=_WAIT_RETURNS, BM=bm, BN=bn, BK=_BK, STAGES=stages,
        GROUP_M=8, num_warps=warps,
    )  # fmt: skip
    return c
