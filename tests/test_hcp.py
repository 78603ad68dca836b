"""CHON's Hot-Channel Patch: scores and selection, construction A in one GEMM, state, entry points, the preset."""

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from testing import linear_step, requires_gpu

import fp4compile
from fp4compile.outlier_channels import HotChannelPatch, new_state
from fp4compile.recipe import Recipe


def _recipe(k=16, period=3, residual="bf16") -> Recipe:
    control = HotChannelPatch(k=k, period=period, residual=residual)
    name = f"chon_test_{k}_{period}_{residual}"
    return dataclasses.replace(Recipe.named("chon"), name=name, outliers=control).register()


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 256, generator=g)
    x[:, 7] *= 30
    x[:, 100] *= 20
    return x, torch.randn(128, 256, generator=g) / 16


def _deq(t, spec):
    return fp4compile.quantize(t, spec).dequantize(torch.float32).double()


def test_options_and_layouts_are_checked():
    with pytest.raises(ValueError, match="k must be a positive integer"):
        HotChannelPatch(k=0)
    with pytest.raises(ValueError, match="residual must be 'bf16' or 'nvfp4'"):
        HotChannelPatch(residual="fp8")
    with pytest.raises(ValueError, match="per-tensor outer scales"):
        dataclasses.replace(Recipe.named("tetrajet_v2"), name="tj_hcp_bad", outliers=HotChannelPatch())
    chon = Recipe.named("chon")
    nvidia = Recipe.named("nvidia")
    assert chon.outliers == HotChannelPatch() and (chon.fwd_x, chon.fwd_w) == (nvidia.fwd_x, nvidia.fwd_w)
    for fqn in ("model.layers.3.self_attn.o_proj", "attn.out_proj", "transformer.h.0.attn.c_proj",
                "blocks.0.attn.proj", "lm_head"):  # fmt: skip
        assert chon.keeps_high_precision(fqn)  # post-QK protection
    assert not chon.keeps_high_precision("model.layers.3.self_attn.q_proj")
    assert not chon.keeps_high_precision("blocks.0.mlp.proj")


@pytest.mark.parametrize("residual", ["bf16", "nvfp4"])
def test_forward_is_construction_a_and_the_scores_choose_the_next_hot_channels(residual):
    recipe, (x, w) = _recipe(residual=residual), _data()
    state = new_state(256, None, recipe.outliers)
    index = state.index.clone()  # channels 0..15 before the first scoring
    y, dx, dw, _ = linear_step(x, w, recipe, state)
    xq, wq = _deq(x, recipe.fwd_x), _deq(w, recipe.fwd_w)
    r_x, r_w = x.double() - xq, w.double() - wq
    if residual == "bf16":
        rx, rw = r_x[:, index].bfloat16().double(), r_w[:, index].bfloat16().double()
    else:
        pad = lambda t: F.pad(t, (0, 128 - t.shape[1]))  # noqa: E731
        rx = _deq(pad(r_x[:, index].float()), recipe.fwd_x)[:, :16]
        rw = _deq(pad(r_w[:, index].float()), recipe.fwd_w)[:, :16]
    want = xq @ wq.T + rx @ wq[:, index].T + xq[:, index] @ rw.T  # [X^ | R_X,I | X^_I] [W^ | W^_I | R_W,I]^T
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    score = r_x.abs().mean(0) + r_w.abs().mean(0)
    assert torch.equal(state.index, torch.topk(score.float(), 16).indices)
    assert 7 in state.index.tolist() and state.count.item() == 1
    # straight through the patch: the backward is the plain recipe's, bit for bit
    _, dx_plain, dw_plain, _ = linear_step(x, w, "nvidia", None)
    assert torch.equal(dx, dx_plain) and torch.equal(dw, dw_plain)


@pytest.mark.parametrize("residual", ["bf16", "nvfp4"])
def test_the_patch_graph_compiled_by_inductor_gives_the_eager_bits(residual):
    """The torch ops around the kernels (residuals, bf16 residual columns, outer scales) are what Inductor fuses
    on CUDA; compiled by Inductor (here for the CPU) they must keep every rounding of the eager code (a fused
    ``.to(bfloat16).float()`` pair is dropped by Inductor: the bf16 columns round with integer ops)."""
    from fp4compile.hcp_gemms import linear_forward

    recipe, (x, w) = _recipe(residual=residual), _data()
    index = torch.randperm(256, generator=torch.Generator().manual_seed(1))[:16]
    forward = lambda x, w: linear_forward(x, w, None, index, recipe)  # noqa: E731
    eager, compiled = forward(x, w), torch.compile(forward, fullgraph=True)(x, w)
    assert torch.equal(compiled[0], eager[0])
    # the channel scores are mean reductions, whose summation order is Inductor's own: equal to FP32 rounding
    torch.testing.assert_close(compiled[-1], eager[-1], rtol=1e-6, atol=0)


