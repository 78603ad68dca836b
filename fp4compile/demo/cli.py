"""The ``fp4compile`` console script.

- ``fp4compile quantizers`` quantizes Gaussian and heavy-tailed data with every named quantizer and
  prints their errors, bias over repeated draws and storage cost.
- ``fp4compile train`` trains the same small byte-level GPT once per recipe and compares the losses
  (``fp4compile.demo.train``).
- ``fp4compile bench`` times one quantized linear layer per recipe on the current GPU (``fp4compile.demo.bench``).
- ``fp4compile explain`` prints which matmuls of a small GPT the ``nvfp4`` backend rewrites.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch

__all__ = ["main", "build_parser"]


class _Failure(Exception):
    """An expected failure (bad input, I/O): :func:`main` prints ``fp4compile CMD: error: MESSAGE`` and returns
    ``status``, without a traceback. Raise it only for what can be explained to the user; a bug keeps its traceback.
    """

    def __init__(self, message: str, status: int = 2):
        super().__init__(message)
        self.status = status


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _recipe_list(text: str) -> tuple[str, ...]:
    """A comma-separated list of recipe names; an unknown name is an error that lists the valid ones."""
    from ..recipe import Recipe

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise argparse.ArgumentTypeError("no recipe given")
    for name in names:
        if name not in Recipe.names():
            raise argparse.ArgumentTypeError(f"unknown recipe {name!r}; valid recipes: {', '.join(Recipe.names())}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a recipe is listed twice in {text!r}")
    return names


def _recipe_name(text: str) -> str:
    """One recipe name (see :func:`_recipe_list`)."""
    if "," in text:
        raise argparse.ArgumentTypeError(f"give one recipe, got {text!r}")
    return _recipe_list(text)[0]


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
    _add_train_parser(commands)
    _add_bench_parser(commands)
    _add_explain_parser(commands)
    return parser


_TRAIN_DESCRIPTION = """\
Train the same small byte-level GPT (fp4compile.demo.gpt) once per recipe, from the same initialization and on
the same data in the same order, each compiled with torch.compile(model, backend="nvfp4", options={"recipe": ...}),
then print a table (final train loss = mean of the last 10 steps, validation loss on a fixed set of batches,
validation gap to bf16, tokens/s) and write results.json and loss.png to --out (checked before training starts).

The corpus is this Python's own standard library source (.py files under sysconfig's "stdlib" path, a
deterministic sorted subset, split by file into train and validation): nothing is downloaded.

