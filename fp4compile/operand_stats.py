"""What one NVFP4 quantization does to one GEMM operand: the statistics of :class:`~fp4compile.NumericsMonitor`.

:func:`operand_stats` quantizes a 2-D operand with a :class:`QuantSpec` (``fp4compile.quantize``: the Triton
kernels on CUDA, ``format.py`` elsewhere) along its last dim, the GEMM's K, and measures it with tensor ops
only (the results stay on the device until read):

- ``amax``: max |operand|;
- ``snr_db``: ``10 log10(sum x^2 / sum (x - dequantize(q))^2)``, in the operand's own domain (a rotation is
  undone by the dequantization); +inf when the quantization is exact;
- ``scale_zero``: of the 16-element blocks that hold a nonzero element, the fraction whose E4M3 scale is 0
  (the whole block flushes to zero);
- ``scale_subnormal``: the fraction of blocks whose E4M3 scale is subnormal (below 2^-6: 3 bits or fewer);
- ``elem_saturated``: the fraction of elements quantized to +-6, the largest E2M1 magnitude;
- ``scale_saturated``: the fraction of blocks whose scale is 448, the largest E4M3 value;
- ``top_channels`` / ``top_share``: the ``top`` columns (K indices: input channels of X and W, output
  channels of dY, tokens of the wgrad operands) of largest squared norm, and their share of the operand's
  squared norm (hot-channel concentration).

Blocks are the operand's as given (before any rotation); the zero padding the GEMM adds (K to the spec's
multiple, rows of 16x16 tiles) is quantized with the operand and left out of every statistic.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .format import NVFP4, stored_fp32
from .linear_gemms import round_up
from .quantize import quantize
from .spec import QuantSpec

__all__ = ["STATS", "dequantized", "operand_stats", "quantize_padded"]

#: The statistics of :func:`operand_stats`, in the order they are reported.
STATS = (
    "amax",
    "snr_db",
    "scale_zero",
    "scale_subnormal",
    "elem_saturated",
    "scale_saturated",
    "top_share",
    "top_channels",
)

_E4M3_MAX_BITS = 0x7E  # 448 = 2^8 x 1.75
_E4M3_EXPONENT = 0x78
_E2M1_MAGNITUDE = 0x7
_E2M1_SIX = 0x7


def _ratio(count: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """``count / total`` of two FP32 values, correctly rounded also where Inductor compiles it for CUDA (whose FP32
    division is approximate): their quotient in FP64, rounded once to FP32, is the FP32 quotient (FP64's 53 bits are
    more than twice FP32's 24 plus 2, so the double rounding is harmless)."""
    return (count.to(torch.float64) / total.to(torch.float64)).to(torch.float32)


def _fraction(mask: torch.Tensor, of: torch.Tensor = None) -> torch.Tensor:
    """The fraction of ``mask``'s elements that are set (among those set in ``of``), FP32."""
    if of is None:
        total = torch.full((), mask.numel(), dtype=torch.float32, device=mask.device)
        return _ratio(mask.sum().to(torch.float32), total)
    return _ratio((mask & of).sum().to(torch.float32), of.sum().clamp_min(1).to(torch.float32))


def quantize_padded(t: torch.Tensor, spec: QuantSpec, k_multiple: Optional[int] = None) -> NVFP4:
    """``t`` [rows, K] quantized by ``spec`` as a GEMM operand is: zero-padded along K to ``k_multiple`` (default
    the spec's own) and along the rows to the spec's row multiple (16x16 tiles)."""
    rows, k = t.shape
    k_multiple = k_multiple or spec.k_multiple
    pad_k, pad_rows = round_up(k, k_multiple) - k, round_up(rows, spec.row_multiple) - rows
    padded = F.pad(t, (0, pad_k, 0, pad_rows)) if pad_k or pad_rows else t
    return quantize(padded, spec, validate=False)


@dispatch.fused
def _rotation_undone(codes, scales, outer, signs, spec: QuantSpec) -> torch.Tensor:
    return NVFP4(codes, scales, outer, spec, signs).dequantize(torch.float32)


def dequantized(q: NVFP4, rows: int, cols: int) -> torch.Tensor:
    """FP32 ``q`` dequantized (a rotation undone) and cropped to [rows, cols]: one decode kernel on CUDA for specs
    without rotation, the spec's torch ops (fused by Inductor on CUDA) with one."""
    if q.spec.rotation == "none":
        return dispatch.dequantize(q, cols)[:rows]
    return _rotation_undone(q.codes, q.scales, q.outer, q.signs, q.spec)[:rows, :cols]


@dispatch.fused
def _statistics(t: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, deq: torch.Tensor, top: int) -> dict:
    """The statistics of ``t`` [rows, K] from its quantization's ``codes`` and ``scales`` (padded) and its FP32
    dequantization ``deq`` [rows, K]."""
    rows, k = t.shape
    x = stored_fp32(t)
    magnitude, column_sq = x.abs(), x.square().sum(0)
    error = (x - deq).square().sum()
    total = column_sq.sum()

    blocks = (k + 15) // 16
    scale_bits = scales.view(torch.uint8)[:rows, :blocks].to(torch.int32)
    block_max = F.pad(magnitude, (0, blocks * 16 - k)).view(rows, blocks, 16).amax(-1)
    codes = codes[:rows]  # element 2j in the low nibble of byte j, element 2j + 1 in the high one
    saturated = ((codes[:, : (k + 1) // 2] & _E2M1_MAGNITUDE) == _E2M1_SIX).sum() + (
        ((codes[:, : k // 2] >> 4) & _E2M1_MAGNITUDE) == _E2M1_SIX
    ).sum()

    chosen = torch.topk(column_sq, min(top, k))
    elements = torch.full((), rows * k, dtype=torch.float32, device=t.device)
    return {
        "amax": magnitude.amax(),
        "snr_db": 10 * torch.log10(total / error),
        "scale_zero": _fraction(scale_bits == 0, of=block_max > 0),
        "scale_subnormal": _fraction(((scale_bits & _E4M3_EXPONENT) == 0) & (scale_bits != 0)),
        "elem_saturated": _ratio(saturated.to(torch.float32), elements),
        "scale_saturated": _fraction(scale_bits == _E4M3_MAX_BITS),
        "top_share": torch.where(total > 0, chosen.values.sum() / total.clamp_min(torch.finfo(torch.float32).tiny), 0),
        "top_channels": chosen.indices,
    }


def operand_stats(t: torch.Tensor, spec: QuantSpec, top: int = 8) -> dict[str, torch.Tensor]:
    """The statistics (module docstring) of ``t`` [rows, K] quantized by ``spec`` along K, as device tensors.

    Draws the quantizer's random bits from torch's default generator of ``t``'s device. On CUDA the measurement
    after the quantization runs as Inductor fuses it (``dispatch.fused``: compiled on first use).
    """
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"operand_stats expects a non-empty 2-D operand [rows, K], got shape {tuple(t.shape)}")
    rows, k = t.shape
    q = quantize_padded(t, spec)
    return _statistics(t, q.codes, q.scales, dequantized(q, rows, k), top)
