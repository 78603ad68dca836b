"""Outlier-channel state across a model: attach it before loading a checkpoint, and report the selection.

``backend="nvfp4"`` attaches each layer's :class:`~fp4compile.outlier_channels.OutlierState` (buffers
``outlier_<field>`` of the ``nn.Linear``) when it first compiles the layer, and ``NVFP4Linear`` holds
one from construction. To resume a run, attach the state first so that ``load_state_dict`` finds the
buffers: ``fp4compile.attach_outlier_state(model, recipe)`` then ``model.load_state_dict(...)``.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from .eligibility import LayerFilter, SkipRule, normalize_fqn, relative_names, why_not_nvfp4
from .outlier_channels import attach_state, module_state, selected_channels
from .recipe import Recipe

__all__ = ["attach_outlier_state", "outlier_channels"]


def _layers(model: nn.Module, recipe: Recipe, skip: LayerFilter):
    """``(fqn, module)`` of the linears ``backend="nvfp4"`` quantizes with ``recipe`` (and ``skip``)."""
    from .nn import NVFP4Linear

    patterns = LayerFilter(tuple(recipe.keep_high_precision)) + skip
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, NVFP4Linear):
            continue
        names = relative_names(name)
        if patterns.match(names + tuple(n + ".weight" for n in names), normalize_fqn(name), module):
            continue
        if why_not_nvfp4(module.out_features, module.in_features, module.weight.dtype) is None:
            yield normalize_fqn(name), module


def attach_outlier_state(model: nn.Module, recipe: Union[str, Recipe], skip: SkipRule = ()) -> list[str]:
    """Register the outlier-channel state on every linear ``backend="nvfp4"`` would quantize with ``recipe``
    (the same ``skip`` as its options), where it is missing; returns their FQNs. Call it before
    ``load_state_dict`` when resuming a run whose recipe has ``outliers``."""
    recipe = Recipe.resolve(recipe)
    if recipe.outliers is None:
        raise ValueError(f"recipe {recipe.name!r} has no outliers option: there is no outlier-channel state")
    attached = []
    for fqn, module in _layers(model, recipe, LayerFilter.parse(skip, what="attach_outlier_state skip")):
        attach_state(module, recipe.outliers)
        attached.append(fqn)
    return attached


def outlier_channels(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer FQN: its outlier input channels}`` (int64, descending norm; empty before the selection) for every
    layer holding outlier state. Reads the state back (host syncs): for reports, not inside the training step."""
    from .nn import NVFP4Linear

    report = {}
    for name, module in model.named_modules():
        state = module_state(module)
        if state is None:
            continue
        if isinstance(module, NVFP4Linear):
            control = Recipe.named(module.recipe).outliers
        else:
            control = getattr(module, "outlier_control", None)
        if control is None:  # state loaded into a module nothing has attached it to: use attach_outlier_state
            raise ValueError(f"{normalize_fqn(name)!r} holds outlier state of an unknown OutControl; call "
                             "fp4compile.attach_outlier_state(model, recipe) first")  # fmt: skip
        report[normalize_fqn(name)] = selected_channels(state, control)
    return report
