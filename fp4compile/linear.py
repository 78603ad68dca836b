"""The quantized linear layer: three NVFP4 GEMMs with the six operand quantizations of a :class:`Recipe`.

``linear_forward`` and ``linear_backward`` are plain functions over 2-D tensors; ``ops.py``
registers them as the ``fp4compile::linear`` / ``fp4compile::linear_backward`` torch.library
ops and wires autograd. What the forward saves for the backward is fixed by the recipe:

- X: the forward quantization of X when ``wgrad_x_source == "forward"``, else the wgrad
  quantization of X^T (taken from the high-precision X during the forward); never X itself.
- W: the forward quantization of W when dgrad re-quantizes it or reuses it (16x16 blocks),
  else nothing (the backward quantizes the weight parameter).
- signs: the wgrad rotation signs when X^T was rotated during the forward.

Dimensions that a quantizer needs as multiples of 128 (double-block scales, RHT-128) are
zero-padded along K for both operands of that GEMM, which leaves the product unchanged.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .format import NVFP4, TE_RHT_SIGNS, gemm_operand, quantize_reference
from .gemm import Operand, nvfp4_gemm, operand_of
from .quantize import draw_seed, draw_signs
from .recipe import Recipe
from .spec import QuantSpec

__all__ = ["nvfp4_linear", "linear_forward", "linear_backward", "SavedShapes", "saved_shapes"]

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------- shapes
def _round_up(n, multiple: int):
    return (n + multiple - 1) // multiple * multiple


def _k_multiple(*specs: QuantSpec) -> int:
    return max(s.k_multiple for s in specs)


class SavedShapes(NamedTuple):
    """Shapes of the tensors the forward saves: (codes, scale bytes, outer) of X and of W, and the signs."""

    x_codes: tuple
    x_scales: tuple
    x_outer: tuple
    w_codes: tuple
    w_scales: tuple
    w_outer: tuple
    signs: tuple


def _quant_shapes(rows, k, spec: QuantSpec) -> tuple[tuple, tuple, tuple]:
    outer = (rows, k // 128) if spec.outer == "block128" else ()
    return (rows, k // 2), (rows, k // 16), outer


def saved_shapes(recipe: Recipe, tokens, in_features: int, out_features: int) -> SavedShapes:
    """Shapes of the saved tensors of a forward over ``tokens`` rows (symbolic sizes allowed)."""
    in_p = _round_up(in_features, _k_multiple(recipe.fwd_x, recipe.fwd_w))
    if recipe.wgrad_x_source == "forward":
        x = _quant_shapes(tokens, in_p, recipe.fwd_x)
    else:
        x = _quant_shapes(in_features, _round_up(tokens, _k_multiple(recipe.wgrad_dy, recipe.wgrad_x)), recipe.wgrad_x)
    if _saves_weight(recipe):
        w = _quant_shapes(out_features, in_p, recipe.fwd_w)
    else:
        w = ((0,), (0,), (0,))
    rotated_x_t = recipe.wgrad_x_source == "hp" and recipe.wgrad_x.random_signs
    signs = (recipe.wgrad_x.rotation_size,) if rotated_x_t else (0,)
    return SavedShapes(*x, *w, signs)


def _saves_weight(recipe: Recipe) -> bool:
    return recipe.dgrad_w_source == "forward" or recipe.reuses_forward_weight


# ----------------------------------------------------------------------------- quantize helpers
def _pad_cols(t: torch.Tensor, k: int) -> torch.Tensor:
    return t if t.shape[1] == k else F.pad(t, (0, k - t.shape[1]))


def _signs_for(spec: QuantSpec, device: torch.device, drawn: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rotation signs of ``spec``: None for none and for TE's fixed signs (the kernel holds those; a cached
    device copy would be a live allocation inside a CUDA-graph pool), else ``drawn`` or fresh random ones."""
    if spec.random_signs:
        return drawn if drawn is not None else draw_signs(spec.rotation_size, device)
    return None


