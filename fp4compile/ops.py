"""torch.library ops of the quantized linear layer (namespace ``fp4compile``), with fake kernels and autograd.

- ``fp4compile::linear_v4(x, weight, bias, recipe) -> (y, *saved)``: the forward; ``saved`` are the
  quantized tensors the backward needs (see ``linear_gemms.py``), returned as outputs so that
  AOTAutograd saves exactly them (never a high-precision copy of x).
- ``fp4compile::linear_backward_v4(dy, weight, *saved, recipe, has_bias) -> (dx, dweight, dbias)``.
- ``outlier_linear`` / ``outlier_linear_backward`` (OutControl) and ``hot_linear`` (the Hot-Channel Patch).

(``_v4``: :data:`~fp4compile.schema.SCHEMA_VERSION`.)

Each op is a ``torch.library.triton_op``: on CUDA its body is the layer's own code (``linear_gemms.py``,
``outcontrol_gemms.py``, ``hcp_gemms.py``), whose Triton kernels are launched through ``wrap_triton`` while
AOTAutograd traces it (``kernels/launch.py``), so that under
``torch.compile`` the op decomposes into the quantize and decode kernels (launched by Inductor's generated
code), the GEMM (with Inductor, a launch of the TMA kernel that its generated code makes,
``kernels/gemm_traced.py``; otherwise the opaque GEMM op, ``kernels/gemm_op.py``) and ordinary ops that Inductor
fuses with their neighbours. Elsewhere (the reference on the CPU; Wang et al.'s layout, see
``dispatch.decomposes``) the body calls ``<name>_reference_v4``, an opaque custom op: the reference draws its
Philox seed on the host and must not be traced or recompiled.

The recipe travels by name (``Recipe.register`` makes custom recipes reachable). Importing this
module registers the ops; ``import fp4compile`` alone does not import it.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch import Tensor

from . import hcp_gemms, outcontrol_gemms
from .dispatch import decomposes
from .linear_gemms import linear_backward, linear_forward, saved_shapes
from .recipe import Recipe
from .schema import SCHEMA_VERSION, op_name

__all__ = [
    "SCHEMA_VERSION",
    "hot_linear",
    "linear",
    "linear_backward_op",
    "outlier_linear",
    "outlier_linear_backward",
]

# (codes, E4M3 scale bytes, outer) of X and of W, the rotation signs, then the OCC residual's (index, value).
_SAVED_DTYPES = (
    torch.uint8, torch.uint8, torch.float32, torch.uint8, torch.uint8, torch.float32, torch.float32, torch.int64,
    torch.float32,
)  # fmt: skip


def _device_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: ``impl`` becomes the triton op ``fp4compile::<name>`` (its CUDA body) and the opaque custom op
    ``fp4compile::<name>_reference`` (what the triton op calls where it does not decompose: tensors off CUDA, and
    the recipes ``dispatch.decomposes`` names; faked by ``fake``). ``impl`` runs with autocast off: exact
    numerics, no op inside may be autocast."""

    def define(impl: Callable) -> Callable:
        @functools.wraps(impl)
        def exact(*args):
            with torch.autocast(args[0].device.type, enabled=False):
                return impl(*args)

        reference = torch.library.custom_op(op_name(f"{name}_reference"), exact, mutates_args=())
        reference.register_fake(fake)

        @functools.wraps(impl)
        def body(*args):
            recipe = Recipe.named(next(a for a in args if isinstance(a, str)))
            return exact(*args) if decomposes(args[0], recipe) else reference(*args)

        return torch.library.triton_op(op_name(name), body, mutates_args=())

    return define


def _linear_fake(x, weight, bias, recipe):
    shapes = saved_shapes(Recipe.named(recipe), x.shape[0], weight.shape[1], weight.shape[0])
    y = x.new_empty(x.shape[0], weight.shape[0])
    return (y, *(x.new_empty(s, dtype=d) for s, d in zip(shapes, _SAVED_DTYPES)))


@_device_op("linear", _linear_fake)
def linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], recipe: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Quantized ``x @ weight^T + bias`` for 2-D x, and the tensors saved for the backward."""
    return linear_forward(x, weight, bias, Recipe.named(recipe))


def _linear_backward_fake(dy, weight, *saved_and_flags):
    has_bias = saved_and_flags[-1]
    db = weight.new_empty(weight.shape[0]) if has_bias else dy.new_empty(0)
    return dy.new_empty(dy.shape[0], weight.shape[1]), weight.new_empty(weight.shape), db  # contiguous, as computed


@_device_op("linear_backward", _linear_backward_fake)
def linear_backward_op(
    dy: torch.Tensor,
    weight: torch.Tensor,
    x_codes: torch.Tensor,
    x_scales: torch.Tensor,
    x_outer: torch.Tensor,
    w_codes: torch.Tensor,
    w_scales: torch.Tensor,
    w_outer: torch.Tensor,
    signs: torch.Tensor,
    residual_index: torch.Tensor,
    residual_value: torch.Tensor,
    recipe: str,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dx, dweight, dbias)`` of ``fp4compile::linear`` (dbias empty without bias)."""
    saved = (x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, signs, residual_index, residual_value)
    return linear_backward(dy, weight, saved, Recipe.named(recipe), has_bias)


