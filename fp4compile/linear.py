"""``nvfp4_linear``: ``F.linear`` whose forward and backward GEMMs run in NVFP4.

The public entry point: it checks the inputs, applies autocast as ``F.linear`` would, and calls
the ``fp4compile::linear`` op (``ops.py``), whose forward and backward are the three GEMMs of
``linear_gemms.py``. ``ops.py`` is imported on first use, so that ``import fp4compile``
registers no op.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from .eligibility import FLOAT_DTYPES, why_not_nvfp4
from .outlier_channels import HotChannelPatch, HotState, OutlierState, observe, state_type, update_hot
from .recipe import Recipe
from .shared_quantization import flattened

__all__ = ["nvfp4_linear"]


# ----------------------------------------------------------------------------- public entry point
def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"nvfp4_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"nvfp4_linear: {name} must be bfloat16, float16 or float32, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"nvfp4_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"nvfp4_linear: x's last dim must equal weight's in_features; got x {tuple(x.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if x.dtype != weight.dtype:
        raise TypeError(
            f"nvfp4_linear: x is {x.dtype} but weight is {weight.dtype}; cast one (e.g. under torch.autocast, "
            "or weight.to(x.dtype))"
        )
    out_features, in_features = weight.shape
    reason = why_not_nvfp4(out_features, in_features)
    if reason is not None:
        raise ValueError(
            f"nvfp4_linear: {reason} (NVFP4 blocks are 16 wide along every GEMM's K, so in and out features must "
            "be positive multiples of 16); keep this layer in high precision"
        )
    if bias is not None and (bias.shape != (out_features,) or bias.dtype != weight.dtype):
        raise ValueError(
            f"nvfp4_linear: bias must be [{out_features}] of {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}"
        )
    if x.device != weight.device or (bias is not None and bias.device != weight.device):
        raise ValueError("nvfp4_linear: x, weight and bias must be on the same device")


def _autocast_inputs(x, weight, bias):
    """Cast float inputs to the active autocast dtype of x's device (what autocast does for ``F.linear``)."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(x.device.type)

    def cast(t):
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES else t

    return cast(x), cast(weight), cast(bias)


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    recipe="nvidia",
    outlier_state: Optional[Union[OutlierState, HotState]] = None,
) -> torch.Tensor:
    """``F.linear`` with NVFP4 forward and backward GEMMs quantized per ``recipe``.

    Args:
        x: [..., in] bfloat16, float16 or float32.
        weight: [out, in] of x's dtype; in and out multiples of 16.
        bias: optional [out].
        recipe: a :class:`Recipe` or a preset name (``Recipe.names()``); ``"bf16"`` is plain ``F.linear``.
        outlier_state: the layer's state (``outlier_channels.new_state(in_features, device, recipe.outliers)``),
            required by recipes with ``outliers`` (``NVFP4Linear`` passes its own); with grad enabled each call
            updates it (OutControl records X; the Hot-Channel Patch re-scores every ``period`` calls).

    Under ``torch.autocast`` the inputs are cast to the autocast dtype first, as ``F.linear`` would be.

    Returns:
        [..., out] in x's dtype. Differentiable in x, weight and bias; the backward keeps only
        the quantized forward tensors (see ``linear.py``). Works under ``torch.compile``.
    """
    recipe = Recipe.resolve(recipe)
    x, weight, bias = _autocast_inputs(x, weight, bias)
    _check(x, weight, bias)
    if not recipe.quantized:
        return F.linear(x, weight, bias)
    from . import ops  # noqa: F401  (registers the fp4compile:: ops on first use)

    x2 = flattened(x)  # one view per traced x: linears reading the same x share its quantization
    if recipe.outliers is None:
        if outlier_state is not None:
            raise ValueError(f"nvfp4_linear: recipe {recipe.name!r} has no outliers option; pass no outlier_state")
        y = ops.linear(x2, weight, bias, recipe.name)[0]
    else:
        control = recipe.outliers
        if not isinstance(outlier_state, state_type(control)):
            raise ValueError(
                f"nvfp4_linear: recipe {recipe.name!r} keeps outlier channels, which needs the layer's state: pass "
                "outlier_state=fp4compile.outlier_channels.new_state(in_features, device, recipe.outliers) "
                "(NVFP4Linear holds one)"
            )
        if isinstance(control, HotChannelPatch):
            outputs = ops.hot_linear(x2, weight, bias, outlier_state.index, recipe.name)
            y = outputs[0]
            if torch.is_grad_enabled():  # the scores of this forward choose the hot channels of the next ones
                update_hot(outputs[-1], outlier_state, control)
        else:
            if torch.is_grad_enabled():  # a training forward: record X first (the window's last one selects)
                observe(x2, outlier_state, control)
            y = ops.outlier_linear(x2, weight, bias, outlier_state.order, outlier_state.selected, recipe.name)[0]
    return y.view(*x.shape[:-1], weight.shape[0])
