"""``NumericsMonitor``: per layer and per GEMM operand slot, what NVFP4 quantization does while a model trains.

Every ``every``-th call of :meth:`NumericsMonitor.step` (the first included) runs a probe: ``loss_fn`` on the
uncompiled model, eagerly, with hooks on each quantized linear that capture its operands (X and W as its
forward casts them, dY from the backward), then each of the six slots' operands (``fwd.x``, ``fwd.w``,
``dgrad.dy``, ``dgrad.w`` = W^T, ``wgrad.dy`` = dY^T, ``wgrad.x`` = X^T; W^T and X^T from the dequantized
forward quantization where the recipe re-quantizes those) quantized with the recipe's quantizer for that slot
and measured (``operand_stats.py``). The probe leaves training as it was: its gradients go to
``torch.autograd.grad`` (never into ``.grad``), the module buffers (BatchNorm statistics, outlier-channel
state) and the random generators are restored afterwards. The other calls only count: no tensor work, no
kernel launch. The compiled model is never touched, so the monitor adds no recompilation and no graph break.

The operands are the eager model's: for a model converted by ``quantize_`` (``NVFP4Linear``) that is its NVFP4
forward and backward; for a model compiled with ``backend="nvfp4"`` it is its high-precision eager forward,
whose operands the statistics quantize with the recipe's quantizers. Recipes whose slots are not NVFP4
(``fp4_dge_occ``'s FP8 backward) are measured on their NVFP4 slots only; OutControl's and the Hot-Channel
Patch's outlier columns and OCC's clamping are not modelled (the plain recipe's quantizers are applied).

Rows are tidy ``{"step", "layer", "slot", "stat", "value"}`` dicts (``value`` None where a statistic is
undefined, e.g. the SNR of an exact quantization; ``top_channels`` a list), kept in :attr:`rows`, appended to
``log`` (``.jsonl`` or ``.csv``) and, with ``tensorboard=DIR``, written as scalars ``layer/slot/stat``.
``python -m fp4compile.plot LOG`` draws per-layer heatmaps.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn

from .eligibility import LayerFilter, SkipRule
from .operand_stats import STATS, dequantized, derive, measure, quantize_padded
from .osci_layers import quantized_linears, unwrap_model
from .recipe import SLOTS, Recipe
from .spec import QuantSpec

__all__ = ["NumericsMonitor"]

_LOG_SUFFIXES = (".jsonl", ".csv")


def _cast_like_forward(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the quantized linear sees it: cast to the autocast dtype of its device if autocast is on."""
    if torch.is_autocast_enabled(t.device.type) and t.is_floating_point():
        return t.to(torch.get_autocast_dtype(t.device.type))
    return t


