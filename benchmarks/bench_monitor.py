"""What ``fp4compile.NumericsMonitor`` costs a training run: the probe's time against the step's.

Run on a GPU:  python -m benchmarks.bench_monitor [--model llama|gpt2] [--layers N] [--recipe nvidia] [--every 100]
               [--out DIR]

The model and step are ``bench_train_step``'s (``backend="nvfp4"``, default mode). Measured: the median step
without the monitor, the median of the monitor's off-steps (``monitor.step`` that only counts) and of its probes,
all timed with CUDA events around the whole call. The overhead at ``--every`` is
``(probe + (every - 1) * off-step extra) / (every * step)``. Where a probe's time goes: its forward + backward
pass alone (the eager model, gradients of the quantized layers' outputs, as the probe runs it) against the whole probe
(the rest is the statistics and their one transfer to the host), and the CUDA kernels one probe launches
(``torch.profiler``). The first probe, timed on its own, also compiles the kernels it is the first to launch.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.bench_train_step import MODELS, make_step
from benchmarks.utils import environment_line, gpu_environment, write_json
from fp4compile import NumericsMonitor


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _probe_pass(model, layers, loss_fn) -> None:
    """The probe's forward and backward alone: the eager model, the gradients of the layers' outputs (dY)."""
    outputs = []
    handles = [layer.register_forward_hook(lambda m, args, out: outputs.append(out)) for layer in layers]
    try:
        with torch.compiler.set_stance("force_eager"):
            torch.autograd.grad(loss_fn(model), outputs)
    finally:
        for handle in handles:
            handle.remove()


def _kernels_launched(fn) -> int:
    """CUDA kernels that one call of ``fn`` launches."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama", choices=sorted(MODELS))
    parser.add_argument("--recipe", default="nvidia")
    parser.add_argument("--every", type=int, default=100, help="steps between probes")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the model's own)")
    parser.add_argument("--out", default="out", help="directory for bench_monitor.json / .md")
    args = parser.parse_args()
    env = gpu_environment("bench_monitor")
    seq, batch, description = MODELS[args.model]
    model, step = make_step(args.recipe, batch, "default", args.model, layers=args.layers)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")

    def loss_fn(module):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return module(input_ids=ids, labels=ids).loss

    for _ in range(5):
        step()
    step_ms = _median_ms(step, 20)
    monitor = NumericsMonitor(model, every=args.every, recipe=args.recipe)
    torch.cuda.synchronize()
    started = time.perf_counter()
    monitor.step(loss_fn)  # the first probe: warm-up of the eager path and of the measuring kernel
    torch.cuda.synchronize()
    first_probe_s = time.perf_counter() - started
    probe_ms = _median_ms(lambda: (setattr(monitor, "steps", 0), monitor.step(loss_fn)), 3)
    pass_ms = _median_ms(lambda: _probe_pass(model, [m for _, m, _ in monitor.layers()], loss_fn), 3)
    kernels = _kernels_launched(lambda: (setattr(monitor, "steps", 0), monitor.step(loss_fn)))
    monitor.steps = 1
    off_ms = _median_ms(lambda: monitor.step(loss_fn), 50)
    overhead = (probe_ms + (args.every - 1) * off_ms) / (args.every * step_ms)
    record = dict(model=args.model, blocks=args.layers, recipe=args.recipe, every=args.every, step_ms=step_ms,
                  probe_ms=probe_ms, probe_pass_ms=pass_ms, probe_kernels=kernels, off_step_ms=off_ms,
                  overhead=overhead, layers=len(monitor.layers()), first_probe_s=first_probe_s)  # fmt: skip
    print(record)
    write_json(f"{args.out}/bench_monitor.json", dict(env=env, results=[record]))
    with open(f"{args.out}/bench_monitor.md", "w") as f:
        blocks = f", run with {args.layers} blocks" if args.layers else ""
        f.write(f"{environment_line(env)}; {description}{blocks}, batch {batch} x {seq}, recipe {args.recipe}\n\n")
        f.write("| step ms | first probe s | probe ms | of it fwd + bwd ms | kernels per probe | off-step ms | ")
        f.write(f"overhead at every={args.every} |\n|---|---|---|---|---|---|---|\n")
        cells = [f"{step_ms:.1f}", f"{first_probe_s:.1f}", f"{probe_ms:.1f}", f"{pass_ms:.1f}", str(kernels)]
        cells.append(f"{off_ms:.4f}")
        f.write("| " + " | ".join(cells) + f" | {100 * overhead:.2f} % |\n")


if __name__ == "__main__":
    main()
