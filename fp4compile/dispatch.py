"""Where NVFP4 work runs: the Triton kernels for CUDA tensors, the plain-torch spec (``format.py``) elsewhere.

This is the one module that makes that choice; everything above it (``quantize``, the GEMM, the
quantized linear, OsciReset) calls these functions and never a kernel or the reference directly.
Both sides give the same bits for the same inputs, seed and signs (``tests/test_kernels.py``).
The kernels are imported on first use, so that importing fp4compile does not import Triton's
runtime.
"""

from __future__ import annotations

from typing import Optional

import torch

from .format import NVFP4, gemm_operand, quantize_reference, stored_abs_max, stored_fp32, te_rht_signs
from .mxfp8 import MXFP8, mxfp8_gemm_operand, quantize_mxfp8
from .operand_sums import operand_sums_reference
from .spec import QuantSpec
from .tracing import tracing

__all__ = [
    "abs_max_pair",
    "dequantize",
    "dequantize_transposed",
    "requantize_transposed",
    "column_abs_residual",
    "decomposes",
    "gemm",
    "gemm_values",
    "mxfp8_operand",
    "on_triton",
    "operand_sums",
    "osci_track_update",
    "quantize",
    "quantize_with_values",
    "residual_columns",
]


def on_triton(t: torch.Tensor) -> bool:
    """Whether work on ``t`` runs in the Triton kernels (CUDA tensors) rather than the reference."""
    return t.is_cuda


def decomposes(t: torch.Tensor, recipe) -> bool:
    """Whether a quantized linear op on ``t`` under ``recipe`` is traced into the compiled graph (its kernels
    launched by Inductor, its torch ops fused) rather than kept as one opaque op that runs eagerly.

    CUDA tensors decompose, except under Wang et al.'s layout (``recipe.fp8_backward``): its per-row scales
    divide, and Inductor's CUDA division is approximate (``div.full``) and fused, so the compiled op would not
    give the eager op's bits; kept opaque, it runs the same kernels and torch ops as in eager mode.
    """
    return on_triton(t) and not recipe.fp8_backward


def operand_sums(
    t: torch.Tensor, q: NVFP4, out: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The monitor's raw measurement of ``t`` [rows, K] against its quantization ``q`` (padded along rows and K;
    ``operand_sums.operand_sums_reference``), written into the zeroed buffers ``out`` if given. On CUDA one
    Triton launch that decodes ``q`` itself (a rotated ``q`` is decoded first, its rotation undone: two); the
    reference's torch ops elsewhere."""
    rows, k = t.shape
    if on_triton(t):
        from .kernels.stats import operand_sums_triton

        if q.spec.rotation == "none":
            return operand_sums_triton(t, q.codes, q.scales, outer=q.outer, out=out)
        return operand_sums_triton(t, q.codes, q.scales, deq=dequantize(q, k)[:rows], out=out)
    found = operand_sums_reference(t, dequantize(q, k)[:rows], q.codes, q.scales)
    if out is None:
        return found
    for buffer, value in zip(out, found):
        buffer.copy_(value)
    return out


def column_abs_residual(x: torch.Tensor, q: NVFP4) -> torch.Tensor:
    """FP32 [K]: per column of ``x`` [rows, K] the sum over its rows of ``|x - dequantize(q)|`` (``q``: ``x``'s
    per-tensor quantization, zero-padded): one Triton launch on CUDA (``kernels/residual.py``), torch ops
    elsewhere."""
    if on_triton(x):
        from .kernels.residual import column_abs_residual_triton

        return column_abs_residual_triton(x, q)
    return _residual(x, q).abs().sum(0)


def residual_columns(x: torch.Tensor, q: NVFP4, index: torch.Tensor) -> torch.Tensor:
    """FP32 [rows, len(index)]: ``x - dequantize(q)`` on the columns ``index`` of ``x`` [rows, K] (``q`` as in
    :func:`column_abs_residual`): one Triton launch on CUDA, torch ops elsewhere."""
    if on_triton(x):
        from .kernels.residual import residual_columns_triton

        return residual_columns_triton(x, q, index)
    return _residual(x, q).index_select(1, index)


def _residual(x: torch.Tensor, q: NVFP4) -> torch.Tensor:
    """FP32 ``x - dequantize(q)`` [rows, K] with torch ops (the residual kernels' reference)."""
    rows, k = x.shape
    return stored_fp32(x) - dequantize(q, k)[:rows]


def _graph_amax(x: torch.Tensor, spec: QuantSpec) -> Optional[torch.Tensor]:
    """``max |x|`` as an ordinary op for the per-tensor specs without rotation (under ``torch.compile`` Inductor
    can fuse it into the op that produces ``x``); None where the kernel's own amax pass is needed (after a
    rotation) or there is none (per-block outer scales)."""
    if spec.outer != "tensor" or spec.rotation != "none" or x.numel() == 0:
        return None
    return stored_abs_max(x)


