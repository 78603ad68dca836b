"""Time and memory of ``fp4compile.OsciReset`` per optimizer step on a GPT-2-small-size model.

Run on a GPU:  python -m benchmarks.bench_osci_reset [--out DIR] [--recipe tetrajet_v2] [--mode reduce-overhead]

Model: ``fp4compile.demo.gpt.GPT`` at GPT-2 small's body (12 layers, d_model 768, 12 heads, sequence
1024; byte vocabulary, so 85M of its 86M parameters are the 48 quantized linear weights), FP32
master weights, bf16 autocast, fused AdamW, batch 8, compiled with ``backend="nvfp4"``. One
compiled model serves every variant. After warm-up, each variant (full, memory-efficient at 10 %)
is registered with ``period=8, window=4``: step 0 snapshots, steps 1-4 track, step 5 resets, steps
6-7 do nothing; three periods are run, so each phase's median is not the first call's (Triton
compiles). Per step the CUDA time of the training step and of the hook
(``OsciReset.on_step``, called right after ``optimizer.step()`` exactly as the registered hook is)
are measured with CUDA events, and the window state held (``bytes_held``) and the allocator's peak
during the hook above what was allocated before the window (the state plus the transient
quantizations) are recorded. The per-step average at TetraJet-v2's schedule (period 200, window 50: one snapshot,
50 tracked steps, one reset, 148 idle steps) is derived from the per-phase medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.utils import environment_line, gpu_environment, write_json
from fp4compile import OsciReset
from fp4compile.demo.gpt import GPT, GPTConfig
from fp4compile.demo.report import format_table, markdown_table

BATCH = 8
SEQ = 1024
PERIOD, WINDOW = 8, 4
PAPER_PERIOD, PAPER_WINDOW = 200, 50


def _timed(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".", help="directory for bench_osci_reset.json / .md")
    parser.add_argument("--recipe", default="tetrajet_v2")
    parser.add_argument("--mode", default="reduce-overhead", help="Inductor mode of the compiled model")
    parser.add_argument("--warmup", type=int, default=6)
    args = parser.parse_args()
    env = gpu_environment("bench_osci_reset")

    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=SEQ, d_model=768, n_layers=12, n_heads=12)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    options = {"recipe": args.recipe, "mode": args.mode}
    compiled = torch.compile(model, backend="nvfp4", options=options)
    ids = torch.randint(0, 256, (BATCH, SEQ + 1), device="cuda")
    x, y = ids[:, :-1], ids[:, 1:]

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    step_ms = statistics.median(_timed(step) for _ in range(10))
    linear_weights = sum(m.weight.numel() for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and n != "lm_head")  # fmt: skip
    print(f"step {step_ms:.2f} ms without OsciReset; {linear_weights / 1e6:.1f}M quantized weights", flush=True)

    rows, records = [], []
    for label, memory_efficient in (("full", False), ("memory-efficient 10%", True)):
        osc = OsciReset(compiled, args.recipe, start=0, period=PERIOD, window=WINDOW, memory_efficient=memory_efficient,
                        autocast_dtype=torch.bfloat16)  # fmt: skip
        phases: dict[str, list[float]] = {}
        held, peak = 0, 0
        for i in range(3 * PERIOD):
            phase = "+".join(osc.schedule(i)) or "idle"
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() - osc.bytes_held()  # the state of earlier steps counts too
            hook_ms = _timed(osc.on_step)
            peak = max(peak, torch.cuda.max_memory_allocated() - before)
            held = max(held, osc.bytes_held())
            phases.setdefault(phase, []).append(hook_ms)
        medians = {phase: statistics.median(times) for phase, times in phases.items()}
        paper = (medians["snapshot"] + PAPER_WINDOW * medians["track"] + medians["reset"]
                 + (PAPER_PERIOD - PAPER_WINDOW - 2) * medians["idle"]) / PAPER_PERIOD  # fmt: skip
        resets = [r["reset"] for r in osc.history]
        record = dict(variant=label, hook_ms=medians, per_step_ms_paper_schedule=paper, step_ms=step_ms,
                      bytes_held=held, bytes_bound=osc.bytes_bound(), bytes_per_weight=osc.bytes_per_weight(),
                      hook_peak_bytes=peak, weights=linear_weights, resets=resets)  # fmt: skip
        records.append(record)
        rows.append([
            label, f"{medians['idle']:.3f}", f"{medians['snapshot']:.2f}", f"{medians['track']:.2f}",
            f"{medians['reset']:.2f}", f"{paper:.3f} ({100 * paper / step_ms:.2f} %)",
            f"{held / 2**20:.0f} MiB ({held / linear_weights:.2f} B/weight)", f"{peak / 2**20:.0f} MiB",
        ])  # fmt: skip
        print(rows[-1], f"resets {resets}", flush=True)
    header = ["variant", "idle ms", "snapshot ms", "track ms", "reset ms",
              f"mean ms/step at period {PAPER_PERIOD}, window {PAPER_WINDOW} (vs step)", "window state held",
              "peak in hook"]  # fmt: skip
    print(format_table(header, rows))
    payload = dict(env=env, recipe=args.recipe, mode=args.mode, batch=BATCH, seq=SEQ, step_ms=step_ms,
                   results=records)  # fmt: skip
    write_json(f"{args.out}/bench_osci_reset.json", payload)
    with open(f"{args.out}/bench_osci_reset.md", "w") as f:
        f.write(f"{environment_line(env)}; recipe {args.recipe}, "
                f"mode {args.mode}, batch {BATCH} x {SEQ}, step {step_ms:.2f} ms\n\n{markdown_table(header, rows)}\n")


if __name__ == "__main__":
    main()