On the CPU the model is float32 and tiny, and the inner compiler is "aot_eager": the NVFP4 rewrite runs, but the
graphs are not compiled by Inductor, whose compilation takes far longer, for no speed-up on these
quantization-bound CPU steps (--inner inductor to use it anyway). On a GPU the model is larger (6 layers, d_model
512, seq 256, ~19M parameters), runs under bf16 autocast, and is compiled with Inductor in mode reduce-overhead
(CUDA graphs, which remove most of the kernel-launch overhead; --mode default to compare). Measured run times:
the README, "Results of the demo".
Defaults marked "cpu X / cuda Y" depend on --device."""


def _add_train_parser(commands) -> None:
    from ..backend import INNER_COMPILERS, MODES
    from .train import DEFAULT_RECIPES, OSCI_THRESHOLD, PRESETS

    cpu, cuda = PRESETS["cpu"], PRESETS["cuda"]

    def per_device(key: str) -> str:
        return f"cpu {cpu[key]} / cuda {cuda[key]}"

    t = commands.add_parser(
        "train",
        help="train a small byte-level GPT once per recipe and compare the losses",
        description=_TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.set_defaults(parser=t)
    t.add_argument(
        "--recipes",
        type=_recipe_list,
        default=DEFAULT_RECIPES,
        help=f"comma-separated recipes to train, in this order (default {','.join(DEFAULT_RECIPES)}); "
        "include bf16 to get the gap column",
    )
    t.add_argument(
        "--steps", type=_positive_int, default=None, help=f"optimizer steps per recipe ({per_device('steps')})"
    )
    t.add_argument(
        "--device", choices=tuple(PRESETS), default="cpu", help="where to train (default cpu; cuda needs a GPU)"
    )
    t.add_argument(
        "--out",
        default="fp4compile-train-out",
        help="directory for results.json and loss.png (created; default fp4compile-train-out)",
    )
    t.add_argument("--seed", type=int, default=0, help="seed of the initialization, the data order and the random "
                   "rounding bits; the same for every recipe (default 0)")  # fmt: skip
    t.add_argument(
        "--seeds", type=_positive_int, default=1,
        help="train every recipe with N seeds (--seed, --seed + 1, ...); the table shows the mean and spread of the "
        "validation gap to bf16 over the seeds, results.json keeps every run (default 1)",
    )  # fmt: skip
    t.add_argument("--batch", type=_positive_int, default=None, help=f"sequences per step ({per_device('batch')})")
    t.add_argument("--seq", type=_positive_int, default=None, help=f"bytes per sequence ({per_device('seq')})")
    t.add_argument(
        "--d-model", type=_positive_int, default=None,
        help=f"model width, a multiple of 16 and of --heads ({per_device('d_model')})",
    )  # fmt: skip
    t.add_argument("--layers", type=_positive_int, default=None, help=f"transformer blocks ({per_device('layers')})")
    t.add_argument("--heads", type=_positive_int, default=None, help=f"attention heads ({per_device('heads')})")
    t.add_argument(
        "--lr", type=_positive_float, default=None,
        help=f"peak AdamW learning rate, after a linear warmup, cosine-decayed to 10%% ({per_device('lr')})",
    )  # fmt: skip
    t.add_argument(
        "--warmup", type=_nonnegative_int, default=None, help=f"learning-rate warmup steps ({per_device('warmup')})"
    )
    t.add_argument(
        "--eval-every", type=_nonnegative_int, default=None,
        help="evaluate the validation loss every N steps as well as after the last (0: only after the last; "
        "default: a quarter of --steps)",
    )  # fmt: skip
    t.add_argument(
        "--val-batches", type=_positive_int, default=None,
        help=f"batches in the fixed validation set ({per_device('val_batches')})",
    )  # fmt: skip
    t.add_argument(
        "--inner", choices=INNER_COMPILERS, default=None,
        help="the nvfp4 backend's inner compiler (cpu aot_eager / cuda inductor; see above)",
    )  # fmt: skip
    t.add_argument(
        "--mode", choices=MODES, default=None,
        help="Inductor mode (needs --inner inductor; reduce-overhead uses CUDA graphs; cpu: Inductor's default / "
        "cuda: reduce-overhead)",
    )  # fmt: skip
    t.add_argument(
        "--data", nargs="+", default=(), metavar="PATH",
        help="train on your own text: files, or directories read whole (sorted, hidden files skipped), as bytes, "
        "split into train and validation by file (default: this Python's standard-library source)",
    )  # fmt: skip
    t.add_argument(
        "--hf-config", default=None, metavar="PATH",
        help="train a Hugging Face causal LM instead of the demo GPT: its config.json (or the directory holding "
        "it; Llama, Qwen2, GPT-2, Mistral, ...), randomly initialized from --seed, vocabulary set to the 256 bytes; "
        "nothing is downloaded",
    )  # fmt: skip
    t.add_argument(
        "--tokenizer", default=None, metavar="DIR",
        help="with --hf-config: tokenize the text with the tokenizer saved in DIR (save_pretrained's files; nothing "
        "is downloaded) instead of reading bytes; losses are then per token",
    )  # fmt: skip
    t.add_argument(
        "--corpus-mb", type=_positive_float, default=None,
        help="megabytes of text to read, from --data or the standard library (default: about what the run reads, "
        "1 to 32)",
    )  # fmt: skip
    t.add_argument(
        "--threads", type=_positive_int, default=None,
        help="CPU threads for torch (default: torch's choice, the cores this process may use)",
    )  # fmt: skip
    t.add_argument(
        "--nproc", type=_positive_int, default=1,
        help="data-parallel processes per recipe (DDP, compiled after wrapping; gloo on the CPU, NCCL and one GPU "
        "each on --device cuda); each reads its own batches, so a step sees nproc x --batch sequences; "
        "on GPUs --mode defaults to default (no CUDA graphs) (default 1)",
    )  # fmt: skip
    t.add_argument(
        "--monitor", type=_positive_int, default=0, metavar="EVERY",
        help="record fp4compile.NumericsMonitor statistics (per layer and GEMM operand: SNR, flush-to-zero and "
        "saturation rates, hot channels) every EVERY steps of each quantized recipe; writes "
        "OUT/numerics/<run>/numerics.jsonl and its heatmaps numerics_snr_db.png and numerics_scale_zero.png",
    )  # fmt: skip
    t.add_argument(
        "--osci-reset", action="store_true",
        help="register fp4compile.OsciReset (TetraJet-v2's reset of oscillating weights) on the optimizer of every "
        "quantized recipe; its schedule is scaled to --steps (TetraJet-v2: start in the learning-rate decay, period "
        "200, window 50, threshold 8) and the table gains a column of the weights it reset",
    )  # fmt: skip
    t.add_argument(
        "--osci-start", type=_nonnegative_int, default=None,
        help="OsciReset: step of the first snapshot (default: half of --steps)",
    )  # fmt: skip
    t.add_argument(
        "--osci-period", type=_positive_int, default=None,
        help="OsciReset: steps between snapshots (default: a fifth of --steps, at least 2)",
    )  # fmt: skip
    t.add_argument(
        "--osci-window", type=_positive_int, default=None,
        help="OsciReset: steps tracked after each snapshot, below --osci-period (default: a quarter of the period)",
    )  # fmt: skip
    t.add_argument(
        "--osci-threshold", type=_positive_float, default=OSCI_THRESHOLD,
        help="OsciReset: reset where (distance of the quantized weight) / (distance of the weight) >= this "
        "(default 8, TetraJet-v2's)",
    )  # fmt: skip
    t.add_argument(
        "--osci-memory-efficient", action="store_true",
        help="OsciReset: track only the 10%% of each weight's elements closest to a rounding edge",
    )  # fmt: skip
    t.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")


def _add_bench_parser(commands) -> None:
    from .bench import RECIPES, TOKENS

    b = commands.add_parser(
        "bench",
        help="time one quantized linear layer per recipe on the current GPU",
        description=(
            f"Forward + backward of one linear layer (tokens {TOKENS}, bf16, Llama shapes) per recipe relative to "
            "bf16 F.linear, a compiled plain-PyTorch fake-quant baseline, the bytes saved for backward per element "
            "of x, and the NVFP4 GEMM alone against torch.mm. Needs a CUDA GPU (the same measurement as "
            "python -m benchmarks.bench_linear)."
        ),
    )
    b.set_defaults(parser=b)
    b.add_argument(
        "--recipes", type=_recipe_list, default=RECIPES, help=f"comma-separated recipes (default {','.join(RECIPES)})"
    )
    b.add_argument("--no-baseline", action="store_true", help="skip the compiled fake-quant baseline")
    b.add_argument(
        "--compiled", action="store_true",
        help="time every variant under torch.compile (bf16 F.linear too; the NVFP4 ops then run as Inductor-launched "
        "kernels) instead of eagerly",
    )  # fmt: skip


def _add_explain_parser(commands) -> None:
    e = commands.add_parser(
        "explain",
        help="show which matmuls of a small GPT the nvfp4 backend rewrites",
        description=(
            "Capture the demo model (fp4compile.demo.gpt.demo_model: a 2-layer byte-level GPT, d_model 64) with "
            "Dynamo, run the nvfp4 backend's matmul pass and print fp4compile.explain's table: every matmul with a "
            "weight, rewritten to NVFP4 or skipped and why. Runs on the CPU; nothing is trained."
        ),
    )
    e.set_defaults(parser=e)
    e.add_argument("--recipe", type=_recipe_name, default="nvidia", help="the recipe to explain (default nvidia)")
    e.add_argument(
        "--skip", default="", help="comma-separated fnmatch patterns of module names to keep in high precision, "
        "e.g. '*.mlp.*' (default: none beyond the recipe's lm_head)",
    )  # fmt: skip


def _run_quantizers(args: argparse.Namespace) -> int:
    from ..spec import QuantSpec
    from .quantizer_report import DISTRIBUTIONS, make_data, quantizer_stats
    from .report import format_row, format_table

    names = QuantSpec.names() if args.names is None else tuple(n.strip() for n in args.names.split(","))
    for name in names:
        try:
            QuantSpec.named(name)  # one clear error for a bad name before any work
        except ValueError as error:
            raise _Failure(str(error)) from error
    if args.cols % 128:
        raise _Failure(f"--cols must be a multiple of 128 (double-block and RHT-128 quantizers), got {args.cols}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise _Failure("--device cuda needs a CUDA GPU and none is available; use --device cpu")

    data_gen = torch.Generator().manual_seed(args.seed)
    draw_gen = torch.Generator(device=args.device).manual_seed(args.seed + 1)
    # Fixed-width columns, without space between them: each row is printed as soon as it is measured.
    header = ("quantizer", "data", "rel err", "err of mean", "ratio", "bytes/el")
    layout = dict(widths=(24, 14, 10, 13, 8, 10), align="<<>>>>", sep="")
    print(
        f"{args.rows}x{args.cols} float32 on {args.device}; err of mean = mean of {args.draws} draws; "
        f"ratio = rel err / err of mean (~{args.draws} if unbiased, ~1 if deterministic)"
    )
    print(format_table(header, [], **layout))
    start = time.perf_counter()
    for distribution in DISTRIBUTIONS:
        x = make_data(distribution, args.rows, args.cols, data_gen).to(args.device)
        for name in names:
            s = quantizer_stats(name, x, distribution=distribution, draws=args.draws, generator=draw_gen)
            cells = (name, distribution, f"{s.rel_error:.3e}", f"{s.mean_error:.3e}", f"{s.error_ratio:.1f}",
                     f"{s.bytes_per_element:.4f}")  # fmt: skip
            print(format_row(cells, **layout))
    print(f"({time.perf_counter() - start:.1f} s)")
    return 0


def _run_train(args: argparse.Namespace) -> int:
    from .train import PlotError, TrainConfig, TrainInputError, prepare_out_dir, run_training

    parser = args.parser
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU and none is available; use --device cpu")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:  # TrainConfig checks the flags' values together, in words that name the flags
        config = TrainConfig(
            recipes=args.recipes, device=args.device, seed=args.seed, steps=args.steps, batch=args.batch, seq=args.seq,
            d_model=args.d_model, layers=args.layers, heads=args.heads, lr=args.lr, warmup=args.warmup,
            eval_every=args.eval_every, val_batches=args.val_batches, inner=args.inner, mode=args.mode,
            corpus_bytes=None if args.corpus_mb is None else int(args.corpus_mb * 1e6), osci_reset=args.osci_reset,
            data=tuple(args.data), seeds=args.seeds, hf_config=args.hf_config, tokenizer=args.tokenizer,
            osci_start=args.osci_start, osci_period=args.osci_period, osci_window=args.osci_window,
            osci_threshold=args.osci_threshold, osci_memory_efficient=args.osci_memory_efficient, nproc=args.nproc,
            monitor=args.monitor,
        ).resolved()  # fmt: skip
    except ValueError as error:
        parser.error(str(error))
    try:
        prepare_out_dir(args.out)  # before any model is built: an unwritable --out fails now, not after training
    except OSError as error:
        parser.exit(2, f"{parser.prog}: error: --out {args.out}: {error.strerror or error}\n")
    try:
        run_training(config, args.out, progress=not args.no_progress)
    except TrainInputError as error:  # found before training (e.g. --corpus-mb too small for --seq)
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except PlotError as error:  # results.json is safe
        message = f"the plot failed ({error.reason}); results.json was written at {error.results_path}"
        raise _Failure(message, 1) from error
    except OSError as error:  # e.g. results.json cannot be written (disk full)
        raise _Failure(str(error), 1) from error
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("fp4compile bench: needs a CUDA GPU and none is available (it times the GPU kernels)", file=sys.stderr)
        return 1
    from .bench import HEADER, run_linear_bench
    from .report import environment, format_table

    env = environment("cuda")
    print(f"{env['device_name']}, torch {env['torch']}", flush=True)
    rows, _ = run_linear_bench(args.recipes, baseline=not args.no_baseline, compiled=args.compiled)
    print(format_table(HEADER, rows))
    return 0


def _run_explain(args: argparse.Namespace) -> int:
    from ..explain import explain
    from .gpt import demo_batch, demo_model

    skip = [p.strip() for p in args.skip.split(",") if p.strip()]
    print(explain(demo_model(), demo_batch(), options={"recipe": args.recipe, "skip": skip}))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``fp4compile`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    handlers = {"quantizers": _run_quantizers, "train": _run_train, "bench": _run_bench, "explain": _run_explain}
    if args.command not in handlers:
        raise AssertionError(f"unhandled command {args.command}")
    try:
        return handlers[args.command](args)
    except _Failure as failure:  # expected: one line, no traceback
        message = " ".join(str(failure).splitlines())
        print(f"fp4compile {args.command}: error: {message}", file=sys.stderr)
        return failure.status


if __name__ == "__main__":
    sys.exit(main())
