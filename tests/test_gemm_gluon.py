"""The experimental Gluon block-scaled GEMM (``kernels/gemm_gluon.py``): compiled for Hopper on any machine, its K
loop keeps one wgmma in flight; on a GPU it equals the float64 emulation of its definition (``test_linear.py``'s
``test_gpu_gemm_large_matches_emulation[gluon]``)."""

import re

import pytest
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type

from fp4compile.kernels import gemm_gluon
from fp4compile.kernels.gemm import gemm_triton


def test_compiled_for_hopper_the_k_loop_keeps_one_wgmma_in_flight():
    """sm_90 PTX at the default launch config: a ``wgmma.wait_group 1`` (the K loop: the next step's wgmma runs while
    this one's partial product is scaled) and the one ``wait_group 0`` after the loop."""
    operand = torch.empty(256, 256, dtype=torch.float16)
    bm, bn, stages, warps = gemm_gluon.DEFAULT_CONFIG
    a_desc, b_desc = gemm_gluon.descriptor(operand, bm), gemm_gluon.descriptor(operand, bn)
    constants = dict(HAS_BIAS=True, WAIT_RETURNS=gemm_gluon._WAIT_RETURNS, BM=bm, BN=bn, BK=128, STAGES=stages,
                     GROUP_M=8, num_warps=warps)  # fmt: skip
    signature = dict(a_desc=mangle_type(a_desc), b_desc=mangle_type(b_desc), c_ptr="*bf16", oa_ptr="*fp32",
                     ob_ptr="*fp32", bias_ptr="*fp32", M="i32", N="i32", K="i32", stride_cm="i32")  # fmt: skip
    signature.update({name: "constexpr" for name in constants})
    source = GluonASTSource(gemm_gluon._block_scaled_gemm_kernel, signature, constants)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    ptx = kernel.asm["ptx"]
    waits = re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", ptx)
    assert "1" in waits and waits.count("0") == 1


def test_gluon_method_needs_per_block_scales():
    a = torch.zeros(128, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"method='gluon' needs per-block outer scales"):
        gemm_triton(a, a, torch.ones(()), torch.ones(()), method="gluon")


def test_gluon_kernel_names_operands_it_cannot_take():
    a = torch.zeros(128, 256, dtype=torch.float16)
    scales = torch.ones(128, 2)
    with pytest.raises(ValueError, match=r"must be fp16 exact values, not torch.bfloat16"):
        gemm_gluon.gemm_gluon(a.bfloat16(), a, scales, scales)
    with pytest.raises(ValueError, match=r"K must be a multiple of 128"):
        gemm_gluon.gemm_gluon(a[:, :200], a[:, :200], scales, scales)
