"""``fp4compile train``: train the same small byte-level GPT once per recipe and compare the losses.

Every run builds the model from the same seed (same initial weights, checked by a hash of them),
reseeds torch before its first step (the stochastic-rounding bits of one run are reproducible), and
reads the same training batches in the same order (``corpus.train_batch`` depends only on seed and
step). The model is compiled with ``torch.compile(model, backend="nvfp4", options={"recipe": ...})``;
``bf16`` is compiled the same way and rewrites nothing, so the comparison isolates the quantization.
A run's settings, :class:`TrainConfig` and the device presets, are in ``train_config.py`` (re-exported here).

``results.json`` (written by :func:`write_results`) holds:

- ``config``: the :class:`TrainConfig` of the run, and the model's parameter count (``params``);
- ``corpus``: the stdlib directory, bytes and files of each split;
- ``runs``: per recipe ``train_loss`` (one value per step; null where not finite), ``final_train_loss``
  (mean of the last 10 steps), ``val_loss`` (mean over the fixed validation batches after the last
  step), ``val_curve`` ([step, loss] pairs), ``gap_to_bf16_pct`` (val loss relative to bf16's, null
  without a bf16 run), ``tokens_per_s`` (training steps after the first ``TIMING_WARMUP``, evaluation
  excluded), ``first_step_s`` (compilation plus one step), ``wall_s``, ``init_sha256``, ``diverged``,
  ``osci_reset`` (with ``--osci-reset``, for quantized recipes: one ``{step, tracked, reset}`` per reset of
  :class:`fp4compile.OsciReset`, with per-layer counts under ``layers``; null otherwise), ``outlier_channels``
  (recipes with ``outliers``: ``{layer: number of outlier channels}`` at the end of the run, from
  :func:`fp4compile.outlier_channels`: 0 where a layer has none, as before OutControl's selection or in a layer
  narrower than one 1x128 block; null otherwise);
- ``environment``: torch, Triton and fp4compile versions, Python, device name, CPU threads, date
  (:func:`fp4compile.demo.report.environment`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..monitor import NumericsMonitor
from ..osci_reset import OsciReset
from ..outlier_layers import outlier_channels
from ..recipe import Recipe
from ..streams import rank_and_world
from .corpus import Corpus, load_corpus, train_batch, val_batches
from .gpt import GPT
from .report import device_name
from .results import FINAL_WINDOW, previous_runs, results_table, run_key, write_results
from .train_config import DEFAULT_RECIPES, PRESETS, TrainConfig
from .train_config import OSCI_THRESHOLD as OSCI_THRESHOLD  # re-exported: cli.py imports it from here

__all__ = [
    "DEFAULT_RECIPES",
    "PRESETS",
    "PlotError",
    "RecipeRun",
    "TrainConfig",
    "TrainInputError",
    "prepare_out_dir",
    "results_table",
    "run_training",
    "train_recipe",
    "write_results",
]

#: Steps left out of the tokens/s measurement (compilation; CUDA-graph recording in "reduce-overhead").
TIMING_WARMUP = 3


class TrainInputError(ValueError):
    """Inputs a run cannot start with (e.g. a corpus too small for the sequence length), found before training."""


class PlotError(RuntimeError):
    """Drawing ``loss.png`` failed after ``results.json`` was written (the results are safe).

    Attributes:
        results_path: the ``results.json`` that was written.
        plot_path: the PNG that could not be drawn.
        reason: why, in words (the original exception is the ``__cause__``).
    """

    def __init__(self, results_path: str, plot_path: str, reason: str):
        super().__init__(f"{results_path} was written, but drawing {plot_path} failed: {reason}")
        self.results_path, self.plot_path, self.reason = results_path, plot_path, reason


def prepare_out_dir(path: str) -> str:
    """Create the directory ``path`` (and its parents) if it is missing, and check that files can be written in it.

    A probe file is created in it and deleted again.

    Returns:
        ``path``.

    Raises:
        OSError: it cannot be created or written; ``strerror`` says why in words, ``filename`` is ``path``.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "exists and is not a directory", path)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"cannot create the directory ({error.strerror or error})", path) from error
    try:
        handle, probe = tempfile.mkstemp(prefix=".fp4compile-write-probe-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OSError(error.errno, f"cannot write in the directory ({error.strerror or error})", path) from error
    return path


@dataclass
class RecipeRun:
    """The outcome of training one recipe (see the module docstring for the fields' meaning)."""

    recipe: str
    train_loss: list[float]
    val_curve: list[tuple[int, float]]
    tokens_per_s: float
    first_step_s: float
    wall_s: float
    init_sha256: str
    diverged: bool = False
    osci_reset: Optional[list[dict]] = None
    outlier_channels: Optional[dict[str, int]] = None

    @classmethod
    def from_json(cls, recipe: str, run: dict) -> "RecipeRun":
        """A run as ``results.json`` stores it (null losses back to NaN), for resuming."""

        def value(v):
            return math.nan if v is None else v

        return cls(
            recipe=recipe,
            train_loss=[value(v) for v in run["train_loss"]],
            val_curve=[(step, value(v)) for step, v in run["val_curve"]],
            tokens_per_s=value(run["tokens_per_s"]),
            first_step_s=value(run["first_step_s"]),
            wall_s=run["wall_s"],
            init_sha256=run["init_sha256"],
            diverged=run["diverged"],
            osci_reset=run["osci_reset"],
            outlier_channels=run.get("outlier_channels"),  # absent from results.json written before it existed
        )

    @property
    def final_train_loss(self) -> float:
        """Mean training loss of the last :data:`FINAL_WINDOW` steps."""
        tail = self.train_loss[-FINAL_WINDOW:]
        return sum(tail) / len(tail) if tail else math.nan

    @property
    def val_loss(self) -> float:
        """Validation loss after the last step."""
        return self.val_curve[-1][1] if self.val_curve else math.nan


def _lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10 % of ``config.lr``."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def _parameter_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _evaluate(model, batches, device: str) -> float:
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        losses = [model(x.to(device), y.to(device)).detach().clone() for x, y in batches]  # clones: CUDA graphs
    return sum(torch.stack(losses).tolist()) / len(batches)  # one host sync for the whole set


def _mean_over_ranks(value: torch.Tensor, world: int) -> torch.Tensor:
    """``value`` averaged over the data-parallel ranks (itself in a single process)."""
    if world > 1:
        torch.distributed.all_reduce(value)
        value = value / world
    return value


def build_model(config: TrainConfig) -> torch.nn.Module:
    """The model of the run, weights from torch's current seed: the demo GPT, or ``--hf-config``'s architecture."""
    if config.hf_config:
        from .hf_model import BYTE_VOCAB, HFByteLM, load_hf_config, load_tokenizer

        vocab = len(load_tokenizer(config.tokenizer)) if config.tokenizer else BYTE_VOCAB
        return HFByteLM(load_hf_config(config.hf_config, config.seq, vocab))
    if config.tokenizer:
        raise ValueError("--tokenizer needs --hf-config (the demo GPT reads bytes)")
    return GPT(config.model_config())


def numerics_log(config: TrainConfig, recipe: str) -> Optional[str]:
    """The numerics log of ``recipe``'s run under ``--monitor`` (``<out>/numerics/<run>/numerics.jsonl``), or None."""
    if not config.monitor or not config.monitor_dir or not Recipe.named(recipe).quantized:
        return None
    return os.path.join(config.monitor_dir, run_key(recipe, config.seed, config.seeds), "numerics.jsonl")


def _numerics_monitor(compiled, recipe: str, config: TrainConfig):
    path = numerics_log(config, recipe)
    if path is None:
        return None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):  # an interrupted earlier run of this key: start its log afresh
        os.remove(path)
    return NumericsMonitor(compiled, every=config.monitor, recipe=recipe, log=path)


