"""Wang et al.'s own configuration, the ``fp4_dge_occ`` preset: row-scaled E2M1 forward, FP8 backward, DGE, OCC.

The numerics are checked against float64 computations written here from the paper's equations (not
from the implementation): Eq. 1 scaling per token and per output channel, FP8 per-tensor casts, the
DGE multiplier on the weight gradient, and OCC's compensation.
"""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from testing import assert_backend_matches_eager, requires_gpu

import fp4compile
from fp4compile.format import E2M1_VALUES, dge_derivative
from fp4compile.linear import nvfp4_linear
from fp4compile.outliers import clamp_outliers, dense_residual
from fp4compile.recipe import Recipe
from fp4compile.wang_format import FP8Tensor, RowE2M1, fp8_gemm, fp8_quantize, quantize_rows

RECIPE = "fp4_dge_occ"
GRID = torch.tensor(sorted(set(E2M1_VALUES)))


def _heavy_tailed(rows=64, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp(min=0.05)


def test_rows_scale_their_absmax_to_six_exactly_as_eq_1():
    x = _heavy_tailed(32, 128)
    x[3] = 0
    v, gamma = quantize_rows(x)
    amax = x.abs().amax(1)
    assert torch.equal(gamma[3], torch.tensor(1.0)) and torch.equal(v[3], torch.zeros(128))
    live = amax > 0
    assert torch.equal(gamma[live], 6.0 / amax[live])  # the exact ratio, not a power of two
    assert torch.isin(v, GRID).all()
    assert torch.equal(v.abs().amax(1)[live], torch.full((31,), 6.0))
    # round to nearest: within half a grid step of x * gamma (steps 0.5 / 1 / 2 below 2 / 4 / 6)
    scaled = (x * gamma[:, None]).double()
    half_step = torch.where(scaled.abs() < 2, 0.25, torch.where(scaled.abs() < 4, 0.5, 1.0))
    assert ((v.double() - scaled).abs() <= half_step).all()


def test_row_ties_round_to_even_not_up_as_the_released_lookup_table():
    x = torch.tensor([[6.0, 0.25, 0.75, 2.5, -0.25, -0.75, 5.0, -3.5] + [0.0] * 8])
    v, gamma = quantize_rows(x)
    assert gamma.item() == 1.0
    assert v[0, :8].tolist() == [6.0, 0.0, 1.0, 2.0, -0.0, -1.0, 4.0, -4.0]  # the code's LUT: 0.25 -> 0.5, ...


@pytest.mark.parametrize("fmt, fmax, rel", [("e4m3", 448.0, 2**-4), ("e5m2", 57344.0, 2**-3)])
def test_fp8_per_tensor_scale_maps_amax_to_the_format_max(fmt, fmax, rel):
    t = _heavy_tailed(64, 64) * 1e-3
    q, scale = fp8_quantize(t, FP8Tensor(fmt))
    assert q.dtype == FP8Tensor(fmt).dtype
    assert scale.item() == pytest.approx(t.abs().max().item() / fmax, rel=1e-7)
    assert q.float().abs().max().item() == fmax
    back = q.float() * scale
    normal = t.abs() > 2 ** (-6 if fmt == "e4m3" else -14) * scale  # within the format's normal range
    assert ((back - t).abs()[normal] <= rel * t.abs()[normal] * 1.0001).all()
    q0, s0 = fp8_quantize(torch.zeros(16, 16), FP8Tensor(fmt))
    assert s0.item() == 1.0 and not q0.float().any()


def test_fp8_gemm_is_the_scaled_product_of_the_fp8_values():
    a, sa = fp8_quantize(torch.randn(48, 64), FP8Tensor("e5m2"))
    b, sb = fp8_quantize(torch.randn(32, 64), FP8Tensor("e4m3"))
    want = (a.double() @ b.double().T) * (sa.double() * sb.double())
    torch.testing.assert_close(fp8_gemm(a, b, sa, sb).double(), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def _deq_rows(t):
    amax = t.double().abs().amax(1, keepdim=True)
    gamma = torch.where(amax > 0, (6.0 / amax.float()).double(), 1.0)
    v, _ = quantize_rows(t)
    return v.double() / gamma


def _fp8(t, fmt):
    q, scale = fp8_quantize(t, FP8Tensor(fmt))
    return q.double() * scale.double()


def _grads(x, w, b, recipe, dy):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    y = nvfp4_linear(x, w, b, recipe)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad


def test_forward_and_fp8_backward_equal_the_papers_equations_in_float64():
    x, w, b = _heavy_tailed(64, 256), torch.randn(128, 256) / 16, torch.randn(128)
    dy = torch.randn(64, 128) * 1e-3
    recipe = Recipe.named(RECIPE)
    y, dx, dw, db = _grads(x, w, b, RECIPE, dy)

    clamped, index, value = clamp_outliers(x, recipe.occ)
    r = dense_residual(x.shape, index, value, recipe.occ).double()
    x_hat, w_hat = _deq_rows(clamped), _deq_rows(w)  # FP4-simulated X (per token) and W (per output channel)
    compensation = r.bfloat16().double() @ w.bfloat16().double().T
    y_want = x_hat @ w_hat.T + compensation + b.double()
    torch.testing.assert_close(y.double(), y_want, rtol=1e-5, atol=1e-5 * y_want.abs().max().item())

    dx_want = _fp8(dy, "e5m2") @ _fp8(w_hat.float(), "e4m3")  # dgrad: FP8(dY) x FP8(W_hat)
    torch.testing.assert_close(dx.double(), dx_want, rtol=1e-5, atol=1e-5 * dx_want.abs().max().item())

    gamma_w = 6.0 / w.abs().amax(1)
    dw_ste = _fp8(dy, "e5m2").T @ _fp8(x_hat.float(), "e4m3") + dy.double().T @ r.bfloat16().double()
    dw_want = dw_ste * dge_derivative(w * gamma_w[:, None]).double()  # DGE on the weight gradient
    torch.testing.assert_close(dw.double(), dw_want, rtol=1e-5, atol=1e-5 * dw_want.abs().max().item())
    assert torch.equal(db, dy.sum(0))


def test_hp_sources_take_fp8_copies_of_the_unquantized_operands():
    recipe = dataclasses.replace(
        Recipe.named(RECIPE), name="fp4_dge_occ_hp_test", dgrad_w_source="hp", wgrad_x_source="hp", dge=False, occ=None
    ).register()
    x, w, b = torch.randn(32, 64), torch.randn(48, 64), torch.zeros(48)
    dy = torch.randn(32, 48)
    _, dx, dw, _ = _grads(x, w, b, recipe, dy)
    torch.testing.assert_close(dx.double(), _fp8(dy, "e5m2") @ _fp8(w, "e4m3"), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), _fp8(dy, "e5m2").T @ _fp8(x, "e4m3"), rtol=1e-5, atol=1e-5)


def test_tokens_not_a_multiple_of_16_are_zero_padded_for_the_fp8_wgrad():
    x, w, b = torch.randn(37, 64), torch.randn(32, 64), torch.randn(32)
    dy = torch.randn(37, 32)
    recipe = dataclasses.replace(Recipe.named(RECIPE), name="fp4_dge_occ_pad_test", dge=False, occ=None).register()
    _, _, dw, _ = _grads(x, w, b, recipe, dy)
    want = _fp8(dy, "e5m2").T @ _fp8(_deq_rows(x).float(), "e4m3")
    torch.testing.assert_close(dw.double(), want, rtol=1e-5, atol=1e-5)


def test_layouts_other_than_wangs_are_refused_with_the_reason():
    rows, e4, e5 = RowE2M1(), FP8Tensor("e4m3"), FP8Tensor("e5m2")
    rtn = fp4compile.QuantSpec.named("rtn")
    with pytest.raises(ValueError, match="RowE2M1 on fwd.x and fwd.w, FP8Tensor on the four backward slots"):
        Recipe("mixed_layout_test", rows, rows, rtn, rtn, rtn, rtn)
    with pytest.raises(ValueError, match="RowE2M1 on fwd.x and fwd.w"):
        Recipe("mixed_layout_test", rtn, rows, e5, e4, e5, e4)
    with pytest.raises(ValueError, match="cannot multiply two E5M2 operands"):
        Recipe("e5m2_pair_test", rows, rows, e5, e5, e5, e4)
    with pytest.raises(ValueError, match="FP8Tensor.fmt must be one of"):
        FP8Tensor("e3m4")


def test_the_preset_reads_as_the_paper_configures_it():
    r = Recipe.named(RECIPE)
    assert r.fp8_backward and r.dge and (r.dge_k, r.dge_cap) == (5.0, 3.0)
    assert (r.occ.alpha, r.occ.granularity, r.occ.residual) == (0.99, "token", "bf16")
    assert [r.spec(s) for s in ("dgrad.dy", "dgrad.w", "wgrad.dy", "wgrad.x")] == [
        FP8Tensor("e5m2"), FP8Tensor("e4m3"), FP8Tensor("e5m2"), FP8Tensor("e4m3")
    ]  # fmt: skip
    assert (r.dgrad_w_source, r.wgrad_x_source) == ("forward", "forward")


def test_backend_equals_eager_and_explain_names_the_recipe():
    assert_backend_matches_eager(RECIPE, torch.randn(16, 64))
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    report = str(fp4compile.explain(model, torch.randn(8, 64), options={"recipe": RECIPE}))
    assert report.count("fp4_dge_occ") >= 2 and "rewritten" in report


def test_quantize_api_swaps_linears_to_the_preset():
    torchao = pytest.importorskip("torchao")
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
    x = torch.randn(8, 64)
    want = nvfp4_linear(F.relu(nvfp4_linear(x, model[0].weight, model[0].bias, RECIPE)), model[2].weight,
                        model[2].bias, RECIPE)  # fmt: skip
    config = fp4compile.NVFP4Config(recipe=RECIPE)
    torchao.quantization.quantize_(model, config, filter_fn=config.filter_fn)
    assert isinstance(model[0], fp4compile.NVFP4Linear)
    assert torch.equal(model(x), want)


def test_osci_reset_refuses_the_non_nvfp4_forward_weight():
    with pytest.raises(ValueError, match="not NVFP4: OsciReset tracks weights on the NVFP4 grid"):
        fp4compile.OsciReset(nn.Linear(64, 64), RECIPE, start=0)


def test_a_small_regression_trains_about_as_well_as_unquantized():
    teacher = torch.randn(64, 64, generator=torch.Generator().manual_seed(3)) / 8

    def train(recipe):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
        compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe, "inner": "aot_eager"})
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        losses = []
        for step in range(150):
            x = torch.randn(64, 64, generator=torch.Generator().manual_seed(step))
            loss = F.mse_loss(compiled(x), x @ teacher)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        torch._dynamo.reset()
        return torch.tensor(losses)

    fp4, bf16 = train(RECIPE), train("bf16")
    assert torch.isfinite(fp4).all()
    assert fp4[-10:].mean() < 0.15 * fp4[:5].mean()  # it learns (0.092 from 1.04 when written; bf16 0.061)
    assert fp4[-10:].mean() < 2.0 * bf16[-10:].mean(), (fp4[-10:].mean(), bf16[-10:].mean())


