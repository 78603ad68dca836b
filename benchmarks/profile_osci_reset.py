"""Profile one tracked step of ``fp4compile.OsciReset`` (full variant) on a GPT-2-small-size model.

Run on a GPU:  python -m benchmarks.profile_osci_reset

Weights of ``fp4compile.demo.gpt.GPT`` (12 layers, d_model 768) on the GPU, nudged by small noise before each
step in place of an optimizer; prints the wall time of the first steps (snapshot, then tracked steps)
and ``torch.profiler``'s table (by CUDA time and by host time) of one tracked step.
"""

from __future__ import annotations

import time

import torch
from torch.profiler import ProfilerActivity, profile

from fp4compile import OsciReset
from fp4compile.demo.gpt import GPT, GPTConfig


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("profile_osci_reset needs a CUDA GPU")
    torch.manual_seed(0)
    model = GPT(GPTConfig(seq_len=1024, d_model=768, n_layers=12, n_heads=12)).cuda()
    osc = OsciReset(model, "tetrajet_v2", start=0, period=8, window=4, autocast_dtype=torch.bfloat16)

    def nudge() -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-4)
        torch.cuda.synchronize()

    for i in range(3):
        nudge()
        start = time.perf_counter()
        osc.on_step()
        torch.cuda.synchronize()
        print(f"step {i} {osc.schedule(i)}: {(time.perf_counter() - start) * 1e3:.1f} ms", flush=True)
    nudge()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        osc.on_step()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(averages.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(averages.table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