def _probe_loss(model, x, y, device: str) -> torch.Tensor:
    """The training loss of the step's batch, as the training step computes it (the monitor's probe)."""
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        return model(x, y)


def train_recipe(
    recipe: str,
    config: TrainConfig,
    corpus: Corpus,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> RecipeRun:
    """Build the model from ``config.seed``, compile it with ``recipe`` and train it for ``config.steps`` steps.

    Args:
        recipe: a name from ``fp4compile.Recipe.names()``.
        config: a resolved :class:`TrainConfig`.
        corpus: the data (:func:`fp4compile.demo.corpus.load_corpus`).
        progress: show a tqdm bar (on stderr) with the current loss.
        log: where to report a divergence.
    """
    from tqdm.auto import tqdm

    device = config.device
    rank, world = rank_and_world()  # under fp4compile train --nproc: one data-parallel rank of `world`
    start = time.perf_counter()
    torch._dynamo.reset()  # each recipe compiles afresh (and never hits Dynamo's recompile limit)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config)
    init_hash = _parameter_hash(model)
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    replica = model
    if world > 1:  # DDP, compiled after wrapping
        replica = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device == "cuda" else None)
    compiled = torch.compile(replica, backend="nvfp4", options=config.compile_options(recipe), dynamic=False)
    osci = None
    if config.osci_reset and Recipe.named(recipe).quantized:
        osci = OsciReset(
            compiled, recipe, start=config.osci_start, period=config.osci_period, window=config.osci_window,
            threshold=config.osci_threshold, memory_efficient=config.osci_memory_efficient,
            autocast_dtype=torch.bfloat16 if device == "cuda" else None,
        )  # fmt: skip
        osci.register(optimizer)
    monitor = _numerics_monitor(compiled, recipe, config) if rank == 0 else None
    validation = val_batches(corpus.val, config.val_batches, config.batch, config.seq)
    torch.manual_seed(config.seed)  # the random bits of stochastic rounding and rotations
    if device == "cuda":
        torch.cuda.manual_seed_all(config.seed)

    losses: list[torch.Tensor] = []
    val_curve: list[tuple[int, float]] = []
    untimed = min(TIMING_WARMUP, config.steps - 1)  # steps left out of tokens/s (all but one of a short run)
    timed_s, probe_s, first_step_s, diverged = 0.0, 0.0, math.nan, False
    log_every = 1 if device == "cpu" else 10  # .item() synchronizes a GPU
    bar = tqdm(total=config.steps, desc=f"{recipe:<12}", unit="step", disable=not progress or rank > 0, file=sys.stderr)
    try:
        tic = time.perf_counter()
        for step in range(config.steps):
            x, y = train_batch(corpus.train, step * world + rank, config.batch, config.seq, config.seed)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, config)
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = compiled(x, y)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if monitor is not None:
                probing = monitor.due()
                if probing:  # the probe's time is not training time: left out of tokens/s
                    _sync(device)
                    probe_tic = time.perf_counter()
                monitor.step(functools.partial(_probe_loss, x=x, y=y, device=device))
                if probing and step + 1 > untimed:
                    _sync(device)
                    probe_s += time.perf_counter() - probe_tic
            losses.append(_mean_over_ranks(loss.detach().clone(), world))  # a clone: CUDA graphs reuse outputs
            done = step + 1
            if done == 1:
                _sync(device)
                first_step_s = time.perf_counter() - start
            if done == untimed:
                _sync(device)
                tic = time.perf_counter()  # tokens/s counts the steps after this one
            last = done == config.steps
            if done % log_every == 0 or last:
                value = losses[-1].item()
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                diverged = not math.isfinite(value)
            if last or diverged or (config.eval_every > 0 and done % config.eval_every == 0):
                if done > untimed:
                    _sync(device)
                    timed_s += time.perf_counter() - tic
                val_curve.append((done, _evaluate(compiled, validation, device)))
                bar.set_postfix(loss=f"{losses[-1].item():.4f}", val=f"{val_curve[-1][1]:.4f}", refresh=False)
                tic = time.perf_counter()
            bar.update(1)
            if diverged:
                log(f"{recipe}: the training loss is not finite at step {step}; stopping this run")
                break
    finally:
        bar.close()
    timed_steps = len(losses) - untimed
    tokens = timed_steps * config.batch * config.seq * world
    timed_s -= probe_s
    tokens_per_s = tokens / timed_s if timed_s > 0 and timed_steps > 0 else math.nan
    return RecipeRun(
        recipe=recipe,
        train_loss=torch.stack(losses).float().cpu().tolist(),
        val_curve=val_curve,
        tokens_per_s=tokens_per_s,
        first_step_s=first_step_s,
        wall_s=time.perf_counter() - start,
        init_sha256=init_hash,
        diverged=diverged,
        osci_reset=None if osci is None else osci.history,
        outlier_channels=_outlier_channel_counts(model, recipe, config),
    )


