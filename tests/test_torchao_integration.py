"""torchao integration: NVFP4Linear, quantize_ with NVFP4Config, the nvfp4 backend on swapped models, export.

CPU tests use small shapes; the GPU test (``requires_gpu``) runs quantize_ + ``backend="nvfp4"``
under bf16 autocast on CUDA.
"""

import dataclasses
import io
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from testing import requires_gpu

import fp4compile
from fp4compile import NVFP4Linear, Recipe, quantize
from fp4compile.backend import nvfp4_backend
from fp4compile.linear import nvfp4_linear
from fp4compile.passes.matmul import ALREADY_NVFP4_OP

pytest.importorskip("torchao", reason="torchao is not importable")
quantize_ = pytest.importorskip("torchao.quantization").quantize_
FqnToConfig = pytest.importorskip("torchao.quantization").FqnToConfig
_nvfp4_tensor = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
NVFP4Tensor = _nvfp4_tensor.NVFP4Tensor
from_blocked = pytest.importorskip("torchao.prototype.mx_formats.utils").from_blocked

from fp4compile.torchao_integration import (  # noqa: E402  (after the importorskip of torchao)
    NVFP4Config,
    _nvfp4_config_transform,
    export_torchao_nvfp4,
    nvfp4_tensor_from_weight,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Block(nn.Module):
    def __init__(self, d=32, hidden=64):
        super().__init__()
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x):
        return x + self.down(F.relu(self.up(x)))


class TinyLM(nn.Module):
    """Two blocks, an odd-sized side projection and an lm_head (kept by every recipe)."""

    def __init__(self, d=32, vocab=64):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d), Block(d)])
        self.odd = nn.Linear(d, 24)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.lm_head(x), self.odd(x)

    def by_hand(self, x, recipe):
        for block in self.blocks:
            h = F.relu(nvfp4_linear(x, block.up.weight, block.up.bias, recipe))
            x = x + nvfp4_linear(h, block.down.weight, None, recipe)
        return self.lm_head(x), self.odd(x)


SWAPPED = ["blocks.0.down", "blocks.0.up", "blocks.1.down", "blocks.1.up"]  # sorted


def _kinds(model):
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _convert(model, config):
    """``quantize_`` as documented: the config's ``filter_fn`` carries the FQNs to its handler."""
    quantize_(model, config, filter_fn=config.filter_fn)
    return model


def _nvfp4_names(model):
    return sorted(name for name, m in model.named_modules() if isinstance(m, NVFP4Linear))


def _loss_and_grads(model, x, fn=None):
    model.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    out = (fn if fn is not None else model)(x)
    loss = sum(o.square().sum() for o in out)
    loss.backward()
    return [o.detach() for o in out], [x.grad] + [p.grad.clone() for p in model.parameters()]


def _assert_all_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ----------------------------------------------------------------------------- NVFP4Linear
def test_from_linear_shares_parameters_and_keeps_device_dtype_and_mode():
    lin = nn.Linear(32, 48, dtype=torch.bfloat16).eval()
    layer = NVFP4Linear.from_linear(lin, "quartet_ii")
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.device == lin.weight.device
    assert not layer.training and layer.recipe == "quartet_ii"
    assert repr(layer) == "NVFP4Linear(in_features=32, out_features=48, bias=True, recipe='quartet_ii')"
    assert list(layer.state_dict()) == list(lin.state_dict()) == ["weight", "bias"]
    no_bias = NVFP4Linear.from_linear(nn.Linear(32, 16, bias=False))
    assert no_bias.bias is None and no_bias.recipe == "nvidia"
    custom = Recipe("naive_for_nn_test", *(Recipe.named("naive").spec(s) for s in fp4compile.recipe.SLOTS))
    assert NVFP4Linear(32, 32, recipe=custom).recipe == "naive_for_nn_test"  # registered by name
    with pytest.raises(ValueError, match="multiples of 16"):
        NVFP4Linear.from_linear(nn.Linear(32, 24))
    with pytest.raises(ValueError, match=r"unknown recipe 'nvidai'; valid recipes: .*nvidia"):
        NVFP4Linear(32, 32, recipe="nvidai")