def _setup_context(ctx, inputs, output):
    x, weight, bias, recipe = inputs
    ctx.recipe = recipe
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(weight, *output[1:])


def _backward(ctx, dy, *unused_grads):
    weight, *saved = ctx.saved_tensors
    dx, dw, db = linear_backward_op(dy.contiguous(), weight, *saved, ctx.recipe, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None


linear.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- OutControl (outlier channels)
def _outlier_linear_fake(x, weight, bias, order, selected, recipe):
    r = Recipe.named(recipe)
    shapes = outcontrol_gemms.saved_shapes(r, x.shape[0], weight.shape[1], weight.shape[0])
    saved = (x.new_empty(s, dtype=d) for s, d in zip(shapes, outcontrol_gemms.saved_dtypes(r)))
    return (x.new_empty(x.shape[0], weight.shape[0]), *saved)


@_device_op("outlier_linear", _outlier_linear_fake)
def outlier_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], order: Tensor, selected: Tensor, recipe: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Quantized ``x @ weight^T + bias`` with OutControl's outlier channels (``order[:k]`` once ``selected``), and
    the tensors saved for the backward (``outcontrol_gemms.py``)."""
    return outcontrol_gemms.linear_forward(x, weight, bias, order, selected, Recipe.named(recipe))


def _outlier_linear_backward_fake(dy, weight, *rest):
    has_bias = rest[-1]
    db = weight.new_empty(weight.shape[0]) if has_bias else dy.new_empty(0)
    return dy.new_empty(dy.shape[0], weight.shape[1]), weight.new_empty(weight.shape), db


@_device_op("outlier_linear_backward", _outlier_linear_backward_fake)
def outlier_linear_backward(
    dy: Tensor,
    weight: Tensor,
    order: Tensor,
    selected: Tensor,
    x_codes: Tensor,
    x_scales: Tensor,
    x_outer: Tensor,
    w_codes: Tensor,
    w_scales: Tensor,
    w_outer: Tensor,
    outlier_values: Tensor,
    outlier_exponents: Tensor,
    recipe: str,
    has_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dx, dweight, dbias)`` of ``fp4compile::outlier_linear`` (dbias empty without bias)."""
    saved = (x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, outlier_values, outlier_exponents)
    return outcontrol_gemms.linear_backward(dy, weight, order, selected, saved, Recipe.named(recipe), has_bias)


def _outlier_setup_context(ctx, inputs, output):
    x, weight, bias, order, selected, recipe = inputs
    ctx.recipe = recipe
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(*output[1:])
    # Copies, since the layer's state tensors are updated in place by later forwards (outlier_channels.observe).
    # Converted copies: Inductor drops a clone whose source it does not see change (the update comes after the
    # graph), and then writes the state's new value into the module buffer and saves that very buffer, a saved
    # tensor that aliases a graph input; a conversion always makes a tensor of its own.
    ctx.save_for_backward(weight, order.to(torch.int32), selected.to(torch.uint8), *output[1:])


def _outlier_backward(ctx, dy, *unused_grads):
    weight, order, selected, *saved = ctx.saved_tensors
    order, selected = order.to(torch.int64), selected.to(torch.bool)
    dx, dw, db = outlier_linear_backward(dy.contiguous(), weight, order, selected, *saved, ctx.recipe, ctx.has_bias)
    return dx, dw, (db if ctx.has_bias else None), None, None, None


outlier_linear.register_autograd(_outlier_backward, setup_context=_outlier_setup_context)


# ----------------------------------------------------------------------------- Hot-Channel Patch (CHON)
def _hot_linear_fake(x, weight, bias, index, recipe):
    y, *saved = _linear_fake(x, weight, bias, recipe)
    return (y, *saved, x.new_empty(weight.shape[1], dtype=torch.float32))


@_device_op("hot_linear", _hot_linear_fake)
def hot_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], index: Tensor, recipe: str
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Quantized ``x @ weight^T + bias`` with the hot channels ``index`` patched (``hcp_gemms.py``), the plain
    recipe's saved tensors, and the channel scores."""
    return hcp_gemms.linear_forward(x, weight, bias, index, Recipe.named(recipe))


def _hot_setup_context(ctx, inputs, output):
    x, weight, bias, index, recipe = inputs
    _setup_context(ctx, (x, weight, bias, recipe), output[:-1])
    ctx.mark_non_differentiable(output[-1])


def _hot_backward(ctx, dy, *unused_grads):
    dx, dw, db, _ = _backward(ctx, dy)  # the plain recipe's backward: straight through the patch
    return dx, dw, db, None, None


hot_linear.register_autograd(_hot_backward, setup_context=_hot_setup_context)
