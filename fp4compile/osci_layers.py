"""Which weights OsciReset tracks, and ``Q``, the forward weight quantizer it compares them with.

Discovery walks the model's own modules (``named_modules()``, names without ``_orig_mod``) under the
shared eligibility rule and skip filter (``eligibility.py``): the ``NVFP4Linear`` layers of a model
converted by ``quantize_``, or else every eligible ``nn.Linear`` the recipe and ``skip`` do not keep
in high precision. ``Q`` is exactly the forward's: the recipe's ``fwd_w`` on the weight zero-padded
along ``in_features`` as the forward pads it, cast as the forward's autocast casts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .eligibility import LayerFilter, normalize_fqn, relative_names, why_not_nvfp4
from .format import NVFP4
from .outlier_channels import OutControl, OutlierState, module_state
from .quantize import quantize
from .recipe import Recipe
from .spec import QuantSpec

__all__ = [
    "TrackedLayer",
    "discover_layers",
    "eligible_weight",
    "forward_weight",
    "forward_weight_spec",
    "is_converted",
    "make_layer",
    "named_layers",
    "outcontrol_state",
    "quantize_weight",
    "quantized_linears",
    "unwrap_model",
]


@dataclass
class TrackedLayer:
    """One tracked weight: its parameter, forward quantizer and the live window state."""

    fqn: str
    param: torch.Tensor
    spec: QuantSpec
    recipe: str
    k_padded: int
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # full variant: Q(previous weight), derivable from state["prev"]: packed, or FP32 for an OutControl layer
    q_prev: Optional[Union[NVFP4, torch.Tensor]] = None
    module: Optional[nn.Module] = None  # the linear holding OutControl's channel state (OutControl recipes only)

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def in_features(self) -> int:
        return self.param.shape[1]


def forward_weight_spec(recipe: Recipe) -> QuantSpec:
    """``recipe.fwd_w``, checked to be a deterministic quantizer without rotation."""
    if not recipe.quantized:
        raise ValueError(f"recipe {recipe.name!r} quantizes nothing: no weight can oscillate across an FP4 grid")
    spec = recipe.fwd_w
    if not isinstance(spec, QuantSpec):
        raise ValueError(
            f"recipe {recipe.name!r} quantizes the forward weight as {spec.short_str()} (Wang et al.'s format), not "
            "NVFP4: OsciReset tracks weights on the NVFP4 grid of an NVFP4 recipe's fwd_w"
        )
    if spec.stochastic:
        raise ValueError(
            f"recipe {recipe.name!r} quantizes the forward weight stochastically ({spec.short_str()}): OsciReset needs "
            "the deterministic forward quantization Q (give the recipe an RTN fwd_w)"
        )
    if spec.rotation != "none":
        raise ValueError(
            f"recipe {recipe.name!r} rotates the forward weight ({spec.rotation}); OsciReset needs Q(W) in W's basis"
        )
    return spec


def quantize_weight(w: torch.Tensor, layer: TrackedLayer, autocast_dtype: Optional[torch.dtype]) -> NVFP4:
    """The forward's quantization of weight values ``w``: autocast cast, K zero-padded, ``recipe.fwd_w``.

    ``quantize`` is looked up in this module at call time (tests count the calls). ``validate=False``
    avoids a host sync per call; a non-finite weight then gives NaN distances, which never reset it.
    """
    if autocast_dtype is not None:
        w = w.to(autocast_dtype)
    if layer.k_padded != w.shape[1]:
        w = F.pad(w, (0, layer.k_padded - w.shape[1]))
    return quantize(w.contiguous(), layer.spec, validate=False)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under ``torch.compile`` (``OptimizedModule._orig_mod``) and DDP / DataParallel wrappers."""
    from torch._dynamo.eval_frame import OptimizedModule

    for _ in range(16):
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def make_layer(fqn: str, param: torch.Tensor, recipe: Recipe, module: Optional[nn.Module] = None) -> TrackedLayer:
    spec = forward_weight_spec(recipe)
    k_multiple = max(recipe.fwd_x.k_multiple, spec.k_multiple)  # the forward pads K for both operands alike
    in_features = param.shape[1]
    return TrackedLayer(
        fqn=fqn,
        param=param,
        spec=spec,
        recipe=recipe.name,
        k_padded=(in_features + k_multiple - 1) // k_multiple * k_multiple,
        module=module if isinstance(recipe.outliers, OutControl) else None,
    )


