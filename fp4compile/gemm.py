"""The NVFP4 GEMM ``a @ b^T`` of two operands quantized along the same K, on any device.

An operand is an :class:`~fp4compile.format.NVFP4` plus its exact ``code * scale``
values (``format.gemm_operand``; the CUDA quantize kernel writes them in fp16 as it
quantizes). ``dispatch.gemm`` runs the Triton kernel on CUDA (fp16 tensor cores, FP32
accumulation, outer scales in the epilogue or per 1x128 K-block) and the same arithmetic
in FP32 torch ops elsewhere.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import dispatch
from .format import NVFP4

__all__ = ["Operand", "operand_of", "nvfp4_gemm"]


class Operand(NamedTuple):
    """A quantized GEMM operand: the quantization and its exact values (fp16 on CUDA, FP32 on CPU)."""

    q: NVFP4
    values: torch.Tensor


def operand_of(q: NVFP4) -> Operand:
    """Decode ``q``'s exact ``code * scale`` values (for quantizations saved without them)."""
    return Operand(q, dispatch.gemm_values(q))


def nvfp4_gemm(a: Operand, b: Operand, bias: Optional[torch.Tensor] = None, out_dtype=torch.float32) -> torch.Tensor:
    """``(a @ b^T)`` in the operands' (shared) rotated domain, plus ``bias``, as ``out_dtype``.

    Both operands must come from quantizations along the same K with the same outer-scale
    kind and the same rotation signs (the rotation then cancels); this is not re-checked
    here (it would cost a device sync), the callers in ``linear_gemms.py`` guarantee it.
    """
    k, kb = a.values.shape[1], b.values.shape[1]
    if k != kb:
        raise ValueError(f"NVFP4 GEMM operands disagree on K: {k} vs {kb}")
    if a.q.outer.dim() != b.q.outer.dim():
        raise ValueError("NVFP4 GEMM operands must both have per-tensor or both per-1x128-block outer scales")
    return dispatch.gemm(a.values, b.values, a.q.outer, b.q.outer, bias, out_dtype)
