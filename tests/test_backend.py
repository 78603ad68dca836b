"""The nvfp4 torch.compile backend: rewritten graphs (expecttest), report, options, end-to-end equality."""

import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase

import fp4compile
from fp4compile.backend import BackendOptions, nvfp4_backend
from fp4compile.linear import nvfp4_linear


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles fresh: Dynamo's per-code-object cache would otherwise carry over between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class MLP(nn.Module):
    def __init__(self, bias=True, d=32, hidden=64):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))

    def by_hand(self, x, recipe):
        h = F.relu(nvfp4_linear(x, self.fc1.weight, self.fc1.bias, recipe))
        return nvfp4_linear(h, self.fc2.weight, self.fc2.bias, recipe)


class HandWritten(nn.Module):
    """Matmuls spelled every way a researcher writes them."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(32, 32) / 6)  # [out, in]
        self.v = nn.Parameter(torch.randn(32, 48) / 6)  # [in, out]
        self.b = nn.Parameter(torch.zeros(48))

    def forward(self, x):
        h = x @ self.w.t()
        h = torch.mm(h, self.w.T)
        h = torch.addmm(self.b, h, self.v)
        return h.matmul(self.v.t())


class Block(nn.Module):
    """A pre-norm transformer block with hand-written attention matmuls."""

    def __init__(self, d=64, heads=4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = MLP(d=d, hidden=4 * d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class TiedLM(nn.Module):
    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mid = nn.Linear(d, d)

    def forward(self, ids):
        return F.linear(torch.tanh(self.mid(self.emb(ids))), self.emb.weight)


def _code(report, i=0):
    return report.graphs[i].code.strip()


class TestRewrittenGraphs(TestCase):
    def test_mlp_with_bias(self):
        report = fp4compile.explain(MLP(), torch.randn(8, 32))
        self.assertExpectedInline(_code(report), """\
def forward(self, L_self_modules_fc1_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_fc1_parameters_bias_ : torch.nn.parameter.Parameter, L_x_ : torch.Tensor, L_self_modules_fc2_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_fc2_parameters_bias_ : torch.nn.parameter.Parameter):
    l_self_modules_fc1_parameters_weight_ = L_self_modules_fc1_parameters_weight_
    l_self_modules_fc1_parameters_bias_ = L_self_modules_fc1_parameters_bias_
    l_x_ = L_x_
    l_self_modules_fc2_parameters_weight_ = L_self_modules_fc2_parameters_weight_
    l_self_modules_fc2_parameters_bias_ = L_self_modules_fc2_parameters_bias_
    nvfp4_linear = fp4compile_linear_nvfp4_linear(l_x_, l_self_modules_fc1_parameters_weight_, l_self_modules_fc1_parameters_bias_, recipe = 'nvidia');  l_x_ = l_self_modules_fc1_parameters_weight_ = l_self_modules_fc1_parameters_bias_ = None
    relu = torch.nn.functional.relu(nvfp4_linear);  nvfp4_linear = None
    nvfp4_linear_1 = fp4compile_linear_nvfp4_linear(relu, l_self_modules_fc2_parameters_weight_, l_self_modules_fc2_parameters_bias_, recipe = 'nvidia');  relu = l_self_modules_fc2_parameters_weight_ = l_self_modules_fc2_parameters_bias_ = None
    return (nvfp4_linear_1,)""")

    def test_mlp_without_bias(self):
        report = fp4compile.explain(MLP(bias=False), torch.randn(8, 32), options={"recipe": "quartet_ii"})
        self.assertExpectedInline(_code(report), """\
def forward(self, L_self_modules_fc1_parameters_weight_ : torch.nn.parameter.Parameter, L_x_ : torch.Tensor, L_self_modules_fc2_parameters_weight_ : torch.nn.parameter.Parameter):
    l_self_modules_fc1_parameters_weight_ = L_self_modules_fc1_parameters_weight_
    l_x_ = L_x_
    l_self_modules_fc2_parameters_weight_ = L_self_modules_fc2_parameters_weight_
    nvfp4_linear = fp4compile_linear_nvfp4_linear(l_x_, l_self_modules_fc1_parameters_weight_, None, recipe = 'quartet_ii');  l_x_ = l_self_modules_fc1_parameters_weight_ = None
    relu = torch.nn.functional.relu(nvfp4_linear);  nvfp4_linear = None
    nvfp4_linear_1 = fp4compile_linear_nvfp4_linear(relu, l_self_modules_fc2_parameters_weight_, None, recipe = 'quartet_ii');  relu = l_self_modules_fc2_parameters_weight_ = None
    return (nvfp4_linear_1,)""")

    def test_3d_input(self):
        report = fp4compile.explain(MLP(), torch.randn(2, 5, 32))
        self.assertEqual([r.x_shape for r in report.records], [(2, 5, 32), (2, 5, 64)])
        self.assertExpectedInline(_code(report), """\
