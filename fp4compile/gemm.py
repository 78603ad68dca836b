"""The NVFP4 GEMM ``a @ b^T`` of two operands quantized along the same K, on any device.

An operand is an :class:`~fp4compile.format.NVFP4` plus its exact ``code * scale``
values (``format.gemm_operand``; the CUDA quantize kernel writes them in fp16 as it
quantizes). CUDA runs the Triton kernel (fp16 tensor cores, FP32 accumulation, outer
scales in the epilogue or per 1x128 K-block); the CPU runs the same arithmetic in
FP32 torch ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .format import NVFP4, gemm_operand

__all__ = ["Operand", "operand_of", "nvfp4_gemm"]


class Operand(NamedTuple):
    """A quantized GEMM operand: the quantization and its exact values (fp16 on CUDA, FP32 on CPU)."""

    q: NVFP4
    values: torch.Tensor


def operand_of(q: NVFP4) -> Operand:
    """Decode ``q``'s exact ``code * scale`` values (for quantizations saved without them)."""
    if q.codes.is_cuda:
        from .kernels.decode import decode_triton

        return Operand(q, decode_triton(q, with_outer=False, dtype=torch.float16))
    return Operand(q, gemm_operand(q))


def _cpu_gemm(a: Operand, b: Operand) -> torch.Tensor:
    oa, ob = a.q.outer, b.q.outer
    va, vb = a.values.float(), b.values.float()
    if oa.dim() == 0:
        return (va @ vb.T) * (oa * ob)
    out = torch.zeros(va.shape[0], vb.shape[0], dtype=torch.float32)
    for kb in range(oa.shape[1]):
        cols = slice(128 * kb, 128 * kb + 128)
        out += (va[:, cols] @ vb[:, cols].T) * (oa[:, kb, None] * ob[None, :, kb])
    return out


def nvfp4_gemm(a: Operand, b: Operand, bias: Optional[torch.Tensor] = None, out_dtype=torch.float32) -> torch.Tensor:
    """``(a @ b^T)`` in the operands' (shared) rotated domain, plus ``bias``, as ``out_dtype``.

    Both operands must come from quantizations along the same K with the same outer-scale
    kind and the same rotation signs (the rotation then cancels); this is not re-checked
    here (it would cost a device sync), the callers in ``linear.py`` guarantee it.
    """
    k, kb = a.values.shape[1], b.values.shape[1]
    if k != kb:
        raise ValueError(f"NVFP4 GEMM operands disagree on K: {k} vs {kb}")
    if a.q.outer.dim() != b.q.outer.dim():
        raise ValueError("NVFP4 GEMM operands must both have per-tensor or both per-1x128-block outer scales")
    if a.values.is_cuda:
        from .kernels.gemm import gemm_triton

        return gemm_triton(a.values, b.values, a.q.outer, b.q.outer, bias, out_dtype)
    out = _cpu_gemm(a, b)
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
