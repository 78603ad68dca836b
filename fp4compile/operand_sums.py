"""The raw measurement behind the monitor's statistics, defined with torch ops (the reference; the CPU path).

:func:`operand_sums_reference` reduces one quantized operand to the sums and counts that
``operand_stats.derive`` turns into statistics. ``kernels/stats.py`` computes the same in one Triton launch on
a GPU (``dispatch.operand_sums`` chooses): its counts and max equal these exactly, its sums up to their order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .format import stored_fp32

__all__ = ["operand_sums_reference"]

_E4M3_MAX_BITS = 0x7E  # 448 = 2^8 x 1.75
_E4M3_EXPONENT = 0x78
_E2M1_MAGNITUDE = 0x7
_E2M1_SIX = 0x7


def operand_sums_reference(
    t: torch.Tensor, deq: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The raw measurement of ``t`` [rows, K] against its FP32 dequantization ``deq`` [rows, K] and its
    quantization's packed ``codes`` and E4M3 ``scales`` (padded along rows and K; blocks are ``t``'s own, 16
    elements along K, the padding left out).

    Returns ``(column_sq, tail, counts)``: FP32 [K] squared norm of every column; FP32 [3] = (sum x^2,
    sum (x - deq)^2, max |x|); int64 [5] = (blocks holding a nonzero element, of them those whose scale is 0
    (the block flushes to zero), blocks whose scale is subnormal, elements quantized to +-6, blocks whose scale
    is 448).
    """
    rows, k = t.shape
    x = stored_fp32(t)
    magnitude = x.abs()
    column_sq = x.square().sum(0)
    blocks = (k + 15) // 16
    scale_bits = scales.view(torch.uint8)[:rows, :blocks].to(torch.int32)
    block_max = F.pad(magnitude, (0, blocks * 16 - k)).view(rows, blocks, 16).amax(-1)
    codes = codes[:rows]  # element 2j in the low nibble of byte j, element 2j + 1 in the high one
    saturated = ((codes[:, : (k + 1) // 2] & _E2M1_MAGNITUDE) == _E2M1_SIX).sum() + (
        ((codes[:, : k // 2] >> 4) & _E2M1_MAGNITUDE) == _E2M1_SIX
    ).sum()
    nonzero = block_max > 0
    counts = torch.stack(
        [
            nonzero.sum(),
            (nonzero & (scale_bits == 0)).sum(),
            (((scale_bits & _E4M3_EXPONENT) == 0) & (scale_bits != 0)).sum(),
            saturated,
            (scale_bits == _E4M3_MAX_BITS).sum(),
        ]
    )
    tail = torch.stack([column_sq.sum(), (x - deq).square().sum(), magnitude.amax()])
    return column_sq, tail, counts
