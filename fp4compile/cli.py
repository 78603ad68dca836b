"""The ``fp4compile`` console script.

``fp4compile quantizers`` quantizes Gaussian and heavy-tailed data with every named
quantizer and prints their errors, bias over repeated draws and storage cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

__all__ = ["main", "build_parser"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``fp4compile`` command (one sub-parser per subcommand)."""
    parser = argparse.ArgumentParser(prog="fp4compile", description="NVFP4 training numerics and kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = commands.add_parser(
        "quantizers",
        help="compare every named NVFP4 quantizer on synthetic data",
        description=(
            "Quantize Gaussian and heavy-tailed data with every named quantizer and print the relative "
            "quadratic error (mean over rows of ||x - x_hat||^2 / ||x||^2), the same error for the mean of "
            "--draws independent quantizations (falls as 1/draws for unbiased quantizers) and bytes per element."
        ),
    )
    q.add_argument("--rows", type=_positive_int, default=128, help="rows of each test matrix (default 128)")
    q.add_argument(
        "--cols", type=_positive_int, default=1024, help="columns (the quantized dim; a multiple of 128; default 1024)"
    )
    q.add_argument("--draws", type=_positive_int, default=64, help="independent draws for the bias column (default 64)")
    q.add_argument("--seed", type=int, default=0, help="seed of the data and of the random draws (default 0)")
    q.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cpu runs the plain-torch spec, cuda the Triton kernels (same numbers up to the random draws)",
    )
    q.add_argument("--names", default=None, help="comma-separated quantizer names (default: all)")
    return parser


def _run_quantizers(args: argparse.Namespace) -> int:
    from .quantizer_report import DISTRIBUTIONS, make_data, quantizer_stats
    from .spec import QuantSpec

    names = QuantSpec.names() if args.names is None else tuple(n.strip() for n in args.names.split(","))
    for name in names:
        QuantSpec.named(name)  # one clear error for a bad name before any work
    if args.cols % 128:
        raise ValueError(f"--cols must be a multiple of 128 (double-block and RHT-128 quantizers), got {args.cols}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda needs a CUDA GPU and none is available; use --device cpu")

    data_gen = torch.Generator().manual_seed(args.seed)
    draw_gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    header = f"{'quantizer':<24}{'data':<14}{'rel err':>10}{'err of mean':>13}{'ratio':>8}{'bytes/el':>10}"
    print(
        f"{args.rows}x{args.cols} float32 on {args.device}; err of mean = mean of {args.draws} draws; "
        f"ratio = rel err / err of mean (~{args.draws} if unbiased, ~1 if deterministic)"
    )
    print(header)
    print("-" * len(header))
    start = time.perf_counter()
    for distribution in DISTRIBUTIONS:
        x = make_data(distribution, args.rows, args.cols, data_gen).to(args.device)
        for name in names:
            s = quantizer_stats(name, x, distribution=distribution, draws=args.draws, generator=draw_gen)
            print(
                f"{name:<24}{distribution:<14}{s.rel_error:>10.3e}{s.mean_error:>13.3e}{s.error_ratio:>8.1f}"
                f"{s.bytes_per_element:>10.4f}"
            )
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fp4compile`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "quantizers":
            return _run_quantizers(args)
    except ValueError as error:
        print(f"fp4compile {args.command}: error: {error}", file=sys.stderr)
        return 2
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