@pytest.mark.parametrize("recipe", ["naive", "nvidia"])
def test_eager_output_and_grads_equal_nvfp4_linear_by_hand(recipe):
    """Bit for bit; ``nvidia``'s stochastic backward draws the same bits after the same manual_seed."""
    lin = nn.Linear(32, 64)
    layer = NVFP4Linear.from_linear(lin, recipe)
    x = torch.randn(3, 16, 32, requires_grad=True)

    def run(fn):
        torch.manual_seed(7)
        x.grad, lin.weight.grad, lin.bias.grad = None, None, None
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad, lin.weight.grad, lin.bias.grad]

    got = run(layer)
    want = run(lambda t: nvfp4_linear(t, lin.weight, lin.bias, recipe))
    _assert_all_equal(got, want)
    assert not torch.equal(got[0], F.linear(x, lin.weight, lin.bias))  # it did quantize


def test_autocast_casts_like_nn_linear():
    layer = NVFP4Linear(32, 32, recipe="naive")
    x = torch.randn(8, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        want = nvfp4_linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16(), "naive")
    assert torch.equal(y, want)


# ----------------------------------------------------------------------------- quantize_ with NVFP4Config
def test_quantize_swaps_exactly_the_eligible_linears():
    model = TinyLM()
    params = {name: p for name, p in model.named_parameters()}
    _convert(model, NVFP4Config(recipe="quartet_ii"))
    assert _nvfp4_names(model) == SWAPPED
    assert type(model.lm_head) is nn.Linear  # the recipe's keep_high_precision
    assert type(model.odd) is nn.Linear  # 24 outputs: not a multiple of 16
    assert all(getattr(model.get_submodule(n), "recipe") == "quartet_ii" for n in SWAPPED)
    assert all(p is params[name] for name, p in model.named_parameters())  # no copies


def test_skip_patterns_and_ineligible_layers_stay_nn_linear():
    model = TinyLM()
    model.blocks[0].up.weight.requires_grad_(False)  # still eligible
    model.int_layer = nn.Linear(32, 32)
    model.int_layer.weight = nn.Parameter(torch.ones(32, 32, dtype=torch.int32), requires_grad=False)
    model.attn = nn.MultiheadAttention(32, 2)  # its out_proj is NonDynamicallyQuantizableLinear
    _convert(model, NVFP4Config(recipe="naive", skip=["blocks.1.*"]))
    assert _nvfp4_names(model) == ["blocks.0.down", "blocks.0.up"]
    assert type(model.int_layer) is nn.Linear and type(model.attn.out_proj) is not NVFP4Linear
    config = NVFP4Config(skip="*.down")  # a single pattern as a string
    assert config.skip == ("*.down",)
    assert config.why_not(model.odd, "odd") == "in_features=32 or out_features=24 is not a multiple of 16"
    assert config.why_not(model.lm_head, "lm_head") == "FQN 'lm_head': skip pattern 'lm_head'"
    assert config.why_not(model.int_layer, "x") == "weight dtype torch.int32 is not bfloat16, float16 or float32"
    assert config.why_not(TinyLM().blocks[1].down, "blocks.1.down") == "FQN 'blocks.1.down': skip pattern '*.down'"


def test_skip_callable_gets_the_fqn_and_the_module():
    seen = []

    def keep_block_1(fqn, module):
        seen.append((fqn, type(module).__name__))
        return fqn.startswith("blocks.1.")

    model = TinyLM()
    _convert(model, NVFP4Config(recipe="naive", skip=["blocks.0.down", keep_block_1]))
    assert _nvfp4_names(model) == ["blocks.0.up"]
    assert ("blocks.1.up", "Linear") in seen and ("blocks.0.up", "Linear") in seen
    assert NVFP4Config(skip=keep_block_1).skip == (keep_block_1,)


def test_a_skip_pattern_that_matches_no_linear_warns_once_with_real_names():
    model = TinyLM()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _convert(model, NVFP4Config(recipe="naive", skip=["block.*", "*.down"]))
    messages = [str(w.message) for w in caught if "matches no linear" in str(w.message)]
    assert messages == [
        "NVFP4Config: skip pattern 'block.*' matches no linear layer, so it keeps nothing in high precision; "
        "the model's linear layers are named like 'blocks.0.up', 'blocks.0.down'"
    ]
    assert _nvfp4_names(model) == ["blocks.0.up", "blocks.1.up"]