def _quantize_operand(x: torch.Tensor, spec: QuantSpec, signs: Optional[torch.Tensor]) -> Operand:
    """Quantize ``x`` (2-D, last dim contiguous, shape already valid for ``spec``) with its GEMM values."""
    seed = draw_seed(x.device) if spec.stochastic else None
    if x.is_cuda:  # the kernel reads transposed views in place
        from .kernels.quantize import quantize_triton

        values = torch.empty(x.shape, dtype=torch.float16, device=x.device)
        q = quantize_triton(x, spec, seed=seed, signs=signs, values=values)
        return Operand(q, values)
    if signs is None and spec.rotation == "rht16_te":
        signs = torch.tensor(TE_RHT_SIGNS, dtype=torch.float32)
    q = quantize_reference(x.contiguous(), spec, seed=None if seed is None else int(seed.item()), signs=signs)
    return Operand(q, gemm_operand(q))


def _restore(codes, scale_bits, outer, spec: QuantSpec, signs=None) -> NVFP4:
    return NVFP4(codes, scale_bits.view(torch.float8_e4m3fn), outer, spec, signs=signs, dtype=torch.float32)


def _dequantized_t(q: NVFP4, rows: int, cols: int, padded_rows: int) -> torch.Tensor:
    """FP32 transpose of the dequantized ``q`` cropped to [rows, cols], zero-padded to [cols, padded_rows]:
    the source of a re-quantization along the other dim."""
    if q.codes.is_cuda:
        from .kernels.decode import decode_triton

        return decode_triton(
            q, with_outer=True, dtype=torch.float32, transpose=True, rows=rows, cols=cols, padded_rows=padded_rows
        )
    return _pad_cols(q.dequantize(torch.float32)[:rows, :cols].T, padded_rows)


# ----------------------------------------------------------------------------- forward / backward
def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: Recipe
) -> tuple[torch.Tensor, ...]:
    """``y = x @ weight^T + bias`` with the recipe's forward quantizers, and the tensors saved for backward.

    Returns ``(y, x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, signs)`` with the shapes of
    :func:`saved_shapes` (empty tensors for what the recipe does not save).
    """
    tokens, in_features = x.shape
    in_p = _round_up(in_features, _k_multiple(recipe.fwd_x, recipe.fwd_w))
    qx = _quantize_operand(_pad_cols(x, in_p), recipe.fwd_x, None)
    qw = _quantize_operand(_pad_cols(weight, in_p), recipe.fwd_w, None)
    y = nvfp4_gemm(qx, qw, bias, out_dtype=x.dtype)

    def empty(dtype: torch.dtype) -> torch.Tensor:  # a fresh one each time: op outputs must not alias
        return torch.empty(0, dtype=dtype, device=x.device)

    signs = empty(torch.float32)
    if recipe.wgrad_x_source == "forward":
        saved_x = qx.q
    else:
        t_p = _round_up(tokens, _k_multiple(recipe.wgrad_dy, recipe.wgrad_x))
        wgrad_signs = _signs_for(recipe.wgrad_x, x.device, None)
        saved_x = _quantize_operand(_pad_cols(x.T, t_p), recipe.wgrad_x, wgrad_signs).q
        if recipe.wgrad_x.random_signs:
            signs = wgrad_signs
    if _saves_weight(recipe):
        w_saved = (qw.q.codes, qw.q.scales.view(torch.uint8), qw.q.outer)
    else:
        w_saved = (empty(torch.uint8), empty(torch.uint8), empty(torch.float32))
    # E4M3 scales travel as their uint8 bit patterns: integer outputs are plainly non-differentiable.
    return (y, saved_x.codes, saved_x.scales.view(torch.uint8), saved_x.outer, *w_saved, signs)


