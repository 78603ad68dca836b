"""The GEMM in a graph Inductor compiles (``kernels/gemm_traced.py``): one recorded launch of the persistent TMA
kernel with device-side descriptors, which writes only its output, computes what the eager launch computes bit for
bit, and is used only where Inductor launches it."""

import contextvars
import json
import os
import subprocess
import sys

import pytest
import torch
import triton
from testing import KERNEL_DEVICE, requires_gpu
from triton.tools.tensor_descriptor import TensorDescriptor

from fp4compile import dispatch, quantize
from fp4compile.format import gemm_operand
from fp4compile.kernels import gemm, gemm_traced
from fp4compile.schema import op_name

# Traced in a fresh process without Triton's interpreter (torch records launches of compiled-mode kernels only): on
# a machine without a GPU, for sm_90 (torch's analysis of a recorded kernel compiles it to Triton IR), with a fixed
# tile config and SM count in place of the autotuner's choice and the device's.
_TRACE = r"""
import json, sys
import torch, triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from triton.backends.compiler import GPUTarget
from fp4compile import dispatch
from fp4compile.kernels import gemm_traced

class HopperTarget:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)
    def get_current_device(self):
        return 0
    def get_current_stream(self, device=None):
        return 0

if not torch.cuda.is_available():
    triton.runtime.driver.set_active(HopperTarget())
gemm_traced.tuned_config = lambda *args: (128, 128, 64, 3, 8)
gemm_traced._num_sms = lambda index: 132
block, bias, uniform_k, transposed, inductor, b_transposed, hopper = json.loads(sys.argv[1])
# hopper: a Hopper GPU with Gluon, where the eager GEMM runs block-scaled GEMMs on the Gluon kernel; set either way,
# so that the trace is the same on a CPU machine and on a lent H200
from fp4compile.kernels import gemm
gemm._hopper_with_gluon = lambda device: hopper
with FakeTensorMode():
    a = torch.empty(512, 256, dtype=torch.float16, device="cuda").T if transposed else torch.empty(
        256, 512, dtype=torch.float16, device="cuda")
    b = torch.empty(512, 384, dtype=torch.float16, device="cuda").T if b_transposed else torch.empty(
        384, 512, dtype=torch.float16, device="cuda")
    oa = torch.empty(256, 4, device="cuda") if block else torch.empty((), device="cuda")
    ob = torch.empty(384, 4, device="cuda") if block else torch.empty((), device="cuda")
    bias_t = torch.empty(384, dtype=torch.bfloat16, device="cuda") if bias else None

    def fn(a, b, oa, ob, bias_t):
        return dispatch.gemm(a, b, oa, ob, bias_t, torch.bfloat16, uniform_k) * 2

    traced = make_fx(torch.func.functionalize(fn, remove="mutations_and_views"))
    if inductor:
        with gemm_traced.inductor_launches():
            graph = traced(a, b, oa, ob, bias_t).graph
    else:
        graph = traced(a, b, oa, ob, bias_t).graph
launches = []
for node in graph.nodes:
    if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
        kw = node.kwargs
        launches.append(dict(kwargs={k: v for k, v in kw["kwargs"].items() if not isinstance(v, torch.fx.Node)},
                             clone=kw["tensors_to_clone"], tma=kw["tma_descriptor_metadata"], grid=kw["grid"]))
targets = [str(n.target) for n in graph.nodes if n.op == "call_function"]
print(json.dumps(dict(launches=launches, targets=targets)))
"""


def _trace(block=False, bias=False, uniform_k=0, transposed=False, inductor=True, b_transposed=False,
           hopper=False) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    flags = json.dumps([block, bias, uniform_k, transposed, inductor, b_transposed, hopper])
    done = subprocess.run([sys.executable, "-c", _TRACE, flags], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "block,bias,uniform_k,b_transposed",
    [(False, False, 0, False), (False, True, 0, False), (True, True, 0, False), (True, False, 256, False),
     (False, False, 0, True), (True, True, 0, True)],
)  # fmt: skip
def test_under_inductor_the_gemm_is_one_recorded_launch_that_writes_only_its_output(block, bias, uniform_k,
                                                                                    b_transposed):
    """B may be a transposed view (the dgrad's W^T): the kernel reads the [K, N] tensor underneath."""
    traced = _trace(block, bias, uniform_k, b_transposed=b_transposed)
    assert len(traced["launches"]) == 1 and not any("fp4compile" in t for t in traced["targets"])
    launch = traced["launches"][0]
    kwargs = launch["kwargs"]
    # torch's analysis of the kernel found that it writes C alone: no operand is cloned before the launch
    assert launch["clone"] == ["c_ptr"]
    assert launch["tma"] == {}  # pointers: the kernel builds its descriptors
    assert (kwargs["DEVICE_DESC"], kwargs["BLOCK_OUTER"], kwargs["HAS_BIAS"]) == (True, block, bias)
    assert (kwargs["UNIFORM"], kwargs["K_UNIFORM"]) == (uniform_k > 0, uniform_k)
    assert [kwargs[k] for k in ("BM", "BN", "BK", "stride_am")] == [128, 128, 64, 512]
    assert (kwargs["B_KMAJOR"], kwargs["stride_bn"]) == ((True, 384) if b_transposed else (False, 512))
    assert launch["grid"] == [[2 * 3, 1, 1]]  # one program per output tile (fewer tiles than SMs)


