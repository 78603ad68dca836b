"""Why Inductor's static CUDA launcher refuses to launch a compiled NVFP4 linear's Triton kernels.

Run on a GPU:  TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS=1 TORCHINDUCTOR_STRICT_STATIC_CUDA_LAUNCHER=1 \
               python -m benchmarks.static_launch [--recipe nvidia] [--shape 512x384] [--tokens 256]

Inductor launches its own kernels through a static launcher (a C++ call, no Python per launch); user-defined
Triton kernels (ours, recorded through ``wrap_triton``) go through Triton's Python launcher unless Inductor's
``static_launch_user_defined_triton_kernels`` is set, and even then it falls back, per kernel, where the static
launcher cannot handle one. This compiles one quantized linear, forward and backward, under the two settings above
(environment variables, so that Inductor's compile workers see them too): strict mode makes the first kernel
refused raise, and the script prints the reason, or how many kernels the generated code launches statically.
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch

__all__ = ["main", "static_launch_report"]

_SETTINGS = ("TORCHINDUCTOR_STATIC_LAUNCH_USER_DEFINED_TRITON_KERNELS", "TORCHINDUCTOR_STRICT_STATIC_CUDA_LAUNCHER")


def static_launch_report(recipe: str = "nvidia", in_features: int = 512, out_features: int = 384,
                         tokens: int = 256) -> str:  # fmt: skip
    """The static launcher's refusal for one compiled linear's kernels (the exception's last line), or, where none
    is refused, the count of statically launched kernels in the generated code."""
    from torch._inductor.utils import run_and_get_code

    linear = torch.nn.Linear(in_features, out_features, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(tokens, in_features, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled = torch.compile(linear, backend="nvfp4", options={"recipe": recipe})

    def step() -> None:
        compiled(x).sum().backward()

    try:
        _, code = run_and_get_code(step)
    except Exception as exc:  # the refusal is what this reports
        return "refused: " + "".join(traceback.format_exception_only(type(exc), exc)).strip().splitlines()[-1]
    source = "\n".join(code)
    return f"no refusal: {source.count('StaticallyLaunched')} statically launched kernel references in the code"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="nvidia", help="the recipe of the linear")
    parser.add_argument("--shape", default="512x384", help="in_features x out_features")
    parser.add_argument("--tokens", type=int, default=256, help="rows of the input")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("static_launch needs a CUDA GPU: the static launcher is CUDA's")
    unset = [name for name in _SETTINGS if os.environ.get(name) != "1"]
    if unset:
        raise SystemExit(f"set {', '.join(f'{name}=1' for name in unset)}: see python -m benchmarks.static_launch -h")
    in_features, out_features = (int(n) for n in args.shape.split("x"))
    print(static_launch_report(args.recipe, in_features, out_features, args.tokens))


if __name__ == "__main__":
    main()
