"""Where the time of one optimizer step goes: wall time vs CUDA kernel time, and the top kernels.

Run on a GPU:  python -m benchmarks.profile_train_step [--model gpt2|llama] [--layers N] [--recipe nvidia]
               [--mode default] [--out DIR]

The models are ``bench_train_step``'s (GPT-2 small, the Llama-style model).

If the wall time per step is well above the summed kernel time, the step is bound by the host
(Python, op dispatch, kernel launches), not by the GPU.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_train_step import MODELS, make_step
from benchmarks.utils import wall_and_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", default="nvidia")
    parser.add_argument("--mode", default="default", help="torch.compile mode")
    parser.add_argument("--model", default="gpt2", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the model's own)")
    parser.add_argument("--batch", type=int, default=None, help="default: the model's benchmark batch")
    parser.add_argument("--rows", type=int, default=30, help="rows of the kernel table")
    parser.add_argument("--out", default=None, help="also write the report to DIR/profile_<recipe>_<mode>.txt")
    args = parser.parse_args()
    batch = args.batch or MODELS[args.model][1]
    _, step = make_step(args.recipe, batch, args.mode, args.model, layers=args.layers)
    wall, prof = wall_and_profile(step, cpu=True)
    events = prof.key_averages()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(e.device_time_total for e in kernels) / 3e3  # kernel events only: op rows repeat them
    report = [
        f"{args.model} {args.recipe} mode={args.mode}: wall {wall * 1e3:.2f} ms/step, "
        f"CUDA kernels {kernel_ms:.2f} ms/step",
        events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70),
        events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70),
    ]
    text = "\n".join(report)
    print(text)
    if args.out:
        with open(f"{args.out}/profile_{args.model}_{args.recipe}_{args.mode}.txt", "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
