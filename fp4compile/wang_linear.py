"""The quantized linear layer of Wang et al.'s FP4 framework: row-scaled E2M1 forward, FP8 backward.

For recipes whose forward slots are :class:`~fp4compile.wang_format.RowE2M1` and whose backward slots
are :class:`~fp4compile.wang_format.FP8Tensor` (the ``fp4_dge_occ`` preset); ``linear_gemms.py`` hands
such recipes here, behind the same ``fp4compile::linear`` ops and saved-tensor layout as NVFP4:

- forward: ``Y = (v_X @ v_W^T) / (gamma_X gamma_W^T) + bias``, with ``v, gamma = quantize_rows(.)`` of
  the (OCC-clamped) X per token and of W per output channel; the E2M1 values are exact in fp16, so
  the product runs in the NVFP4 GEMM (FP32 accumulation) and the per-row scales come after it. OCC's
  residual product is added in FP32.
- saved: the FP8 wgrad copy of X^T [in, tokens padded to 16] (its bytes in ``x_codes``, its scale
  in ``x_outer``) and the OCC residual pairs; the weight's copies are recomputed from W.
- dgrad ``dX = dY W`` and wgrad ``dW = dY^T X`` in FP8 (``fp8_gemm``: ``torch._scaled_mm`` on CUDA), the
  W and X operands taken from the FP4-simulated tensors (source ``"forward"``, as the paper) or the
  high-precision ones (``"hp"``); DGE multiplies dW by ``dge_derivative(W * gamma_W)``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .format import dge_derivative
from .outliers import clamp_for_forward, compensation, dense_residual, residual_shapes, residual_weight_grad
from .recipe import Recipe
from .wang_format import dequantize_rows, fp8_gemm, fp8_quantize, quantize_rows

__all__ = ["linear_backward", "linear_forward", "saved_shapes"]

_K_MULTIPLE = 16  # FP8 tensor cores: K (and N) multiples of 16


def _padded(n):
    return (n + _K_MULTIPLE - 1) // _K_MULTIPLE * _K_MULTIPLE


def saved_shapes(recipe: Recipe, tokens, in_features: int, out_features: int) -> tuple:
    """Shapes of the nine saved tensors (the NVFP4 layout of ``linear_gemms.SavedShapes``)."""
    return ((in_features, _padded(tokens)), (0,), (), (0,), (0,), (0,), (0,),
            *residual_shapes(recipe.occ, tokens, in_features))  # fmt: skip


def _fp8_t(t: torch.Tensor, padded_cols: int, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 of ``t^T`` zero-padded to ``padded_cols`` columns, contiguous, and its scale."""
    t_t = t.T
    if t_t.shape[1] != padded_cols:
        t_t = F.pad(t_t, (0, padded_cols - t_t.shape[1]))
    q, scale = fp8_quantize(t_t, spec)
    return q.contiguous(), scale


def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: Recipe
) -> tuple[torch.Tensor, ...]:
    """``y = x @ weight^T + bias`` with row-scaled E2M1 operands, and the tensors saved for the backward."""
    tokens = x.shape[0]

    def empty(dtype: torch.dtype) -> torch.Tensor:  # a fresh one each time: op outputs must not alias
        return torch.empty(0, dtype=dtype, device=x.device)

    occ = recipe.occ
    x, residual = clamp_for_forward(x, occ)
    v_x, gamma_x = quantize_rows(x)
    v_w, gamma_w = quantize_rows(weight)
    one = torch.ones((), dtype=torch.float32, device=x.device)
    acc = dispatch.gemm(v_x.to(torch.float16), v_w.to(torch.float16), one, one, None, torch.float32)
    y = acc / (gamma_x[:, None] * gamma_w[None, :])
    if occ is not None and occ.compensates:
        y = y + compensation(dense_residual(x.shape, *residual, occ), weight, occ.residual)
    if bias is not None:
        y = y + bias.float()
    x_src = dequantize_rows(v_x, gamma_x) if recipe.wgrad_x_source == "forward" else x
    x8t, x_scale = _fp8_t(x_src, _padded(tokens), recipe.wgrad_x)
    return (y.to(x.dtype), x8t.view(torch.uint8), empty(torch.uint8), x_scale, empty(torch.uint8),
            empty(torch.uint8), empty(torch.float32), empty(torch.float32), *residual)  # fmt: skip


def linear_backward(
    dy: torch.Tensor, weight: torch.Tensor, saved: tuple[torch.Tensor, ...], recipe: Recipe, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` with FP8 dgrad and wgrad GEMMs (``dbias`` empty without bias)."""
    x8t_bytes, _, x_scale, _, _, _, _, residual_index, residual_value = saved
    tokens, in_features = dy.shape[0], weight.shape[1]
    rows_w = quantize_rows(weight) if (recipe.dgrad_w_source == "forward" or recipe.dge) else None

    # dgrad: dX = dY W, K = out.
    w_src = dequantize_rows(*rows_w) if recipe.dgrad_w_source == "forward" else weight
    w8t, w_scale = _fp8_t(w_src, w_src.shape[0], recipe.dgrad_w)  # [in, out]
    dy8, dy_scale = fp8_quantize(dy, recipe.dgrad_dy)
    dx = fp8_gemm(dy8.contiguous(), w8t, dy_scale, w_scale).to(dy.dtype)

    # wgrad: dW = dY^T X, K = tokens (padded with zeros to the saved X^T's width).
    dyt8, dyt_scale = _fp8_t(dy, x8t_bytes.shape[1], recipe.wgrad_dy)  # [out, tokens padded]
    dw = fp8_gemm(dyt8, x8t_bytes.view(recipe.wgrad_x.dtype), dyt_scale, x_scale)
    occ = recipe.occ
    if occ is not None and occ.compensates:  # the compensation's own weight gradient, dY^T R
        r = dense_residual(torch.Size((tokens, in_features)), residual_index, residual_value, occ)
        dw = dw + residual_weight_grad(dy, r, occ.residual)
    if recipe.dge:
        v_w = weight.to(torch.float32) * rows_w[1][:, None]  # the values quantize_rows rounded
        dw = dw * dge_derivative(v_w, recipe.dge_k, recipe.dge_cap)
    db = dy.sum(0, dtype=torch.float32).to(weight.dtype) if has_bias else dy.new_empty(0)
    return dx, dw.to(weight.dtype), db
