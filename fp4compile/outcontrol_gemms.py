"""The quantized linear layer with TetraJet-v2's OutControl: outlier input channels in MXFP8 (or bf16).

For recipes with ``outliers=OutControl(...)`` (double-block forward quantizers, ``wgrad_x_source="forward"``);
``order`` and ``selected`` come from the layer's :class:`~fp4compile.outlier_channels.OutlierState`, and
``k = outlier_count(in_features, control)`` is a multiple of 128. With ``P = order``:

- forward: X and W are taken in the channel order ``P`` and zero-padded along K to a multiple of 128;
  both are quantized by the recipe's forward quantizers (1x128 blocks, so the first ``k`` channels
  form blocks of their own). Once ``selected``, those first ``k`` channels (the outliers) are replaced
  by their MXFP8 (or bf16) GEMM operand: same GEMM, the outlier columns as further K-blocks, each with
  its own outer scale. Before selection ``P`` is the identity and this is the plain recipe, bit for bit.
- dgrad stays fully FP4: ``W^T`` is the dequantized forward W (outlier columns from their MXFP8 form),
  in the original order, quantized by the recipe's dgrad quantizer.
- wgrad: the FP4 GEMM of the recipe over all channels (its X operand re-quantized from the dequantized
  forward FP4 X), and once ``selected`` the outlier columns of dW come instead from an MXFP8 GEMM along
  tokens of ``MXFP8(dY^T)`` and ``MXFP8(deq(MXFP8(X_S))^T)`` (TetraJet-v2's ``linear_mix``), RN, no rotation.

Saved for the backward: the forward FP4 quantizations of X and W (as the plain recipe saves them) and
the outlier columns of X in their outlier format (E4M3 bytes and E8M0 exponents, or bf16).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from .format import NVFP4, cast_exactly, stored_fp32, stored_sum
from .gemm import nvfp4_gemm
from .linear_gemms import pad_cols, quantize_operand, requantize_operand, restore, round_up, signs_for
from .mxfp8 import MXFP8, bf16_gemm_operand
from .outlier_channels import outlier_count
from .recipe import Recipe

__all__ = ["forward_weight_dequantized", "linear_backward", "linear_forward", "saved_shapes"]


def saved_shapes(recipe: Recipe, tokens, in_features: int, out_features: int) -> tuple:
    """Shapes of the eight saved tensors: (codes, scale bytes, outer) of X and W, the outlier columns of X."""
    in_p = round_up(in_features, 128)
    k = outlier_count(in_features, recipe.outliers)
    mx = recipe.outliers.outlier_format == "mxfp8"
    return ((tokens, in_p // 2), (tokens, in_p // 16), (tokens, in_p // 128),
            (out_features, in_p // 2), (out_features, in_p // 16), (out_features, in_p // 128),
            (tokens, k), (tokens, k // 32) if mx else (0,))  # fmt: skip


def saved_dtypes(recipe: Recipe) -> tuple[torch.dtype, ...]:
    """Dtypes of the saved tensors (the outlier columns: E4M3 bytes and E8M0 exponents, or bf16)."""
    mx = recipe.outliers.outlier_format == "mxfp8"
    outlier = (torch.uint8, torch.int16) if mx else (torch.bfloat16, torch.int16)
    return (torch.uint8, torch.uint8, torch.float32) * 2 + outlier


def _outlier_operand(t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM values and per-1x128 outer scales of ``t`` [rows, K] in the outlier format."""
    return dispatch.mxfp8_operand(t)[:2] if fmt == "mxfp8" else bf16_gemm_operand(stored_fp32(t))