def abs_max_pair(
    x: torch.Tensor, spec: QuantSpec, signs: Optional[torch.Tensor]
) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """For a tensor quantized twice per tensor, once unrotated and once (``x`` as given) by the rotated ``spec``:
    on CUDA ``(max |x| after the rotation, max |x|)``, FP32 [] each, from one pass over ``x`` (the rotated
    quantization's amax pass, which reads ``x`` anyway), to pass as ``amax=`` to the two quantizations in place
    of that pass and of the graph reduction. None on the reference path (which finds each itself) and for an
    empty ``x``."""
    if not on_triton(x) or x.numel() == 0:
        return None
    from .kernels.quantize import abs_max_pair_triton

    rotated, plain = abs_max_pair_triton(x, spec, signs).unbind(0)
    return rotated, plain


def quantize(
    x: torch.Tensor, spec: QuantSpec, seed: Optional[torch.Tensor], signs: Optional[torch.Tensor],
    amax: Optional[torch.Tensor] = None,
) -> NVFP4:  # fmt: skip
    """``x`` [rows, K] quantized by ``spec`` with the given Philox ``seed`` and rotation ``signs`` (no checks;
    ``signs`` None with TE's fixed RHT-16 means those signs, as in :func:`quantize_with_values`); ``amax``: a
    per-tensor spec's amax when the caller has it (:func:`abs_max_pair`; used on CUDA)."""
    if on_triton(x):
        from .kernels.quantize import quantize_triton

        amax = amax if amax is not None else _graph_amax(x, spec)
        return quantize_triton(x, spec, seed=seed, signs=signs, amax=amax)
    if signs is None and spec.rotation == "rht16_te":
        signs = te_rht_signs(x.device)
    return quantize_reference(x.contiguous(), spec, seed=None if seed is None else int(seed.item()), signs=signs)


def quantize_with_values(
    x: torch.Tensor, spec: QuantSpec, seed: Optional[torch.Tensor], signs: Optional[torch.Tensor],
    amax: Optional[torch.Tensor] = None,
) -> tuple[NVFP4, torch.Tensor]:  # fmt: skip
    """``x`` quantized, and its exact ``code * block scale`` GEMM values (fp16 on CUDA, FP32 on the reference).

    The CUDA kernel reads transposed views in place and writes the values as it quantizes. ``signs``
    None with TE's fixed RHT-16 means the fixed signs (the kernel holds them as a constant). ``amax`` as in
    :func:`quantize`.
    """
    if on_triton(x):
        from .kernels.quantize import quantize_triton

        values = torch.empty(x.shape, dtype=torch.float16, device=x.device)
        amax = amax if amax is not None else _graph_amax(x, spec)
        return quantize_triton(x, spec, seed=seed, signs=signs, values=values, amax=amax), values
    q = quantize(x, spec, seed, signs)
    return q, gemm_operand(q)


def gemm_values(q: NVFP4) -> torch.Tensor:
    """The exact ``code * block scale`` values of ``q`` (fp16 on CUDA, FP32 on the reference), rotation kept."""
    if on_triton(q.codes):
        from .kernels.decode import decode_triton

        return decode_triton(q, with_outer=False, dtype=torch.float16)
    return gemm_operand(q)


def mxfp8_operand(x: torch.Tensor, saved: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[MXFP8]]:
    """``x`` [rows, K] (K a multiple of 128) in MXFP8 as a GEMM operand: fp16 values and FP32 per-1x128 outer scales
    (``mxfp8.mxfp8_gemm_operand(mxfp8.quantize_mxfp8(x))``), and with ``saved`` the MXFP8 tensor itself (else
    None). One Triton launch on CUDA (``kernels/mxfp8.py``, reading ``x`` in place: no FP32 copy); the torch-op
    spec elsewhere."""
    if on_triton(x):
        from .kernels.mxfp8 import mxfp8_triton

        values, outer, elements, exponents = mxfp8_triton(x, saved)
        return values, outer, MXFP8(elements.view(torch.float8_e4m3fn), exponents) if saved else None
    q = quantize_mxfp8(x)
    values, outer = mxfp8_gemm_operand(q)
    return values, outer, q if saved else None


def dequantize(q: NVFP4, cols: int) -> torch.Tensor:
    """FP32 dequantized ``q`` (any rotation undone) cropped to ``cols`` columns: one decode kernel on CUDA."""
    if on_triton(q.codes):
        from .kernels.decode import decode_triton

        return decode_triton(q, with_outer=True, dtype=torch.float32, cols=cols, unrotate=True)
    return q.dequantize(torch.float32)[:, :cols]