def test_user_filter_fn_composes_with_the_configs():
    model = TinyLM()
    seen = []

    def only_block_1(module, fqn):
        seen.append(fqn)
        return isinstance(module, nn.Linear) and fqn.startswith("blocks.1.")

    config = NVFP4Config(recipe="naive")
    quantize_(model, config, filter_fn=lambda m, fqn: only_block_1(m, fqn) and config.filter_fn(m, fqn))
    assert _nvfp4_names(model) == ["blocks.1.down", "blocks.1.up"]
    assert "lm_head" in seen
    # A filter accepting lm_head does not override the recipe's keep_high_precision.
    model = TinyLM()
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in ("lm_head", "blocks.0.up") and config.filter_fn(m, fqn))
    assert _nvfp4_names(model) == ["blocks.0.up"]
    # The config's own filter_fn alone: every eligible linear but those its rules keep.
    model, config = TinyLM(), NVFP4Config(recipe="naive", skip=["blocks.0.up"])
    quantize_(model, config, filter_fn=config.filter_fn)
    assert _nvfp4_names(model) == ["blocks.0.down", "blocks.1.down", "blocks.1.up"]


def test_without_the_configs_filter_fn_its_fqn_rules_cannot_apply_so_it_refuses():
    fix = r"call quantize_\(model, config, filter_fn=config.filter_fn\)"
    for call in (
        lambda model: quantize_(model, NVFP4Config()),  # torchao's default filter
        lambda model: quantize_(model, NVFP4Config(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear)),
        lambda model: quantize_(model, FqnToConfig({"blocks.0.up": NVFP4Config()}), filter_fn=None),
    ):
        model = TinyLM()
        with pytest.raises(ValueError, match=r"keeps layers in high precision by name \(\['lm_head'.*" + fix):
            call(model)
        assert _nvfp4_names(model) == []  # refused before anything was swapped
    with pytest.raises(ValueError, match=fix):
        _nvfp4_config_transform(nn.Linear(32, 32), NVFP4Config())


def test_a_config_without_fqn_rules_takes_any_filter_and_containers():
    recipe = dataclasses.replace(Recipe.named("naive"), name="naive_keep_nothing", keep_high_precision=()).register()
    config = NVFP4Config(recipe=recipe)
    model = TinyLM()
    quantize_(model, config, filter_fn=lambda m, fqn: fqn == "blocks.0")  # a container: its eligible linears
    assert _nvfp4_names(model) == ["blocks.0.down", "blocks.0.up"]
    model = TinyLM()
    fqn_to_config = {"blocks.0.up": config, "lm_head": config, "re:blocks\\.1\\.(up|down)": config}
    quantize_(model, FqnToConfig(fqn_to_config), filter_fn=None)
    assert _nvfp4_names(model) == ["blocks.0.up", "blocks.1.down", "blocks.1.up", "lm_head"]
    assert isinstance(_nvfp4_config_transform(nn.Linear(32, 32), config), NVFP4Linear)  # outside quantize_


def test_unknown_recipe_raises_at_config_construction():
    valid = "nvidia, tetrajet_v2, tetrajet_v2_full, quartet_ii"
    with pytest.raises(ValueError, match=f"unknown recipe 'quartet2'; valid recipes: {valid}"):
        NVFP4Config(recipe="quartet2")
    with pytest.raises(TypeError, match="recipe must be a Recipe or a recipe name"):
        NVFP4Config(recipe=3)
    with pytest.raises(TypeError, match="FQN patterns"):
        NVFP4Config(skip=[1])
    assert NVFP4Config(recipe=Recipe.named("tetrajet_v2")).recipe_name == "tetrajet_v2"


