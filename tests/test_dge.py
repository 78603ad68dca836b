"""Wang et al.'s Differentiable Gradient Estimator: the spec (format.py) and the ``dge=True`` recipe option."""

import dataclasses

import pytest
import torch
from testing import assert_backend_matches_eager, requires_gpu

import fp4compile
from fp4compile.format import dge_derivative, e2m1_rne, quantize_reference, scaled_values, unpack_nibbles
from fp4compile.linear import nvfp4_linear
from fp4compile.recipe import Recipe
from fp4compile.spec import QuantSpec

# Wang et al.'s released test (MS-AMP tests/operators/test_fp4_quantize.py): x = linspace(-6, 6, 20) in bf16,
# k = 5, cap 3, output in bf16: the first ten values, then their mirror image.
GOLDEN_BF16 = (0.2002, 0.4375, 0.6055, 0.2168, 1.8359, 0.2695, 0.3027, 0.2695, 0.2402, 0.5781)
# The same points in FP32 (an independent re-implementation in shared/research/outliers_and_peers.md, 4 decimals).
GOLDEN_FP32 = (0.2000, 0.4383, 0.6063, 0.2164, 1.8379, 0.2699, 0.3035, 0.2699, 0.2398, 0.5776)


def test_golden_values_of_the_released_code():
    x = torch.linspace(-6, 6, 20).bfloat16()
    d = dge_derivative(x)
    assert d.dtype == torch.float32
    golden = torch.tensor(GOLDEN_BF16 + GOLDEN_BF16[::-1])
    assert torch.equal(d.bfloat16(), golden.bfloat16())  # bit for bit after the code's bf16 output rounding
    torch.testing.assert_close(d[:10], torch.tensor(GOLDEN_FP32), rtol=0, atol=5e-5)


def test_grid_points_thresholds_sign_and_saturation():
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    assert torch.equal(dge_derivative(grid), torch.full((8,), 0.2))  # 1/k on every E2M1 value
    assert torch.equal(dge_derivative(-grid), dge_derivative(grid))
    thresholds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert torch.equal(dge_derivative(thresholds), torch.full((7,), 3.0))  # capped where rounding decides
    assert torch.equal(dge_derivative(thresholds, cap=1.5), torch.full((7,), 1.5))
    beyond = torch.tensor([6.01, 6.4, -7.0, float("inf")])  # an E4M3 block scale can push |v| past 6
    assert torch.equal(dge_derivative(beyond), torch.full((4,), 0.2))  # evaluated at 6
    assert torch.isnan(dge_derivative(torch.tensor([float("nan")]))).all()
    # Eq. 8 at a point inside [3, 4): (1/k) |2 (3.2 - 3) / 1 - 1|^(1/k - 1)
    assert dge_derivative(torch.tensor([3.2]), k=3.0).item() == pytest.approx((1 / 3) * 0.6 ** (1 / 3 - 1), rel=1e-6)


def test_mean_multiplier_over_uniform_in_bin_positions():
    # The research note's derived statistics: E[f'] = 0.594 and 3.4 % capped at k = 5, cap 3 (0.778 at k = 3).
    positions = (torch.arange(200_000, dtype=torch.float64) + 0.5) / 200_000
    v = (4.0 + 2.0 * positions).float()  # one interval; every interval is the same function of the position
    d = dge_derivative(v)
    assert d.mean().item() == pytest.approx(0.594, abs=1e-3)
    assert (d == 3.0).float().mean().item() == pytest.approx(0.034, abs=1e-3)
    assert dge_derivative(v, k=3.0).mean().item() == pytest.approx(0.778, abs=1e-3)


def test_bad_k_and_cap_raise():
    with pytest.raises(ValueError, match="k must be a positive finite number"):
        dge_derivative(torch.zeros(1), k=0)
    with pytest.raises(ValueError, match="cap must be a positive number"):
        dge_derivative(torch.zeros(1), cap=-1)