@pytest.mark.parametrize("transposed,inductor", [(False, False), (True, True)])
def test_elsewhere_the_trace_keeps_the_opaque_gemm_op(transposed, inductor):
    """Without Inductor (``aot_eager``, a user's own trace), or with an operand TMA cannot read (a transposed
    view), the GEMM stays the opaque op that launches the autotuned kernel itself."""
    traced = _trace(transposed=transposed, inductor=inductor)
    assert f"{op_name('gemm')}.default".replace("::", ".") in traced["targets"] and not traced["launches"]


@pytest.mark.parametrize(
    "block,uniform_k,b_transposed,launched",
    [(True, 0, False, False), (True, 256, False, True), (True, 0, True, True), (False, 0, False, True)],
)  # fmt: skip
def test_on_hopper_block_scaled_gemms_stay_the_op_that_runs_the_gluon_kernel(block, uniform_k, b_transposed,
                                                                              launched):
    """Where the eager GEMM runs on the Gluon kernel (per-block scales, no uniform leading columns, both operands'
    own rows TMA-readable, a Hopper GPU), which Inductor cannot launch, the trace keeps the opaque op; GEMMs with
    uniform leading columns, the dgrad's transposed W^T and per-tensor scales are still launched."""
    traced = _trace(block, uniform_k=uniform_k, b_transposed=b_transposed, hopper=True)
    opaque = f"{op_name('gemm')}.default".replace("::", ".") in traced["targets"]
    assert (len(traced["launches"]), opaque) == ((1, False) if launched else (0, True))


def test_the_tile_choice_times_stand_ins_laid_out_as_the_operands(monkeypatch):
    """The autotuner times zero tensors with the operands' exact layouts: a W^T whose rows (N = 100) are not a
    multiple of 8 elements but sit in a padded [K, 112] tensor is TMA-readable, and so must its stand-in be (a
    contiguous [K, 100] one is not: the eager autotuner would refuse it). Chosen once per layout."""
    timed = []

    def autotune(a, b, outer_a, outer_b, bias, out_dtype, method, uniform_k):
        timed.append((a, b, outer_a, outer_b, bias))

    class Tuner:
        best_config = triton.Config({"BM": 128, "BN": 64, "BK": 64, "GROUP_M": 8}, num_stages=3, num_warps=8)

    monkeypatch.setattr(gemm_traced, "gemm_triton", autotune)
    monkeypatch.setattr(gemm_traced, "_gemm_tma", Tuner)
    monkeypatch.setattr(gemm_traced, "_TUNED", {})
    a = torch.empty(64, 512, dtype=torch.float16)[:, 128:384]  # rows 1 KiB apart, starting 256 bytes in
    b = torch.empty(256, 112, dtype=torch.float16)[:, :100].T  # W^T: [N=100, K=256] over a padded [K, 112]
    outer = torch.ones(())
    assert gemm_traced.tma_operands(a, b)
    config = gemm_traced.tuned_config(a, b, outer, outer, None, torch.bfloat16, 0)
    assert config == (128, 64, 64, 3, 8)
    (sa, sb, so_a, so_b, bias), = timed
    for stand_in, operand in [(sa, a), (sb, b), (so_a, outer)]:
        assert (stand_in.shape, stand_in.stride(), stand_in.storage_offset(), stand_in.dtype) == (
            operand.shape, operand.stride(), operand.storage_offset(), operand.dtype)
        assert not stand_in.any()
    assert bias is None and gemm._tma_ready(sa) and gemm._tma_ready(sb.T)
    gemm_traced.tuned_config(a, b, outer, outer, None, torch.bfloat16, 0)
    assert len(timed) == 1  # the same layout again: chosen once


def _values(rows: int, k: int, device) -> torch.Tensor:
    return gemm_operand(quantize(torch.randn(rows, k, device=device), "rtn")).half()


