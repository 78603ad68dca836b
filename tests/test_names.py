"""Module names are the model's own, however ``forward`` is wrapped; skip rules and the warnings that guard them.

The backend logs its report (a ``RewriteReport``) at INFO on ``fp4compile.backend``; the tests read
that report object from the log record, so they check what ``torch.compile(..., backend="nvfp4")``
itself did, not only what ``explain`` says.
"""

import functools
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fp4compile
from fp4compile.passes import RewriteReport
from fp4compile.passes.names import source_to_fqn


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _decorated(fn):
    """A ``functools.wraps`` decorator with a ``(*args, **kwargs)`` signature, as transformers 5 puts on forward."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class Block(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.attn = nn.Linear(d, d)
        self.mlp = nn.ModuleDict({"up": nn.Linear(d, 2 * d), "down": nn.Linear(2 * d, d)})

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp["down"](F.relu(self.mlp["up"](x)))


class Inner(nn.Module):
    def __init__(self, d=32, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class LM(nn.Module):
    """``model.layers.N.{attn, mlp.up, mlp.down}`` and ``lm_head``, like a Hugging Face causal LM."""

    def __init__(self, d=32):
        super().__init__()
        self.model = Inner(d)
        self.lm_head = nn.Linear(d, 64, bias=False)

    def forward(self, x):
        return self.lm_head(self.model(x))


class DecoratedLM(LM):
    @_decorated
    def forward(self, x):
        return self.lm_head(self.model(x))


LINEARS = [f"model.layers.{i}.{n}" for i in range(2) for n in ("attn", "mlp.up", "mlp.down")]


def _reports(caplog) -> list[RewriteReport]:
    return [r.args[1] for r in caplog.records if r.name == "fp4compile.backend" and r.levelno == logging.INFO]


def _compile_and_run(caplog, model, *args, options=None, compile_fn=None, **kwargs) -> RewriteReport:
    options = {"inner": "aot_eager", **(options or {})}
    with caplog.at_level(logging.INFO, logger="fp4compile.backend"):
        if compile_fn is None:
            torch.compile(model, backend="nvfp4", options=options)(*args, **kwargs)
        else:
            compile_fn(options)(*args, **kwargs)
    reports = _reports(caplog)
    assert reports, "the backend logged no report"
    merged = RewriteReport()
    for report in reports:
        merged.records.extend(report.records)
        merged.graphs.extend(report.graphs)
    return merged


def _status(report) -> dict:
    return {r.module: (r.rewritten, r.reason) for r in report.records if r.weight}


# ----------------------------------------------------------------------------- wrapped forwards
@pytest.mark.parametrize("cls", [LM, DecoratedLM], ids=["plain", "decorated"])
def test_names_and_skip_patterns_are_the_models_own(cls, caplog):
    model = cls()
    report = _compile_and_run(caplog, model, torch.randn(4, 32), options={"skip": ["model.layers.0.*"]})
    status = _status(report)
    assert sorted(status) == sorted(LINEARS + ["lm_head"])
    assert {r.weight for r in report.records} == {f"{m}.weight" for m in LINEARS + ["lm_head"]}
    assert all(status[m] == (False, "skip pattern 'model.layers.0.*'") for m in LINEARS[:3])
    assert all(status[m] == (True, "") for m in LINEARS[3:])
    assert status["lm_head"] == (False, "skip pattern 'lm_head'")


def test_model_compile_method_uses_the_models_names(caplog):
    model = DecoratedLM()

    def compile_fn(options):
        model.compile(backend="nvfp4", options=options)
        return model

    report = _compile_and_run(caplog, model, torch.randn(4, 32), options={"skip": ["*.mlp.*"]}, compile_fn=compile_fn)
    assert sorted(r.module for r in report.rewritten) == ["model.layers.0.attn", "model.layers.1.attn"]


def test_compiled_submodule_answers_to_full_and_relative_names(caplog):
    model = LM()
    skip = ["model.layers.0.attn", "mlp.up"]  # a full name, and one relative to the compiled block

    def compile_fn(options):
        for i, layer in enumerate(model.model.layers):  # per-block compile, the torchtitan way
            model.model.layers[i] = torch.compile(layer, backend="nvfp4", options={**options, "skip": skip})
        return model

    report = _compile_and_run(caplog, model, torch.randn(4, 32), compile_fn=compile_fn)
    status = _status(report)
    assert sorted(status) == sorted(LINEARS)  # full names: no "_orig_mod", no block-relative names
    assert status["model.layers.0.attn"] == (False, "skip pattern 'model.layers.0.attn'")
    assert status["model.layers.1.attn"] == (True, "")
    assert status["model.layers.0.mlp.up"] == status["model.layers.1.mlp.up"] == (False, "skip pattern 'mlp.up'")


def test_compiled_function_taking_the_model_and_a_graph_break(caplog):
    model = LM()

    def step(m, x):
        h = m.model.layers[0](x)
        torch._dynamo.graph_break()
        return m.lm_head(m.model.layers[1](h))

    def compile_fn(options):
        return torch.compile(step, backend="nvfp4", options=options)

    report = _compile_and_run(caplog, model, model, torch.randn(4, 32), compile_fn=compile_fn)
    assert len(report.graphs) == 2
    assert sorted(r.module for r in report.rewritten) == sorted(LINEARS)


def test_source_path_fallback_drops_the_root_access():
    assert source_to_fqn("L['args'][0]._modules['model']._modules['0']._parameters['weight']") == "model.0.weight"
    assert source_to_fqn("L['self']._modules['layers']._modules['0']._orig_mod._parameters['w']") == "layers.0.w"
    assert source_to_fqn("G['net']._parameters['weight']") == "weight"
    assert source_to_fqn("L['w']") == "w"


# ----------------------------------------------------------------------------- Hugging Face models
transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need transformers (test extra)")


def _hf(kind: str):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)  # fmt: skip
    if kind == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


HF_FIRST_LAYER = {"llama": "model.layers.0.*", "qwen2": "model.layers.0.*", "gpt2": "transformer.h.0.*"}
HF_PER_LAYER = {"llama": 7, "qwen2": 7, "gpt2": 4}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_hugging_face_names_and_first_layer_skip(kind, caplog):
    model = _hf(kind)
    ids = torch.randint(0, 256, (2, 16))
    expected = {
        name for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, transformers.pytorch_utils.Conv1D)) and name != "lm_head"
    }  # fmt: skip
    report = _compile_and_run(caplog, model, input_ids=ids, options={"skip": [HF_FIRST_LAYER[kind]]})
    assert report.graph_breaks == 0
    weight_records = [r for r in report.records if r.weight]
    assert {r.module for r in weight_records} == expected | {"lm_head"}
    assert all(r.weight == f"{r.module}.weight" for r in weight_records if r.module != "lm_head")  # GPT-2 ties it
    skipped = {r.module for r in weight_records if r.reason == f"skip pattern {HF_FIRST_LAYER[kind]!r}"}
    assert len(skipped) == HF_PER_LAYER[kind] and all(".0." in m for m in skipped)
    assert {r.module for r in report.rewritten} == expected - skipped
    # explain takes the model's keyword inputs, and says the same.
    explained = fp4compile.explain(model, input_ids=ids, options={"skip": [HF_FIRST_LAYER[kind]]})
    assert [(r.module, r.rewritten, r.reason) for r in explained.records if r.weight] == [
        (r.module, r.rewritten, r.reason) for r in weight_records
    ]


def test_skip_callable_gets_the_models_fqn_and_module():
    model = _hf("llama")
    seen = {}

    def keep_down_proj(fqn, module):
        seen[fqn] = module
        return fqn.endswith("mlp.down_proj")

    report = fp4compile.explain(model, input_ids=torch.randint(0, 256, (2, 16)), options={"skip": keep_down_proj})
    kept = sorted(r.module for r in report.records if r.reason.startswith("skip callable"))
    assert kept == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert seen["model.layers.1.self_attn.q_proj"] is model.model.layers[1].self_attn.q_proj
    assert "lm_head" not in seen  # the recipe's own pattern decides first


# ----------------------------------------------------------------------------- warnings
def test_a_pattern_that_matches_no_linear_warns_with_real_names():
    message = r"skip pattern 'layers\.0\.\*' matches no linear layer.*'model\.layers\.0\.attn'"
    with pytest.warns(UserWarning, match=message):
        report = fp4compile.explain(LM(), torch.randn(4, 32), options={"skip": ["layers.0.*", "*.mlp.*"]})
    assert len(report.rewritten) == 2  # the other pattern still applies


def test_matching_patterns_do_not_warn(recwarn):
    fp4compile.explain(LM(), torch.randn(4, 32), options={"skip": ["model.layers.0.*", "*.up", "lm_head.weight"]})
    assert not [w for w in recwarn if "matches no linear" in str(w.message)]


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fine = nn.Linear(32, 32)
        self.odd = nn.Linear(32, 24)
        self.w = nn.Parameter(torch.randn(32, 32))

    def forward(self, x):
        h = self.fine(x)
        return self.odd(h), self.w @ h.t()


def test_matmuls_left_in_high_precision_get_one_warning_per_compile(caplog):
    with caplog.at_level(logging.INFO, logger="fp4compile.backend"):
        torch.compile(Odd(), backend="nvfp4", options={"inner": "aot_eager"})(torch.randn(4, 32))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 matmul(s) with a weight stay in high precision" in warnings[0]
    assert "odd: in_features=32 or out_features=24 is not a multiple of 16" in warnings[0]
    assert "  w: weight is the left operand (W @ x); write x @ W.T" in warnings[0]
    assert "options={'skip': [...]}" in warnings[0]


def test_skipping_them_silences_the_warning(caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, logger="fp4compile.backend"):
        torch.compile(Odd(), backend="nvfp4", options={"inner": "aot_eager", "skip": ["odd", "w"]})(torch.randn(4, 32))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_osci_reset_takes_the_same_skip_rules():
    model = LM()
    with pytest.warns(UserWarning, match=r"OsciReset: skip pattern 'layers\.\*' matches no linear layer"):
        osc = fp4compile.OsciReset(model, "nvidia", start=0, skip=["layers.*", lambda fqn, m: fqn.endswith("up")])
    assert sorted(osc.layers) == sorted(f"{m}.weight" for m in LINEARS if not m.endswith("up"))


def test_skip_of_the_wrong_type_names_the_fix():
    with pytest.raises(TypeError, match=r"nvfp4 option 'skip' must be FQN patterns \(strings\), a callable"):
        fp4compile.explain(LM(), torch.randn(4, 32), options={"skip": [3]})
