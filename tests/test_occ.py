"""Wang et al.'s outlier clamping and compensation (OCC): the clamp, the compensated GEMM, STE, the recipe option."""

import dataclasses

import pytest
import torch
from testing import assert_backend_matches_eager, requires_gpu

from fp4compile.linear import nvfp4_linear
from fp4compile.outliers import OutlierClamping, clamp_outliers, dense_residual, residual_count
from fp4compile.recipe import Recipe


def _occ_recipe(base: str, **occ) -> Recipe:
    name = f"{base}_occ_" + "_".join(f"{k}{v}" for k, v in sorted(occ.items()))
    return dataclasses.replace(Recipe.named(base), name=name, occ=OutlierClamping(**occ)).register()


def _heavy_tailed(rows=64, cols=256, seed=0):
    """Gaussian over uniform: a heavy tail of a few large activations in every row."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) / torch.rand(rows, cols, generator=g).clamp(min=0.02)


@pytest.mark.parametrize("granularity", ["token", "tensor"])
def test_clamp_bounds_are_the_sorted_elements_and_the_residual_is_exact(granularity):
    x = _heavy_tailed()
    occ = OutlierClamping(alpha=0.97, granularity=granularity)
    clamped, index, value = clamp_outliers(x, occ)
    rows = x if granularity == "token" else x.reshape(1, -1)
    n = rows.shape[1]
    ordered = rows.sort(dim=1).values
    lower, upper = ordered[:, int(0.03 * n) : int(0.03 * n) + 1], ordered[:, int(0.97 * n) : int(0.97 * n) + 1]
    assert torch.equal(clamped.reshape(rows.shape), rows.clamp(min=lower, max=upper))
    below, above = residual_count(n, 0.97)
    assert (below, above) == (int(0.03 * n), n - 1 - int(0.97 * n))
    assert index.shape == value.shape == (rows.shape[0], below + above)
    assert torch.equal(dense_residual(x.shape, index, value, occ), (x - clamped).float())
    assert clamped.dtype == x.dtype


def test_clamp_of_bf16_keeps_its_values():
    x = _heavy_tailed().bfloat16()
    clamped, _, value = clamp_outliers(x, OutlierClamping())
    assert clamped.dtype == torch.bfloat16 and value.dtype == torch.float32
    assert torch.isin(clamped, x).all()  # bounds are elements of their row: nothing is rounded


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"alpha must lie in \(0.5, 1\)"):
        OutlierClamping(alpha=1.0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        OutlierClamping(granularity="channel")
    with pytest.raises(ValueError, match="residual must be one of"):
        OutlierClamping(residual="fp16")
    with pytest.raises(TypeError, match="Recipe.occ must be an OutlierClamping"):
        dataclasses.replace(Recipe.named("naive"), name="bad_occ", occ=0.99)


def _grads(x, w, b, recipe, seed=0):
    x, w, b = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    torch.manual_seed(seed)
    y = nvfp4_linear(x, w, b, recipe)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device)
    y.backward(dy)
    return y.detach(), x.grad, w.grad, b.grad, dy


@pytest.mark.parametrize("base", ["naive", "nvidia", "quartet_ii"])
def test_compensated_forward_and_ste_backward(base):
    x, w, b = _heavy_tailed(), torch.randn(128, 256) / 16, torch.randn(128)
    recipe = _occ_recipe(base, alpha=0.99, residual="bf16")
    clamped, index, value = clamp_outliers(x, recipe.occ)
    r = dense_residual(x.shape, index, value, recipe.occ)
    y, dx, dw, db, dy = _grads(x, w, b, recipe)
    y_c, dx_c, dw_c, db_c, _ = _grads(clamped, w, b, base)  # the plain recipe on the clamped input, same bits
    compensation = r.bfloat16().float() @ w.bfloat16().float().T
    torch.testing.assert_close(y, y_c + compensation, rtol=1e-6, atol=1e-5)  # one FP32 rounding order apart
    assert torch.equal(dx, dx_c) and torch.equal(db, db_c)  # straight through the clamp
    torch.testing.assert_close(dw, dw_c + dy.T @ r.bfloat16().float(), rtol=1e-6, atol=1e-5)


def test_residual_off_is_clamp_only_and_saves_nothing():
    x, w, b = _heavy_tailed(), torch.randn(128, 256) / 16, torch.randn(128)
    recipe = _occ_recipe("naive", residual="off")
    clamped, _, _ = clamp_outliers(x, recipe.occ)
    for got, want in zip(_grads(x, w, b, recipe), _grads(clamped, w, b, "naive")):
        assert torch.equal(got, want)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        nvfp4_linear(x.requires_grad_(), w.requires_grad_(), None, recipe)
    assert all(t.numel() == 0 for t in saved if t.dtype == torch.int64)


@pytest.mark.parametrize("residual", ["bf16", "fp8"])
def test_compensation_lowers_the_forward_error_on_heavy_tailed_activations(residual):
    x, w = _heavy_tailed(256, 512), torch.randn(256, 512) / 16
    exact = x.double() @ w.double().T

    def error(recipe):
        y = nvfp4_linear(x, w, None, recipe).double()
        return ((y - exact).norm() / exact.norm()).item()

    plain, clamp_only = error("nvidia"), error(_occ_recipe("nvidia", residual="off"))
    compensated = error(_occ_recipe("nvidia", residual=residual))
    assert compensated < 0.8 * plain, (compensated, plain)
    assert compensated < clamp_only


def test_occ_through_the_backend_equals_eager():
    recipe = _occ_recipe("naive", alpha=0.98, granularity="tensor", residual="fp8")
    assert_backend_matches_eager(recipe, _heavy_tailed(16, 64))


@requires_gpu
@pytest.mark.parametrize("residual", ["bf16", "fp8"])
def test_gpu_occ_matches_the_cpu_path(residual):
    recipe = _occ_recipe("naive", residual=residual)
    x, w, b = _heavy_tailed(256, 512), torch.randn(256, 512) / 16, torch.randn(256)
    clamped, index, value = clamp_outliers(x.cuda(), recipe.occ)
    want_clamped, _, want_value = clamp_outliers(x, recipe.occ)
    assert torch.equal(clamped.cpu(), want_clamped)
    assert torch.equal(value.sort(dim=1).values.cpu(), want_value.sort(dim=1).values)
    y, dx, dw, db, _ = _grads(x.cuda(), w.cuda(), b.cuda(), recipe)
    y_cpu, dx_cpu, dw_cpu, db_cpu, _ = _grads(x, w, b, recipe)
    for got, want in ((y, y_cpu), (dx, dx_cpu), (dw, dw_cpu), (db, db_cpu)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)  # fp16 tensor cores vs FP32: sum order
