"""The quantized linear layer: GEMM accuracy, recipes vs the format.py emulation, gradients, memory, errors.

CPU runs the format.py numerics (and the Triton GEMM in the interpreter); GPU tests compare
the CUDA path with the CPU one at larger shapes.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from testing import KERNEL_DEVICE, requires_gpu

from fp4compile import QuantSpec, quantize
from fp4compile import ops as fp4compile_ops
from fp4compile.format import TE_RHT_SIGNS, gemm_operand, gemm_reference, quantize_reference
from fp4compile.gemm import Operand, nvfp4_gemm
from fp4compile.kernels.gemm import gemm_triton
from fp4compile.linear import nvfp4_linear
from fp4compile.recipe import Recipe

STOCHASTIC = ("nvidia", "tetrajet_v2", "quartet_ii", "four_over_six")
QUANTIZED = STOCHASTIC + ("naive",)


def sqnr_db(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return 10 * math.log10(want.square().sum().item() / max((got - want).square().sum().item(), 1e-300))


def _operand(x, name, signs=None):
    q = quantize_reference(x, QuantSpec.named(name), signs=signs)
    return Operand(q, gemm_operand(q))


# ----------------------------------------------------------------------------- the GEMM
@pytest.mark.parametrize("name", ["rtn", "double_block_rtn"])
def test_gemm_matches_float64_emulation_and_catches_layout_bugs(name):
    a, b = _operand(torch.randn(48, 256), name), _operand(torch.randn(80, 256), name)
    want = gemm_reference(a.q, b.q)
    assert sqnr_db(nvfp4_gemm(a, b), want) > 120  # FP32 accumulation of exact products
    dev = KERNEL_DEVICE  # the Triton GEMM: in the interpreter on CPU machines
    interp = gemm_triton(a.values.half().to(dev), b.values.half().to(dev), a.q.outer.to(dev), b.q.outer.to(dev),
                         out_dtype=torch.float32, autotune=False)  # fmt: skip
    assert sqnr_db(interp, want) > 120
    # The same threshold rejects a wrong scale, swapped nibbles and a transposed 16x16 block.
    codes_swapped = (a.q.codes >> 4) | (a.q.codes << 4)
    bad_nibbles = Operand(a.q, gemm_operand(type(a.q)(codes_swapped, a.q.scales, a.q.outer, a.q.spec)))
    bad_scale = Operand(a.q, a.values * 2)
    blocks = a.values[:16, :16].clone()
    bad_block = Operand(a.q, a.values.clone())
    bad_block.values[:16, :16] = blocks.T
    for bad in (bad_nibbles, bad_scale, bad_block):
        assert sqnr_db(nvfp4_gemm(bad, b), want) < 40


def test_gemm_adds_bias_and_rounds_once_to_the_output_dtype():
    a, b = _operand(torch.randn(32, 128), "rtn"), _operand(torch.randn(48, 128), "rtn")
    bias = torch.randn(48)
    want = gemm_reference(a.q, b.q) + bias.double()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = nvfp4_gemm(a, b, bias, out_dtype=dtype)
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert sqnr_db(got, want) > 120
        else:  # one rounding of the FP32 sum: within one ulp of the float64 result rounded to dtype
            torch.testing.assert_close(got, want.to(dtype), rtol=2 ** -(7 if dtype == torch.bfloat16 else 10), atol=0)


def _uniform_operands(rows_a, rows_b, k_main, k_tail, device):
    """Operands as the Hot-Channel Patch builds them: per-tensor FP4 columns (their scale repeated per 1x128 block)
    followed by columns with per-block scales of their own, and the float64 result of the per-block definition."""
    torch.manual_seed(0)
    values, outers = [], []
    for rows in (rows_a, rows_b):
        q = quantize_reference(torch.randn(rows, k_main), QuantSpec.named("rtn"))
        tail = quantize_reference(torch.randn(rows, k_tail) * 40, QuantSpec.named("double_block_rtn"))
        values.append(torch.cat([gemm_operand(q), gemm_operand(tail)], 1).half().to(device))
        outers.append(torch.cat([q.outer.reshape(1, 1).expand(rows, k_main // 128), tail.outer], 1).contiguous())
    va, vb = values[0].double().cpu(), values[1].double().cpu()
    oa, ob = outers[0].double(), outers[1].double()
    want = sum((va[:, c : c + 128] @ vb[:, c : c + 128].T) * (oa[:, c // 128, None] * ob[None, :, c // 128])
               for c in range(0, k_main + k_tail, 128))  # fmt: skip
    return values[0], values[1], outers[0].to(device), outers[1].to(device), want


@pytest.mark.parametrize("k_tail", [256, 0])
def test_gemm_with_uniform_leading_blocks_scales_them_once(k_tail):
    """``uniform_k``: the leading per-block scales repeat a per-tensor one, so the kernel sums those K steps unscaled
    and scales the sum once (at the first tail step, or after the loop when there is no tail)."""
    va, vb, oa, ob, want = _uniform_operands(48, 80, 256, k_tail, KERNEL_DEVICE)
    for uniform_k in (0, 256):
        got = gemm_triton(va, vb, oa, ob, out_dtype=torch.float32, autotune=False, uniform_k=uniform_k)
        assert sqnr_db(got, want) > 120, uniform_k
    unscaled_tail = gemm_triton(va, vb, oa, ob.clone().fill_(1.0), out_dtype=torch.float32, autotune=False,
                                uniform_k=256)  # fmt: skip
    assert sqnr_db(unscaled_tail, want) < 40  # the threshold sees a scale that was left out
    with pytest.raises(ValueError, match="uniform_k=100 needs per-block outer scales and a multiple of 128"):
        gemm_triton(va, vb, oa, ob, autotune=False, uniform_k=100)


@requires_gpu
@pytest.mark.parametrize("method", ["tma", "pointer"])
@pytest.mark.parametrize("k_tail", [256, 0])
def test_gpu_gemm_with_uniform_leading_blocks_autotuned(method, k_tail):
    """The autotuned kernels (the TMA one as the Hot-Channel Patch runs it), whose unscaled leading K steps run in a
    loop of their own: the per-block definition, at a size with many K steps per loop."""
    va, vb, oa, ob, want = _uniform_operands(1024 + 48, 512 + 80, 2048, k_tail, KERNEL_DEVICE)
    got = gemm_triton(va, vb, oa, ob, out_dtype=torch.float32, method=method, uniform_k=2048)
    assert sqnr_db(got, want) > 120


def test_gemm_rejects_mismatched_operands():
    a, b = _operand(torch.randn(16, 128), "rtn"), _operand(torch.randn(16, 256), "rtn")
    with pytest.raises(ValueError, match="disagree on K: 128 vs 256"):
        nvfp4_gemm(a, b)
    c = _operand(torch.randn(16, 128), "double_block_rtn")
    with pytest.raises(ValueError, match="both have per-tensor or both per-1x128-block"):
        nvfp4_gemm(a, c)


# ----------------------------------------------------------------------------- recipes vs emulation
def _emulated_naive(x, w, bias, dy):
    """The format.py emulation of the naive recipe's six quantizations and three GEMMs (float64)."""
    q = lambda t: quantize_reference(t.contiguous(), QuantSpec.named("rtn"))  # noqa: E731
    y = gemm_reference(q(x), q(w)) + bias.double()
    dx = gemm_reference(q(dy), q(w.T))
    dw = gemm_reference(q(dy.T), q(x.T))
    return y, dx, dw


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_naive_forward_and_gradients_equal_the_emulation(dtype):
    x = torch.randn(48, 128, dtype=dtype, requires_grad=True)
    w = torch.randn(64, 128, dtype=dtype, requires_grad=True)
    bias = torch.randn(64, dtype=dtype, requires_grad=True)
    dy = torch.randn(48, 64, dtype=dtype)
    y = nvfp4_linear(x, w, bias, "naive")
    y.backward(dy)
    want_y, want_dx, want_dw = _emulated_naive(x.detach(), w.detach(), bias.detach(), dy)
    # FP32 accumulation, then one rounding: within one ulp of the float64 result rounded to dtype.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=0)
    torch.testing.assert_close(y, want_y.to(dtype), **tol)
    torch.testing.assert_close(x.grad, want_dx.to(dtype), **tol)
    torch.testing.assert_close(w.grad, want_dw.to(dtype), **tol)
    torch.testing.assert_close(bias.grad, dy.float().sum(0).to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("recipe", QUANTIZED)
def test_forward_equals_emulation_of_the_forward_slots(recipe):
    r = Recipe.named(recipe)
    x, w = torch.randn(2, 24, 256), torch.randn(128, 256)
    y = nvfp4_linear(x, w, None, recipe)
    want = gemm_reference(quantize_reference(x.reshape(-1, 256), r.fwd_x), quantize_reference(w, r.fwd_w))
    assert y.shape == (2, 24, 128)
    torch.testing.assert_close(y.reshape(-1, 128), want.float(), rtol=1e-5, atol=1e-5)


def test_nvidia_backward_uses_the_forward_weight_and_te_rotation():
    """dgrad of the nvidia recipe with dY on the E2M1 grid (SR is then exact) equals dY @ Q_2d(W)."""
    w = torch.randn(64, 128)
    dy = torch.tensor([0.5, -1.0, 1.5, 6.0]).repeat(32, 16)  # every 1x16 block has max 6: scale 1, values exact
    x = torch.randn(32, 128, requires_grad=True)
    nvfp4_linear(x, w, None, "nvidia").backward(dy)
    w_hat = quantize_reference(w, QuantSpec.named("rtn_2d")).dequantize(torch.float32)
    want = dy.double() @ w_hat.double()
    assert sqnr_db(x.grad, want) > 120
    te_signs = torch.tensor(TE_RHT_SIGNS, dtype=torch.float32)
    assert quantize(x.detach().T.contiguous(), "rht16_rtn_te").signs.equal(te_signs)


def _grad_error(recipe, draws, x, w, dy, want_dx, want_dw):
    sum_dx, sum_dw = torch.zeros_like(want_dx), torch.zeros_like(want_dw)
    for _ in range(draws):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        nvfp4_linear(xr, wr, None, recipe).backward(dy)
        sum_dx += xr.grad.double()
        sum_dw += wr.grad.double()
    rel = lambda got, want: ((got - want).square().sum() / want.square().sum()).item()  # noqa: E731
    return rel(sum_dx / draws, want_dx), rel(sum_dw / draws, want_dw)


@pytest.mark.parametrize("recipe", ["tetrajet_v2", "quartet_ii"])
def test_mean_gradient_converges_to_the_gradient_of_the_quantized_forward(recipe):
    """E[dX] = dY Q(W) and E[dW] = dY^T Q(X): the error of the mean of B calls falls as 1/B."""
    torch.manual_seed(0)
    r = Recipe.named(recipe)
    x, w, dy = torch.randn(128, 128), torch.randn(128, 128), torch.randn(128, 128)
    x_hat = quantize_reference(x, r.fwd_x).dequantize(torch.float32).double()
    w_hat = quantize_reference(w, r.fwd_w).dequantize(torch.float32).double()
    want_dx, want_dw = dy.double() @ w_hat, dy.double().T @ x_hat
    few = _grad_error(recipe, 2, x, w, dy, want_dx, want_dw)
    many = _grad_error(recipe, 32, x, w, dy, want_dx, want_dw)
    for e_few, e_many in zip(few, many):
        assert 8 < e_few / e_many < 32, (e_few, e_many)  # 1/B predicts 16; a bias would flatten it toward 1


# ----------------------------------------------------------------------------- autograd, memory, compile
@pytest.mark.parametrize("recipe", QUANTIZED)
def test_backward_saves_only_quantized_activations(recipe):
    tokens, d_in, d_out = 256, 128, 64
    x = torch.randn(tokens, d_in, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(d_out, d_in))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nvfp4_linear(x, w, None, recipe)
    activations = [t for t in saved if t.data_ptr() != w.data_ptr()]
    # Codes and scale bytes, FP32 outer scales and signs, and the OCC residual's index slot (empty without OCC).
    empty_index = [t for t in activations if t.dtype == torch.int64]
    assert all(t.dtype in (torch.uint8, torch.float32) for t in activations if t.dtype != torch.int64)
    assert all(t.numel() == 0 for t in empty_index)
    assert not any(t.dtype == torch.float32 and t.numel() >= tokens * d_in for t in activations)
    saved_bytes = sum(t.numel() * t.element_size() for t in activations)
    weight_bytes = sum(t.numel() * t.element_size() for t in activations if t.dim() and t.shape[0] == d_out)
    assert (saved_bytes - weight_bytes) / x.numel() <= 0.6


@pytest.mark.parametrize("recipe", ["naive"])
def test_opcheck_deterministic(recipe):
    import fp4compile.ops  # noqa: F401

    x, w, b = (torch.randn(40, 128, requires_grad=True), torch.randn(64, 128, requires_grad=True),
               torch.randn(64, requires_grad=True))  # fmt: skip
    torch.library.opcheck(fp4compile_ops.linear, (x, w, b, recipe))


@pytest.mark.parametrize("recipe", STOCHASTIC)
def test_opcheck_stochastic(recipe):
    """opcheck's AOT test reseeds only before the forward, so it cannot compare stochastic backwards;
    test_compiled_equals_eager_under_manual_seed covers that path instead."""
    import fp4compile.ops  # noqa: F401

    x, w = torch.randn(40, 128, requires_grad=True), torch.randn(64, 128, requires_grad=True)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(fp4compile_ops.linear, (x, w, None, recipe), test_utils=tests)


@pytest.mark.parametrize("recipe", ["nvidia", "quartet_ii"])
def test_compiled_equals_eager_under_manual_seed(recipe):
    x0, w0 = torch.randn(40, 128), torch.randn(64, 128)

    def run(fn):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        torch.manual_seed(5)
        y = fn(x, w)
        (y * torch.arange(64.0)).sum().backward()
        return y, x.grad, w.grad

    f = lambda x, w: nvfp4_linear(x, w, None, recipe)  # noqa: E731
    eager = run(f)
    compiled = run(torch.compile(f, backend="aot_eager", fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_dtypes_and_leading_dims(dtype):
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    w = torch.randn(32, 64, dtype=dtype, requires_grad=True)
    b = torch.randn(32, dtype=dtype, requires_grad=True)
    y = nvfp4_linear(x, w, b, "tetrajet_v2")
    assert y.shape == (3, 5, 32) and y.dtype == dtype
    y.sum().backward()
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (dtype, dtype, dtype)
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert sqnr_db(y, F.linear(x, w, b)) > 15  # NVFP4 forward: about 20 dB on Gaussian data


def test_bf16_recipe_is_plain_linear():
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    assert torch.equal(nvfp4_linear(x, w, None, "bf16"), F.linear(x, w))


@pytest.mark.parametrize(
    "x_shape, w_shape, dtype, error, match",
    [
        ((8, 40), (32, 40), torch.float32, ValueError, r"in_features=40 or out_features=32 is not a multiple of 16"),
        ((8, 32), (24, 32), torch.float32, ValueError, "multiples of 16"),
        ((8, 32), (32, 48), torch.float32, ValueError, "x's last dim must equal weight's in_features"),
        ((8, 32), (32, 32), torch.int32, TypeError, "must be bfloat16, float16 or float32, got torch.int32"),
    ],
)
def test_bad_shapes_and_dtypes_raise_clear_errors(x_shape, w_shape, dtype, error, match):
    x = torch.ones(x_shape, dtype=dtype)
    with pytest.raises(error, match=match):
        nvfp4_linear(x, torch.ones(w_shape, dtype=dtype))


def test_mixed_dtypes_unknown_recipe_and_bad_bias_raise_clear_errors():
    x, w = torch.randn(8, 32), torch.randn(16, 32)
    with pytest.raises(TypeError, match="x is torch.bfloat16 but weight is torch.float32"):
        nvfp4_linear(x.bfloat16(), w)
    with pytest.raises(ValueError, match="unknown recipe 'fp4'; valid recipes"):
        nvfp4_linear(x, w, recipe="fp4")
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        nvfp4_linear(x, w, torch.zeros(8))


# ----------------------------------------------------------------------------- GPU
@requires_gpu
@pytest.mark.parametrize("recipe", QUANTIZED)
def test_gpu_matches_cpu(recipe):
    """Deterministic parts bit-identical in quantization; the GEMMs differ only in accumulation order."""
    torch.manual_seed(0)
    x, w, b = torch.randn(1000, 512), torch.randn(384, 512), torch.randn(384)
    y_cpu = nvfp4_linear(x, w, b, recipe)
    y_gpu = nvfp4_linear(x.cuda(), w.cuda(), b.cuda(), recipe)
    assert sqnr_db(y_gpu, y_cpu) > 110
    xg, wg = x.cuda().bfloat16().requires_grad_(), w.cuda().bfloat16().requires_grad_()
    yg = nvfp4_linear(xg, wg, None, recipe)
    yg.float().square().mean().backward()
    ref = F.linear(xg.detach().float(), wg.detach().float())
    assert sqnr_db(yg, ref) > 15 and torch.isfinite(xg.grad).all() and torch.isfinite(wg.grad).all()


@requires_gpu
@pytest.mark.parametrize("method", ["pointer", "tma"])
def test_gpu_gemm_with_uniform_leading_blocks_matches_emulation(method):
    va, vb, oa, ob, want = _uniform_operands(4096 + 8, 2048 + 16, 4096, 256, "cuda")
    got = gemm_triton(va, vb, oa, ob, out_dtype=torch.float32, method=method, uniform_k=4096)
    assert sqnr_db(got, want) > 110


@requires_gpu
@pytest.mark.parametrize(
    "name, method",
    [("rtn", "pointer"), ("rtn", "tma"), ("double_block_rtn", "pointer"), ("double_block_rtn", "tma"),
     ("double_block_rtn", "gluon")],
)  # fmt: skip
def test_gpu_gemm_large_matches_emulation(name, method):
    a = quantize(torch.randn(4096 + 8, 4096, device="cuda"), name)
    b = quantize(torch.randn(2048 + 16, 4096, device="cuda"), name)
    va, vb = gemm_operand(a).half(), gemm_operand(b).half()
    got = gemm_triton(va, vb, a.outer, b.outer, out_dtype=torch.float32, method=method)
    assert sqnr_db(got, gemm_reference(a, b)) > 110
    bias = torch.randn(b.codes.shape[0], device="cuda")
    got = gemm_triton(va, vb, a.outer, b.outer, bias, out_dtype=torch.float32, method=method)
    assert sqnr_db(got, gemm_reference(a, b).cpu() + bias.double().cpu()) > 110


@requires_gpu
@pytest.mark.parametrize("name", ["rtn", "double_block_rtn"])
def test_gpu_gemm_of_a_transposed_b_reads_it_with_tma_and_matches_emulation(name):
    """B a transposed view of a row-major [K, N] tensor (the dgrad's W^T): TMA reads the tensor underneath."""
    a = quantize(torch.randn(4096 + 8, 4096, device="cuda"), name)
    b = quantize(torch.randn(2048 + 16, 4096, device="cuda"), name)
    va, vb = gemm_operand(a).half(), gemm_operand(b).half().T.contiguous().T
    got = gemm_triton(va, vb, a.outer, b.outer, out_dtype=torch.float32, method="tma")
    assert sqnr_db(got, gemm_reference(a, b)) > 110


def test_gemm_collects_garbage_after_a_first_autotuning_only(monkeypatch):
    """The autotuned GEMM's launch that autotunes (a new shape: the autotuner's config cache grows) collects the
    garbage its timing left (tensors in reference cycles trip CUDA-graph trees' pool check); other launches do not."""
    from fp4compile.kernels import gemm

    launches, collections = [], []

    class Autotuned:  # the parts of triton.autotune's Autotuner that the launch uses
        cache: dict = {}

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append(args)
                self.cache.setdefault((args[1], tuple(sorted(kwargs.items()))), "config")

            return run

    monkeypatch.setattr(gemm, "gc", type("GC", (), {"collect": staticmethod(lambda: collections.append(1))}))
    kernel = Autotuned()
    for args in [(None, 32), (None, 32), (None, 16), (None, 32)]:
        gemm._launch_tuned(kernel, (1,), args, {"HAS_BIAS": False})
    gemm._launch_tuned(kernel, (1,), (None, 32), {"HAS_BIAS": True})
    assert len(launches) == 5 and len(collections) == 3  # shapes 32 and 16, then another flag
    assert all(hasattr(k, "cache") for k in (gemm._gemm_tma, gemm._gemm_tuned))  # the real kernels are autotuners
