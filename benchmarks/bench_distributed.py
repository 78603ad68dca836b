"""Data-parallel throughput: tokens/s of a Llama-style model on 1 and N processes, DDP and FSDP2, bf16 vs NVFP4.

Run on a machine with N GPUs (one process per GPU, NCCL)::

    python -m benchmarks.bench_distributed --nproc 2 [--recipes bf16,nvidia] [--engines ddp,fsdp2] [--out DIR]

or as a smoke test on the CPU (gloo, a small model): ``python -m benchmarks.bench_distributed --device cpu --small``.

Model: Hugging Face Llama config, d_model 2048, SwiGLU 5632, 8 layers, 16 heads (4 KV heads), vocab 32000,
random weights, sequence 2048, 4 sequences per process and step; FP32 master weights under bf16 autocast, AdamW
(fused on GPUs). ``bf16`` is ``torch.compile`` with Inductor; the NVFP4 recipes are ``backend="nvfp4"``. DDP
wraps the model and is compiled after wrapping; FSDP2 shards each decoder layer and the root (``fully_shard``)
and compiles each layer after sharding. Tokens/s = processes x batch x seq / median step time; every process
runs the same number of steps, rank 0 times them. Reported per engine and recipe: tokens/s on 1 and N
processes, the scaling N vs 1 (target >= 1.8x for 2 GPUs), and the NVFP4/bf16 step-time ratio at each size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.utils import write_json
from fp4compile.demo.report import environment, format_table, markdown_table

FULL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=16,
            num_key_value_heads=4, vocab_size=32000)  # fmt: skip
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256)  # fmt: skip


def _model(small: bool, device: torch.device):
    import transformers

    torch.manual_seed(0)
    shape = SMALL if small else FULL
    config = transformers.LlamaConfig(**shape, max_position_embeddings=4096)
    return transformers.LlamaForCausalLM(config).to(device)


def _wrap(model, engine: str, recipe: str, device: torch.device):
    """The engine's wrapping and the compile, in the order each engine wants."""
    options = {"recipe": recipe}

    def compile_(module):
        return torch.compile(module) if recipe == "bf16" else torch.compile(module, backend="nvfp4", options=options)

    if engine == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return compile_(torch.nn.parallel.DistributedDataParallel(model, device_ids=ids))
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # FSDP2 would pick CUDA wherever one exists
    layers = model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for i, layer in enumerate(layers):
        layers[i] = compile_(layer)
    return model


def _median_step_s(args, engine: str, recipe: str, device: torch.device, rank: int) -> float:
    model = _model(args.small, device)
    forward = _wrap(model, engine, recipe, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    g = torch.Generator().manual_seed(rank)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    times = []
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier()
        tic = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = forward(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - tic)
    torch._dynamo.reset()
    return statistics.median(times)


def _rank_main(rank: int, world: int, init_file: str, args, out: str) -> None:
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world)  # fmt: skip
    try:
        results = {}
        for engine in args.engines:
            for recipe in args.recipes:
                results[f"{engine}/{recipe}"] = _median_step_s(args, engine, recipe, device, rank)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def run(args) -> dict:
    """Median step seconds per ``engine/recipe`` for 1 and ``args.nproc`` processes: ``{nproc: {key: s}}``."""
    step_s = {}
    for world in sorted({1, args.nproc}):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "steps.pt")
            mp.start_processes(_rank_main, args=(world, os.path.join(tmp, "init"), args, out), nprocs=world,
                               join=True, start_method="spawn")  # fmt: skip
            step_s[world] = torch.load(out)
    return step_s


def table_rows(args, step_s: dict) -> list[list[str]]:
    """One row per engine and recipe: tokens/s on 1 and N processes, the scaling, and the ratio to bf16's step."""
    n = args.nproc
    rows = []
    for engine in args.engines:
        for recipe in args.recipes:
            key = f"{engine}/{recipe}"
            tokens = {w: w * args.batch * args.seq / step_s[w][key] for w in step_s}
            ratio = {w: step_s[w][key] / step_s[w][f"{engine}/bf16"] for w in step_s if f"{engine}/bf16" in step_s[w]}
            rows.append([
                engine, recipe, f"{tokens[1]:,.0f}", f"{tokens[n]:,.0f}", f"{tokens[n] / tokens[1]:.2f}x",
                f"{ratio[1]:.2f}x" if 1 in ratio else "-", f"{ratio[n]:.2f}x" if n in ratio else "-",
            ])  # fmt: skip
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes of the parallel run (default 2)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--recipes", default="bf16,nvidia", help="comma-separated (bf16 first for the ratios)")
    parser.add_argument("--engines", default="ddp,fsdp2", help="comma-separated: ddp, fsdp2")
    parser.add_argument("--batch", type=int, default=4, help="sequences per process and step (default 4)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="a tiny model (smoke test)")
    parser.add_argument("--out", default="benchmarks/out/distributed")
    args = parser.parse_args(argv)
    args.recipes, args.engines = args.recipes.split(","), args.engines.split(",")
    if not set(args.engines) <= {"ddp", "fsdp2"}:
        parser.error(f"--engines takes ddp and fsdp2, got {args.engines}")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--nproc {args.nproc} needs {args.nproc} GPUs; this machine has {torch.cuda.device_count()}")
    step_s = run(args)
    header = ["engine", "recipe", "tokens/s (1)", f"tokens/s ({args.nproc})", "scaling", "vs bf16 (1)",
              f"vs bf16 ({args.nproc})"]  # fmt: skip
    rows = table_rows(args, step_s)
    env = environment(args.device)
    print(format_table(header, rows))
    write_json(os.path.join(args.out, "bench_distributed.json"),
               {"env": env, "args": vars(args), "step_s": {str(k): v for k, v in step_s.items()}})  # fmt: skip
    with open(os.path.join(args.out, "bench_distributed.md"), "w") as f:
        f.write(markdown_table(header, rows) + "\n")


if __name__ == "__main__":
    main()