def test_state_dict_round_trips_between_nvfp4_and_plain_models():
    nvfp4 = TinyLM()
    _convert(nvfp4, NVFP4Config())
    plain = TinyLM()
    assert list(nvfp4.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(nvfp4.state_dict())  # strict
    _assert_all_equal(list(plain.state_dict().values()), list(nvfp4.state_dict().values()))
    fresh = TinyLM()
    _convert(fresh, NVFP4Config())
    fresh.load_state_dict(plain.state_dict())
    _assert_all_equal(list(fresh.state_dict().values()), list(plain.state_dict().values()))


# ----------------------------------------------------------------------------- torch.compile
def test_compiled_equals_eager_with_aot_eager_and_nvfp4_backends():
    model = TinyLM()
    _convert(model, NVFP4Config(recipe="naive"))
    x = torch.randn(2, 8, 32)
    want = _loss_and_grads(model, x)
    for g, w in zip(_loss_and_grads(model, x, lambda t: model.by_hand(t, "naive")), want):
        _assert_all_equal(g, w)
    graphs = []

    def nvfp4_inner_aot_eager(gm, example_inputs, **kwargs):
        compiled = nvfp4_backend(gm, example_inputs, options={"inner": "aot_eager"})
        graphs.append(gm)  # as rewritten by the backend's pass
        return compiled

    for backend in ("aot_eager", nvfp4_inner_aot_eager):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        for g, w in zip(_loss_and_grads(model, x, compiled), want):
            _assert_all_equal(g, w)
    # One fp4compile::linear per swapped layer, and no nvfp4_linear added by the pass: never quantized twice.
    (gm,) = graphs
    ops = [n for n in gm.graph.nodes if n.op == "call_function" and "fp4compile.linear" in str(n.target)]
    assert len(ops) == len(SWAPPED)
    assert not [n for n in gm.graph.nodes if n.target is nvfp4_linear]


def test_explain_lists_swapped_layers_as_already_nvfp4():
    model = TinyLM()
    _convert(model, NVFP4Config(recipe="quartet_ii", skip=["blocks.1.down"]))
    x = torch.randn(4, 32)
    # No recipe given: the conversion stands, the linear quantize_ skipped stays high precision, and a warning says so.
    with pytest.warns(UserWarning, match=r"NVFP4Linear layers \(recipe quartet_ii\).*1 other linear matmul.*blocks\.1"):
        report = fp4compile.explain(model, x)
    rows = {r.module: (r.op, r.recipe, r.rewritten, r.reason) for r in report.records}
    assert rows["blocks.0.up"] == (ALREADY_NVFP4_OP, "quartet_ii", False, "already NVFP4 (recipe 'quartet_ii')")
    assert rows["blocks.1.down"][2] is False and rows["blocks.1.down"][3].startswith("kept: the model was converted")
    assert rows["lm_head"] == ("linear", "nvidia", False, "skip pattern 'lm_head'")
    assert rows["odd"] == ("linear", "nvidia", False, "in_features=32 or out_features=24 is not a multiple of 16")
    already = [r for r in report.records if r.op == ALREADY_NVFP4_OP]
    assert sorted(r.module for r in already) == ["blocks.0.down", "blocks.0.up", "blocks.1.up"]
    assert [r.weight for r in already] == [f"{r.module}.weight" for r in already]
    assert "skipped: already NVFP4 (recipe 'quartet_ii')" in str(report)
    assert not report.rewritten
    # The converted recipe, asked for: the rest is quantized with it.
    report = fp4compile.explain(model, x, options={"recipe": "quartet_ii"})
    assert [(r.module, r.recipe) for r in report.rewritten] == [("blocks.1.down", "quartet_ii")]
    # Another recipe mixes two in one model: refused unless asked for.
    with pytest.raises(ValueError, match=r"recipe\(s\) \['quartet_ii'\].*given recipe 'nvidia'.*mix_recipes"):
        fp4compile.explain(model, x, options={"recipe": "nvidia"})
    report = fp4compile.explain(model, x, options={"recipe": "nvidia", "mix_recipes": True})
    assert [(r.module, r.recipe) for r in report.rewritten] == [("blocks.1.down", "nvidia")]


def test_inductor_compiles_a_swapped_layer():
    layer = NVFP4Linear(32, 32, recipe="naive")
    x = torch.randn(4, 32, requires_grad=True)
    want = _loss_and_grads(layer, x, lambda t: (layer(t),))
    got = _loss_and_grads(layer, x, lambda t: (torch.compile(layer, backend="inductor", fullgraph=True)(t),))
    for g, w in zip(got, want):
        _assert_all_equal(g, w)


# ----------------------------------------------------------------------------- export for inference
def _assert_bits_equal_rtn(t, w, spec="rtn"):
    q = quantize(w.detach(), spec)
    assert isinstance(t, NVFP4Tensor) and t.shape == w.shape and t.dtype == w.dtype
    assert t.block_size == 16 and t.is_swizzled_scales
    assert torch.equal(t.qdata.view(torch.uint8), q.codes)
    assert torch.equal(from_blocked(t.scale, *q.scales.shape).view(torch.uint8), q.scales.view(torch.uint8))
    assert t.per_tensor_scale.shape == q.outer.shape == ()
    assert torch.equal(t.per_tensor_scale.view(torch.int32), q.outer.view(torch.int32))
    # Same value code * scale * outer: up to the order of the two FP32 products.
    assert torch.allclose(t.dequantize(torch.float32), q.dequantize(torch.float32), rtol=2**-22, atol=0)


def test_export_is_bit_identical_to_rtn_and_runs_on_cpu():
    model = TinyLM()
    _convert(model, NVFP4Config(recipe="quartet_ii"))
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in SWAPPED}
    biases = {n: model.get_submodule(n).bias for n in SWAPPED}
    assert export_torchao_nvfp4(model) is model
    assert not _nvfp4_names(model)
    for name in SWAPPED:
        layer = model.get_submodule(name)
        assert type(layer) is nn.Linear and not layer.weight.requires_grad
        assert layer.bias is biases[name]
        assert layer.weight.act_quant_kwargs is None  # weight-only: F.linear dequantizes
        _assert_bits_equal_rtn(layer.weight, weights[name])
    x = torch.randn(4, 32)
    with torch.no_grad():
        layer = model.blocks[0].up
        want = F.linear(x, quantize(weights["blocks.0.up"], "rtn").dequantize(torch.float32), layer.bias)
        assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-6)
        assert [tuple(o.shape) for o in model(x)] == [(4, 64), (4, 24)]