@pytest.mark.parametrize(
    "block,bias,uniform_k,b_transposed",
    [(False, True, 0, False), (True, False, 0, False), (True, True, 128, False), (False, False, 0, True),
     (True, True, 0, True)],
)  # fmt: skip
def test_device_descriptors_compute_what_host_descriptors_compute_bit_for_bit(monkeypatch, block, bias, uniform_k,
                                                                             b_transposed):
    """The recorded launch (pointers, descriptors built by the kernel) and the eager one (host descriptors), same
    tile config: the same bits (FP32 output, so that nothing but the kernel rounds); B also as a transposed view."""
    m, n, k = 200, 136, 384
    a, b = _values(m, k, KERNEL_DEVICE), _values(n, k, KERNEL_DEVICE)
    if b_transposed:
        b = b.T.contiguous().T
    oa = torch.rand(m, k // 128, device=KERNEL_DEVICE) if block else torch.tensor(0.75, device=KERNEL_DEVICE)
    ob = torch.rand(n, k // 128, device=KERNEL_DEVICE) if block else torch.tensor(1.5, device=KERNEL_DEVICE)
    if uniform_k:
        oa[:, 1:] = oa[:, :1]
        ob[:, 1:] = ob[:, :1]
    bias_t = torch.randn(n, device=KERNEL_DEVICE) if bias else None
    bm, bn, bk, stages, warps = 64, 64, 64, 2, 4
    sms = 3  # fewer programs than tiles: each walks several

    def run():
        launched = gemm_traced.gemm_launched(a, b, oa, ob, bias_t, torch.float32, uniform_k, config=(bm, bn, bk,
                                                                                                     stages, warps))
        c = torch.empty(m, n, device=KERNEL_DEVICE)
        b_desc = TensorDescriptor.from_tensor(b.T, [bk, bn]) if b_transposed else TensorDescriptor.from_tensor(
            b, [bn, bk])
        gemm._gemm_tma_body[(sms,)](
            TensorDescriptor.from_tensor(a, [bm, bk]), b_desc, c, oa, ob, bias_t if bias else oa, m, n, k, c.stride(0),
            c.stride(1), uniform_k, a.stride(0), n if b_transposed else k, BLOCK_OUTER=block, HAS_BIAS=bias,
            UNIFORM=uniform_k > 0, NUM_SMS=sms, BM=bm, BN=bn, BK=bk, GROUP_M=8, B_KMAJOR=b_transposed,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return launched, c

    def scratch(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8, device=KERNEL_DEVICE)

    def in_context():
        triton.set_allocator(scratch)  # device-side descriptors need Triton's global scratch (this context only)
        return run()

    monkeypatch.setattr(gemm_traced, "_num_sms", lambda index: sms)
    launched, host = contextvars.copy_context().run(in_context)
    assert torch.equal(launched, host)
    reference = dispatch._reference_gemm(a, b, oa, ob, bias_t, torch.float32)
    assert (launched - reference).abs().max() <= 1e-5 * reference.abs().max()  # the GEMM, summed in another order


def _deterministic_double_block():
    """``tetrajet_v2`` (per-1x128-block outer scales) with round-to-nearest, unrotated backward quantizers: its
    compiled and eager runs draw no random bits, so they must agree bit for bit."""
    import dataclasses

    from fp4compile import Recipe

    base = Recipe.named("tetrajet_v2")
    deterministic = {s: dataclasses.replace(getattr(base, s), rounding="rtn", rotation="none")
                     for s in ("dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x")}  # fmt: skip
    return dataclasses.replace(base, name="double_block_rtn_backward", **deterministic)


@requires_gpu
@pytest.mark.parametrize("block_scaled", [False, True])
def test_gpu_compiled_linear_launches_the_gemm_from_inductor_and_equals_eager(block_scaled):
    """``backend="nvfp4"`` with Inductor: the generated code launches the TMA kernel itself (no ``fp4compile.gemm``
    op), and the forward output and the gradients equal the eager quantized linear's bit for bit. Block-scaled
    GEMMs on Hopper run the Gluon kernel through the op, in both."""
    from torch._inductor.utils import run_and_get_code

    from fp4compile.linear import nvfp4_linear

    recipe = _deterministic_double_block() if block_scaled else "naive"
    hopper = torch.cuda.get_device_capability() == (9, 0)
    torch._dynamo.reset()
    layer = torch.nn.Linear(512, 384, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(layer, backend="nvfp4", options={"recipe": recipe})

    def step():
        out = compiled(x)
        out.float().square().sum().backward()
        return out

    out, codes = run_and_get_code(step)
    grads = (x.grad.clone(), layer.weight.grad.clone(), layer.bias.grad.clone())
    code = "\n".join(codes)
    if block_scaled and hopper:
        assert "fp4compile.gemm" in code
    else:
        assert "_gemm_tma_body" in code and "fp4compile.gemm" not in code
    x.grad = layer.weight.grad = layer.bias.grad = None
    want = nvfp4_linear(x, layer.weight, layer.bias, recipe)
    want.float().square().sum().backward()
    assert torch.equal(out, want)
    for got, expected in zip(grads, (x.grad, layer.weight.grad, layer.bias.grad)):
        assert torch.equal(got, expected)
    torch._dynamo.reset()
