"""The fp4compile:: triton ops decompose on CUDA: Inductor launches their kernels and sees their torch ops.

On the CPU the CUDA decomposition is traced with fake CUDA tensors in a fresh interpreter without
TRITON_INTERPRET (the kernels are recorded, not run): the graphs (expecttest) list each kernel launch and
each fp4compile op. On the GPU the compiled op equals the eager op bit for bit where the recipe's
rounding is deterministic.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from expecttest import TestCase
from testing import requires_gpu

from fp4compile.linear import nvfp4_linear
from fp4compile.schema import SCHEMA_VERSION, op_name

_TRACE = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from fp4compile import ops

    recipe, tokens, d_in, d_out = sys.argv[1], 256, 256, 128

    SYNCS = tuple(f"aten.{name}." for name in ("_local_scalar_dense", "nonzero", "item", "_assert_async",
                                                "masked_select", "unique"))

    def summary(gm):
        launches, others = [], 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if str(node.target).startswith(SYNCS):  # a host sync in the traced op
                launches.append(f"HOST SYNC {node.target}")
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                name = getattr(kernel, "fn", kernel).__name__
                kwargs = node.kwargs["kwargs"]
                mode = kwargs.get("MODE")
                plain = ", PLAIN_AMAX" if kwargs.get("PLAIN_AMAX") else ""
                launches.append(name if mode is None else f"{name}(MODE={mode}{plain})")
            elif "fp4compile" in str(node.target) or node.target is torch.ops.aten.amax.default:
                launches.append(str(node.target))  # the fp4compile ops, and the per-tensor amax as a graph op
            else:
                others += 1
        return launches, others

    if recipe.startswith(("shared:", "memo:")):  # three linears reading one activation [4, 64, d_in]
        import contextlib
        from fp4compile.launch_analysis import memoized_launch_analysis
        from fp4compile.linear import nvfp4_linear

        memoized = recipe.startswith("memo:")  # torch's launch analysis memoized, as the backend compiles
        recipe = recipe.split(":")[-1]
        with FakeTensorMode():
            x = torch.empty(4, 64, d_in, device="cuda", dtype=torch.bfloat16)
            ws = [torch.empty(d_out, d_in, device="cuda", dtype=torch.bfloat16) for _ in range(3)]

        def three(x, *ws):
            return [nvfp4_linear(x, w, None, recipe) for w in ws]

        with memoized_launch_analysis() if memoized else contextlib.nullcontext({}) as memo:
            forward = summary(make_fx(dispatch_functionalize(three), tracing_mode="fake")(x, *ws))
        print(json.dumps({"forward": forward, "analysed": len(memo)}))
        sys.exit(0)
    with FakeTensorMode() as mode:
        x = torch.empty(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        w = torch.empty(d_out, d_in, device="cuda", dtype=torch.bfloat16)
        dy = torch.empty(tokens, d_out, device="cuda", dtype=torch.bfloat16)
        saved = ops.linear(x, w, None, recipe)[1:]
    forward = make_fx(dispatch_functionalize(lambda x, w: ops.linear(x, w, None, recipe)), tracing_mode="fake")(x, w)
    backward = make_fx(
        dispatch_functionalize(lambda dy, w, *s: ops.linear_backward_op(dy, w, *s, recipe, False)), tracing_mode="fake"
    )(dy, w, *saved)
    print(json.dumps({"forward": summary(forward), "backward": summary(backward)}))
    """
)


