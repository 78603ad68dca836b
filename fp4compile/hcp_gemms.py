"""The quantized linear layer with CHON's Hot-Channel Patch: residual columns for the hot input channels.

For recipes with ``outliers=HotChannelPatch(...)`` (NVFP4 forward quantizers with per-tensor outer scales,
as NVIDIA's). With ``X^``, ``W^`` the recipe's forward quantizations, ``R = true - dequantized`` and ``I``
the layer's hot channels, the forward GEMM is construction A of the CHON notes
(``shared/research/outliers_and_peers.md`` section 1c)::

    [X^ | R_X,I | X^_I] @ [W^ | W^_I | R_W,I]^T

one GEMM over ``K + 2k`` columns, each part padded to a multiple of 128 with its own per-1x128-block outer
scales (the per-tensor ones repeated for ``X^`` and ``W^``): on the hot channels the error of the product is
only ``-R_W,I^T R_X,I``. The residual columns are bf16 or the recipe's forward NVFP4 quantization of the
residual. The backward is the plain recipe's (straight through the patch) and saves what it saves.

The op also returns each channel's score for the next selection: the mean ``|R_X|`` over tokens plus the
mean ``|R_W|`` over output units.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .linear_gemms import forward_with_gemm
from .mxfp8 import bf16_gemm_operand
from .recipe import Recipe

__all__ = ["linear_forward"]

_BLOCK = 128


def _pad_to_block(t: torch.Tensor) -> torch.Tensor:
    k = t.shape[1]
    return t if k % _BLOCK == 0 else F.pad(t, (0, _BLOCK - k % _BLOCK))


def _per_block(outer: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """A per-tensor outer scale repeated as per-1x128-block scales [rows, k/128]."""
    return outer.reshape(1, 1).expand(rows, k // _BLOCK).contiguous()


def _residual_operand(r: torch.Tensor, spec, fmt: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """GEMM values and per-block outer scales of the residual columns ``r`` [rows, k] (padded to 128)."""
    r = _pad_to_block(r)
    if fmt == "bf16":
        values, outer = bf16_gemm_operand(r)
        return values.to(dtype), outer
    q, values = dispatch.quantize_with_values(r.contiguous(), spec, None, None)
    return values, _per_block(q.outer, r.shape[0], r.shape[1])


def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor, recipe: Recipe
) -> tuple[torch.Tensor, ...]:
    """``(y, *saved, score)``: ``y`` with the hot channels ``index`` patched, the plain recipe's saved tensors
    (``linear_gemms.saved_shapes``), and the FP32 channel scores [in]."""
    fmt = recipe.outliers.residual
    scores = []

    def gemm(qx, qw, in_p):
        k_main = -(-in_p // _BLOCK) * _BLOCK
        tokens, out_features = x.shape[0], weight.shape[0]
        # R = x - X^ decoded from the codes as the residual kernels read them (on CUDA: no FP32 X^ in memory, and
        # the product X^ is rounded before the subtraction, never fused with it into an FMA)
        column_x = dispatch.column_abs_residual(x, qx.q)
        column_w = dispatch.column_abs_residual(weight, qw.q)
        scores.append(column_x / tokens + column_w / out_features)  # mean |R_X| over tokens + mean |R_W| over units
        r_x, r_w = dispatch.residual_columns(x, qx.q, index), dispatch.residual_columns(weight, qw.q, index)
        va, oa = _residual_operand(r_x, recipe.fwd_x, fmt, qx.values.dtype)
        vb, ob = _residual_operand(r_w, recipe.fwd_w, fmt, qw.values.dtype)
        hot_x, hot_w = _pad_to_block(qx.values.index_select(1, index)), _pad_to_block(qw.values.index_select(1, index))
        k_hot = hot_x.shape[1]
        a = torch.cat([_pad_to_block(qx.values), va, hot_x], 1)
        b = torch.cat([_pad_to_block(qw.values), hot_w, vb], 1)
        outer_a = torch.cat([_per_block(qx.q.outer, tokens, k_main), oa, _per_block(qx.q.outer, tokens, k_hot)], 1)
        outer_b = torch.cat([_per_block(qw.q.outer, out_features, k_main), _per_block(qw.q.outer, out_features, k_hot),
                             ob], 1)  # fmt: skip
        return dispatch.gemm(a, b, outer_a, outer_b, bias, x.dtype, uniform_k=k_main)  # X^, W^: per-tensor scales

    outputs = forward_with_gemm(x, weight, bias, recipe, gemm)
    return (*outputs, scores[0])