def forward(self, L_self_modules_fc1_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_fc1_parameters_bias_ : torch.nn.parameter.Parameter, L_x_ : torch.Tensor, L_self_modules_fc2_parameters_weight_ : torch.nn.parameter.Parameter, L_self_modules_fc2_parameters_bias_ : torch.nn.parameter.Parameter):
    l_self_modules_fc1_parameters_weight_ = L_self_modules_fc1_parameters_weight_
    l_self_modules_fc1_parameters_bias_ = L_self_modules_fc1_parameters_bias_
    l_x_ = L_x_
    l_self_modules_fc2_parameters_weight_ = L_self_modules_fc2_parameters_weight_
    l_self_modules_fc2_parameters_bias_ = L_self_modules_fc2_parameters_bias_
    nvfp4_linear = fp4compile_linear_nvfp4_linear(l_x_, l_self_modules_fc1_parameters_weight_, l_self_modules_fc1_parameters_bias_, recipe = 'nvidia');  l_x_ = l_self_modules_fc1_parameters_weight_ = l_self_modules_fc1_parameters_bias_ = None
    relu = torch.nn.functional.relu(nvfp4_linear);  nvfp4_linear = None
    nvfp4_linear_1 = fp4compile_linear_nvfp4_linear(relu, l_self_modules_fc2_parameters_weight_, l_self_modules_fc2_parameters_bias_, recipe = 'nvidia');  relu = l_self_modules_fc2_parameters_weight_ = l_self_modules_fc2_parameters_bias_ = None
    return (nvfp4_linear_1,)""")

    def test_hand_written_matmuls(self):
        report = fp4compile.explain(HandWritten(), torch.randn(8, 32), options={"recipe": "naive"})
        self.assertEqual([r.op for r in report.rewritten], ["matmul", "mm", "addmm", "matmul"])
        self.assertExpectedInline(_code(report), """\
def forward(self, L_self_parameters_w_ : torch.nn.parameter.Parameter, L_x_ : torch.Tensor, L_self_parameters_b_ : torch.nn.parameter.Parameter, L_self_parameters_v_ : torch.nn.parameter.Parameter):
    l_self_parameters_w_ = L_self_parameters_w_
    l_x_ = L_x_
    l_self_parameters_b_ = L_self_parameters_b_
    l_self_parameters_v_ = L_self_parameters_v_
    nvfp4_linear = fp4compile_linear_nvfp4_linear(l_x_, l_self_parameters_w_, None, recipe = 'naive');  l_x_ = None
    nvfp4_linear_1 = fp4compile_linear_nvfp4_linear(nvfp4_linear, l_self_parameters_w_, None, recipe = 'naive');  nvfp4_linear = l_self_parameters_w_ = None
    t_2 = l_self_parameters_v_.t()
    nvfp4_linear_2 = fp4compile_linear_nvfp4_linear(nvfp4_linear_1, t_2, l_self_parameters_b_, recipe = 'naive');  nvfp4_linear_1 = t_2 = l_self_parameters_b_ = None
    nvfp4_linear_3 = fp4compile_linear_nvfp4_linear(nvfp4_linear_2, l_self_parameters_v_, None, recipe = 'naive');  nvfp4_linear_2 = l_self_parameters_v_ = None
    return (nvfp4_linear_3,)""")

    def test_attention_matmuls_stay_high_precision(self):
        report = fp4compile.explain(Block(), torch.randn(2, 16, 64))
        self.assertExpectedInline(str(report), """\
graph  module   weight          op      x          weight [out, in]  recipe  NVFP4
-----  -------  --------------  ------  ---------  ----------------  ------  -------------------------------------------------------
0      qkv      qkv.weight      linear  2x16x64    192x64            nvidia  rewritten
0      (root)   -               matmul  2x4x16x16  2x4x16x16         nvidia  skipped: activation x activation (no parameter operand)
0      (root)   -               matmul  2x4x16x16  2x4x16x16         nvidia  skipped: activation x activation (no parameter operand)
0      proj     proj.weight     linear  2x16x64    64x64             nvidia  rewritten
0      mlp.fc1  mlp.fc1.weight  linear  2x16x64    256x64            nvidia  rewritten
0      mlp.fc2  mlp.fc2.weight  linear  2x16x256   64x256            nvidia  rewritten
4 of 6 matmuls rewritten to NVFP4 in 1 graph(s), 0 graph break(s)""")

    def test_tied_weights(self):
        report = fp4compile.explain(TiedLM(), torch.randint(0, 64, (2, 8)))
        self.assertExpectedInline(str(report), """\
