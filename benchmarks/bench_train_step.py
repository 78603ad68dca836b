"""One optimizer step of a GPT-2-small or Llama-style model: torch.compile bf16 (Inductor) vs backend="nvfp4".

Run on a GPU:  python -m benchmarks.bench_train_step [--model gpt2|llama] [--mode reduce-overhead] [--out DIR]
               [--recipes nvidia,quartet_ii,tetrajet_v2] [--regional]

Variants of a recipe, to compare with the library's choices side by side in one run (``--recipes
tetrajet_v2,tetrajet_v2@triton,tetrajet_v2@decoded``; combined as ``R@triton+decoded``):
- ``@triton``: block-scaled GEMMs on the Triton kernel even on Hopper, where they otherwise run on the Gluon kernel
  (``kernels/gemm.py``'s ``gluon_preferred``);
- ``@decoded``: the backward's re-quantizations of saved forward operands from an FP32 transpose that a decode
  kernel writes, as before the quantize kernel decoded the codes itself (``dispatch.requantize_transposed``);
- ``@graph_amax``: each per-tensor quantization finds its own amax (a graph reduction, or its own amax pass after
  a rotation), as before X's and dY's two amaxes came from one pass (``linear_gemms.amax_pair``).

Models (Hugging Face configs without KV cache, random weights, FP32 master weights under bf16 autocast, fused AdamW):
- ``gpt2``: GPT-2 small (12 layers, d 768, 12 heads, vocab 50257, 124M parameters), batch 8 x 1024 tokens;
  the LM head (tied to the embedding) stays in bf16 under every recipe.
- ``llama``: Llama-style, d_model 2048, SwiGLU 5632, 8 layers, 16 heads, vocab 32000, batch 4 x 2048 tokens.
One step = forward, backward, optimizer step, zero_grad. Reported: the median step (CUDA events), the first
step's wall time (compilation included), the host time per step (wall time of the Python call that enqueues a
step, no synchronization: equal to the step time when the host is the bottleneck) and the CUDA allocator's peak
during a step (weights, optimizer state, activations).
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Iterator, Union

import torch

from benchmarks.utils import environment_line, gpu_environment, write_json
from fp4compile.demo.report import format_table, markdown_table

#: (sequence length, default batch, description) per model.
MODELS = {
    "gpt2": (1024, 8, "GPT-2 small"),
    "llama": (2048, 4, "Llama-style d_model 2048, SwiGLU 5632, 8 layers"),
}


def make_model(kind: str, layers: Union[int, None] = None, device: str = "cuda"):
    """The benchmark's model (``MODELS``), seeded, on ``device``; ``layers`` overrides its number of blocks."""
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(
            n_layer=layers or 12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024, use_cache=False
        )
        return transformers.GPT2LMHeadModel(config).to(device)
    config = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers or 8, num_attention_heads=16,
        num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
        use_cache=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).to(device)


def _blocks(model) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def make_step(
    recipe: str,
    batch: int,
    mode: str = "default",
    kind: str = "gpt2",
    layers: Union[int, None] = None,
    regional: bool = False,
    inductor: Union[dict, None] = None,
):
    """(model, step): one optimizer step of the compiled model (Inductor for bf16, else backend="nvfp4").

    ``layers`` overrides the model's number of transformer blocks (default: the model's own). ``regional``
    compiles each transformer block instead of the whole model (one compilation serves the identical blocks;
    embeddings, final norm, LM head and loss run eagerly). ``inductor``: Inductor config patches for every
    variant (bf16 through ``torch.compile(options=...)``, NVFP4 through the backend's ``inductor`` option).
    """
    model = make_model(kind, layers)
    seq = MODELS[kind][0]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    nvfp4 = dict(backend="nvfp4", options={"recipe": recipe, "mode": mode, "inductor": dict(inductor or {})})
    if recipe != "bf16":
        compile_kw = nvfp4
    elif inductor:  # torch.compile takes mode= or options=, not both
        from torch._inductor import list_mode_options

        compile_kw = dict(options={**list_mode_options(mode), **inductor})
    else:
        compile_kw = dict(mode=mode)
    if regional:
        for block in _blocks(model):
            block.compile(**compile_kw)
        compiled = model
    else:
        compiled = torch.compile(model, **compile_kw)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def _requantize_from_fp32(q, rows, cols, padded_rows, spec, **options):
    """The re-quantization as it was before the quantize kernel decoded the codes: decode, then quantize."""
    from fp4compile.kernels.decode import decode_triton
    from fp4compile.kernels.quantize import quantize_triton

    t = decode_triton(q, with_outer=True, dtype=torch.float32, transpose=True, rows=rows, cols=cols,
                      padded_rows=padded_rows)  # fmt: skip
    return quantize_triton(t, spec, **options)


