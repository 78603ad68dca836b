"""The quantized linear layer: three NVFP4 GEMMs with the six operand quantizations of a :class:`Recipe`.

``linear_forward`` and ``linear_backward`` are plain functions over 2-D tensors; ``ops.py``
registers them as the ``fp4compile::linear`` / ``fp4compile::linear_backward`` torch.library
ops and wires autograd, and ``linear.py`` holds the public ``nvfp4_linear``. Every quantization,
decode and GEMM goes through ``dispatch`` (Triton on CUDA, the reference elsewhere). What the
forward saves for the backward is fixed by the recipe:

- X: the forward quantization of X when ``wgrad_x_source == "forward"``, else the wgrad
  quantization of X^T (taken from the high-precision X during the forward); never X itself.
- W: the forward quantization of W when dgrad re-quantizes it or reuses it (16x16 blocks),
  else nothing (the backward quantizes the weight parameter).
- signs: the wgrad rotation signs when X^T was rotated during the forward.

Dimensions that a quantizer needs as multiples of 128 (double-block scales, RHT-128) are
zero-padded along K for both operands of that GEMM, which leaves the product unchanged.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import dispatch, wang_linear
from .format import NVFP4, cast_exactly, dge_derivative, scaled_values, stored_fp32, stored_sum
from .gemm import Operand, nvfp4_gemm, operand_of
from .outliers import clamp_for_forward, compensation, dense_residual, residual_shapes, residual_weight_grad
from .recipe import Recipe
from .shared_quantization import shared_operand, shared_quantization, shared_value, transposed
from .spec import QuantSpec
from .streams import stream_seed, stream_signs

__all__ = [
    "SavedShapes",
    "amax_pair",
    "forward_with_gemm",
    "linear_backward",
    "linear_forward",
    "pad_cols",
    "quantize_operand",
    "requantize_operand",
    "restore",
    "round_up",
    "saved_shapes",
    "signs_for",
]


# ----------------------------------------------------------------------------- shapes
def round_up(n, multiple: int):
    return (n + multiple - 1) // multiple * multiple


def _k_multiple(*specs: QuantSpec) -> int:
    return max(s.k_multiple for s in specs)


class SavedShapes(NamedTuple):
    """Shapes of the tensors the forward saves: (codes, scale bytes, outer) of X and of W, the signs, and the
    OCC residual's (index, value) pairs."""

    x_codes: tuple
    x_scales: tuple
    x_outer: tuple
    w_codes: tuple
    w_scales: tuple
    w_outer: tuple
    signs: tuple
    residual_index: tuple
    residual_value: tuple


