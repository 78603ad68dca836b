"""The experimental Gluon block-scaled GEMM (``kernels/gemm_gluon.py``): compiled for Hopper on any machine, its K
loop keeps one wgmma in flight; on a GPU it equals the float64 emulation of its definition (``test_linear.py``'s
``test_gpu_gemm_large_matches_emulation[gluon]``)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fp4compile.kernels import gemm_gluon
from fp4compile.kernels.gemm import gemm_triton

# Compiled in a fresh process without Triton's interpreter, which the test session turns on for machines without a
# GPU: the compiler must see Triton's own language functions, not the interpreter's stand-ins.
_COMPILE = r"""
import json, re
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource
from triton.runtime.jit import mangle_type
from fp4compile.kernels import gemm_gluon

operand = torch.empty(256, 256, dtype=torch.float16)
bm, bn, stages, warps = gemm_gluon.DEFAULT_CONFIG
a_desc, b_desc = gemm_gluon.descriptor(operand, bm), gemm_gluon.descriptor(operand, bn)
constants = dict(HAS_BIAS=True, WAIT_RETURNS=gemm_gluon._WAIT_RETURNS, BM=bm, BN=bn, BK=128, STAGES=stages,
                 GROUP_M=8, num_warps=warps)
signature = dict(a_desc=mangle_type(a_desc), b_desc=mangle_type(b_desc), c_ptr="*bf16", oa_ptr="*fp32",
                 ob_ptr="*fp32", bias_ptr="*fp32", M="i32", N="i32", K="i32", stride_cm="i32")
signature.update({name: "constexpr" for name in constants})
source = GluonASTSource(gemm_gluon._block_scaled_gemm_kernel, signature, constants)
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
print(json.dumps(re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", kernel.asm["ptx"])))
"""


def test_compiled_for_hopper_the_k_loop_keeps_one_wgmma_in_flight():
    """sm_90 PTX at the default launch config: a ``wgmma.wait_group 1`` (the K loop: the next step's wgmma runs while
    this one's partial product is scaled) and the one ``wait_group 0`` after the loop."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    waits = json.loads(done.stdout.strip().splitlines()[-1])
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


def test_auto_prefers_gluon_for_block_scaled_fp16_gemms_on_hopper_only(monkeypatch):
    """``gemm_triton(method="auto")`` runs a GEMM on the Gluon kernel only with per-block outer scales, no uniform
    leading columns, non-empty fp16 operands whose own rows TMA reads, on a Hopper GPU (traced tensors included:
    the answer reads layouts only)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fp4compile.kernels import gemm

    assert not gemm._hopper_with_gluon(torch.device("cuda")) or torch.cuda.get_device_capability() == (9, 0)
    monkeypatch.setattr(gemm, "_hopper_with_gluon", lambda device: True)
    with FakeTensorMode():
        a = torch.empty(256, 512, dtype=torch.float16, device="cuda")
        b = torch.empty(384, 512, dtype=torch.float16, device="cuda")
        blocks, per_tensor = torch.empty(256, 4, device="cuda"), torch.empty((), device="cuda")
        assert gemm.gluon_preferred(a, b, blocks, 0)
        assert not gemm.gluon_preferred(a, b, blocks, 256)  # uniform leading columns: Triton's kernel is faster
        assert not gemm.gluon_preferred(a, b, per_tensor, 0)
        assert not gemm.gluon_preferred(a, torch.empty(512, 384, dtype=torch.float16, device="cuda").T, blocks, 0)
        assert not gemm.gluon_preferred(a.bfloat16(), b.bfloat16(), blocks, 0)
        empty = torch.empty(0, 512, dtype=torch.float16, device="cuda")
        assert not gemm.gluon_preferred(empty, b, torch.empty(0, 4, device="cuda"), 0)
    cpu = torch.zeros(256, 512, dtype=torch.float16)
    assert not gemm.gluon_preferred(cpu, cpu, torch.ones(256, 4), 0)
    monkeypatch.setattr(gemm, "_hopper_with_gluon", lambda device: False)
    with FakeTensorMode():
        a = torch.empty(256, 512, dtype=torch.float16, device="cuda")
        assert not gemm.gluon_preferred(a, a, torch.empty(256, 4, device="cuda"), 0)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0),
                    reason="needs a Hopper GPU (sm_90)")  # fmt: skip
def test_gpu_auto_runs_block_scaled_gemms_on_the_gluon_kernel():
    """On Hopper, ``method="auto"`` gives the Gluon kernel's result bit for bit for block-scaled GEMMs, and the
    Triton kernel's for GEMMs with uniform leading columns."""
    torch.manual_seed(0)
    a = torch.randint(-6, 7, (1024 + 8, 1024), device="cuda").half()
    b = torch.randint(-6, 7, (512 + 16, 1024), device="cuda").half()
    oa, ob = torch.rand(a.shape[0], 8, device="cuda"), torch.rand(b.shape[0], 8, device="cuda")
    assert torch.equal(gemm_triton(a, b, oa, ob), gemm_triton(a, b, oa, ob, method="gluon"))
    oa[:, :4], ob[:, :4] = oa[:, :1], ob[:, :1]
    uniform = gemm_triton(a, b, oa, ob, uniform_k=512)
    assert torch.equal(uniform, gemm_triton(a, b, oa, ob, uniform_k=512, method="tma"))


def test_the_step_benchmark_runs_recipe_variants(monkeypatch):
    """``bench_train_step --recipes R@triton+decoded``: inside the block the Gluon kernel is not offered and the
    re-quantization decodes to FP32 first (``@graph_amax``: each quantization finds its own amax); after it, the
    library's choices are back."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from benchmarks import bench_train_step
    from fp4compile import linear_gemms
    from fp4compile.kernels import gemm, quantize

    monkeypatch.setattr(gemm, "_hopper_with_gluon", lambda device: True)
    fused = quantize.requantize_transposed_triton
    with FakeTensorMode():
        a = torch.empty(256, 512, dtype=torch.float16, device="cuda")
        blocks = torch.empty(256, 4, device="cuda")
        with bench_train_step._variant("triton+decoded"):
            assert not gemm.gluon_preferred(a, a, blocks, 0)
            assert quantize.requantize_transposed_triton is bench_train_step._requantize_from_fp32
        assert gemm.gluon_preferred(a, a, blocks, 0) and quantize.requantize_transposed_triton is fused
    paired = linear_gemms.amax_pair
    with bench_train_step._variant("graph_amax"):
        assert linear_gemms.amax_pair(None, None, None, None, None) == (None, None)
    assert linear_gemms.amax_pair is paired
    with pytest.raises(SystemExit, match="@gluon"):
        with bench_train_step._variant("gluon"):
            pass
