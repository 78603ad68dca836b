"""One optimizer step of a GPT-2-small-size model: torch.compile bf16 (Inductor) vs backend="nvfp4".

Run on a GPU:  python -m benchmarks.bench_train_step [--out DIR] [--recipes nvidia,quartet_ii,tetrajet_v2]

Model: Hugging Face GPT-2 config at GPT-2 small size (12 layers, d 768, 12 heads, vocab
50257, 124M parameters), random weights, sequence 1024, FP32 master weights under bf16
autocast, fused AdamW. One step = forward, backward, optimizer step, zero_grad. The LM head
(tied to the embedding) stays in bf16 under every recipe. Peak memory is the CUDA allocator's
peak during one step (weights, optimizer state, activations).
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.utils import environment_line, gpu_environment, write_json
from fp4compile.demo.report import format_table, markdown_table

SEQ = 1024


def _model():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=SEQ)
    return transformers.GPT2LMHeadModel(config).cuda()


def make_step(recipe: str, batch: int, mode: str = "default"):
    """(model, step): one optimizer step of the compiled model (Inductor for bf16, else backend="nvfp4")."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if recipe == "bf16":
        compiled = torch.compile(model, mode=mode)
    else:
        compiled = torch.compile(model, backend="nvfp4", options={"recipe": recipe, "mode": mode})
    ids = torch.randint(0, 50257, (batch, SEQ), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return model, step


def _measure(recipe: str, batch: int, warmup: int, steps: int, mode: str) -> dict:
    model, step = make_step(recipe, batch, mode)
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss = step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    params = sum(p.numel() for p in model.parameters())
    return dict(recipe=recipe, ms=times[len(times) // 2], peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                loss=loss.item(), params=params)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="directory for bench_train_step.json / .md")
    parser.add_argument("--recipes", default="nvidia,quartet_ii,tetrajet_v2", help="comma-separated recipes")
    parser.add_argument("--batch", type=int, default=8, help="sequences of 1024 tokens per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    parser.add_argument("--mode", default="default", help="torch.compile mode for every variant (e.g. reduce-overhead)")
    args = parser.parse_args()
    env = gpu_environment("bench_train_step")
    records = []
    for recipe in ["bf16", *args.recipes.split(",")]:
        records.append(_measure(recipe, args.batch, warmup=5, steps=args.steps, mode=args.mode))
        print(records[-1], flush=True)
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    base = records[0]
    header = ["variant", "step ms", "vs bf16", "peak GiB", "vs bf16", "loss"]
    rows = [
        [("torch.compile bf16" if r["recipe"] == "bf16" else f"nvfp4 {r['recipe']}"), f"{r['ms']:.1f}",
         f"{r['ms'] / base['ms']:.2f}x", f"{r['peak_gib']:.2f}", f"{r['peak_gib'] / base['peak_gib']:.2f}x",
         f"{r['loss']:.3f}"]
        for r in records
    ]  # fmt: skip
    print(format_table(header, rows))
    stem = "bench_train_step" if args.mode == "default" else f"bench_train_step_{args.mode}"
    write_json(f"{args.out}/{stem}.json", dict(env=env, seq=SEQ, batch=args.batch, mode=args.mode, results=records))
    with open(f"{args.out}/{stem}.md", "w") as f:
        f.write(f"{environment_line(env)}; ")
        f.write(f"GPT-2 small ({base['params'] / 1e6:.0f}M params), batch {args.batch} x {SEQ} tokens, ")
        f.write(f"mode {args.mode}\n\n")
        f.write(markdown_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