graph  module  weight      op      x       weight [out, in]  recipe  NVFP4
-----  ------  ----------  ------  ------  ----------------  ------  ---------
0      mid     mid.weight  linear  2x8x32  32x32             nvidia  rewritten
0      (root)  emb.weight  linear  2x8x32  64x32             nvidia  rewritten
2 of 2 matmuls rewritten to NVFP4 in 1 graph(s), 0 graph break(s)""")

    def test_skip_patterns(self):
        report = fp4compile.explain(Block(), torch.randn(2, 16, 64), options={"skip": ["mlp.*", "proj"]})
        self.assertExpectedInline(str(report), """\
graph  module   weight          op      x          weight [out, in]  recipe  NVFP4
-----  -------  --------------  ------  ---------  ----------------  ------  -------------------------------------------------------
0      qkv      qkv.weight      linear  2x16x64    192x64            nvidia  rewritten
0      (root)   -               matmul  2x4x16x16  2x4x16x16         nvidia  skipped: activation x activation (no parameter operand)
0      (root)   -               matmul  2x4x16x16  2x4x16x16         nvidia  skipped: activation x activation (no parameter operand)
0      proj     proj.weight     linear  2x16x64    64x64             nvidia  skipped: skip pattern 'proj'
0      mlp.fc1  mlp.fc1.weight  linear  2x16x64    256x64            nvidia  skipped: skip pattern 'mlp.*'
0      mlp.fc2  mlp.fc2.weight  linear  2x16x256   64x256            nvidia  skipped: skip pattern 'mlp.*'
1 of 6 matmuls rewritten to NVFP4 in 1 graph(s), 0 graph break(s)""")


# ----------------------------------------------------------------------------- what is left alone
def test_shapes_not_multiple_of_16_and_integer_weights_are_left_alone_with_reasons():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(32, 24)
            self.idx = nn.Parameter(torch.ones(24, 16, dtype=torch.int64), requires_grad=False)

        def forward(self, x):
            h = self.a(x)
            return h, h.round().long() @ self.idx

    report = fp4compile.explain(Odd(), torch.randn(4, 32))
    assert [r.reason for r in report.records] == [
        "in_features=32 or out_features=24 is not a multiple of 16",
        "activation dtype torch.int64 is not bfloat16, float16 or float32",
    ]
    assert not report.rewritten


def test_bf16_recipe_rewrites_nothing():
    report = fp4compile.explain(MLP(), torch.randn(4, 32), options={"recipe": "bf16"})
    assert not report.rewritten and {r.reason for r in report.records} == {"recipe bf16 quantizes nothing"}


# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("inner", ["aot_eager", "inductor"])
def test_compiled_forward_and_gradients_equal_nvfp4_linear_by_hand(inner):
    model = MLP()
    x = torch.randn(2, 24, 32, requires_grad=True)
    want = model.by_hand(x, "naive")
    want.square().sum().backward()
    want_grads = [x.grad.clone()] + [p.grad.clone() for p in model.parameters()]
    x.grad = None
    model.zero_grad()
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "naive", "inner": inner}, fullgraph=True)
    got = compiled(x)
    got.square().sum().backward()
    got_grads = [x.grad] + [p.grad for p in model.parameters()]
    assert torch.equal(got, want)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w)
    assert not torch.equal(want, model.fc2(F.relu(model.fc1(x))))  # it did quantize


def test_stochastic_recipe_is_reproducible_under_manual_seed():
    model = MLP()
    x = torch.randn(16, 32)
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "quartet_ii", "inner": "aot_eager"})

    def grads(seed):
        torch.manual_seed(seed)
        model.zero_grad()
        compiled(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    first, again, other = grads(0), grads(0), grads(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("recipe", ["naive", "nvidia", "tetrajet_v2"])
def test_dynamic_batch_and_sequence_do_not_recompile_per_size(recipe):
    model = MLP()
    compiles = []

    def counting(gm, example_inputs, **kwargs):
        compiles.append(1)
        return nvfp4_backend(gm, example_inputs, options={"recipe": recipe, "inner": "aot_eager"})

    compiled = torch.compile(model, backend=counting)
    # Dynamo's automatic dynamic shapes: static first, then batch dynamic, then batch and sequence.
    for b, s in [(2, 8), (3, 8), (4, 12)]:
        compiled(torch.randn(b, s, 32, requires_grad=True))
    warm = len(compiles)
    assert warm <= 3
    for b, s in [(5, 16), (7, 3), (6, 129), (9, 40)]:  # sizes 0 and 1 always specialize
        x = torch.randn(b, s, 32, requires_grad=True)
        y = compiled(x)
        y.sum().backward()
        with torch.no_grad():
            assert torch.equal(y, model.by_hand(x, recipe))  # forward slots are deterministic in all three
    assert len(compiles) == warm


def test_no_grad_inference_quantizes_the_forward_only():
    model = MLP()
    x = torch.randn(8, 32)
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "naive", "inner": "aot_eager"})
    with torch.no_grad():
        y = compiled(x)
        assert torch.equal(y, model.by_hand(x, "naive"))
    assert not y.requires_grad


def test_autocast_region_casts_like_f_linear():
    model = MLP()
    x = torch.randn(8, 32)
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "naive", "inner": "aot_eager"})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = compiled(x)
    assert y.dtype == torch.bfloat16
    with torch.no_grad():
        h = F.relu(nvfp4_linear(x.bfloat16(), model.fc1.weight.bfloat16(), model.fc1.bias.bfloat16(), "naive"))
        want = nvfp4_linear(h, model.fc2.weight.bfloat16(), model.fc2.bias.bfloat16(), "naive")
    assert torch.equal(y, want)


def test_no_graph_breaks_added():
    report = fp4compile.explain(Block(), torch.randn(2, 16, 64))
    assert report.graph_breaks == 0 and len(report.rewritten) == 4


# ----------------------------------------------------------------------------- options and registration
def test_options_are_validated_with_the_valid_values_listed():
    with pytest.raises(ValueError, match=r"unknown nvfp4 backend option\(s\) \['recpie'\]; valid options: recipe, skip"):
        BackendOptions.parse({"recpie": "nvidia"})
    with pytest.raises(ValueError, match=r"unknown recipe 'nvidai'; valid recipes: .*nvidia"):
        BackendOptions.parse({"recipe": "nvidai"})
    with pytest.raises(ValueError, match=r"valid: inductor, aot_eager"):
        BackendOptions.parse({"inner": "eager"})
    with pytest.raises(ValueError, match=r"valid modes: default, reduce-overhead"):
        BackendOptions.parse({"mode": "fast"})
    compiled = torch.compile(MLP(), backend="nvfp4", options={"recipe": "nvidai"})
    with pytest.raises(Exception, match=r"valid recipes"):
        compiled(torch.randn(4, 32))


def test_inductor_option_patches_this_compilation_only():
    """``options={"inductor": {...}}`` reaches Inductor for the backend's compilation (torch.compile's own
    ``options=`` are the backend's), after the mode's patches, and leaves the global config as it was."""
    import torch._inductor.config as inductor_config

    seen = []

    def record(graph):
        seen.append(sum(1 for n in graph.nodes if n.op == "call_function"))

    before = inductor_config.post_grad_custom_pre_pass
    torch._dynamo.reset()
    options = {"recipe": "naive", "inductor": {"post_grad_custom_pre_pass": record}}
    compiled = torch.compile(MLP(), backend="nvfp4", options=options)
    compiled(torch.randn(4, 32))
    assert seen and seen[0] > 0  # Inductor ran the pass on the rewritten graph
    assert inductor_config.post_grad_custom_pre_pass is before
    options = BackendOptions.parse({"inductor": {"cpp_wrapper": True, "triton.cudagraphs": False}})
    assert options.inductor == (("cpp_wrapper", True), ("triton.cudagraphs", False))


def test_inductor_option_is_validated():
    with pytest.raises(ValueError, match=r"unknown Inductor config name\(s\) \['cpp_wraper'\]"):
        BackendOptions.parse({"inductor": {"cpp_wraper": True}})
    with pytest.raises(TypeError, match=r"must be a dict of Inductor config patches, got list"):
        BackendOptions.parse({"inductor": ["cpp_wrapper"]})
    with pytest.raises(ValueError, match=r"needs inner='inductor'"):
        BackendOptions.parse({"inner": "aot_eager", "inductor": {"cpp_wrapper": True}})
    with pytest.raises(ValueError, match=r"cannot set post_grad_custom_post_pass"):
        BackendOptions.parse({"inductor": {"post_grad_custom_post_pass": None}})


def test_backend_is_found_through_the_entry_point_without_importing_fp4compile():
    code = (
        "import sys, torch\n"
        "m = torch.nn.Linear(32, 16)\n"
        "y = torch.compile(m, backend='nvfp4', options={'recipe': 'naive', 'inner': 'aot_eager'})(torch.randn(4, 32))\n"
        "assert 'fp4compile.backend' in sys.modules\n"
        "print(tuple(y.shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("(4, 16)")
    assert "nvfp4" in torch._dynamo.list_backends(exclude_tags=())


def test_tied_weight_gradient_sums_both_uses_like_by_hand():
    model = TiedLM()
    ids = torch.randint(0, 64, (2, 8))

    def by_hand():
        h = torch.tanh(nvfp4_linear(model.emb(ids), model.mid.weight, model.mid.bias, "naive"))
        return nvfp4_linear(h, model.emb.weight, None, "naive")

    by_hand().square().mean().backward()
    want = model.emb.weight.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "naive", "inner": "aot_eager"})
    compiled(ids).square().mean().backward()
    assert torch.equal(model.emb.weight.grad, want)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return torch.relu(self.fc(x)) + x


def _blocks_compiled_one_by_one(recipe: str):
    torch._dynamo.reset()
    torch.manual_seed(0)
    blocks = nn.Sequential(*[_Block() for _ in range(3)])
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return nvfp4_backend(gm, example_inputs, options={"recipe": recipe, "inner": "aot_eager"})

    for block in blocks:
        block.compile(backend=counting)
    return blocks, graphs


def test_regional_compilation_reuses_one_graph_and_quantizes_every_block():
    """Compiling each repeated block (the cold-start remedy for deep models) compiles the block once; every copy
    runs it with its own weights, as the whole model compiled would."""
    blocks, graphs = _blocks_compiled_one_by_one("naive")
    x = torch.randn(32, 64, requires_grad=True)  # as every later block's input does (else one recompile)
    y = blocks(x)
    assert len(graphs) == 1
    expected = x
    for block in blocks:
        expected = torch.relu(nvfp4_linear(expected, block.fc.weight, block.fc.bias, "naive")) + expected
    assert torch.equal(y, expected)


@pytest.mark.parametrize("recipe", ["chon", "tetrajet_v2_full"])
def test_regional_compilation_with_outlier_state_is_refused(recipe):
    """The pass bakes each layer's outlier-channel state into its graph: a graph Dynamo reuses for another copy of
    the block would run with the first block's state, so it refuses and says what to do."""
    blocks, graphs = _blocks_compiled_one_by_one(recipe)
    x = torch.randn(32, 64)
    blocks[0](x)
    with pytest.raises(RuntimeError, match=r"outlier-channel state of layer .*compile the whole model"):
        blocks[1](x)
    assert len(graphs) == 1