def _outlier_channel_counts(model: torch.nn.Module, recipe: str, config: TrainConfig) -> Optional[dict[str, int]]:
    """``{layer: outlier channels}`` of a recipe with ``outliers`` (read back after training), else None."""
    if config.run_recipe(recipe).outliers is None:
        return None
    return {name: int(channels.numel()) for name, channels in outlier_channels(model).items()}


def _describe_outlier_channels(recipe: str, counts: Optional[dict[str, int]]) -> Optional[str]:
    """One line on where a run's outlier channels ended up, or None for a recipe without outliers."""
    if counts is None:
        return None
    sizes = ", ".join(str(n) for n in sorted({n for n in counts.values() if n})) or "-"
    with_channels = sum(1 for n in counts.values() if n)
    return f"{recipe}: outlier channels in {with_channels} of {len(counts)} layers ({sizes} each)"


def _train_in_fresh_process(recipe: str, config: TrainConfig, corpus: Corpus, progress: bool) -> RecipeRun:
    """:func:`train_recipe` in a new (spawned) Python process, for GPU runs.

    Every recipe then starts from a clean CUDA allocator, CUDA-graph tree and compile state, and one recipe's
    leftovers cannot affect the next one's speed. (It was first needed against the CUDA-graph tree's pool check,
    "These storage data ptrs are not allocated in pool", which a second quantized model in one process tripped on
    an H100; the check also failed for the first OutControl model of a process, from garbage in reference cycles
    that the GEMM's first autotuning left and now collects; the second-model case is not re-tested since.)
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train_recipe, recipe, config, corpus, progress).result()


def _plot_numerics(path: Optional[str], log: Callable[[str], None]) -> None:
    """The heatmaps of a run's numerics log, next to it (a run without one draws nothing)."""
    if path is None or not os.path.exists(path):
        return
    from ..plot import plot_numerics

    try:
        for png in plot_numerics(path, os.path.dirname(path)):
            log(f"wrote {png}")
    except (OSError, ImportError, ValueError) as error:  # the log stays; only the pictures are missing
        log(f"could not draw the heatmaps of {path}: {error}")