def _shards_weights(root: nn.Module) -> bool:
    """Whether FSDP (FSDP2's ``fully_shard`` or FSDP1) manages some of ``root``'s weights: it frees the storage of an
    all-gathered weight when it reshards after the forward, before the probe measures it."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in root.modules())


def _weight_seen(weight: torch.Tensor, own_storage: bool) -> torch.Tensor:
    """The weight as the quantized linear sees it (:func:`_cast_like_forward`); with ``own_storage`` in storage of
    its own (a copy where the cast made none)."""
    seen = _cast_like_forward(weight.detach())
    if own_storage and seen.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr():
        seen = seen.clone()
    return seen


def _dequantized(t: torch.Tensor, spec: QuantSpec, k_multiple: int) -> torch.Tensor:
    """``t`` [rows, K] quantized along K as the forward does (K zero-padded to ``k_multiple``), dequantized."""
    rows, k = t.shape
    return dequantized(quantize_padded(t, spec, k_multiple), rows, k)


def slot_operands(recipe: Recipe, x: torch.Tensor, w: torch.Tensor, dy: Optional[torch.Tensor]) -> dict:
    """The operand each NVFP4 slot of ``recipe`` quantizes, from X [tokens, in], W [out, in] and dY [tokens, out]
    (the dY slots are left out when ``dy`` is None, and slots whose spec is not an NVFP4 ``QuantSpec``)."""
    specs = {s: recipe.spec(s) for s in SLOTS}
    nvfp4 = [s for s in SLOTS if isinstance(specs[s], QuantSpec) and (dy is not None or "dy" not in s)]

    def transposed(t: torch.Tensor, source: str, forward_slot: str) -> Optional[torch.Tensor]:
        if source != "forward":
            return t.T
        if not isinstance(specs[forward_slot], QuantSpec):
            return None
        k_multiple = max(getattr(specs[s], "k_multiple", 16) for s in ("fwd.x", "fwd.w"))
        return _dequantized(t, specs[forward_slot], k_multiple).T

    operands = {
        "fwd.x": lambda: x,
        "fwd.w": lambda: w,
        "dgrad.dy": lambda: dy,
        "dgrad.w": lambda: transposed(w, recipe.dgrad_w_source, "fwd.w"),
        "wgrad.dy": lambda: dy.T,
        "wgrad.x": lambda: transposed(x, recipe.wgrad_x_source, "fwd.x"),
    }
    found = {s: operands[s]() for s in nvfp4}
    return {s: t for s, t in found.items() if t is not None}


def _statistics(operands: list[tuple[torch.Tensor, QuantSpec]], top: int) -> list[dict[str, Any]]:
    """The statistics of every operand as Python values (non-finite numbers as None): measured and derived on
    each device for all its operands at once, and read in one transfer per device for the numbers and one for
    the channel indices (a host synchronization each on a GPU, not one per statistic or operand)."""
    scalars = [stat for stat in STATS if stat != "top_channels"]
    by_device: dict[torch.device, list[int]] = {}
    for i, (t, _) in enumerate(operands):
        by_device.setdefault(t.device, []).append(i)
    values: list[dict[str, Any]] = [{} for _ in operands]
    for indices in by_device.values():
        found = measure([operands[i] for i in indices], top)
        stats = derive(found.sums, found.counts, found.sizes)
        numbers = torch.stack([stats[stat] for stat in scalars], 1).tolist()
        channels = found.top_channels.tolist()
        for n, i in enumerate(indices):
            values[i] = {stat: (v if math.isfinite(v) else None) for stat, v in zip(scalars, numbers[n])}
            values[i]["top_channels"] = channels[n][: found.top_counts[n]]
    return values


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return " ".join(map(str, value))
    return "" if value is None else value


class NumericsMonitor:
    """Per-layer NVFP4 statistics every ``every`` optimizer steps (see the module docstring).

    Args:
        model: the model (compiled or not, DDP-wrapped or not): its quantized linears are found as OsciReset finds
            them (``NVFP4Linear`` layers, or every eligible ``nn.Linear`` of ``recipe`` not in ``skip``).
        every: probe on steps 0, every, 2 * every, ...
        recipe: the recipe of a model compiled with ``backend="nvfp4"`` (or pass the monitor to the backend as
            ``options={"monitor": monitor}``, which tells it the recipe and ``skip``); unused for converted models.
        skip: layers to leave out, as the backend's ``skip`` option.
        top_channels: how many top K columns to report per slot.
        log: a ``.jsonl`` or ``.csv`` file the rows are appended to after each probe.
        tensorboard: a log directory for ``torch.utils.tensorboard.SummaryWriter``.

    Call :meth:`step` once per optimizer step, after it, with ``loss_fn(module) -> loss`` computing the step's
    loss on the module it is given (``lambda m: m(**batch).loss``; calling the compiled model works too: the probe
    runs under ``torch.compiler.set_stance("force_eager")``, so compiled modules and compiled submodules run their
    eager code). Under DDP one rank may probe alone (the probe calls the module inside the DDP wrapper); under FSDP
    every rank must call :meth:`step`, since the probe's forward all-gathers the sharded weights, and the probe holds
    a copy of each whole weight until it has measured it (tested with FSDP2 on 2 CPU processes: the weight
    statistics are the whole weights').
    """

    def __init__(
        self,
        model: nn.Module,
        every: int = 100,
        recipe: Union[str, Recipe, None] = None,
        *,
        skip: SkipRule = (),
        top_channels: int = 8,
        log: Optional[Union[str, os.PathLike]] = None,
        tensorboard: Optional[Union[str, os.PathLike]] = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"NumericsMonitor expects an nn.Module, got {type(model).__name__}")
        for name, value in (("every", every), ("top_channels", top_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"NumericsMonitor: {name} must be a positive integer, got {value!r}")
        if log is not None and not str(log).endswith(_LOG_SUFFIXES):
            raise ValueError(f"NumericsMonitor: log must end in .jsonl or .csv, got {str(log)!r}")
        self.model = model
        self.every = every
        self.recipe = None if recipe is None else Recipe.resolve(recipe)
        self.skip = LayerFilter.parse(skip, what="NumericsMonitor skip")
        self.top_channels = top_channels
        self.log = None if log is None else os.fspath(log)
        self.rows: list[dict] = []
        self.steps = 0
        self._writer = None
        if tensorboard is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ImportError(
                    f"NumericsMonitor(tensorboard=...) needs the tensorboard package ({error}); pip install "
                    "tensorboard, or log to a .jsonl file instead"
                ) from error
            self._writer = SummaryWriter(os.fspath(tensorboard))

    def configure(self, recipe: Recipe, skip: LayerFilter) -> None:
        """Take the recipe and ``skip`` of the ``backend="nvfp4"`` compilation this monitor was passed to."""
        self.recipe, self.skip = recipe, skip

    def layers(self) -> list[tuple[str, nn.Module, Recipe]]:
        """``(FQN, module, recipe)`` of the monitored linears."""
        root = unwrap_model(self.model)
        recipe = self.recipe
        if recipe is None:
            from .osci_layers import is_converted

            if not is_converted(root):
                raise ValueError(
                    "NumericsMonitor: the model holds no NVFP4Linear layers and no recipe was given: pass "
                    "recipe=... or compile with torch.compile(model, backend='nvfp4', options={'monitor': monitor})"
                )
            recipe = Recipe.named("nvidia")  # unused: converted layers carry their own recipes
        found = quantized_linears(root, recipe, self.skip)
        if not found:
            raise ValueError("NumericsMonitor: the model has no linear layer that trains in NVFP4")
        return found

    def due(self) -> bool:
        """Whether the next :meth:`step` runs a probe."""
        return self.steps % self.every == 0

    def step(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> Optional[list[dict]]:
        """Count one optimizer step; on a probe step measure every layer and return the new rows (else None)."""
        step, probe = self.steps, self.due()
        self.steps += 1
        if not probe:
            return None
        rows = self._probe(step, loss_fn)
        self.rows.extend(rows)
        self._write(rows)
        return rows

    # ------------------------------------------------------------------------- the probe
    def _probe(self, step: int, loss_fn: Callable[[nn.Module], torch.Tensor]) -> list[dict]:
        root = unwrap_model(self.model)
        layers = self.layers()
        captured: dict[str, dict[str, torch.Tensor]] = {}
        sharded = _shards_weights(root)  # then each weight is copied as the forward sees it (FSDP frees it after)

        def capture(fqn):
            def hook(module, args, output):
                x = _cast_like_forward(args[0].detach())
                captured[fqn] = {"x": x.reshape(-1, x.shape[-1]), "w": _weight_seen(module.weight, sharded)}
                if isinstance(output, torch.Tensor) and output.requires_grad:
                    captured[fqn]["y"] = output

            return hook

        handles = [module.register_forward_hook(capture(fqn)) for fqn, module, _ in layers]
        buffers = [(b, b.detach().clone()) for b in root.buffers()]
        devices = sorted({p.device.index or 0 for p in root.parameters() if p.is_cuda})
        try:
            # force_eager: submodules compiled on their own (FSDP2's per-block torch.compile) run eagerly too
            with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"):
                loss = loss_fn(root)
                outputs = {fqn: seen.pop("y") for fqn, seen in captured.items() if "y" in seen}
                if isinstance(loss, torch.Tensor) and loss.requires_grad and outputs:
                    # dY of each linear, and no more: autograd skips every weight gradient (dW) on the way
                    grads = torch.autograd.grad(loss, list(outputs.values()), allow_unused=True)
                    for fqn, g in zip(outputs, grads):
                        if g is not None:
                            captured[fqn]["dy"] = g.reshape(-1, g.shape[-1])
                del loss, outputs
                with torch.no_grad(), torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
                    return self._measure(step, layers, captured)
        finally:
            for handle in handles:
                handle.remove()
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)

    def _measure(self, step: int, layers, captured) -> list[dict]:
        missing = [fqn for fqn, _, _ in layers if fqn not in captured]
        if len(missing) == len(layers):
            raise ValueError(
                "NumericsMonitor: loss_fn ran none of the quantized linears; it must run the model on a batch "
                "(loss_fn=lambda m: m(**batch).loss)"
            )
        slots, operands = [], []
        for fqn, _, recipe in layers:
            seen = captured.get(fqn)
            if seen is None:
                continue
            for slot, operand in slot_operands(recipe, seen["x"], seen["w"], seen.get("dy")).items():
                slots.append((fqn, slot))
                operands.append((operand, recipe.spec(slot)))
        values = _statistics(operands, self.top_channels)
        return [
            {"step": step, "layer": fqn, "slot": slot, "stat": stat, "value": value[stat]}
            for (fqn, slot), value in zip(slots, values)
            for stat in STATS
        ]

    # ------------------------------------------------------------------------- output
    def _write(self, rows: list[dict]) -> None:
        if self.log is not None:
            new = not os.path.exists(self.log)
            with open(self.log, "a", newline="") as f:
                if self.log.endswith(".jsonl"):
                    f.writelines(json.dumps(row) + "\n" for row in rows)
                else:
                    writer = csv.writer(f)
                    if new:
                        writer.writerow(["step", "layer", "slot", "stat", "value"])
                    for row in rows:
                        writer.writerow([row["step"], row["layer"], row["slot"], row["stat"], _csv_value(row["value"])])
        if self._writer is not None:
            for row in rows:
                if isinstance(row["value"], (int, float)):
                    self._writer.add_scalar(f"{row['layer']}/{row['slot']}/{row['stat']}", row["value"], row["step"])
            self._writer.flush()
