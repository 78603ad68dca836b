"""What torch's Triton launch analysis costs the backend's compilation, measured on a CPU machine.

Run on a CPU:  python -m benchmarks.launch_analysis_cpu [--layers 4] [--recipe nvidia] [--no-memo]

Under ``torch.compile`` on a GPU every kernel launch of the quantized linear's decomposition is recorded through
``wrap_triton``, and torch analyses each one (it generates the kernel's Triton IR) to learn which tensors it
writes. This runs AOTAutograd's part of that compilation for ``bench_train_step``'s Llama-style model on the CPU:
a stand-in Triton driver names an sm90 CUDA target (IR generation needs no GPU), CPU tensors take the CUDA code
path, and the GEMM op runs its CPU kernel (the reference). The compiled graph is not run (the stand-in driver
cannot launch), and Inductor's lowering, which analyses the launches again, is not included. Reported:
AOTAutograd's time, the analyses the backend asked for, those torch performed, and their time; ``--no-memo``
disables the backend's memo (``fp4compile/launch_analysis.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from benchmarks.bench_train_step import make_model

__all__ = ["cuda_target_driver", "main"]


class _CudaTargetDriver:
    """The parts of a Triton driver that IR generation asks for: an sm90 CUDA target, device 0."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda


@contextlib.contextmanager
def cuda_target_driver():
    """Triton's active driver replaced by one that names an sm90 CUDA target (restored on exit)."""
    import triton

    driver = triton.runtime.driver
    previous = driver._active  # None on a CPU machine, where reset_active() would fail
    driver.set_active(_CudaTargetDriver())
    try:
        yield
    finally:
        driver._active = previous


@contextlib.contextmanager
def _cuda_path_on_cpu(counts: dict, memo: bool):
    """CPU tensors take the CUDA code path; torch's analyses are counted and timed; the memo on or off."""
    import torch._higher_order_ops.triton_kernel_wrap as wrap

    import fp4compile.backend as backend
    import fp4compile.launch_analysis as launch_analysis
    from fp4compile import dispatch

    name = next(n for n in ("identify_accessed_tensors", "identify_mutated_tensors") if hasattr(wrap, n))
    analysis, memoized = getattr(wrap, name), launch_analysis._memoized

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return analysis(*args, **kwargs)
        finally:
            counts["performed"] += 1
            counts["seconds"] += time.perf_counter() - start

    def counted(name, analysis, memo_dict):
        inner = memoized(name, analysis, memo_dict)

        def asked(*args, **kwargs):
            counts["asked"] += 1
            return inner(*args, **kwargs)

        return asked

    patches = [
        (wrap, name, timed),
        (launch_analysis, "_memoized", counted),
        (dispatch, "on_triton", lambda t: True),
    ]
    if not memo:
        patches.append((backend, "memoized_launch_analysis", lambda: contextlib.nullcontext({})))
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    try:
        for owner, attr, value in patches:
            setattr(owner, attr, value)
        with cuda_target_driver():
            yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks of the Llama-style model")
    parser.add_argument("--recipe", default="nvidia")
    parser.add_argument("--no-memo", action="store_true", help="without the backend's memo of the analyses")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = make_model("llama", layers=args.layers, device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    counts = {"asked": 0, "performed": 0, "seconds": 0.0}
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="nvfp4", options={"recipe": args.recipe, "inner": "aot_eager"})
    with _cuda_path_on_cpu(counts, memo=not args.no_memo):
        start = time.perf_counter()
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compiled(input_ids=ids, labels=ids)
        except AttributeError as error:  # the stand-in driver cannot launch: compilation is over by then
            if _CudaTargetDriver.__name__ not in str(error):
                raise
            stopped = "not run"
        else:
            stopped = "ran"
        wall = time.perf_counter() - start
    phases = dict(zip(*torch._dynamo.utils.compile_times(repr="csv")))
    memo = "without" if args.no_memo else "with"
    print(f"Llama-style, {args.layers} blocks, {args.recipe}, {memo} the memo: compile {wall:.1f} s ({stopped})")
    print(f"  AOTAutograd {float(phases.get('create_aot_dispatcher_function', 'nan')):.1f} s "
          f"(metadata {float(phases.get('aot_collect_metadata', 'nan')):.1f} s, "
          f"joint trace {float(phases.get('aot_trace_joint_graph', 'nan')):.1f} s)")  # fmt: skip
    asked = counts["asked"] if not args.no_memo else counts["performed"]
    print(f"  launch analyses: asked {asked}, performed {counts['performed']} ({counts['seconds']:.1f} s)")


if __name__ == "__main__":
    main()