def run_training(
    config: TrainConfig, out_dir: str, progress: bool = True, log: Callable[[str], None] = print
) -> dict[str, RecipeRun]:
    """Train every recipe of ``config``, print the table, write ``results.json`` and ``loss.png`` to ``out_dir``.

    ``out_dir`` is created and checked for writing (:func:`prepare_out_dir`) and the corpus is loaded and checked
    before any model is built; ``results.json`` is written before ``loss.png`` is drawn.

    Returns:
        recipe name -> :class:`RecipeRun`, in the order of ``config.recipes``.

    Raises:
        OSError: ``out_dir`` cannot be created or written (before training), or ``results.json`` cannot be written.
        TrainInputError: the corpus is too small for the run (before training).
        PlotError: ``results.json`` was written but ``loss.png`` could not be drawn.
    """
    from .plot import plot_results

    start = time.perf_counter()
    config = config.resolved()
    if config.monitor:
        config = dataclasses.replace(config, monitor_dir=os.path.join(out_dir, "numerics"))
    prepare_out_dir(out_dir)  # before any training: an unwritable --out fails now, not after the last recipe
    try:
        corpus = load_corpus(config.corpus_bytes, data=config.data)
    except ValueError as error:  # too small a corpus_bytes
        raise TrainInputError(f"corpus: {error}") from error
    if config.tokenizer and config.hf_config:
        from .hf_model import load_tokenizer, tokenize_corpus

        try:
            corpus = tokenize_corpus(corpus, load_tokenizer(config.tokenizer))
        except ValueError as error:
            raise TrainInputError(str(error)) from error
    for split, data in (("training", corpus.train), ("validation", corpus.val)):
        if len(data) < config.seq + 2:  # corpus.train_batch and corpus.val_batches need one window and a byte
            raise TrainInputError(
                f"the {split} split of the corpus ({len(data)} bytes) is too short for sequences of {config.seq} "
                f"bytes (at least {config.seq + 2}); read more of the corpus or shorten the sequences"
            )
    try:
        model = build_model(config)
    except ValueError as error:  # a --hf-config that is not a causal LM, ...
        raise TrainInputError(str(error)) from error
    params = model.num_parameters()
    if config.hf_config:
        architecture = f"byte-level {model.description}, seq {config.seq}"
    else:
        architecture = (f"byte-level GPT (layers {config.layers}, d_model {config.d_model}, heads {config.heads}, "
                        f"seq {config.seq})")  # fmt: skip
    del model
    compiler = config.inner + (f", mode {config.mode}" if config.mode not in (None, "default") else "")
    log(
        f"{params / 1e6:.2f}M-parameter {architecture}, batch {config.batch}, {config.steps} steps, lr {config.lr:g}, "
        f"on {config.device} ({device_name(config.device)})"
        f"{f' x {config.nproc} processes (DDP)' if config.nproc > 1 else ''}, "
        f"backend nvfp4 (inner {compiler}){', bf16 autocast' if config.device == 'cuda' else ', float32'}"
    )
    if config.osci_reset:
        variant = "memory-efficient" if config.osci_memory_efficient else "full"
        log(
            f"OsciReset ({variant}) on the quantized recipes: snapshots at step {config.osci_start} and every "
            f"{config.osci_period} steps after, window {config.osci_window}, threshold {config.osci_threshold:g}"
        )
    for recipe in config.recipes:
        run = config.run_recipe(recipe)
        if run.name != recipe:
            control = run.outliers
            preset, steps = Recipe.named(recipe).outliers, "steps" if control.window > 1 else "step"
            log(
                f"{recipe}: OutControl scaled to this run: channel norms recorded from step {control.start} for "
                f"{control.window} {steps}, selection at step {control.start + control.window} (the preset's "
                f"{preset.start} + {preset.window} is for long runs)"
            )
    log(corpus.describe())
    results = os.path.join(out_dir, "results.json")
    done, note = previous_runs(results, config)
    if note:
        log(note)
    runs: dict[str, RecipeRun] = {}
    for seed in range(config.seed, config.seed + config.seeds):
        seeded = dataclasses.replace(config, seed=seed)
        for recipe in config.recipes:
            key = run_key(recipe, seed, config.seeds)
            if key in done:  # an earlier, interrupted run of this configuration finished it
                runs[key] = RecipeRun.from_json(recipe, done[key])
                continue
            if config.nproc > 1:
                from .ranks import train_on_ranks  # it imports train_recipe from here

                runs[key] = train_on_ranks(recipe, seeded, corpus, progress)
            elif config.device == "cuda":
                runs[key] = _train_in_fresh_process(recipe, seeded, corpus, progress)
            else:
                runs[key] = train_recipe(recipe, seeded, corpus, progress=progress, log=log)
            outliers = _describe_outlier_channels(key, runs[key].outlier_channels)
            if outliers:
                log(outliers)
            # after every run: an interrupted run resumes from here
            write_results(results, config, corpus, runs, params, time.perf_counter() - start)
            _plot_numerics(numerics_log(seeded, recipe), log)
    wall_s = time.perf_counter() - start
    # The results first, then the table, then the plot: a failing plot loses nothing.
    write_results(results, config, corpus, runs, params, wall_s)
    log(results_table(runs))
    log(f"wrote {results} ({wall_s:.0f} s in all)")
    png = os.path.join(out_dir, "loss.png")
    try:
        plot = plot_results(results, png)
    except (OSError, ImportError) as error:  # the PNG cannot be written, or matplotlib cannot be imported
        raise PlotError(results, png, str(error) or type(error).__name__) from error
    log(f"wrote {plot}")
    return runs