def test_rescoring_happens_every_period_and_the_patch_lowers_the_error():
    recipe, (x, w) = _recipe(period=3), _data()
    other = _data(seed=3)[0]
    other[:, 7] /= 30
    other[:, 200] *= 40  # other hot channels
    state = new_state(256, None, recipe.outliers)
    indices = []
    for xs in (x, x, other, other):  # scored at forwards 0 and 3
        linear_step(xs, w, recipe, state)
        indices.append(state.index.clone())
    assert torch.equal(indices[0], indices[1]) and torch.equal(indices[1], indices[2])  # forward 2 does not re-score
    r_x, r_w = other.double() - _deq(other, recipe.fwd_x), w.double() - _deq(w, recipe.fwd_w)
    score = r_x.abs().mean(0) + r_w.abs().mean(0)
    assert torch.equal(indices[3], torch.topk(score.float(), 16).indices) and 200 in indices[3].tolist()
    assert state.count.item() == 4
    exact = x.double() @ w.double().T
    state = new_state(256, None, recipe.outliers)
    linear_step(x, w, recipe, state)  # scores x
    patched, plain = linear_step(x, w, recipe, state)[0], linear_step(x, w, "nvidia", None)[0]
    assert (patched.double() - exact).norm() < 0.8 * (plain.double() - exact).norm()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 128)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


_LOSS_WEIGHTS = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))


def _train(model, forward, steps):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(steps):
        x = _data(seed=step)[0][:32]
        torch.manual_seed(step)
        (forward(x) * _LOSS_WEIGHTS).sum().backward()
        opt.step()
        opt.zero_grad()


def test_backend_equals_eager_nvfp4linear_in_one_graph():
    recipe = _recipe(period=2)
    torch.manual_seed(0)
    model = Net()
    eager = copy.deepcopy(model)
    for name in ("fc1", "fc2"):
        setattr(eager, name, fp4compile.NVFP4Linear.from_linear(getattr(eager, name), recipe))
    _train(eager, eager, 4)
    want = {k: v.clone() for k, v in eager.state_dict().items()}
    for inner in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled_model = copy.deepcopy(model)
        options = {"recipe": recipe, "inner": inner}
        _train(compiled_model, torch.compile(compiled_model, backend="nvfp4", options=options), 4)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        got = compiled_model.state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), (inner, key)
    torch._dynamo.reset()
    assert got["fc1.outlier_count"].item() == 4
    assert list(fp4compile.outlier_channels(compiled_model)) == ["fc1", "fc2"]


@requires_gpu
def test_gpu_layer_equals_the_cpu_spec():
    recipe, (x, w) = _recipe(), _data()
    cpu_state, gpu_state = new_state(256, None, recipe.outliers), new_state(256, "cuda", recipe.outliers)
    for _ in range(2):
        cpu = linear_step(x, w, recipe, cpu_state)[0]
        gpu = linear_step(x.cuda(), w.cuda(), recipe, gpu_state)[0]
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5 * cpu.abs().max().item())
    assert torch.equal(gpu_state.index.cpu(), cpu_state.index)


def test_quantize_api_and_resume_carry_the_state():
    from torchao.quantization import quantize_

    recipe = _recipe(period=2)
    torch.manual_seed(0)
    start = Net()
    straight, first = copy.deepcopy(start), copy.deepcopy(start)
    for model in (straight, first):
        config = fp4compile.NVFP4Config(recipe=recipe)
        quantize_(model, config, filter_fn=config.filter_fn)
        assert isinstance(model.fc1, fp4compile.NVFP4Linear) and "fc1.outlier_index" in model.state_dict()
    _train(straight, straight, 4)
    _train(first, first, 2)
    resumed = copy.deepcopy(start)
    assert fp4compile.attach_outlier_state(resumed, recipe) == ["fc1", "fc2"]
    resumed.load_state_dict(first.state_dict())  # an nn.Linear model with the state, compiled from here on
    torch._dynamo.reset()
    compiled = torch.compile(resumed, backend="nvfp4", options={"recipe": recipe, "inner": "aot_eager"})
    opt_steps = [(step, _data(seed=step)[0][:32]) for step in (2, 3)]
    opt = torch.optim.SGD(resumed.parameters(), lr=0.01)
    for step, x in opt_steps:
        torch.manual_seed(step)
        (compiled(x) * _LOSS_WEIGHTS).sum().backward()
        opt.step()
        opt.zero_grad()
    torch._dynamo.reset()
    want = straight.state_dict()
    for key, value in resumed.state_dict().items():
        assert torch.equal(value, want[key]), key
