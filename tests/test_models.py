"""Real models: Hugging Face GPT-2 and Llama from small configs (random weights, no downloads).

Every decoder linear is rewritten; a short training run with ``backend="nvfp4"`` lowers the loss
as much as the unquantized run, within a few percent.
"""

import argparse
import difflib
import functools
import inspect
import json
import string
import textwrap

import pytest
import torch
from testing import requires_gpu

import fp4compile

transformers = pytest.importorskip("transformers", reason="the real-model tests need transformers (test extra)")

# Byte-level text: the source of a standard-library module, so the loss has something to learn.
_TEXT = torch.tensor(list(inspect.getsource(json.decoder).encode()), dtype=torch.long)
# The GPU runs (200 steps of 16 x 128 tokens) read ~20x more: on json.decoder alone (12.5 KB, seen ~33 times) the
# models memorize it, and that is where NVFP4 ended 15-29 % above bf16's training loss (on the H200 and on the CPU
# reference alike, 2026-12-01): a measure of memorization, not of training. On this corpus (~1.7 epochs) the CPU
# reference of the Llama run ends within 0.1 % of bf16 (benchmarks/RESULTS.md, "Fourth session").
_LARGE_SOURCE = "".join(inspect.getsource(m) for m in (argparse, json.decoder, json.encoder, textwrap, string, difflib))
_LARGE_TEXT = torch.tensor(list(_LARGE_SOURCE.encode()), dtype=torch.long)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(step: int, batch: int, seq: int, device="cpu", text: torch.Tensor = _TEXT) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(text) - seq - 1, (batch,), generator=g)
    return torch.stack([text[s : s + seq] for s in starts]).to(device)


def _model(kind: str, layers=2, d=64, seq=64):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=layers, n_embd=d, n_head=4, vocab_size=256, n_positions=seq,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(num_hidden_layers=layers, hidden_size=d, intermediate_size=2 * d,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=seq)  # fmt: skip
    return transformers.LlamaForCausalLM(config)


DECODER_LINEARS = {"gpt2": 4, "llama": 7}  # per layer: c_attn, c_proj, c_fc, mlp c_proj / q, k, v, o, gate, up, down


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_every_decoder_linear_is_rewritten(kind):
    report = fp4compile.explain(_model(kind), _batch(0, 2, 32))
    assert report.graph_breaks == 0
    assert len(report.rewritten) == 2 * DECODER_LINEARS[kind]
    assert all(r.module.startswith(("transformer.h.", "model.layers.")) for r in report.rewritten)
    # Every recipe keeps the LM head in bf16; other skips hold no parameter (e.g. Llama's rotary inv_freq @ positions
    # in some transformers versions).
    weight_skips = [r for r in report.skipped if "activation x activation" not in r.reason]
    assert [(r.module, r.reason) for r in weight_skips] == [("lm_head", "skip pattern 'lm_head'")]


def _train(kind, recipe, steps, inner, device="cpu", batch=8, seq=64, lr=3e-3, text=_TEXT, **model_kw):
    model = _model(kind, seq=seq, **model_kw).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe, "inner": inner})
    losses = []
    for step in range(steps):
        ids = _batch(step, batch, seq, device, text)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-10:]) / 10


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_training_on_cpu_lowers_the_loss_like_unquantized(kind):
    start, unquantized = _train(kind, "bf16", 120, "aot_eager")
    start_q, nvfp4 = _train(kind, "nvidia", 120, "aot_eager")
    assert start == pytest.approx(start_q, rel=0.01)  # same initialization and data
    assert nvfp4 < 0.6 * start_q
    assert abs(nvfp4 - unquantized) / unquantized < 0.05, (nvfp4, unquantized)


GPU_RUN = dict(device="cuda", batch=16, seq=128, layers=4, d=256, text=_LARGE_TEXT)
# GPT-2 at lr 1e-3 was unstable on json.decoder alone: its final loss swung from 1.47 to 2.37 with the seed in bf16
# alike (H200, 3 seeds per recipe, 2026-12-01), which made the comparison below a coin toss; at 3e-4 the three seeds
# ended at 1.646-1.706 in bf16 and 1.676-1.734 in nvidia (+1.0 to +1.8 %). benchmarks/RESULTS.md has the tables.
GPU_LR = {"gpt2": 3e-4, "llama": 1e-3}


@functools.lru_cache(maxsize=None)
def _gpu_bf16_run(kind):
    return _train(kind, "bf16", 200, "inductor", lr=GPU_LR[kind], **GPU_RUN)


@requires_gpu
@pytest.mark.parametrize(
    "kind, recipe", [("gpt2", "nvidia"), ("llama", "nvidia"), ("llama", "quartet_ii"), ("llama", "tetrajet_v2")]
)
def test_training_on_gpu_lowers_the_loss_like_bf16(kind, recipe):
    start, bf16 = _gpu_bf16_run(kind)
    start_q, nvfp4 = _train(kind, recipe, 200, "inductor", lr=GPU_LR[kind], **GPU_RUN)
    print(f"{kind} {recipe}: start {start_q:.3f}, final {nvfp4:.3f}, bf16 final {bf16:.3f}")
    assert nvfp4 < 0.75 * start_q
    # NVFP4 costs at most 5 % of loss; ending lower is not counted as a failure.
    assert nvfp4 < 1.05 * bf16, (nvfp4, bf16)


class _DeepMLP(torch.nn.Module):
    """Only deterministic CUDA ops (no attention backward, no embedding atomics), so reruns compare bit for bit."""

    def __init__(self, d=256, layers=4):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return x.square().mean()


@requires_gpu
@pytest.mark.parametrize("recipe", ["nvidia", "quartet_ii", "tetrajet_v2_full", "chon"])
def test_gpu_training_step_never_syncs_the_host(recipe):
    """A compiled training step (default mode, after warm-up and GEMM autotuning) runs under
    ``torch.cuda.set_sync_debug_mode("error")``: no op of the quantized linears, their outlier-channel state
    updates or the stochastic-rounding seeds reads a device value on the host."""
    torch.manual_seed(0)
    model = _DeepMLP().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe})
    x = torch.randn(512, 256, device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@requires_gpu
@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
def test_gpu_modes_stochastic_rounding_is_fresh_per_step_and_reproducible(mode):
    torch.manual_seed(0)
    model = _DeepMLP().cuda()
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": "quartet_ii", "mode": mode})
    x = torch.randn(512, 256, device="cuda")

    def grads(seed=None):
        if seed is not None:
            torch.manual_seed(seed)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            compiled(x).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()]).clone()

    for _ in range(3):  # warm up (CUDA graphs record on a later call)
        grads(0)
    a, b, c = grads(0), grads(0), grads(1)
    assert torch.equal(a, b)  # reproducible under torch.manual_seed
    assert not torch.equal(a, c)  # fresh random bits for a new seed
    assert not torch.equal(grads(), grads())  # and for every step without reseeding