def linear_backward(
    dy: torch.Tensor,
    weight: torch.Tensor,
    saved: tuple[torch.Tensor, ...],
    recipe: Recipe,
    has_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)`` of the quantized linear, from ``dy`` [tokens, out] and the saved tensors.

    ``dbias`` is an empty tensor when ``has_bias`` is False.
    """
    x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, saved_signs = saved
    tokens, out_features = dy.shape
    in_features = weight.shape[1]
    device = dy.device

    # Signs: one vector per backward (shared) or one per GEMM; wgrad's may come from the forward.
    from_forward = saved_signs if saved_signs.numel() else None
    shared = _signs_for(recipe.dgrad_dy, device, from_forward) if recipe.share_backward_signs else None
    dgrad_signs = shared if shared is not None else _signs_for(recipe.dgrad_dy, device, None)
    wgrad_signs = shared if shared is not None else _signs_for(recipe.wgrad_dy, device, from_forward)

    # dgrad: dX = dY W, K = out.
    out_p = _round_up(out_features, _k_multiple(recipe.dgrad_dy, recipe.dgrad_w))
    if recipe.reuses_forward_weight and out_p == out_features:
        qw = operand_of(_restore(w_codes, w_scales, w_outer, recipe.fwd_w))
        q_wt = Operand(qw.q, qw.values[:, :in_features].T)  # exact: 16x16 quantization commutes with W^T
    else:
        if recipe.dgrad_w_source == "forward":
            w_q = _restore(w_codes, w_scales, w_outer, recipe.fwd_w)
            w_t = _dequantized_t(w_q, out_features, in_features, out_p)
        else:
            w_t = _pad_cols(weight.T, out_p)
        q_wt = _quantize_operand(w_t, recipe.dgrad_w, dgrad_signs)
    q_dy = _quantize_operand(_pad_cols(dy, out_p), recipe.dgrad_dy, dgrad_signs)
    dx = nvfp4_gemm(q_dy, q_wt, None, out_dtype=dy.dtype)

    # wgrad: dW = dY^T X, K = tokens.
    t_p = _round_up(tokens, _k_multiple(recipe.wgrad_dy, recipe.wgrad_x))
    if recipe.wgrad_x_source == "forward":
        x_t = _dequantized_t(_restore(x_codes, x_scales, x_outer, recipe.fwd_x), tokens, in_features, t_p)
        q_xt = _quantize_operand(x_t, recipe.wgrad_x, wgrad_signs)
    else:
        q_xt = operand_of(_restore(x_codes, x_scales, x_outer, recipe.wgrad_x, signs=wgrad_signs))
    q_dyt = _quantize_operand(_pad_cols(dy.T, t_p), recipe.wgrad_dy, wgrad_signs)
    dw = nvfp4_gemm(q_dyt, q_xt, None, out_dtype=weight.dtype)

    db = dy.sum(0, dtype=torch.float32).to(weight.dtype) if has_bias else dy.new_empty(0)
    return dx, dw, db


# ----------------------------------------------------------------------------- public entry point
def _check(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"nvfp4_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
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
    if in_features % 16 or out_features % 16 or in_features == 0 or out_features == 0:
        raise ValueError(
            f"nvfp4_linear: in_features ({in_features}) and out_features ({out_features}) must be positive multiples "
            "of 16 (NVFP4 blocks are 16 wide along every GEMM's K); keep this layer in high precision"
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
        return t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _FLOAT_DTYPES else t

    return cast(x), cast(weight), cast(bias)


def nvfp4_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    recipe="nvidia",
) -> torch.Tensor:
    """``F.linear`` with NVFP4 forward and backward GEMMs quantized per ``recipe``.

    Args:
        x: [..., in] bfloat16, float16 or float32.
        weight: [out, in] of x's dtype; in and out multiples of 16.
        bias: optional [out].
        recipe: a :class:`Recipe` or a preset name (``Recipe.names()``); ``"bf16"`` is plain ``F.linear``.

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

    x2 = x.reshape(-1, x.shape[-1])
    y = torch.ops.fp4compile.linear(x2, weight, bias, recipe.name)[0]
    return y.view(*x.shape[:-1], weight.shape[0])