@pytest.mark.parametrize("name", ["rtn", "rtn_2d", "rtn_4over6", "double_block_rtn"])
def test_scaled_values_are_what_the_quantizer_rounds(name):
    spec = QuantSpec.named(name)
    x = torch.randn(32, 256) * torch.logspace(-2, 2, 256)  # column scales across four decades
    q = quantize_reference(x, spec)
    v = scaled_values(x, q)
    assert torch.equal(e2m1_rne(v), unpack_nibbles(q.codes))


def test_scaled_values_refuse_rotated_or_foreign_quantizations():
    x = torch.randn(16, 128)
    with pytest.raises(ValueError, match="unrotated"):
        scaled_values(x, fp4compile.quantize(x, "ms_eden"))
    with pytest.raises(ValueError, match="quantizes a"):
        scaled_values(x[:, :64], quantize_reference(x, QuantSpec.named("rtn")))


def _grads(x, w, b, recipe, seed=0):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    torch.manual_seed(seed)
    nvfp4_linear(x, w, b, recipe).square().sum().backward()
    return x.grad, w.grad, b.grad


@pytest.mark.parametrize("base", ["naive", "nvidia", "tetrajet_v2"])
def test_dge_multiplies_only_the_weight_gradient(base):
    recipe = dataclasses.replace(Recipe.named(base), name=f"{base}_dge_test", dge=True).register()
    x, w, b = torch.randn(64, 256), torch.randn(128, 256) / 16, torch.randn(128)
    dx, dw, db = _grads(x, w, b, base)
    dx_dge, dw_dge, db_dge = _grads(x, w, b, recipe)  # same seed: the same stochastic rounding bits
    assert torch.equal(dx_dge, dx) and torch.equal(db_dge, db)
    q = fp4compile.quantize(w, Recipe.named(base).fwd_w)
    assert torch.equal(dw_dge, dw * dge_derivative(scaled_values(w, q)))
    assert not torch.equal(dw_dge, dw)


def test_dge_through_the_backend_equals_eager():
    recipe = dataclasses.replace(Recipe.named("naive"), name="naive_dge_backend_test", dge=True)
    assert_backend_matches_eager(recipe, torch.randn(16, 64))


def test_dge_recipe_options_are_checked():
    with pytest.raises(ValueError, match="dge, occ and outliers need quantized operands"):
        Recipe("bf16_dge_test", dge=True)
    with pytest.raises(ValueError, match="dge_k must be a positive finite number"):
        dataclasses.replace(Recipe.named("naive"), name="bad_dge_k", dge=True, dge_k=0)
    with pytest.raises(TypeError, match="dge must be True or False"):
        dataclasses.replace(Recipe.named("naive"), name="bad_dge", dge=1)


@requires_gpu
def test_gpu_dge_equals_the_cpu_spec():
    recipe = dataclasses.replace(Recipe.named("nvidia"), name="nvidia_dge_gpu_test", dge=True).register()
    x, w, b = torch.randn(256, 512), torch.randn(256, 512) / 16, torch.randn(256)
    v_gpu = scaled_values(w.cuda(), fp4compile.quantize(w.cuda(), recipe.fwd_w))
    v_cpu = scaled_values(w, fp4compile.quantize(w, recipe.fwd_w))
    assert torch.equal(v_gpu.cpu(), v_cpu)  # the Triton quantize kernel's scales are the spec's bits
    mult_gpu = dge_derivative(v_gpu)
    # |.|^(1/k-1) is a pow: CUDA's powf and the CPU's are each within a few ulp of the true value, not equal
    torch.testing.assert_close(mult_gpu.cpu(), dge_derivative(v_cpu), rtol=4 * 2**-23, atol=0)
    _, dw, _ = _grads(x.cuda(), w.cuda(), b.cuda(), "nvidia")
    _, dw_dge, _ = _grads(x.cuda(), w.cuda(), b.cuda(), recipe)
    assert torch.equal(dw_dge, dw * mult_gpu)