def _trace(recipe: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", _TRACE, recipe], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _listing(part) -> str:
    return "\n".join(part[0])  # kernels, fp4compile ops and amax reductions in order (other torch ops vary by version)


class TestCudaDecomposition(TestCase):
    def test_nvidia(self):
        graphs = _trace("nvidia")
        self.assertExpectedInline(
            _listing(graphs["forward"]),
            """\
_nvfp4_quantize_kernel(MODE=0, PLAIN_AMAX)
_nvfp4_quantize_kernel(MODE=1)
aten.amax.default
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default
_nvfp4_quantize_kernel(MODE=1)""",
        )
        self.assertExpectedInline(
            _listing(graphs["backward"]),
            """\
_decode_kernel
_nvfp4_quantize_kernel(MODE=0, PLAIN_AMAX)
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default
_decode_kernel
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default""",
        )

    def test_tetrajet_v2(self):
        graphs = _trace("tetrajet_v2")
        self.assertExpectedInline(
            _listing(graphs["forward"]),
            """\
_nvfp4_quantize_kernel(MODE=1)
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default""",
        )
        self.assertExpectedInline(
            _listing(graphs["backward"]),
            """\
_nvfp4_quantize_kernel(MODE=1)
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default
_nvfp4_quantize_kernel(MODE=1)
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default""",
        )


class TestSharedQuantization(TestCase):
    def test_q_k_v_quantize_their_input_once(self):
        """nvidia: X (RTN) and X^T (TE's fixed RHT-16, RTN) are quantized by the first linear only; the others
        quantize their weights (and copy the saved X^T quantization: op outputs must not alias)."""
        self.assertExpectedInline(
            _listing(_trace("shared:nvidia")["forward"]),
            """\
_nvfp4_quantize_kernel(MODE=0, PLAIN_AMAX)
_nvfp4_quantize_kernel(MODE=1)
aten.amax.default
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default
_nvfp4_quantize_kernel(MODE=1)
aten.amax.default
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default
aten.amax.default
_nvfp4_quantize_kernel(MODE=1)
fp4compile.gemm_v4.default""",
        )

    def test_tetrajet_v2_quantizes_x_once(self):
        launches = _trace("shared:tetrajet_v2")["forward"][0]  # double-block RTN forward: X once, W three times
        assert launches.count("_nvfp4_quantize_kernel(MODE=1)") == 4
        assert launches.count(f"fp4compile.gemm_v{SCHEMA_VERSION}.default") == 3

    def test_the_backend_analyses_each_distinct_launch_once(self):
        """With torch's launch analysis memoized (as ``backend.compile_rewritten`` does) the graph is unchanged and
        6 kernel launches of three equal linears are analysed 4 times: X's quantization, the two passes of X^T's,
        and W's (the same launch for the three weights)."""
        plain, memoized = _trace("shared:nvidia"), _trace("memo:shared:nvidia")
        assert memoized["forward"] == plain["forward"] and plain["analysed"] == 0
        kernels = [op for op in plain["forward"][0] if op.startswith("_")]
        assert (len(kernels), memoized["analysed"]) == (6, 4)


def test_only_deterministic_quantizations_of_an_unchanged_traced_tensor_are_shared():
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    from fp4compile.format import quantize_reference
    from fp4compile.gemm import Operand
    from fp4compile.shared_quantization import shared_operand
    from fp4compile.spec import QuantSpec

    rtn, sr = QuantSpec.named("rtn"), QuantSpec.named("sr")
    calls, seen = [], {}

    def quantize(x, spec):
        calls.append(spec.rounding)
        q = quantize_reference(x, spec, seed=1 if spec.stochastic else None)
        return Operand(q, q.dequantize())

    def traced(x):
        seen["a"] = shared_operand(x, rtn, None, lambda: quantize(x, rtn))
        seen["b"] = shared_operand(x, rtn, None, lambda: quantize(x, rtn))
        shared_operand(x, sr, None, lambda: quantize(x, sr))
        shared_operand(x, sr, None, lambda: quantize(x, sr))
        shared_operand(x, rtn, torch.ones(16), lambda: quantize(x, rtn))  # signs given: its own draw
        x.mul_(2)
        seen["c"] = shared_operand(x, rtn, None, lambda: quantize(x, rtn))  # changed in place: quantized again
        return seen["c"].q.outer

    make_fx(dispatch_functionalize(traced), tracing_mode="fake")(torch.randn(32, 64))
    assert calls == ["rtn", "sr", "sr", "rtn", "rtn"]
    a, b = seen["a"], seen["b"]
    assert b.values is a.values and b.q.codes is not a.q.codes  # a reuse: the packed tensors are copies

    class OtherMode(TorchDispatchMode):  # a real tensor under someone else's dispatch mode: never remembered
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    calls.clear()
    x = torch.randn(32, 64)
    with OtherMode():
        for _ in range(2):
            shared_operand(x, rtn, None, lambda: quantize(x, rtn))
    assert calls == ["rtn", "rtn"] and "_fp4compile_shared" not in x.__dict__


# (Recipes whose ops slice a functional CUDA tensor, OCC's among them, do not trace in a CPU-only torch build.)
@pytest.mark.parametrize("recipe", ["nvidia", "quartet_ii", "four_over_six", "naive", "tetrajet_v2"])
def test_every_cuda_launch_is_traced_and_nothing_syncs(recipe):
    """No opaque fallback hides inside the decomposition (only kernels, the GEMM op and torch ops remain) and no
    op of it reads a device value on the host (``.item()``, ``nonzero``: a sync that also stops CUDA graphs)."""
    graphs = _trace(recipe)
    for part in ("forward", "backward"):
        launches, _ = graphs[part]
        assert not any(op.startswith("HOST SYNC") for op in launches), launches
        assert not any("reference" in op or "linear" in op for op in launches), launches
        assert sum("gemm" in op for op in launches) == (1 if part == "forward" else 2), launches
        assert any(op.startswith("_nvfp4_quantize_kernel") for op in launches), launches


def test_wang_layout_stays_one_opaque_op_on_cuda():
    """Wang et al.'s per-row scales divide, and Inductor's CUDA division is approximate: its op is not
    decomposed but calls the opaque reference op, which runs the eager code (compiled == eager by construction)."""
    graphs = _trace("fp4_dge_occ")
    opaque = lambda name: op_name(name).replace("::", ".") + ".default"  # noqa: E731
    assert graphs["forward"][0] == [opaque("linear_reference")]
    assert graphs["backward"][0] == [opaque("linear_backward_reference")]


def test_graph_amax_reads_the_rounded_autocast_operand_under_inductor():
    """The per-tensor amax handed to the quantize kernel is a graph reduction that Inductor fuses with the autocast
    cast producing X; it must be the amax of the bf16 values the kernel reads, not of the FP32 values before their
    rounding (Inductor's CPU backend, like its CUDA one, elides a fused downcast-upcast: an amax that upcast X
    before reducing would fail here). On the GPU the forward of GPT-2's Conv1D under autocast differed from eager
    until the amax read X's bits (``test_gpu_compiled_conv1d_layout_with_bias_equals_eager``)."""
    from fp4compile import dispatch
    from fp4compile.recipe import Recipe

    spec = Recipe.named("nvidia").fwd_x
    torch.manual_seed(0)
    x = torch.randn(4096, 64) * 3
    amax = lambda x: dispatch._graph_amax(x.to(torch.bfloat16), spec)  # noqa: E731
    assert torch.equal(torch.compile(amax, fullgraph=True)(x), x.to(torch.bfloat16).abs().amax().float())


# ----------------------------------------------------------------------------- GPU
QUANTIZED = ("naive", "nvidia", "tetrajet_v2", "quartet_ii", "four_over_six")


@requires_gpu
@pytest.mark.parametrize("recipe", QUANTIZED)
def test_gpu_compiled_forward_equals_eager_bit_for_bit(recipe):
    """Every preset's forward rounds deterministically: the kernels Inductor compiles (FP fusion on, its own
    launcher) must give the eager op's bits."""
    torch.manual_seed(0)
    x = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(384, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda x, w, b: nvfp4_linear(x, w, b, recipe), backend="inductor", fullgraph=True)
    assert torch.equal(compiled(x, w, b), nvfp4_linear(x, w, b, recipe))


@requires_gpu
@pytest.mark.parametrize("recipe", ["tetrajet_v2_full", "chon", "fp4_dge_occ"])
def test_gpu_compiled_forward_equals_eager_with_outlier_paths(recipe):
    """The outlier paths' torch ops (MXFP8 columns, residual columns, row scales) compiled by Inductor, whose
    kernels contract products into FMAs, still give the eager op's bits (states past their warm-up)."""
    from fp4compile.demo.bench import _steady_outlier_state
    from fp4compile.recipe import Recipe

    torch.manual_seed(0)
    x = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    r = Recipe.named(recipe)
    state = _steady_outlier_state(r, 512, "cuda") if r.outliers is not None else None

    def forward(x, w):
        return nvfp4_linear(x, w, None, recipe, outlier_state=state)

    with torch.no_grad():  # a forward that updates no state
        assert torch.equal(torch.compile(forward, backend="inductor", fullgraph=True)(x, w), forward(x, w))


@requires_gpu
def test_gpu_compiled_backward_equals_eager_for_a_deterministic_recipe():
    torch.manual_seed(0)
    x = torch.randn(1000, 512, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 512, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(1000, 384, device="cuda", dtype=torch.bfloat16)

    def grads(fn):
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        fn(xg, wg).backward(dy)
        return xg.grad, wg.grad

    compiled = torch.compile(lambda x, w: nvfp4_linear(x, w, None, "naive"), backend="inductor", fullgraph=True)
    for got, want in zip(grads(compiled), grads(lambda x, w: nvfp4_linear(x, w, None, "naive"))):
        assert torch.equal(got, want)


class _Conv1D(torch.nn.Module):
    """GPT-2's Conv1D: ``addmm(bias, x, W)`` with the weight held as [in, out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.weight, self.bias = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(bias.clone())

    def forward(self, x):
        return torch.addmm(self.bias, x, self.weight)


@requires_gpu
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["inductor", "nvfp4"])
def test_gpu_compiled_conv1d_layout_with_bias_equals_eager(backend, autocast):
    """GPT-2's Conv1D under autocast, FP32 input and parameters (a transposed weight with a bias): through the
    backend's pass (``nvfp4``) or ``nvfp4_linear`` compiled by Inductor, the forward and every gradient equal the
    eager op's bits for a deterministic recipe. The autocast casts are fused with the torch ops that read their
    outputs (the graph amax, the bias gradient), which must still see the rounded values (``format.stored_fp32``)."""
    torch.manual_seed(0)
    x = torch.randn(512, 256, device="cuda")
    w = torch.randn(256, 768, device="cuda") / 16  # [in, out], as Conv1D holds it
    b = torch.randn(768, device="cuda")
    dy = torch.randn(512, 768, device="cuda", dtype=autocast)
    layer = _Conv1D(w, b)

    def linear(x, w, b):
        return nvfp4_linear(x, w.t(), b, "naive")

    torch._dynamo.reset()
    if backend == "nvfp4":
        compiled_layer = torch.compile(layer, backend="nvfp4", options={"recipe": "naive"})
        compiled = lambda x, w, b: compiled_layer(x)  # noqa: E731
        leaves_of = lambda x: (x, layer.weight, layer.bias)  # noqa: E731
    else:
        compiled = torch.compile(linear, backend="inductor", fullgraph=True)
        leaves_of = lambda x: (x, w.clone().requires_grad_(), b.clone().requires_grad_())  # noqa: E731

    def run(fn):
        layer.zero_grad(set_to_none=True)
        leaves = leaves_of(x.clone().requires_grad_())
        with torch.autocast("cuda", dtype=autocast):
            y = fn(*leaves)
        y.backward(dy)
        return [y.detach()] + [t.grad.clone() for t in leaves]

    for name, got, want in zip(("y", "dx", "dw", "db"), run(compiled), run(linear)):
        assert torch.equal(got, want), name


def test_the_gemm_op_runs_the_reference_on_cpu_tensors():
    """``fp4compile::gemm`` on CPU tensors is the reference GEMM (one rounding after FP32 accumulation and bias),
    per tensor and per 1x128 block outer scales: the CPU stands in for the GPU with the op itself."""
    from fp4compile import dispatch
    from fp4compile.kernels.gemm_op import gemm_op

    torch.manual_seed(0)
    a, b, bias = torch.randn(64, 256).half(), torch.randn(48, 256).half(), torch.randn(48)
    for outer_a, outer_b in [(torch.tensor(0.5), torch.tensor(3.0)), (torch.rand(64, 2), torch.rand(48, 2))]:
        for bias_or_none in (bias, None):
            got = gemm_op(a, b, outer_a, outer_b, bias_or_none, torch.bfloat16)
            assert torch.equal(got, dispatch.gemm(a, b, outer_a, outer_b, bias_or_none, torch.bfloat16))
