"""MXFP8 (OCP microscaling E4M3) as TetraJet-v2's OutControl uses it: the executable spec, and GEMM operands.

One E8M0 scale per 1x32 block along K: the power of two ``2**e`` that ``amax / 448`` rounds **up** to
(PTX ``cvt.rp.satfinite.ue8m0x2.f32``, as TetraJet-v2's ``quant_fp8.cu``), so no element exceeds
E4M3's 448; the elements ``x / 2**e`` rounded to nearest-even E4M3, saturating. No stochastic rounding,
no rotation. An all-zero block gets the smallest scale, ``2**-127``.

GEMM operands: the NVFP4 GEMM multiplies exact fp16 values with FP32 outer scales per 1x128 K-block
(double-block scaling). An MXFP8 row block of 128 (four 1x32 blocks, exponents ``e_b``) becomes the
fp16 values ``q * 2**(e_b - E)`` with the outer scale ``2**E``, ``E = max e_b``: exact whenever the four
exponents of a 128-block lie within 15 of each other (E4M3's smallest step, 2**-9, then stays at or
above fp16's 2**-24); a block whose scale is more than 2**15 below its neighbour's rounds to fp16
there (an error below 2**-24 of the 128-block's largest scale). :func:`bf16_gemm_operand` maps bf16
operands (OutControl's ``outlier_format="bf16"``) the same way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .format import bf16_rne, stored_fp32

__all__ = ["MXFP8", "bf16_gemm_operand", "mxfp8_gemm_operand", "quantize_mxfp8"]

_E4M3_MAX = 448.0
_BLOCK = 32
_OUTER_BLOCK = 128
_MIN_EXP = -127


class MXFP8(NamedTuple):
    """An MXFP8 tensor: E4M3 elements [rows, K] and E8M0 block exponents [rows, K/32] (int16, ``e``, unbiased)."""

    elements: torch.Tensor
    exponents: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """FP32 ``element * 2**e``."""
        scale = torch.exp2(self.exponents.to(torch.float32)).repeat_interleave(_BLOCK, dim=1)
        return self.elements.to(torch.float32) * scale


def _ceil_log2(v: torch.Tensor) -> torch.Tensor:
    """The smallest ``e`` with ``2**e >= v`` for positive FP32 ``v``, exactly (int32)."""
    mantissa, exponent = torch.frexp(v)  # v = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.where(mantissa == 0.5, exponent - 1, exponent)


def quantize_mxfp8(x: torch.Tensor) -> MXFP8:
    """``x`` [rows, K] (K a multiple of 32) as MXFP8: round-up E8M0 scales of ``amax / 448``, RNE E4M3 elements."""
    rows, k = x.shape
    if k % _BLOCK:
        raise ValueError(f"MXFP8 blocks are 1x32: K={k} must be a multiple of 32")
    blocks = stored_fp32(x).reshape(rows, k // _BLOCK, _BLOCK)
    amax = blocks.abs().amax(dim=2)
    exponent = torch.where(amax > 0, _ceil_log2(amax / _E4M3_MAX), _MIN_EXP).clamp(_MIN_EXP, 127)
    scaled = blocks * torch.exp2(-exponent.to(torch.float32)).unsqueeze(-1)
    elements = scaled.clamp(-_E4M3_MAX, _E4M3_MAX).to(torch.float8_e4m3fn).reshape(rows, k)
    return MXFP8(elements, exponent.to(torch.int16))


def _per_outer_block(values: torch.Tensor, exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``values * 2**(e - E)`` and FP32 ``2**E`` per 1x128 block, for per-element exponents ``e`` [rows, K]."""
    rows, k = values.shape
    if k % _OUTER_BLOCK:
        raise ValueError(f"the GEMM's outer scales are per 1x128 block: K={k} must be a multiple of 128")
    e = exponents.to(torch.int32).reshape(rows, k // _OUTER_BLOCK, _OUTER_BLOCK)
    top = e.amax(dim=2)
    shift = torch.exp2((e - top.unsqueeze(-1)).to(torch.float32))
    gemm_values = (values.to(torch.float32).reshape(rows, -1, _OUTER_BLOCK) * shift).reshape(rows, k)
    return gemm_values.to(torch.float16), torch.exp2(top.to(torch.float32))


def mxfp8_gemm_operand(q: MXFP8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, outer)``: fp16 values [rows, K] and FP32 outer scales [rows, K/128] with
    ``values * outer`` (per 1x128 block) equal to ``q.dequantize()`` (exactly, under the module's condition)."""
    return _per_outer_block(q.elements, q.exponents.repeat_interleave(_BLOCK, dim=1))


def bf16_gemm_operand(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` rounded to bf16, as fp16 values [rows, K] and FP32 outer scales [rows, K/128]: per 1x128 block the
    power of two ``2**E`` that puts its largest magnitude in [2**14, 2**15). Exact for every element at least
    2**-32 of its block's largest (bf16's 8 significant bits fit fp16's 11 down to fp16's 2**-24)."""
    b = bf16_rne(x)
    rows, k = b.shape
    if k % _OUTER_BLOCK:
        raise ValueError(f"the GEMM's outer scales are per 1x128 block: K={k} must be a multiple of 128")
    blocks = b.reshape(rows, k // _OUTER_BLOCK, _OUTER_BLOCK)
    amax = blocks.abs().amax(dim=2)
    top = torch.where(amax > 0, torch.frexp(amax)[1] - 15, _MIN_EXP)  # amax in [2**(E+14), 2**(E+15))
    values = (blocks * torch.exp2(-top.to(torch.float32)).unsqueeze(-1)).reshape(rows, k)
    return values.to(torch.float16), torch.exp2(top.to(torch.float32))
