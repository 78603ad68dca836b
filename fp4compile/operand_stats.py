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

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from . import dispatch
from .format import NVFP4
from .linear_gemms import round_up
from .quantize import draw_seed, quantize
from .spec import QuantSpec

__all__ = ["STATS", "Measurements", "derive", "dequantized", "measure", "operand_stats", "quantize_padded"]

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


class Measurements(NamedTuple):
    """Operands measured together (:func:`measure`), before :func:`derive` turns them into statistics."""

    sums: torch.Tensor  #: FP32 [n, 4]: sum x^2, sum (x - dequantized)^2, max |x|, sum x^2 of the top columns
    counts: torch.Tensor  #: int64 [n, 5]: see ``operand_sums.operand_sums_reference``
    sizes: torch.Tensor  #: int64 [n, 2]: elements and 16-element blocks of each operand
    top_channels: torch.Tensor  #: int64 [n, min(top, max K)], largest squared norm first
    top_counts: tuple[int, ...]  #: min(top, K) per operand: how many of its row's top channels are its own


def quantize_padded(t: torch.Tensor, spec: QuantSpec, k_multiple: Optional[int] = None) -> NVFP4:
    """``t`` [rows, K] quantized by ``spec`` as a GEMM operand is: zero-padded along K to ``k_multiple`` (default
    the spec's own) and along the rows to the spec's row multiple (16x16 tiles)."""
    rows, k = t.shape
    k_multiple = k_multiple or spec.k_multiple
    pad_k, pad_rows = round_up(k, k_multiple) - k, round_up(rows, spec.row_multiple) - rows
    padded = F.pad(t, (0, pad_k, 0, pad_rows)) if pad_k or pad_rows else t
    if dispatch.on_triton(padded) and spec.rotation == "rht16_te":  # TE's signs as the kernel's constant: no
        seed = draw_seed(padded.device) if spec.stochastic else None  # sign tensor made on the device each time
        return dispatch.quantize(padded, spec, seed, None)
    return quantize(padded, spec, validate=False)


def dequantized(q: NVFP4, rows: int, cols: int) -> torch.Tensor:
    """FP32 ``q`` dequantized (a rotation undone) and cropped to [rows, cols]: one decode kernel on CUDA."""
    return dispatch.dequantize(q, cols)[:rows]


def measure(operands: Sequence[tuple[torch.Tensor, QuantSpec]], top: int = 8) -> Measurements:
    """Each ``t`` [rows, K] of ``operands`` (on one device) quantized by its spec along K and measured, on the
    device: per operand its quantization and one measuring kernel on a GPU (a rotated quantization is decoded
    first, its rotation undone); for all of them two buffer fills, the top-column selection and a few ops. The
    monitor measures a probe's operands at once."""
    if not operands:
        raise ValueError("measure: no operands")
    for t, _ in operands:
        if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"operand_stats expects a non-empty 2-D operand [rows, K], got shape {tuple(t.shape)}")
    device = operands[0][0].device
    if any(t.device != device for t, _ in operands):
        raise ValueError("measure: the operands must be on one device")
    widths = tuple(t.shape[1] for t, _ in operands)
    width = max(widths)
    floats = torch.zeros(len(operands), width + 3, dtype=torch.float32, device=device)  # column norms, then tail
    counts = torch.zeros(len(operands), 5, dtype=torch.int64, device=device)
    for i, (t, spec) in enumerate(operands):
        k = t.shape[1]
        dispatch.operand_sums(t, quantize_padded(t, spec), (floats[i, :k], floats[i, width:], counts[i]))
    host = torch.tensor([(t.numel(), t.shape[0] * ((t.shape[1] + 15) // 16), t.shape[1]) for t, _ in operands])
    sizes = host.to(device, non_blocking=True)
    columns = floats[:, :width]
    if min(widths) < width:  # a narrower operand's unused columns rank below every real one (norms are >= 0)
        columns = columns.masked_fill(torch.arange(width, device=device) >= sizes[:, 2:], -1.0)
    chosen = torch.topk(columns, min(top, width))
    sums = torch.cat([floats[:, width:], chosen.values.clamp_min(0).sum(-1, keepdim=True)], 1)
    return Measurements(sums, counts, sizes[:, :2], chosen.indices, tuple(min(top, k) for k in widths))


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
    after the quantization is two Triton kernels (``kernels/decode.py``, ``kernels/stats.py``).
    """
    found = measure([(t, spec)], top)
    stats = {name: value[0] for name, value in derive(found.sums, found.counts, found.sizes).items()}
    return {**stats, "top_channels": found.top_channels[0, : found.top_counts[0]]}