def test_a_layer_whose_weight_is_replaced_keeps_running_with_outlier_state():
    """The check compares each outlier layer's weight input with the layer's current weight, so a weight replaced
    after compiling (a new Parameter with the same values) is not mistaken for another block's."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block())
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "chon", "inner": "aot_eager"})
    x = torch.randn(32, 64)
    with torch.no_grad():  # no re-scoring: the state stays as it is
        before = compiled(x)
        old = model[0].fc.weight
        model[0].fc.weight = nn.Parameter(old.detach().clone())
        assert torch.equal(compiled(x), before)


def test_backward_graph_is_lowered_with_the_forward_inside_the_compilation():
    """With Inductor the backward graph is lowered when the forward compiles (inside the backend's launch-analysis
    memo), not lazily at the first backward; the setting is patched for that call only."""
    from torch._dynamo.utils import counters
    from torch._functorch import config as functorch_config

    def lowered():  # Inductor graph compilations so far, whether served from its cache or not
        return sum(counters["inductor"][k] for k in ("fxgraph_cache_miss", "fxgraph_cache_hit", "fxgraph_cache_bypass"))

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(MLP(), backend="nvfp4", options={"recipe": "nvidia"})
    y = compiled(torch.randn(8, 32))
    assert lowered() == 2  # forward and backward
    y.sum().backward()
    assert lowered() == 2 and functorch_config.force_non_lazy_backward_lowering is False