@requires_gpu
def test_gpu_forward_is_bit_exact_and_fp8_backward_equals_its_emulation():
    """The forward's E2M1 products and their FP32 sums are exact (small multiples of 1/4), so CUDA and CPU agree
    bit for bit without compensation. The FP8 GEMMs (``torch._scaled_mm``) equal the CPU emulation up to the
    accumulation: Hopper's FP8 tensor cores keep ~14 mantissa bits inside a K-block before cuBLAS promotes to
    FP32, hence the bound of 2^-12 of the sum of absolute products (a wrong operand, transpose or scale is off
    by far more)."""
    recipe = dataclasses.replace(Recipe.named(RECIPE), name="fp4_dge_occ_gpu_test", occ=None).register()
    x, w, b = _heavy_tailed(256, 512), torch.randn(384, 512) / 16, torch.randn(384)
    dy = torch.randn(256, 384) * 1e-3
    cpu = _grads(x, w, b, recipe, dy)
    gpu = _grads(x.cuda(), w.cuda(), b.cuda(), recipe, dy.cuda())
    assert torch.equal(gpu[0].cpu(), cpu[0])

    a8, sa = fp8_quantize(dy, FP8Tensor("e5m2"))
    w8, sw = fp8_quantize(_deq_rows(w).float(), FP8Tensor("e4m3"))
    abs_dx = (a8.double().abs() @ w8.double().abs()) * (sa.double() * sw.double())
    assert ((gpu[1].cpu().double() - cpu[1].double()).abs() <= 2**-12 * abs_dx + 1e-30).all()
    x8, sx = fp8_quantize(_deq_rows(x).float(), FP8Tensor("e4m3"))
    mult = dge_derivative(w * (6.0 / w.abs().amax(1))[:, None]).double()
    abs_dw = (a8.double().abs().T @ x8.double().abs()) * (sa.double() * sx.double()) * mult
    assert ((gpu[2].cpu().double() - cpu[2].double()).abs() <= 2**-12 * abs_dw + 1e-30).all()


@requires_gpu
def test_gpu_preset_with_occ_matches_the_cpu():
    x, w, b = _heavy_tailed(128, 256), torch.randn(128, 256) / 16, torch.randn(128)
    dy = torch.randn(128, 128) * 1e-3
    cpu = _grads(x, w, b, RECIPE, dy)
    gpu = _grads(x.cuda(), w.cuda(), b.cuda(), RECIPE, dy.cuda())
    for got, want in zip(gpu, cpu):
        torch.testing.assert_close(got.cpu(), want, rtol=2**-10, atol=2**-10 * want.abs().max().item())