def test_export_bf16_layer():
    layer = NVFP4Linear(32, 48, dtype=torch.bfloat16)
    weight = layer.weight.detach().clone()
    exported = export_torchao_nvfp4(layer)
    assert type(exported) is nn.Linear and exported.weight.dtype == torch.bfloat16
    _assert_bits_equal_rtn(exported.weight, weight)
    with torch.no_grad():
        x = torch.randn(4, 32, dtype=torch.bfloat16)
        want = F.linear(x, quantize(weight, "rtn").dequantize(torch.bfloat16), layer.bias)
        assert torch.allclose(exported(x).float(), want.float(), rtol=1e-2, atol=1e-2)


def test_export_uses_our_bits_where_torchao_to_nvfp4_differs():
    """A block far below the tensor's amax: torchao clamps its scale to 2**-6 (difference class 2 of
    test_torchao_agreement.py); the export keeps rtn's subnormal scale and codes."""
    w = torch.randn(32, 64)
    w[0, :16] *= 1e-6
    t = nvfp4_tensor_from_weight(w)
    _assert_bits_equal_rtn(t, w)
    p = _nvfp4_tensor.per_tensor_amax_to_scale(w.abs().amax())
    theirs = NVFP4Tensor.to_nvfp4(w, per_tensor_scale=p, is_swizzled_scales=True)
    assert t.scale.shape == theirs.scale.shape  # the same (swizzled) layout
    assert not torch.equal(t.scale.view(torch.uint8), theirs.scale.view(torch.uint8))
    same = torch.ones(32, 4, dtype=torch.bool)
    same[0, 0] = False  # every other block agrees
    ours = from_blocked(t.scale, 32, 4).view(torch.uint8)
    assert torch.equal(ours[same], from_blocked(theirs.scale, 32, 4).view(torch.uint8)[same])


def test_export_options():
    for spec in ("rtn_4over6", "rtn_2d"):
        w = torch.randn(32, 64)
        _assert_bits_equal_rtn(nvfp4_tensor_from_weight(w, spec), w, spec)
    w = torch.randn(32, 64)
    plain = nvfp4_tensor_from_weight(w, swizzle=False)  # scales as [rows, K/16]
    assert not plain.is_swizzled_scales
    assert torch.equal(plain.scale.view(torch.uint8), quantize(w, "rtn").scales.view(torch.uint8))
    assert torch.equal(plain.dequantize(), nvfp4_tensor_from_weight(w).dequantize())
    dynamic = nvfp4_tensor_from_weight(torch.randn(32, 64), dynamic_activation=True)
    assert dynamic.act_quant_kwargs.is_swizzled_scales and dynamic.act_quant_kwargs.use_dynamic_per_tensor_scale
    with pytest.raises(ValueError, match="deterministic, unrotated spec with a per-tensor outer scale"):
        export_torchao_nvfp4(nn.Linear(32, 32), spec="ms_eden")
    # filter_fn and a bare NVFP4Linear root
    model = TinyLM()
    _convert(model, NVFP4Config())
    export_torchao_nvfp4(model, filter_fn=lambda m, fqn: fqn.startswith("blocks.0."))
    assert _nvfp4_names(model) == ["blocks.1.down", "blocks.1.up"]
    exported = export_torchao_nvfp4(NVFP4Linear(32, 32))
    assert type(exported) is nn.Linear and isinstance(exported.weight, NVFP4Tensor)
    saved = io.BytesIO()
    torch.save(exported.state_dict(), saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=True)  # torchao allow-lists NVFP4Tensor for safe loading
    assert torch.equal(loaded["weight"].qdata, exported.weight.qdata)


