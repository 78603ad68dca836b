"""``OsciReset``: TetraJet-v2's fix for weights that oscillate across an FP4 rounding edge.

A master weight sitting next to a rounding edge of its forward quantization can flip its quantized
value back and forth on every optimizer step while the master weight itself barely moves. TetraJet-v2
(arXiv 2510.27527, section "OsciReset"; ``shared/research/tetrajet_v2.md`` section 3) finds such
weights by comparing, over a window of optimizer steps, the distance travelled by the quantized
weight with the distance travelled by the master weight, and snaps the oscillating ones to their
quantized value (the centre of the rounding bin they sit in). Adam moments are not touched.

Usage::

    osc = OsciReset(model, "tetrajet_v2", start=8000, period=200)   # model plain, compiled or converted
    handle = osc.register(optimizer)                                 # runs after every optimizer.step()
    ...
    checkpoint["osci_reset"] = osc.state_dict()                      # with the model and the optimizer

The schedule (TetraJet-v2's, with the hook's step index ``i``: the first ``optimizer.step()`` after
``register`` is step 0, i.e. ``i = global_step - 1`` of the paper's trainer):

- **snapshot** after step ``i = start + n * period`` (n = 0, 1, ...): remember each weight and its
  quantized value, zero the two accumulators;
- **track** after steps ``i + 1 ... i + window``: ``D_q += |Q(W_t) - Q(W_t-1)|`` and
  ``D_w += |W_t - W_t-1|`` elementwise (``window`` single-step deltas);
- **reset** after step ``i + window + 1`` (one optimizer step after the last tracked one, as
  TetraJet-v2's code does): ``ratio = D_q / D_w`` (0 where ``D_w == 0``); where ``ratio >= threshold``
  the master weight becomes ``Q(W)`` of that step, cast to the weight's dtype. The window state is freed.

Every other step does no work: no quantization, no tensor operation, no allocation.

``Q`` is exactly the forward weight quantization of the layer's recipe (``recipe.fwd_w``):
``fp4compile.quantize(W, recipe.fwd_w)`` then ``dequantize`` to FP32, with ``W`` zero-padded along
``in_features`` as the forward pads it (double-block specs need multiples of 128) and, with
``autocast_dtype``, cast as the forward's autocast casts it. Recipes never quantize the forward
stochastically (``Recipe`` refuses it), so ``Q`` is deterministic. For a layer with OutControl (``tetrajet_v2_full``)
``Q`` is that layer's forward weight: its channels in the layer's descending-norm order, the outlier channels in
MXFP8 (or bf16) once selected (``outcontrol_gemms.forward_weight_dequantized``).

Memory held per tracked weight element during a window (nothing outside windows; the transient
full-size quantization of each tracked step comes on top):

- full variant: the previous weight (its own dtype), ``D_q`` and ``D_w`` (FP32) and the packed
  quantization of the previous weight (``spec.bytes_per_element``: 0.5625 B, 0.59375 B for
  double-block specs, plus 4 B per tensor for a per-tensor scale), so that each tracked step
  quantizes once: **12.59375 B** for FP32 master weights under ``tetrajet_v2`` (12.5625 B under
  ``nvidia``; bf16 masters: 2 B less). TetraJet-v2's code holds 12 B and quantizes the previous
  weight again on every tracked step. Weights whose ``in_features`` the forward pads (double-block
  specs need multiples of 128) hold the packed quantization of the padded weight. OutControl layers hold
  ``Q`` of the previous weight in FP32 (4 B): **16 B** for FP32 master weights.
- memory-efficient variant: ``ceil(sample_fraction * numel)`` sampled elements, each with an int32
  index (int64 for tensors of 2**31 elements or more), the previous weight (its dtype), the previous
  quantized value, ``D_q`` and ``D_w`` (FP32): 20 B per sampled FP32 element, **2.0 B per weight** at
  ``sample_fraction=0.1`` (TetraJet-v2's code: 2.4 B, with int64 indices).

:meth:`OsciReset.bytes_held` reports the bytes actually held, :meth:`OsciReset.bytes_bound` the maximum
above for this model and :meth:`OsciReset.bytes_per_weight` that maximum per tracked weight element.

The memory-efficient variant's sample is chosen and read in ``osci_sample.py``; the checks on the settings,
the hook's handle and the ``state_dict`` format are in ``osci_state.py``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn as nn

from . import dispatch
from .eligibility import LayerFilter, SkipRule, linear_layer_names, warn_unmatched_patterns
from .format import NVFP4
from .osci_layers import (
    TrackedLayer,
    discover_layers,
    forward_weight,
    forward_weight_spec,
    named_layers,
    quantize_weight,
    unwrap_model,
)
from .osci_sample import dequantize_at as _dequantize_at  # the name it had here (tests import it)
from .osci_sample import edge_score, sample_size
from .osci_shards import (
    check_shardable,
    full_from_local,
    full_weight,
    is_sharded,
    local_part,
    local_rows,
    local_weight,
)
from .osci_state import CONFIG_KEYS, HookHandle, build_state_dict, check_settings, restore_state
from .outlier_channels import OutControl
from .recipe import Recipe

__all__ = ["OsciReset"]

log = logging.getLogger(__name__)


class OsciReset:
    """Detect weights whose forward quantization oscillates and reset them to their quantized value.

    Args:
        model: an ``nn.Module``: plain, compiled with ``torch.compile`` (its ``_orig_mod`` is used; the
            parameters are the same objects) or with linears converted to
            :class:`~fp4compile.nn.NVFP4Linear` (``torchao``'s ``quantize_`` with ``NVFP4Config``).
        recipe: a preset name or :class:`Recipe`: the forward weight quantizer ``recipe.fwd_w`` of
            plain ``nn.Linear`` weights. ``NVFP4Linear`` layers use their own recipe. For a model compiled
            with ``backend="nvfp4"``, pass the recipe of its ``options`` (``Q`` is the forward's quantizer).
        start: step index of the first snapshot (non-negative); TetraJet-v2 starts at ~60-70% of training.
        period: steps between snapshots (TetraJet-v2: 200, 400 for its largest model).
        window: tracked steps after each snapshot (TetraJet-v2: 50); must be smaller than ``period``
            (the reset comes after step ``snapshot + window + 1``).
        threshold: reset where ``D_q / D_w >= threshold`` (TetraJet-v2: 8; its code default 16).
        memory_efficient: track only the ``sample_fraction`` of each weight's elements closest to a
            rounding edge at the snapshot (TetraJet-v2's ``distance_ratio_memeff``).
        sample_fraction: in (0, 1]; used by the memory-efficient variant.
        skip: layers kept in high precision, as the backend's ``skip`` option (pass the same):
            ``fnmatch`` patterns of module FQNs, callables ``(fqn, module) -> bool``, or both. A
            pattern that matches no ``nn.Linear`` of the model is warned about.
        autocast_dtype: when the forward runs under ``torch.autocast`` (e.g. ``torch.bfloat16``), the
            dtype the forward casts the weights to before quantizing them; ``Q`` then quantizes
            ``W.to(autocast_dtype)`` as the forward does. None (default): the weights' own dtype.
        weights: parameter FQNs (e.g. ``["blocks.0.attn.w_qkv"]``) to track instead of
            discovering them, for weights the ``nvfp4`` backend rewrites outside ``nn.Linear``
            (``x @ w.t()``; ``fp4compile.explain`` lists them). Quantized with ``recipe``.

    Under FSDP2 (DTensor weights sharded by rows) ``Q`` quantizes the whole, all-gathered weight, the window
    state covers the local rows and each rank resets its own rows (``osci_shards.py``); every rank must call
    :meth:`on_step` (the registered hook does).

    Which weights are tracked (without ``weights``): if the model holds ``NVFP4Linear`` layers, those
    whose recipe quantizes (the conversion kept the remaining ``nn.Linear`` in high precision on
    purpose); otherwise every ``nn.Linear`` whose in and out features are multiples of 16, whose
    weight is bfloat16, float16 or float32 and whose FQN matches neither ``recipe.keep_high_precision``
    (``lm_head``) nor ``skip``. FQNs are the module's own, without ``_orig_mod`` components.
    A parameter shared by several linears is tracked once.

    Raises:
        ValueError: bad hyperparameters, an unknown recipe, a recipe that quantizes nothing or
            quantizes the forward weight stochastically, a compile-time recipe mismatch, or a model
            with no eligible weight.
        TypeError: ``model`` is not an ``nn.Module``, ``recipe`` is neither a name nor a Recipe.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Union[str, Recipe] = "tetrajet_v2",
        *,
        start: int,
        period: int = 200,
        window: int = 50,
        threshold: float = 8.0,
        memory_efficient: bool = False,
        sample_fraction: float = 0.1,
        skip: SkipRule = (),
        autocast_dtype: Optional[torch.dtype] = None,
        weights: Optional[Sequence[str]] = None,
    ) -> None:
        check_settings(start, period, window, threshold, memory_efficient, sample_fraction, autocast_dtype)
        skip = LayerFilter.parse(skip, what="OsciReset skip")
        if not isinstance(model, nn.Module):
            raise TypeError(f"OsciReset expects an nn.Module, got {type(model).__name__}")
        resolved = Recipe.resolve(recipe)
        forward_weight_spec(resolved)  # the recipe must quantize the forward weight deterministically
        self.recipe = resolved
        self.start = int(start)
        self.period = int(period)
        self.window = int(window)
        self.threshold = float(threshold)
        self.memory_efficient = memory_efficient
        self.sample_fraction = float(sample_fraction)
        self.autocast_dtype = autocast_dtype
        self._step = 0
        self._history: list[dict[str, Any]] = []
        self._handle: Optional[HookHandle] = None

        root = unwrap_model(model)
        if weights is not None:
            layers = named_layers(root, weights, resolved)
        else:
            linears, names = linear_layer_names(root.named_modules())
            warn_unmatched_patterns(skip, linears, "OsciReset", candidates=names)
            layers = discover_layers(root, resolved, skip)
        for layer in layers:
            check_shardable(layer.param, layer.fqn)
        if not layers:
            raise ValueError(
                f"OsciReset found no eligible weight in {type(root).__name__}: it tracks nn.Linear layers (or "
                "NVFP4Linear) with in and out features multiples of 16, a float weight and an FQN not kept in "
                f"high precision by {resolved.keep_high_precision + skip.patterns + skip.callables}; pass "
                "weights=[...] to name them"
            )
        self._layers: dict[str, TrackedLayer] = {layer.fqn: layer for layer in layers}

    # ------------------------------------------------------------------ public queries
    @property
    def layers(self) -> dict[str, str]:
        """The tracked weights: parameter FQN -> the name of the recipe whose ``fwd_w`` quantizes it."""
        return {fqn: layer.recipe for fqn, layer in self._layers.items()}

    @property
    def step(self) -> int:
        """The index the next optimizer step will have (the number of steps seen so far)."""
        return self._step

    def schedule(self, step: int) -> tuple[str, ...]:
        """What the hook does after optimizer step ``step``: ``()`` (nothing), ``("snapshot",)``,
        ``("track",)``, ``("reset",)`` or ``("reset", "snapshot")`` (when ``window + 1 == period``)."""
        if step < self.start:
            return ()
        offset = (step - self.start) % self.period
        if offset == 0:
            return ("reset", "snapshot") if self.window + 1 == self.period and step > self.start else ("snapshot",)
        if offset <= self.window:
            return ("track",)
        if offset == self.window + 1:
            return ("reset",)
        return ()

    @property
    def history(self) -> list[dict[str, Any]]:
        """One report per reset, oldest first (a copy); see :meth:`last_report`."""
        return copy.deepcopy(self._history)

    def last_report(self) -> Optional[dict[str, Any]]:
        """The report of the latest reset, or None before the first.

        ``{"step": i, "tracked": n, "reset": k, "layers": {fqn: {"tracked": n_l, "reset": k_l}}}``: per
        layer, the number of weight elements tracked in the window (all of them, or the sample) and reset.
        """
        return copy.deepcopy(self._history[-1]) if self._history else None

    def bytes_held(self) -> int:
        """Bytes of the window state held now (0 outside windows)."""
        total = 0
        for layer in self._layers.values():
            total += sum(t.numel() * t.element_size() for t in layer.state.values())
            if isinstance(layer.q_prev, torch.Tensor):  # an OutControl layer's FP32 Q(previous weight)
                total += layer.q_prev.numel() * layer.q_prev.element_size()
            elif layer.q_prev is not None:
                q = layer.q_prev
                total += sum(t.numel() * t.element_size() for t in (q.codes, q.scales, q.outer))
        return total

    def bytes_bound(self) -> int:
        """The most bytes the window state holds for this model (see the module docstring for the formulas)."""
        total = 0
        for layer in self._layers.values():
            itemsize = layer.param.element_size()
            if self.memory_efficient:
                index_size = 4 if layer.numel < 2**31 else 8
                total += sample_size(layer.numel, self.sample_fraction) * (index_size + itemsize + 12)
            elif isinstance(Recipe.named(layer.recipe).outliers, OutControl):  # Q(previous weight) in FP32
                total += layer.numel * (itemsize + 8 + 4)
            else:
                rows = layer.param.shape[0]
                packed = rows * layer.k_padded // 2 + rows * layer.k_padded // 16
                packed += 4 * rows * layer.k_padded // 128 if layer.spec.outer == "block128" else 4
                total += layer.numel * (itemsize + 8) + packed
        return total

    def bytes_per_weight(self) -> float:
        """:meth:`bytes_bound` per tracked weight element (e.g. 12.59375 full, 2.0 memory-efficient at 10%, FP32)."""
        return self.bytes_bound() / sum(layer.numel for layer in self._layers.values())

    def __repr__(self) -> str:
        variant = f"memory_efficient, sample_fraction={self.sample_fraction:g}" if self.memory_efficient else "full"
        return (
            f"OsciReset(recipe={self.recipe.name!r}, start={self.start}, period={self.period}, window={self.window}, "
            f"threshold={self.threshold:g}, {variant}, {len(self._layers)} weights, step={self._step})"
        )

    # ------------------------------------------------------------------ hooking
    def register(self, optimizer: torch.optim.Optimizer) -> HookHandle:
        """Run :meth:`on_step` after every ``optimizer.step()`` (``register_step_post_hook``).

        Tracked weights that ``optimizer`` does not update are dropped (they cannot move). Returns a
        handle whose ``remove()`` unregisters the hook. Raises ``RuntimeError`` when already registered
        and ``ValueError`` when the optimizer updates none of the tracked weights.
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"register expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._handle is not None:
            raise RuntimeError("this OsciReset is already registered; call handle.remove() first")
        updated = {id(p) for group in optimizer.param_groups for p in group["params"]}
        kept = {fqn: layer for fqn, layer in self._layers.items() if id(layer.param) in updated}
        if not kept:
            raise ValueError(f"the optimizer updates none of the tracked weights {sorted(self._layers)}")
        dropped = sorted(set(self._layers) - set(kept))
        if dropped:
            log.info("OsciReset: the optimizer does not update %s; not tracking them", ", ".join(dropped))
        self._layers = kept
        self._handle = HookHandle(self, optimizer.register_step_post_hook(self._hook))
        return self._handle

    def _hook(self, optimizer, args, kwargs) -> None:
        self.on_step()

    def on_step(self) -> None:
        """Advance the schedule by one optimizer step (what the registered hook calls after each step).

        Call it yourself, instead of :meth:`register`, if the weights are updated some other way;
        never both.
        """
        step = self._step
        self._step += 1
        actions = self.schedule(step)
        if not actions:
            return
        with torch.no_grad():
            for action in actions:
                if action == "snapshot":
                    self._snapshot()
                elif action == "track":
                    self._track()
                else:
                    self._reset(step)

    # ------------------------------------------------------------------ the three actions
    def _quantize(self, layer: TrackedLayer, weight: Optional[torch.Tensor] = None) -> Union[NVFP4, torch.Tensor]:
        """``Q`` of the layer's whole current weight (or of ``weight``), as the forward computes it: packed, or
        for an OutControl layer FP32 in the original channel order (``osci_layers.forward_weight``)."""
        return forward_weight(full_weight(layer.param) if weight is None else weight, layer, self.autocast_dtype)

    def _dequantized(self, layer: TrackedLayer, q: Union[NVFP4, torch.Tensor]) -> torch.Tensor:
        """FP32 ``Q(W)`` of this rank's rows (all rows unless sharded) from ``Q`` of the whole weight (padding
        cropped). On a GPU one Triton decode (bit-identical to ``q.dequantize``)."""
        full = q if isinstance(q, torch.Tensor) else dispatch.dequantize(q, layer.in_features)
        return local_part(full, layer.param)

    @staticmethod
    def _values_at(q: Union[NVFP4, torch.Tensor], index: torch.Tensor, in_features: int) -> torch.Tensor:
        """FP32 ``Q(W)`` at flat ``index`` into the whole [out, in_features] weight."""
        if isinstance(q, torch.Tensor):
            return q.reshape(-1)[index]
        return _dequantize_at(q, index, in_features)

    def _flat_offset(self, layer: TrackedLayer) -> int:
        """Flat index of this rank's first element in the whole weight (0 unless sharded)."""
        return local_rows(layer.param)[0] * layer.in_features

    def _snapshot(self) -> None:
        for layer in self._layers.values():
            w = local_weight(layer.param)
            q = self._quantize(layer)
            if not self.memory_efficient:
                layer.state = {
                    "prev": w.clone(memory_format=torch.contiguous_format),
                    "d_q": torch.zeros(w.shape, dtype=torch.float32, device=w.device),
                    "d_w": torch.zeros(w.shape, dtype=torch.float32, device=w.device),
                }
                layer.q_prev = q
                continue
            # The sample favours weights next to a rounding edge of the FP4 grid (for an OutControl layer, of the
            # plain forward quantizer's grid: an approximation for choosing the sample only).
            plain = q if isinstance(q, NVFP4) else quantize_weight(full_weight(layer.param), layer, self.autocast_dtype)
            score = edge_score(layer, plain, self.autocast_dtype)
            k = sample_size(layer.numel, self.sample_fraction)
            index = torch.topk(score.reshape(-1), k, sorted=False).indices.sort().values
            if is_sharded(layer.param):  # this rank's share of the sample, as flat indices into its rows
                offset = self._flat_offset(layer)
                index = index[(index >= offset) & (index < offset + w.numel())] - offset
                k = index.numel()
            index = index.to(torch.int32 if layer.numel < 2**31 else torch.int64)
            layer.state = {
                "index": index,
                "prev": w.reshape(-1)[index],
                "prev_q": self._values_at(q, index + self._flat_offset(layer), layer.in_features),
                "d_q": torch.zeros(k, dtype=torch.float32, device=w.device),
                "d_w": torch.zeros(k, dtype=torch.float32, device=w.device),
            }
            layer.q_prev = None

    def _track(self) -> None:
        for layer in self._layers.values():
            if not layer.state:
                continue  # no snapshot in this window (e.g. registered mid-window): nothing to accumulate
            state = layer.state
            w = local_weight(layer.param)
            q = self._quantize(layer)
            if not self.memory_efficient:
                if layer.q_prev is None:  # after load_state_dict: Q(prev) again, bit for bit what it was
                    prev = full_from_local(state["prev"], layer.param)
                    layer.q_prev = self._quantize(layer, prev)
                deq, deq_prev = self._dequantized(layer, q), self._dequantized(layer, layer.q_prev)
                dispatch.osci_track_update(w, state["prev"], deq, deq_prev, state["d_q"], state["d_w"])
                layer.q_prev = q
                continue
            index = state["index"]
            current = w.reshape(-1)[index]
            current_q = self._values_at(q, index + self._flat_offset(layer), layer.in_features)
            state["d_q"].add_((current_q - state["prev_q"]).abs())
            state["d_w"].add_((current.to(torch.float32) - state["prev"].to(torch.float32)).abs())
            state["prev"].copy_(current)
            state["prev_q"].copy_(current_q)

    def _reset(self, step: int) -> None:
        counts: dict[str, tuple[int, torch.Tensor]] = {}
        sharded: list[str] = []
        for fqn, layer in self._layers.items():
            if not layer.state:
                continue
            state = layer.state
            d_q, d_w = state["d_q"], state["d_w"]
            ratio = torch.where(d_w > 0, d_q / d_w, torch.zeros((), dtype=d_q.dtype, device=d_q.device))
            mask = ratio >= self.threshold
            w = local_weight(layer.param)
            q = self._quantize(layer)
            if not self.memory_efficient:
                target = self._dequantized(layer, q).to(w.dtype)
                w.copy_(torch.where(mask, target, w))
            else:
                index = state["index"][mask]
                values = self._values_at(q, index + self._flat_offset(layer), layer.in_features).to(w.dtype)
                if w.is_contiguous():
                    w.view(-1)[index] = values
                else:
                    flat = w.detach().reshape(-1).clone()
                    flat[index] = values
                    w.copy_(flat.view_as(w))
            tracked = sample_size(layer.numel, self.sample_fraction) if self.memory_efficient else layer.numel
            counts[fqn] = (tracked, mask.sum())
            if is_sharded(layer.param):
                sharded.append(fqn)
            layer.state = {}
            layer.q_prev = None
        if not counts:
            return
        if sharded:  # every rank reset its own rows: the layer's count is their sum (same order on all ranks)
            import torch.distributed as dist

            summed = torch.stack([counts[fqn][1] for fqn in sharded])
            dist.all_reduce(summed)
            for fqn, total in zip(sharded, summed):
                counts[fqn] = (counts[fqn][0], total)
        resets = torch.stack([c for _, c in counts.values()]).tolist()  # one host sync per reset step
        report_layers = {
            fqn: {"tracked": tracked, "reset": int(n)} for (fqn, (tracked, _)), n in zip(counts.items(), resets)
        }
        tracked_total = sum(r["tracked"] for r in report_layers.values())
        reset_total = sum(r["reset"] for r in report_layers.values())
        self._history.append({"step": step, "tracked": tracked_total, "reset": reset_total, "layers": report_layers})
        log.info(
            "OsciReset step %d: reset %d of %d tracked weights (%.4g%%) in %d of %d layers (threshold %g, window %d)",
            step,
            reset_total,
            tracked_total,
            100.0 * reset_total / max(tracked_total, 1),
            sum(1 for r in report_layers.values() if r["reset"]),
            len(report_layers),
            self.threshold,
            self.window,
        )
        for fqn, r in report_layers.items():
            log.debug("OsciReset step %d: %s reset %d of %d", step, fqn, r["reset"], r["tracked"])

    # ------------------------------------------------------------------ checkpointing
    def _config(self) -> dict[str, Any]:
        """The settings a :meth:`state_dict` records: the recipe's name and ``osci_state.CONFIG_KEYS``."""
        return {"recipe": self.recipe.name, **{key: getattr(self, key) for key in CONFIG_KEYS}}

    def state_dict(self) -> dict[str, Any]:
        """The step counter, the live window state per parameter FQN and the reset history.

        Tensors are the live ones (like ``Optimizer.state_dict``): save the dict right away
        (``torch.save``) or deep-copy it. The packed ``Q(previous weight)`` of the full variant is
        not saved; it is recomputed, bit-identical, on the first tracked step after loading.
        """
        return build_state_dict(self._step, self._config(), self._layers, self._history)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into this OsciReset (same schedule, same tracked weights).

        Tensors move to their weight's device. Raises ``ValueError`` when the schedule or variant
        differs, or a layer is unknown or has mismatched shapes. ``threshold`` may differ (the new one applies).
        """
        step, restored = restore_state(state_dict, self._config(), self._layers)
        self._step = step
        for fqn, layer in self._layers.items():
            layer.state = restored.get(fqn, {})
            layer.q_prev = None
        self._history = copy.deepcopy(list(state_dict.get("history", [])))