def outcontrol_state(layer: TrackedLayer) -> Optional[OutlierState]:
    """The OutControl state of the layer's linear (its channel order and whether it is selected), or None: not an
    OutControl layer, or one whose forward has not run yet (the state is attached by the first forward)."""
    state = module_state(layer.module) if layer.module is not None else None
    return state if isinstance(state, OutlierState) else None


def forward_weight(w: torch.Tensor, layer: TrackedLayer, autocast_dtype: Optional[torch.dtype]):
    """``Q(w)`` as the forward computes it: :func:`quantize_weight`'s packed quantization, or for a layer with
    OutControl's state the dequantized FP32 weight of its forward (channels in ``order``, the outlier channels
    in their format once selected; ``outcontrol_gemms.forward_weight_dequantized``)."""
    state = outcontrol_state(layer)
    if state is None:
        return quantize_weight(w, layer, autocast_dtype)
    from .outcontrol_gemms import forward_weight_dequantized

    if autocast_dtype is not None:
        w = w.to(autocast_dtype)
    return forward_weight_dequantized(w, state.order, state.selected, Recipe.named(layer.recipe))


def eligible_weight(weight: Optional[torch.Tensor]) -> bool:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return False
    return why_not_nvfp4(*weight.shape, weight.dtype) is None


def is_converted(root: nn.Module) -> bool:
    """Whether the model holds ``NVFP4Linear`` layers (converted, e.g. by torchao's ``quantize_``)."""
    from .nn import NVFP4Linear

    return any(isinstance(m, NVFP4Linear) for m in root.modules())


def quantized_linears(root: nn.Module, recipe: Recipe, skip: LayerFilter) -> list[tuple[str, nn.Module, Recipe]]:
    """``(FQN, module, recipe)`` of every linear layer of ``root`` that trains in NVFP4, each weight once: the
    ``NVFP4Linear`` layers of a converted model (their own recipes; only ``skip`` applies), or else every eligible
    ``nn.Linear`` that ``recipe`` and ``skip`` do not keep in high precision."""
    from .nn import NVFP4Linear

    converted = is_converted(root)
    patterns = LayerFilter(tuple(recipe.keep_high_precision)) + skip
    found: list[tuple[str, nn.Module, Recipe]] = []
    seen: set[int] = set()
    for name, module in root.named_modules():
        names = relative_names(name)
        names += tuple(n + ".weight" for n in names)
        if converted:  # NVFP4Linear layers are quantized whatever their name; only ``skip`` applies
            if not isinstance(module, NVFP4Linear) or skip.match(names, normalize_fqn(name), module):
                continue
            layer_recipe = Recipe.named(module.recipe)
            if not layer_recipe.quantized:
                continue
        else:
            if not isinstance(module, nn.Linear) or patterns.match(names, normalize_fqn(name), module):
                continue
            layer_recipe = recipe
        weight = module.weight
        if not eligible_weight(weight) or id(weight) in seen:
            continue
        seen.add(id(weight))
        found.append((normalize_fqn(name), module, layer_recipe))
    return found


def discover_layers(root: nn.Module, recipe: Recipe, skip: LayerFilter) -> list[TrackedLayer]:
    return [
        make_layer(normalize_fqn(name + ".weight" if name else "weight"), module.weight, layer_recipe, module)
        for name, module, layer_recipe in quantized_linears(root, recipe, skip)
    ]


def named_layers(root: nn.Module, names: Sequence[str], recipe: Recipe) -> list[TrackedLayer]:
    if isinstance(names, str):
        names = (names,)
    params = {normalize_fqn(n): p for n, p in root.named_parameters()}
    modules = {normalize_fqn(n): m for n, m in root.named_modules()}
    layers: list[TrackedLayer] = []
    seen: set[int] = set()
    for name in names:
        param = params.get(normalize_fqn(name))
        if param is None:
            raise ValueError(f"weights: the model has no parameter {name!r}")
        if not eligible_weight(param):
            raise ValueError(
                f"weights: {name!r} of shape {tuple(param.shape)} and dtype {param.dtype} is not a 2-D float weight "
                "with dims multiples of 16"
            )
        if id(param) not in seen:
            seen.add(id(param))
            owner = modules.get(normalize_fqn(name).rpartition(".")[0]) if name.endswith("weight") else None
            layers.append(make_layer(normalize_fqn(name), param, recipe, owner))
    return layers