def _outlier_saved_and_operand(t: torch.Tensor, fmt: str) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple]:
    """``t`` [rows, k] in the outlier format as saved, (E4M3 bytes, E8M0 exponents) or (bf16, empty), and as the
    GEMM operand (values, outer scales): one pass over ``t`` for MXFP8."""
    if fmt == "mxfp8":
        values, outer, q = dispatch.mxfp8_operand(t, saved=True)
        return (q.elements.view(torch.uint8), q.exponents), (values, outer)
    b = t.to(torch.bfloat16)
    return (b, torch.empty(0, dtype=torch.int16, device=t.device)), bf16_gemm_operand(b)


def _outlier_dequantized(values: torch.Tensor, exponents: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "mxfp8":
        return MXFP8(values.view(torch.float8_e4m3fn), exponents).dequantize()
    return values.to(torch.float32)


def _join(q_values, q_outer, outlier: tuple[torch.Tensor, torch.Tensor], k: int, selected: torch.Tensor):
    """The GEMM operand: the FP4 one, its first ``k`` columns replaced by the outlier operand once selected. The
    values ``q_values`` (the GEMM's own fresh buffer) are overwritten in place in those columns only; the outer
    scales, which the backward saves, are joined into a new tensor."""
    if k == 0:
        return q_values, q_outer
    values, outer = outlier
    kb = k // 128
    q_values[:, :k] = torch.where(selected, values.to(q_values.dtype), q_values[:, :k])
    joined_outer = torch.cat([torch.where(selected, outer, q_outer[:, :kb]), q_outer[:, kb:]], 1)
    return q_values, joined_outer


def forward_weight_dequantized(
    weight: torch.Tensor,
    order: torch.Tensor,
    selected: torch.Tensor,
    recipe: Recipe,
    w_q: Optional[NVFP4] = None,
    transposed: bool = False,
    inverse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FP32 [out, in]: W as the forward's GEMM sees it, dequantized, in the original channel order: the FP4
    quantization of W in the order ``order`` (``w_q`` when the forward saved it), its first ``k`` channels from
    their outlier format once ``selected``. What dgrad re-quantizes (``transposed``: as a contiguous [in, out],
    decoded transposed and gathered by rows), and OsciReset's ``Q(W)``. ``inverse``: ``argsort(order)`` where the
    caller has it."""
    out_features, in_features = weight.shape
    k = outlier_count(in_features, recipe.outliers)
    if w_q is None:
        w_q = dispatch.quantize(
            pad_cols(weight.index_select(1, order), round_up(in_features, 128)), recipe.fwd_w, None, None
        )
    # A fresh buffer ([in, out] when transposed: decoded transposed, so that the reordering gathers whole rows):
    # its outlier channels are overwritten in place.
    if transposed:
        w_deq = dispatch.dequantize_transposed(w_q, out_features, in_features, out_features)
    else:
        w_deq = dispatch.dequantize(w_q, in_features)
    if k:
        fmt = recipe.outliers.outlier_format
        w_out = _outlier_dequantized(*_outlier_saved_and_operand(weight[:, order[:k]], fmt)[0], fmt)
        if transposed:
            w_deq[:k] = torch.where(selected, w_out.T, w_deq[:k])
        else:
            w_deq[:, :k] = torch.where(selected, w_out, w_deq[:, :k])
    inverse = torch.argsort(order) if inverse is None else inverse
    return w_deq.index_select(0 if transposed else 1, inverse)


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    order: torch.Tensor,
    selected: torch.Tensor,
    recipe: Recipe,
) -> tuple[torch.Tensor, ...]:
    """``y = x @ weight^T + bias`` with the outlier channels ``order[:k]`` in the outlier format once ``selected``,
    and the tensors saved for the backward (:func:`saved_shapes`)."""
    control = recipe.outliers
    in_features = x.shape[1]
    k, in_p = outlier_count(in_features, control), round_up(in_features, 128)
    xp, wp = pad_cols(x.index_select(1, order), in_p), pad_cols(weight.index_select(1, order), in_p)
    qx, vx = dispatch.quantize_with_values(xp, recipe.fwd_x, None, None)
    qw, vw = dispatch.quantize_with_values(wp, recipe.fwd_w, None, None)
    fmt = control.outlier_format
    outlier_x, x_operand = _outlier_saved_and_operand(xp[:, :k], fmt)
    va, oa = _join(vx, qx.outer, x_operand, k, selected)
    vb, ob = _join(vw, qw.outer, _outlier_operand(wp[:, :k], fmt), k, selected)
    y = dispatch.gemm(va, vb, oa, ob, bias, x.dtype)
    return (y, qx.codes, qx.scales.view(torch.uint8), qx.outer, qw.codes, qw.scales.view(torch.uint8), qw.outer,
            *outlier_x)  # fmt: skip


def linear_backward(
    dy: torch.Tensor,
    weight: torch.Tensor,
    order: torch.Tensor,
    selected: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    recipe: Recipe,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``: FP4 dgrad, FP4 wgrad with the outlier columns of dW from the outlier format."""
    x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, outlier_values, outlier_exponents = saved
    control, fmt = recipe.outliers, recipe.outliers.outlier_format
    tokens, out_features = dy.shape
    in_features = weight.shape[1]
    k = outlier_count(in_features, control)
    inverse = torch.argsort(order)
    device = dy.device
    # Signs before any quantization, as linear_gemms draws them (the same streams as the plain recipe).
    dgrad_signs = signs_for(recipe.dgrad_dy, device, None)
    wgrad_signs = dgrad_signs if recipe.share_backward_signs else signs_for(recipe.wgrad_dy, device, None)

    # dgrad: dX = dY W, K = out, with W the dequantized forward W in the original channel order.
    if recipe.dgrad_w_source == "forward":
        w_q = restore(w_codes, w_scales, w_outer, recipe.fwd_w)
        w_t = forward_weight_dequantized(weight, order, selected, recipe, w_q, transposed=True, inverse=inverse)
    else:
        w_t = stored_fp32(weight).T.contiguous()
    out_p = round_up(out_features, recipe.dgrad_dy.k_multiple)
    q_wt = quantize_operand(pad_cols(w_t, out_p), recipe.dgrad_w, dgrad_signs)
    q_dy = quantize_operand(pad_cols(dy, out_p), recipe.dgrad_dy, dgrad_signs)
    dx = nvfp4_gemm(q_dy, q_wt, None, out_dtype=dy.dtype)

    # wgrad: dW = dY^T X, K = tokens; FP4 over every channel (in P's order), then the outlier columns.
    t_p = round_up(tokens, max(recipe.wgrad_dy.k_multiple, recipe.wgrad_x.k_multiple))
    x_q = restore(x_codes, x_scales, x_outer, recipe.fwd_x)
    q_xt = requantize_operand(x_q, tokens, x_q.shape[1], t_p, recipe.wgrad_x, wgrad_signs)
    q_dyt = quantize_operand(pad_cols(dy.T, t_p), recipe.wgrad_dy, wgrad_signs)
    dw = nvfp4_gemm(q_dyt, q_xt, None, out_dtype=torch.float32)
    if k:
        x_out_t = pad_cols(_outlier_dequantized(outlier_values, outlier_exponents, fmt).T.contiguous(), t_p)
        va, oa = _outlier_operand(pad_cols(dy.T, t_p), fmt)  # MXFP8 on CUDA: read in place, no FP32 copy
        vb, ob = _outlier_operand(x_out_t, fmt)
        dw_out = dispatch.gemm(va, vb.to(va.dtype), oa, ob, None, torch.float32)
        dw[:, :k] = torch.where(selected, dw_out, dw[:, :k])  # dw: the FP4 GEMM's fresh output
    dw = cast_exactly(dw[:, :in_features].index_select(1, inverse), weight.dtype)
    db = cast_exactly(stored_sum(dy, 0), weight.dtype) if has_bias else dy.new_empty(0)
    return dx, dw, db