@contextlib.contextmanager
def _variant(variant: str) -> Iterator[None]:
    """Inside the block, the variant's choices (see the module docstring); ``""``: the library's."""
    from fp4compile import linear_gemms
    from fp4compile.kernels import gemm, quantize

    names = [name for name in variant.split("+") if name]
    unknown = set(names) - {"triton", "decoded", "graph_amax"}
    if unknown:
        raise SystemExit(f"unknown recipe variant @{'+'.join(sorted(unknown))}: the variants are @triton, @decoded, "
                         "@graph_amax")  # fmt: skip
    saved = (gemm._hopper_with_gluon, quantize.requantize_transposed_triton, linear_gemms.amax_pair)
    if "triton" in names:
        gemm._hopper_with_gluon = lambda device: False
    if "decoded" in names:
        quantize.requantize_transposed_triton = _requantize_from_fp32
    if "graph_amax" in names:
        linear_gemms.amax_pair = lambda *args: (None, None)
    try:
        yield
    finally:
        gemm._hopper_with_gluon, quantize.requantize_transposed_triton, linear_gemms.amax_pair = saved


def _measure(
    recipe: str, batch: int, warmup: int, steps: int, mode: str, kind: str, regional: bool = False, inductor=None
) -> dict:
    name, _, variant = recipe.partition("@")
    with _variant(variant):
        record = _measure_recipe(name, batch, warmup, steps, mode, kind, regional, inductor)
    return dict(record, recipe=recipe)


def _measure_recipe(
    recipe: str, batch: int, warmup: int, steps: int, mode: str, kind: str, regional: bool, inductor
) -> dict:
    model, step = make_step(recipe, batch, mode, kind, regional=regional, inductor=inductor)
    first = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first_s = time.perf_counter() - first
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        loss = step()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    host.sort()
    params = sum(p.numel() for p in model.parameters())
    return dict(recipe=recipe, ms=times[len(times) // 2], host_ms=host[len(host) // 2], first_step_s=first_s,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30, loss=loss.item(), params=params)  # fmt: skip


def _patch(text: str) -> tuple:
    """``NAME=VALUE`` (a Python literal) as a pair."""
    import ast

    name, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--inductor takes NAME=VALUE, got {text!r}")
    try:
        return name.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        raise SystemExit(f"--inductor {text!r}: the value must be a Python literal (True, 4, 'x')") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_train_step.json / .md")
    parser.add_argument("--recipes", default="nvidia,quartet_ii,tetrajet_v2", help="comma-separated recipes")
    parser.add_argument("--model", default="gpt2", choices=sorted(MODELS), help="the model (see above)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default: 8 gpt2, 4 llama)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--mode", default="default", help="torch.compile mode for every variant (e.g. reduce-overhead)")
    parser.add_argument("--regional", action="store_true", help="compile each transformer block, not the whole model")
    parser.add_argument(
        "--inductor", action="append", default=[], metavar="NAME=VALUE",
        help="an Inductor config patch for every variant (Python literal value), e.g. cpp_wrapper=True; repeatable",
    )  # fmt: skip
    args = parser.parse_args()
    inductor = dict(_patch(p) for p in args.inductor)
    env = gpu_environment("bench_train_step")
    seq, default_batch, description = MODELS[args.model]
    batch = args.batch or default_batch
    records = []
    for recipe in ["bf16", *args.recipes.split(",")]:
        records.append(_measure(recipe, batch, 5, args.steps, args.mode, args.model, args.regional, inductor))
        print(records[-1], flush=True)
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True), flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    base = records[0]
    header = ["variant", "step ms", "vs bf16", "host ms", "1st step s", "vs bf16", "peak GiB", "vs bf16", "loss"]
    rows = [
        [("torch.compile bf16" if r["recipe"] == "bf16" else f"nvfp4 {r['recipe']}"), f"{r['ms']:.1f}",
         f"{r['ms'] / base['ms']:.2f}x", f"{r['host_ms']:.1f}", f"{r['first_step_s']:.1f}",
         f"{r['first_step_s'] / base['first_step_s']:.2f}x", f"{r['peak_gib']:.2f}",
         f"{r['peak_gib'] / base['peak_gib']:.2f}x", f"{r['loss']:.3f}"]
        for r in records
    ]  # fmt: skip
    print(format_table(header, rows))
    patched = "".join(f"_{name}" for name in sorted(inductor))
    stem = f"bench_train_step_{args.model}_{args.mode}{'_regional' if args.regional else ''}{patched}"
    write_json(f"{args.out}/{stem}.json", dict(env=env, model=args.model, seq=seq, batch=batch, mode=args.mode,
                                               results=records))  # fmt: skip
    with open(f"{args.out}/{stem}.md", "w") as f:
        f.write(f"{environment_line(env)}; ")
        f.write(f"{description} ({base['params'] / 1e6:.0f}M params), batch {batch} x {seq} tokens, ")
        f.write(f"mode {args.mode}{', each block compiled (--regional)' if args.regional else ''}")
        f.write("".join(f", Inductor {name}={value!r}" for name, value in sorted(inductor.items())) + "\n\n")
        f.write(markdown_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