def _quant_shapes(rows, k, spec: QuantSpec) -> tuple[tuple, tuple, tuple]:
    outer = (rows, k // 128) if spec.outer == "block128" else ()
    return (rows, k // 2), (rows, k // 16), outer


def saved_shapes(recipe: Recipe, tokens, in_features: int, out_features: int) -> SavedShapes:
    """Shapes of the saved tensors of a forward over ``tokens`` rows (symbolic sizes allowed)."""
    if recipe.fp8_backward:
        return SavedShapes(*wang_linear.saved_shapes(recipe, tokens, in_features, out_features))
    in_p = round_up(in_features, _k_multiple(recipe.fwd_x, recipe.fwd_w))
    if recipe.wgrad_x_source == "forward":
        x = _quant_shapes(tokens, in_p, recipe.fwd_x)
    else:
        x = _quant_shapes(in_features, round_up(tokens, _k_multiple(recipe.wgrad_dy, recipe.wgrad_x)), recipe.wgrad_x)
    if _saves_weight(recipe):
        w = _quant_shapes(out_features, in_p, recipe.fwd_w)
    else:
        w = ((0,), (0,), (0,))
    rotated_x_t = recipe.wgrad_x_source == "hp" and recipe.wgrad_x.random_signs
    signs = (recipe.wgrad_x.rotation_size,) if rotated_x_t else (0,)
    return SavedShapes(*x, *w, signs, *residual_shapes(recipe.occ, tokens, in_features))


def _saves_weight(recipe: Recipe) -> bool:
    return recipe.dgrad_w_source == "forward" or recipe.reuses_forward_weight


# ----------------------------------------------------------------------------- quantize helpers
def pad_cols(t: torch.Tensor, k: int) -> torch.Tensor:
    return t if t.shape[1] == k else F.pad(t, (0, k - t.shape[1]))


def signs_for(spec: QuantSpec, device: torch.device, drawn: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The rotation signs of ``spec``: None for none and for TE's fixed signs (the kernel holds those; a cached
    device copy would be a live allocation inside a CUDA-graph pool), else ``drawn`` or fresh random ones."""
    if spec.random_signs:
        return drawn if drawn is not None else stream_signs(spec.rotation_size, device)
    return None


Amax = Optional[Callable[[], Optional[torch.Tensor]]]


def amax_pair(
    x: torch.Tensor, rotated_input: torch.Tensor, plain: QuantSpec, rotated: QuantSpec, signs: Optional[torch.Tensor]
) -> tuple[Amax, Amax]:
    """Where ``x`` is quantized per tensor twice, by the unrotated ``plain`` and (as ``rotated_input``: ``x`` or its
    padded transpose) by the rotated ``rotated`` with ``signs``: the two amaxes as functions for
    :func:`quantize_operand` / :func:`quantize_saved`, from one pass over ``rotated_input``
    (``dispatch.abs_max_pair``) made on first use, once per traced ``x`` where the signs are fixed. (None, None)
    for other pairs of specs: each quantization finds its own amax."""
    per_tensor = plain.outer == "tensor" and rotated.outer == "tensor"
    if not (per_tensor and plain.rotation == "none" and rotated.rotation != "none"):
        return None, None

    made: list = []  # the pair, once made (a plain list: Dynamo traces this function where a test compiles it)

    def pair() -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if not made:
            make = lambda: dispatch.abs_max_pair(rotated_input, rotated, signs)  # noqa: E731
            key = ("abs_max_pair", rotated, tuple(rotated_input.shape))
            made.append(make() if signs is not None else shared_value(x, key, make))
        return made[0]

    def plain_amax() -> Optional[torch.Tensor]:
        found = pair()
        return None if found is None else found[1]

    def rotated_amax() -> Optional[torch.Tensor]:
        found = pair()
        return None if found is None else found[0]

    return plain_amax, rotated_amax


def quantize_operand(x: torch.Tensor, spec: QuantSpec, signs: Optional[torch.Tensor], amax: Amax = None) -> Operand:
    """Quantize ``x`` (2-D, shape already valid for ``spec``) with its GEMM values (once per traced ``x`` for a
    deterministic quantization: ``shared_quantization.py``); ``amax``: from :func:`amax_pair`, called only if
    ``x`` is quantized here."""

    def quantize() -> Operand:
        seed = stream_seed(x.device) if spec.stochastic else None
        return Operand(*dispatch.quantize_with_values(x, spec, seed, signs, amax() if amax else None))

    return shared_operand(x, spec, signs, quantize)


def requantize_operand(
    q: NVFP4, rows: int, cols: int, padded_rows: int, spec: QuantSpec, signs: Optional[torch.Tensor]
) -> Operand:
    """:func:`quantize_operand` of ``dispatch.dequantize_transposed(q, rows, cols, padded_rows)`` (the saved forward
    quantization, dequantized, transposed, re-quantized along the other dim), decoded by the quantize kernel as it
    reads ``q`` on CUDA (``dispatch.requantize_transposed``); the same random draws, in the same order."""
    seed = stream_seed(q.codes.device) if spec.stochastic else None
    return Operand(*dispatch.requantize_transposed(q, rows, cols, padded_rows, spec, seed, signs))


def quantize_saved(x: torch.Tensor, spec: QuantSpec, signs: Optional[torch.Tensor], amax: Amax = None) -> NVFP4:
    """Quantize ``x`` for the backward to save: codes and scales only, no GEMM values written (once per traced
    ``x`` for a deterministic quantization, as :func:`quantize_operand`; ``amax`` as there)."""

    def quantize() -> NVFP4:
        seed = stream_seed(x.device) if spec.stochastic else None
        return dispatch.quantize(x, spec, seed, signs, amax() if amax else None)

    return shared_quantization(x, spec, signs, quantize)


def restore(codes, scale_bits, outer, spec: QuantSpec, signs=None) -> NVFP4:
    return NVFP4(codes, scale_bits.view(torch.float8_e4m3fn), outer, spec, signs=signs, dtype=torch.float32)


# ----------------------------------------------------------------------------- forward / backward
def linear_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], recipe: Recipe
) -> tuple[torch.Tensor, ...]:
    """``y = x @ weight^T + bias`` with the recipe's forward quantizers, and the tensors saved for backward.

    Returns ``(y, x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, signs, residual_index,
    residual_value)`` with the shapes of :func:`saved_shapes` (empty tensors for what the recipe does
    not save). With ``recipe.occ`` X is clamped first, and every X operand is the clamped one.
    Wang et al.'s layout (``recipe.fp8_backward``) runs in ``wang_linear.py``.
    """
    if recipe.outliers is not None:  # never quantize without the outlier channels the recipe asks for
        raise ValueError(
            f"recipe {recipe.name!r} keeps outlier channels: it runs in fp4compile::outlier_linear with the layer's "
            "state (nvfp4_linear(..., outlier_state=...), NVFP4Linear, or backend='nvfp4')"
        )
    if recipe.fp8_backward:
        return wang_linear.linear_forward(x, weight, bias, recipe)
    return forward_with_gemm(x, weight, bias, recipe, None)


def forward_with_gemm(x, weight, bias, recipe: Recipe, gemm) -> tuple[torch.Tensor, ...]:
    """:func:`linear_forward` (no OCC) with the output from ``gemm(qx, qw, in_p) -> y`` when given (the Hot-Channel
    Patch adds its columns there): the same quantizations and the same saved tensors."""
    tokens, in_features = x.shape

    def empty(dtype: torch.dtype) -> torch.Tensor:  # a fresh one each time: op outputs must not alias
        return torch.empty(0, dtype=dtype, device=x.device)

    occ = recipe.occ
    x, residual = clamp_for_forward(x, occ)
    in_p = round_up(in_features, _k_multiple(recipe.fwd_x, recipe.fwd_w))
    x_amax = xt_amax = None
    if recipe.wgrad_x_source == "hp":  # X^T is quantized here too: X's two amaxes may come from one pass
        t_p = round_up(tokens, _k_multiple(recipe.wgrad_dy, recipe.wgrad_x))
        wgrad_signs = signs_for(recipe.wgrad_x, x.device, None)
        x_t = pad_cols(transposed(x), t_p)
        x_amax, xt_amax = amax_pair(x, x_t, recipe.fwd_x, recipe.wgrad_x, wgrad_signs)
    qx = quantize_operand(pad_cols(x, in_p), recipe.fwd_x, None, x_amax)
    qw = quantize_operand(pad_cols(weight, in_p), recipe.fwd_w, None)
    if gemm is not None:
        y = gemm(qx, qw, in_p)
    elif occ is not None and occ.compensates:
        y = nvfp4_gemm(qx, qw, None, out_dtype=torch.float32)
        y = y + compensation(dense_residual(x.shape, *residual, occ), weight, occ.residual)
        y = cast_exactly(y if bias is None else y + stored_fp32(bias), x.dtype)
    else:
        y = nvfp4_gemm(qx, qw, bias, out_dtype=x.dtype)

    signs = empty(torch.float32)
    if recipe.wgrad_x_source == "forward":
        saved_x = qx.q
    else:
        saved_x = quantize_saved(x_t, recipe.wgrad_x, wgrad_signs, xt_amax)
        if recipe.wgrad_x.random_signs:
            signs = wgrad_signs
    if _saves_weight(recipe):
        w_saved = (qw.q.codes, qw.q.scales.view(torch.uint8), qw.q.outer)
    else:
        w_saved = (empty(torch.uint8), empty(torch.uint8), empty(torch.float32))
    # E4M3 scales travel as their uint8 bit patterns: integer outputs are plainly non-differentiable.
    return (y, saved_x.codes, saved_x.scales.view(torch.uint8), saved_x.outer, *w_saved, signs, *residual)


def _dge_multiplier(weight: torch.Tensor, recipe: Recipe, w_q: Optional[NVFP4]) -> torch.Tensor:
    """``dge_derivative`` of ``weight`` in E2M1 units of its forward quantization (``w_q`` when the forward saved
    it, else quantized again: the forward weight quantizer is deterministic), FP32 [out, in]."""
    out_features, in_features = weight.shape
    in_p = round_up(in_features, _k_multiple(recipe.fwd_x, recipe.fwd_w))
    w_p = pad_cols(weight, in_p)
    if w_q is None:
        w_q = dispatch.quantize(w_p, recipe.fwd_w, None, None)
    v = scaled_values(w_p, w_q)[:, :in_features]
    return dge_derivative(v, recipe.dge_k, recipe.dge_cap)


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
    if recipe.fp8_backward:
        return wang_linear.linear_backward(dy, weight, saved, recipe, has_bias)
    x_codes, x_scales, x_outer, w_codes, w_scales, w_outer, saved_signs, residual_index, residual_value = saved
    tokens, out_features = dy.shape
    in_features = weight.shape[1]
    device = dy.device

    # Signs: one vector per backward (shared) or one per GEMM; wgrad's may come from the forward.
    from_forward = saved_signs if saved_signs.numel() else None
    shared = signs_for(recipe.dgrad_dy, device, from_forward) if recipe.share_backward_signs else None
    dgrad_signs = shared if shared is not None else signs_for(recipe.dgrad_dy, device, None)
    wgrad_signs = shared if shared is not None else signs_for(recipe.wgrad_dy, device, from_forward)

    # dgrad: dX = dY W, K = out.
    out_p = round_up(out_features, _k_multiple(recipe.dgrad_dy, recipe.dgrad_w))
    if recipe.reuses_forward_weight and out_p == out_features:
        qw = operand_of(restore(w_codes, w_scales, w_outer, recipe.fwd_w))
        w_values = qw.values if qw.values.shape[1] == in_features else qw.values[:, :in_features]
        q_wt = Operand(qw.q, w_values.T)  # exact: 16x16 quantization commutes with W^T
    else:
        if recipe.dgrad_w_source == "forward":
            w_q = restore(w_codes, w_scales, w_outer, recipe.fwd_w)
            q_wt = requantize_operand(w_q, out_features, in_features, out_p, recipe.dgrad_w, dgrad_signs)
        else:
            q_wt = quantize_operand(pad_cols(weight.T, out_p), recipe.dgrad_w, dgrad_signs)
    t_p = round_up(tokens, _k_multiple(recipe.wgrad_dy, recipe.wgrad_x))
    dy_t = pad_cols(dy.T, t_p)
    dy_amax, dyt_amax = amax_pair(dy, dy_t, recipe.dgrad_dy, recipe.wgrad_dy, wgrad_signs)
    q_dy = quantize_operand(pad_cols(dy, out_p), recipe.dgrad_dy, dgrad_signs, dy_amax)
    dx = nvfp4_gemm(q_dy, q_wt, None, out_dtype=dy.dtype)

    # wgrad: dW = dY^T X, K = tokens.
    if recipe.wgrad_x_source == "forward":
        x_q = restore(x_codes, x_scales, x_outer, recipe.fwd_x)
        q_xt = requantize_operand(x_q, tokens, in_features, t_p, recipe.wgrad_x, wgrad_signs)
    else:
        q_xt = operand_of(restore(x_codes, x_scales, x_outer, recipe.wgrad_x, signs=wgrad_signs))
    q_dyt = quantize_operand(dy_t, recipe.wgrad_dy, wgrad_signs, dyt_amax)
    compensated = recipe.occ is not None and recipe.occ.compensates
    if recipe.dge or compensated:
        dw = nvfp4_gemm(q_dyt, q_xt, None, out_dtype=torch.float32)
        if compensated:  # the compensation's own weight gradient, dY^T R
            r = dense_residual(torch.Size((tokens, in_features)), residual_index, residual_value, recipe.occ)
            dw = dw + residual_weight_grad(dy, r, recipe.occ.residual)
        if recipe.dge:
            w_q = restore(w_codes, w_scales, w_outer, recipe.fwd_w) if _saves_weight(recipe) else None
            dw = dw * _dge_multiplier(weight, recipe, w_q)
        dw = cast_exactly(dw, weight.dtype)
    else:
        dw = nvfp4_gemm(q_dyt, q_xt, None, out_dtype=weight.dtype)

    db = cast_exactly(stored_sum(dy, 0), weight.dtype) if has_bias else dy.new_empty(0)
    return dx, dw, db
