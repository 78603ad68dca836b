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

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import dispatch
from .format import NVFP4
from .linear_gemms import round_up
from .quantize import quantize
from .spec import QuantSpec

__all__ = ["STATS", "RawStats", "derive", "dequantized", "measure", "operand_stats", "quantize_padded"]

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


class RawStats(NamedTuple):
    """One operand measured (:func:`measure`), before :func:`derive` turns it into statistics."""

    sums: torch.Tensor  #: FP32 [4]: sum x^2, sum (x - dequantized)^2, max |x|, sum x^2 of the top columns
    counts: torch.Tensor  #: int64 [5]: see ``operand_sums.operand_sums_reference``
    top_channels: torch.Tensor  #: int64 [min(top, K)], largest squared norm first
    sizes: tuple[int, int]  #: (elements, 16-element blocks) of the operand


def quantize_padded(t: torch.Tensor, spec: QuantSpec, k_multiple: Optional[int] = None) -> NVFP4:
    """``t`` [rows, K] quantized by ``spec`` as a GEMM operand is: zero-padded along K to ``k_multiple`` (default
    the spec's own) and along the rows to the spec's row multiple (16x16 tiles)."""
    rows, k = t.shape
    k_multiple = k_multiple or spec.k_multiple
    pad_k, pad_rows = round_up(k, k_multiple) - k, round_up(rows, spec.row_multiple) - rows
    padded = F.pad(t, (0, pad_k, 0, pad_rows)) if pad_k or pad_rows else t
    return quantize(padded, spec, validate=False)


def dequantized(q: NVFP4, rows: int, cols: int) -> torch.Tensor:
    """FP32 ``q`` dequantized (a rotation undone) and cropped to [rows, cols]: one decode kernel on CUDA for specs
    without rotation, the spec's torch ops with one."""
    if q.spec.rotation == "none":
        return dispatch.dequantize(q, cols)[:rows]
    return q.dequantize(torch.float32)[:rows, :cols]


def measure(t: torch.Tensor, spec: QuantSpec, top: int = 8) -> RawStats:
    """``t`` [rows, K] quantized by ``spec`` along K and measured, all on ``t``'s device (a handful of launches
    on a GPU: the quantization, its decoding, one measuring kernel, the top-column selection)."""
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"operand_stats expects a non-empty 2-D operand [rows, K], got shape {tuple(t.shape)}")
    rows, k = t.shape
    q = quantize_padded(t, spec)
    column_sq, tail, counts = dispatch.operand_sums(t, dequantized(q, rows, k), q.codes, q.scales)
    chosen = torch.topk(column_sq, min(top, k))
    sums = torch.cat([tail, chosen.values.sum().reshape(1)])
    return RawStats(sums, counts, chosen.indices, (rows * k, rows * ((k + 15) // 16)))


def derive(sums: torch.Tensor, counts: torch.Tensor, sizes: torch.Tensor) -> dict[str, torch.Tensor]:
    """The statistics (module docstring; all but ``top_channels``) of operands measured by :func:`measure`:
    ``sums`` FP32 [..., 4], ``counts`` int64 [..., 5] and ``sizes`` int64 [..., 2] stacked over any leading dims
    (the monitor derives all operands of a probe at once)."""
    total, error, amax, top = sums.unbind(-1)
    flushed_of, flushed, subnormal, saturated, scale_saturated = counts.to(torch.float32).unbind(-1)
    elements, blocks = sizes.to(torch.float32).unbind(-1)
    return {
        "amax": amax,
        "snr_db": 10 * torch.log10(total / error),
        "scale_zero": flushed / flushed_of.clamp_min(1),
        "scale_subnormal": subnormal / blocks,
        "elem_saturated": saturated / elements,
        "scale_saturated": scale_saturated / blocks,
        "top_share": torch.where(total > 0, top / total.clamp_min(torch.finfo(torch.float32).tiny), 0),
    }


def operand_stats(t: torch.Tensor, spec: QuantSpec, top: int = 8) -> dict[str, torch.Tensor]:
    """The statistics (module docstring) of ``t`` [rows, K] quantized by ``spec`` along K, as device tensors.

    Draws the quantizer's random bits from torch's default generator of ``t``'s device. On CUDA the measurement
    after the quantization is one Triton kernel (``kernels/stats.py``).
    """
    raw = measure(t, spec, top)
    sizes = torch.tensor(raw.sizes, dtype=torch.int64).to(t.device, non_blocking=True)
    return {**derive(raw.sums, raw.counts, sizes), "top_channels": raw.top_channels}