# ----------------------------------------------------------------------------- lazy import and missing torchao
def test_lazy_names_and_missing_torchao_error():
    code = textwrap.dedent(
        """
        import sys
        import fp4compile
        assert "torchao" not in sys.modules and "fp4compile.torchao_integration" not in sys.modules
        assert {"NVFP4Config", "NVFP4Linear", "export_torchao_nvfp4"} <= set(dir(fp4compile))
        assert set(fp4compile.__all__) <= set(dir(fp4compile))
        sys.modules["torchao"] = None  # as if torchao were not installed
        exec("from fp4compile import *")  # star import works without torchao
        print(fp4compile.NVFP4Linear(32, 32).recipe)  # needs no torchao
        for name in ("NVFP4Config", "export_torchao_nvfp4"):
            try:
                getattr(fp4compile, name)
            except ImportError as e:
                print("ImportError:", e)
        try:
            fp4compile.not_a_name
        except AttributeError as e:
            print("AttributeError:", e)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "nvidia"
    assert len(lines) == 4 and all('pip install "torchao>=0.18"' in line for line in lines[1:3])
    assert lines[3] == "AttributeError: module 'fp4compile' has no attribute 'not_a_name'"


# ----------------------------------------------------------------------------- GPU
@requires_gpu
def test_gpu_quantize_then_nvfp4_backend_under_bf16_autocast_trains():
    torch.manual_seed(0)
    d = 256
    model = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.LayerNorm(d)).cuda()
    reference = [p.detach().clone() for p in model.parameters()]
    _convert(model, NVFP4Config(recipe="quartet_ii"))
    assert _nvfp4_names(model) == ["0", "2"]
    graphs = []

    def backend(gm, example_inputs, **kwargs):
        graphs.append(gm)
        return nvfp4_backend(gm, example_inputs)

    compiled = torch.compile(model, backend=backend)
    x = torch.randn(8, 128, d, device="cuda")
    target = torch.randn(8, 128, d, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = compiled(x)
        loss = F.mse_loss(y.float(), target)
    loss.backward()
    assert torch.isfinite(loss)
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    # Exactly one fp4compile::linear per layer, nothing added by the pass.
    nodes = [n for gm in graphs for n in gm.graph.nodes]
    assert sum("fp4compile.linear" in str(n.target) for n in nodes if n.op == "call_function") == 2
    assert not any(n.target is nvfp4_linear for n in nodes)
    # Close to the unquantized model.
    plain = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.LayerNorm(d)).cuda()
    with torch.no_grad():
        for p, r in zip(plain.parameters(), reference):
            p.copy_(r)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            want = plain(x)
    rel = (y.float() - want.float()).norm() / want.float().norm()
    assert rel < 0.3, rel
    # Export on the GPU (Triton quantize kernel) gives the CPU reference's bits.
    weight = model[0].weight.detach().clone()
    export_torchao_nvfp4(model)
    _assert_bits_equal_rtn(model[0].weight, weight)
    cpu = nvfp4_tensor_from_weight(weight.cpu())
    assert torch.equal(model[0].weight.qdata.cpu(), cpu.qdata)
    assert torch.equal(model[0].weight.scale.cpu().view(torch.uint8), cpu.scale.view(torch.uint8))


def test_quantize_finds_every_fqn_without_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _convert(TinyLM(), NVFP4Config())
    assert not [w for w in caught if "NVFP4Config" in str(w.message)]