def dequantize_transposed(q: NVFP4, rows: int, cols: int, padded_rows: int) -> torch.Tensor:
    """FP32 transpose of the dequantized ``q`` cropped to [rows, cols], zero-padded to [cols, padded_rows]:
    the source of a re-quantization along the other dim."""
    if on_triton(q.codes):
        from .kernels.decode import decode_triton

        return decode_triton(
            q, with_outer=True, dtype=torch.float32, transpose=True, rows=rows, cols=cols, padded_rows=padded_rows
        )
    t = q.dequantize(torch.float32)[:rows, :cols].T
    return t if t.shape[1] == padded_rows else torch.nn.functional.pad(t, (0, padded_rows - t.shape[1]))


def requantize_transposed(
    q: NVFP4, rows: int, cols: int, padded_rows: int, spec: QuantSpec, seed: Optional[torch.Tensor],
    signs: Optional[torch.Tensor],
) -> tuple[NVFP4, torch.Tensor]:  # fmt: skip
    """:func:`quantize_with_values` of :func:`dequantize_transposed` ``(q, rows, cols, padded_rows)``: the
    re-quantization of a saved forward operand along its other dim. On CUDA (an unrotated ``q``) one quantize kernel
    decodes ``q``'s codes as it reads them, bit for bit the same: the FP32 transpose is never written. Not for an
    RHT-128 ``spec`` (quartet_ii's MS-EDEN): its decoding quantize pass spills, and on an H200 the Llama step ran
    faster with the FP32 transpose written first (``bench_train_step --recipes quartet_ii,quartet_ii@decoded``:
    112.1 against 120.4 ms; RESULTS.md, "Eleventh session")."""
    fused = spec.rotation_size != 128 and q.spec.rotation == "none"
    if on_triton(q.codes) and fused and rows > 0 and cols > 0:
        from .kernels.quantize import requantize_transposed_triton

        values = torch.empty(cols, padded_rows, dtype=torch.float16, device=q.codes.device)
        q_t = requantize_transposed_triton(q, rows, cols, padded_rows, spec, seed=seed, signs=signs, values=values)
        return q_t, values
    return quantize_with_values(dequantize_transposed(q, rows, cols, padded_rows), spec, seed, signs)


def _reference_gemm(
    va: torch.Tensor,
    vb: torch.Tensor,
    oa: torch.Tensor,
    ob: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The GEMM in torch ops: FP32 products per 1x128 K-block scaled and summed (or scaled once per tensor), bias
    added, one rounding to ``out_dtype``."""
    va, vb = va.float(), vb.float()
    if oa.dim() == 0:
        out = (va @ vb.T) * (oa * ob)
    else:
        out = torch.zeros(va.shape[0], vb.shape[0], dtype=torch.float32, device=va.device)
        for kb in range(oa.shape[1]):
            cols = slice(128 * kb, 128 * kb + 128)
            out += (va[:, cols] @ vb[:, cols].T) * (oa[:, kb, None] * ob[None, :, kb])
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def gemm(
    va: torch.Tensor,
    vb: torch.Tensor,
    outer_a: torch.Tensor,
    outer_b: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    uniform_k: int = 0,
) -> torch.Tensor:
    """``(va @ vb^T) * outer`` (+ bias) as ``out_dtype``, FP32 accumulation; outer scales per tensor or per 1x128
    K-block (``[rows, K/128]``). ``uniform_k``: leading K columns whose per-block scales repeat each row's first
    (the CUDA kernel then scales them once; see ``kernels.gemm.gemm_triton``). In a graph that Inductor compiles the
    CUDA GEMM is a kernel launch Inductor makes (``kernels/gemm_traced.py``; block-scaled GEMMs on Hopper excepted,
    which run the Gluon kernel), elsewhere the opaque op ``fp4compile::gemm``."""
    if on_triton(va):
        from .kernels.gemm_traced import gemm_launched, launchable

        if tracing() and launchable(va, vb, outer_a, uniform_k):
            return gemm_launched(va, vb, outer_a, outer_b, bias, out_dtype, uniform_k)
        from .kernels.gemm_op import gemm_op

        return gemm_op(va, vb, outer_a, outer_b, bias, out_dtype, uniform_k)
    return _reference_gemm(va, vb, outer_a, outer_b, bias, out_dtype)


def osci_track_update(
    w: torch.Tensor,
    prev: torch.Tensor,
    deq: torch.Tensor,
    deq_prev: torch.Tensor,
    d_q: torch.Tensor,
    d_w: torch.Tensor,
) -> None:
    """OsciReset's tracked step, in place: ``d_q += |deq - deq_prev|``, ``d_w += |w - prev|``, ``prev = w``."""
    if on_triton(w) and w.is_contiguous():
        from .kernels.osci import track_update_triton

        track_update_triton(w, prev, deq, deq_prev, d_q, d_w)
        return
    d_q.add_((deq - deq_prev).abs())
    d_w.add_((w.to(torch.float32) - prev.to(torch.float32)).abs())
    prev.copy_(w)
