"""What defines a ``fp4compile train`` run: the device presets and :class:`TrainConfig`, resolved and checked.

:meth:`TrainConfig.resolved` fills every unset field from the device's preset (:data:`PRESETS`) and derived
defaults (OsciReset's schedule among them), then checks the result by building what it feeds (the model's shape,
the ``nvfp4`` backend's options); errors name the ``fp4compile train`` flags. Training is in ``train.py``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..backend import BackendOptions
from ..outlier_channels import OutControl
from ..recipe import Recipe
from .gpt import GPTConfig

__all__ = ["DEFAULT_RECIPES", "OSCI_THRESHOLD", "PRESETS", "TrainConfig"]

DEFAULT_RECIPES = ("bf16", "naive", "nvidia", "quartet_ii", "tetrajet_v2")
#: OsciReset's reset threshold unless one is given (TetraJet-v2's).
OSCI_THRESHOLD = 8.0

# Defaults per device; every one can be overridden by a flag.
#
# CPU: the quantized linears run fp4compile's plain-torch reference quantizers, which cost far more than the
# matmuls, so the model is tiny and the run short. Inner compiler: on the CPU, Inductor's compilation costs far
# more than "aot_eager"'s (AOTAutograd and the NVFP4 rewrite, eager kernels) and the steps run no faster (the
# quantizers dominate), so the default CPU run uses inner "aot_eager" (--inner inductor to override).
# Measured run times: the README, "Results of the demo".
PRESETS: dict[str, dict] = {
    "cpu": dict(
        steps=100, batch=8, seq=64, d_model=64, layers=2, heads=4, lr=3e-3, warmup=10, val_batches=4,
        inner="aot_eager", mode=None,
    ),
    "cuda": dict(
        steps=1000, batch=32, seq=256, d_model=512, layers=6, heads=8, lr=1e-3, warmup=100, val_batches=16,
        inner="inductor", mode="reduce-overhead",
    ),
}  # fmt: skip


#: The ``fp4compile train`` flag of each name that errors of :class:`GPTConfig` and of the ``nvfp4`` backend's
#: options (:class:`fp4compile.backend.BackendOptions`) use for a value :class:`TrainConfig` gives them.
_FLAGS = {"seq_len": "--seq", "d_model": "--d-model", "n_layers": "--layers", "n_heads": "--heads",
          "inner": "--inner", "mode": "--mode"}  # fmt: skip


def _in_flags(message: str) -> str:
    """``message`` with the names in :data:`_FLAGS` spelled as the flags that set them.

    ``d_model (48) must be a multiple of n_heads (5)`` becomes ``--d-model (48) must be a multiple of --heads (5)``,
    ``mode='max-autotune' needs inner='inductor'`` becomes ``--mode max-autotune needs --inner inductor``.
    """
    message = re.sub(r"\b(inner|mode)='([^']*)'", lambda m: f"{_FLAGS[m[1]]} {m[2]}", message)
    return re.sub(r"\b(?:GPTConfig\.)?(seq_len|d_model|n_layers|n_heads)\b", lambda m: _FLAGS[m[1]], message)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a ``fp4compile train`` run (see ``fp4compile train --help``).

    ``None`` fields take the device's value from :data:`PRESETS` in :meth:`resolved`; the ``osci_*`` fields apply
    only with ``osci_reset`` (``osci_start``, ``osci_period`` and ``osci_window`` stay ``None`` without it).

    Bad values raise ``ValueError``, in words that name the ``fp4compile train`` flags (which the CLI prints as
    they are): ``osci_*`` settings without ``osci_reset`` on construction, the rest in :meth:`resolved`.
    """

    recipes: tuple[str, ...] = DEFAULT_RECIPES
    device: str = "cpu"
    seed: int = 0
    seeds: int = 1  # --seeds N: every recipe trained with seeds seed .. seed + N - 1
    steps: Optional[int] = None
    batch: Optional[int] = None
    seq: Optional[int] = None
    d_model: Optional[int] = None
    layers: Optional[int] = None
    heads: Optional[int] = None
    lr: Optional[float] = None
    warmup: Optional[int] = None
    eval_every: Optional[int] = None
    val_batches: Optional[int] = None
    inner: Optional[str] = None
    mode: Optional[str] = None
    corpus_bytes: Optional[int] = None
    data: tuple[str, ...] = ()  # --data: text files and directories instead of the standard library
    hf_config: Optional[str] = None  # --hf-config: a Hugging Face causal-LM architecture instead of the demo GPT
    tokenizer: Optional[str] = None  # --tokenizer: a locally saved tokenizer instead of bytes (needs hf_config)
    grad_clip: float = 1.0
    osci_reset: bool = False
    osci_start: Optional[int] = None
    osci_period: Optional[int] = None
    osci_window: Optional[int] = None
    osci_threshold: float = OSCI_THRESHOLD
    osci_memory_efficient: bool = False
    nproc: int = 1
    monitor: int = 0  # --monitor N: fp4compile.NumericsMonitor every N steps (0: off)
    monitor_dir: Optional[str] = None  # where run_training puts each run's numerics log and heatmaps

    def __post_init__(self) -> None:
        unused = [flag for flag, given in (
            ("--osci-start", self.osci_start is not None),
            ("--osci-period", self.osci_period is not None),
            ("--osci-window", self.osci_window is not None),
            ("--osci-threshold", self.osci_threshold != OSCI_THRESHOLD),
            ("--osci-memory-efficient", self.osci_memory_efficient),
        ) if given]  # fmt: skip
        if unused and not self.osci_reset:
            raise ValueError(f"{', '.join(unused)} needs --osci-reset")

    def resolved(self) -> "TrainConfig":
        """This config with every ``None`` replaced by the device preset (and derived defaults), checked.

        Raises:
            ValueError: an unknown device; a model shape that :class:`GPTConfig` refuses; compile options that
                the ``nvfp4`` backend refuses; with ``osci_reset``, no quantized recipe or a schedule whose first
                reset would come after the last step.
        """
        if self.device not in PRESETS:
            raise ValueError(f"unknown device {self.device!r}; valid: {', '.join(PRESETS)}")
        values = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        for key, value in PRESETS[self.device].items():
            values.setdefault(key, value)
        if self.nproc > 1 and self.mode is None:  # DDP's bucketed all-reduces and CUDA graphs do not mix
            values["mode"] = "default"
        merged = dataclasses.replace(self, **values)
        if merged.eval_every is None:
            merged = dataclasses.replace(merged, eval_every=max(1, merged.steps // 4))
        if merged.corpus_bytes is None:  # about the bytes the run reads, between 1 MB and 32 MB
            need = merged.steps * merged.batch * (merged.seq + 1)
            merged = dataclasses.replace(merged, corpus_bytes=int(min(max(need * 1.2, 1e6), 32e6)))
        if merged.warmup >= merged.steps:
            merged = dataclasses.replace(merged, warmup=merged.steps // 10)
        # OsciReset scaled from TetraJet-v2's (start in the learning-rate decay, period 200, window 50) to the
        # run: the first snapshot at half the steps, a period of a fifth of the steps, a window of a quarter of it.
        if merged.osci_reset and merged.osci_period is None:
            merged = dataclasses.replace(merged, osci_period=max(2, merged.steps // 5))
        if merged.osci_reset and merged.osci_window is None:
            merged = dataclasses.replace(merged, osci_window=max(1, merged.osci_period // 4))
        if merged.osci_reset and merged.osci_start is None:
            merged = dataclasses.replace(merged, osci_start=merged.steps // 2)
        merged._check()
        return merged

    def _check(self) -> None:
        """Check a resolved config: by building what it feeds (the model's shape, the backend's options), then
        the number of processes and OsciReset's schedule against the run."""
        if isinstance(self.monitor, bool) or not isinstance(self.monitor, int) or self.monitor < 0:
            raise ValueError(f"--monitor must be a positive integer (steps between probes), got {self.monitor!r}")
        if isinstance(self.nproc, bool) or not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"--nproc must be a positive integer, got {self.nproc!r}")
        if self.device == "cuda" and self.nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {self.nproc} needs {self.nproc} GPUs; this machine has "
                             f"{torch.cuda.device_count()}")  # fmt: skip
        try:
            self.model_config()
            for recipe in self.recipes:
                BackendOptions.parse(self.compile_options(recipe))
        except ValueError as error:
            raise ValueError(_in_flags(str(error))) from error
        if not self.osci_reset:
            return
        if not any(Recipe.named(r).quantized for r in self.recipes):
            raise ValueError(f"--osci-reset needs a quantized recipe; --recipes is {','.join(self.recipes)}")
        if self.osci_window >= self.osci_period:  # OsciReset's own rule, checked before any model is built
            raise ValueError(f"--osci-window ({self.osci_window}) must be smaller than --osci-period "
                             f"({self.osci_period})")  # fmt: skip
        first_reset = self.osci_start + self.osci_window + 1
        if first_reset >= self.steps:
            raise ValueError(f"OsciReset's first reset (at step --osci-start + --osci-window + 1 = {first_reset}) "
                             f"must come by the last step ({self.steps - 1}); lower --osci-start or raise "
                             "--steps")  # fmt: skip

    def model_config(self) -> GPTConfig:
        """The GPT shape of this (resolved) config."""
        return GPTConfig(seq_len=self.seq, d_model=self.d_model, n_layers=self.layers, n_heads=self.heads)

    def run_recipe(self, recipe: str) -> Recipe:
        """``recipe`` as this run trains it. OutControl's schedule (TetraJet-v2: record channel norms from step 500
        for 50 steps, in runs of many thousand steps) is scaled to a run too short to reach its selection: record
        from a fifth of the steps for a fiftieth of them (a 500-step run selects at step 110). The scaled recipe is
        named after its schedule (``tetrajet_v2_full_start100_window10``)."""
        found = Recipe.named(recipe)
        control = found.outliers
        if not isinstance(control, OutControl) or control.start + control.window < self.steps:
            return found
        start, window = self.steps // 5, max(1, self.steps // 50)
        scaled = dataclasses.replace(control, start=start, window=window)
        return dataclasses.replace(found, name=f"{recipe}_start{start}_window{window}", outliers=scaled)

    def compile_options(self, recipe: str) -> dict:
        """The ``options`` of ``torch.compile(backend="nvfp4")`` for ``recipe`` (:meth:`run_recipe`)."""
        run = self.run_recipe(recipe)
        options = {"recipe": recipe if run.name == recipe else run, "inner": self.inner}
        if self.mode not in (None, "default"):
            options["mode"] = self.mode
        return options
