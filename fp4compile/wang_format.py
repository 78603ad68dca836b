"""The operand formats of Wang et al.'s FP4 framework (arXiv 2501.17116), as specs and executable numerics.

Wang et al. quantize only the forward GEMM to 4 bits, and not in NVFP4's block format: each row of
an operand gets one absmax scale over the whole K dimension (Eq. 1, ``x_fp4 = Q(x * gamma)``,
``gamma = 6 / max|x|``: per token for the activation X, per output channel for the weight W, so both
scales factor out of the K-sum). Their backward GEMMs run in FP8 with one scale per tensor: E4M3
copies of the (FP4-simulated) weight and activation, E5M2 for the output gradient dY.

- :class:`RowE2M1` and :class:`FP8Tensor` are the slot specs a :class:`~fp4compile.Recipe` holds for
  these operands (the ``fp4_dge_occ`` preset);
- :func:`quantize_rows`, :func:`fp8_quantize` and :func:`fp8_gemm` are their numerics, the executable
  spec the CUDA path must match (``torch._scaled_mm`` on CUDA, FP32 emulation elsewhere).

Deviations from the released code (Azure/MS-AMP PR #203), chosen deliberately and documented in the
README: ``gamma`` is the exact ratio ``6 / amax`` of the paper's Eq. 1, not the code's power of two
``2**floor(log2(6 / amax))``; the weight's scales are per output channel (the paper), not along K
(the code's Megatron layout); E2M1 rounding is round-to-nearest-even (the code's lookup table sends
exact midpoints up, a measure-zero difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import e2m1_round

__all__ = ["FP8Tensor", "RowE2M1", "dequantize_rows", "fp8_gemm", "fp8_quantize", "quantize_rows"]

_E2M1_MAX = 6.0
_FP8 = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}


class _UnrotatedDeterministic:
    """The spec attributes the recipe checks read; these formats have no rotation and no random draws."""

    rotation = "none"
    stochastic = False
    random_signs = False
    rotation_size = 0
    k_multiple = 16  # the recipe's eligibility rule (K a multiple of 16), shared with NVFP4
    row_multiple = 1


@dataclass(frozen=True)
class RowE2M1(_UnrotatedDeterministic):
    """E2M1 values with one exact FP32 absmax scale per row (Wang et al.'s Eq. 1): ``gamma = 6 / max|row|``.

    For the forward operands only: X per token, W per output channel (both rows, reduced along K).
    """

    def short_str(self) -> str:
        """``e2m1/row-absmax``."""
        return "e2m1/row-absmax"


@dataclass(frozen=True)
class FP8Tensor(_UnrotatedDeterministic):
    """FP8 (``fmt`` ``"e4m3"`` or ``"e5m2"``) with one FP32 scale per tensor, ``scale = amax / fp8_max``."""

    fmt: str = "e4m3"

    def __post_init__(self) -> None:
        if self.fmt not in _FP8:
            raise ValueError(f"FP8Tensor.fmt must be one of {tuple(_FP8)}, got {self.fmt!r}")

    @property
    def dtype(self) -> torch.dtype:
        """The torch FP8 dtype."""
        return _FP8[self.fmt][0]

    def short_str(self) -> str:
        """e.g. ``fp8 e5m2/tensor``."""
        return f"fp8 {self.fmt}/tensor"


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(v, gamma)``: x [rows, K] as E2M1 values ``v = RNE(x * gamma)`` (FP32, saturating at 6) and the per-row
    FP32 ``gamma = 6 / max|row|`` (1 for an all-zero row). The dequantized tensor is ``v / gamma[:, None]``."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=1)
    gamma = torch.where(amax > 0, _E2M1_MAX / amax, torch.ones_like(amax))
    return e2m1_round(x * gamma[:, None]), gamma


def dequantize_rows(v: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """FP32 ``v / gamma`` per row: the FP4-simulated tensor."""
    return v / gamma[:, None]


def fp8_quantize(t: torch.Tensor, spec: FP8Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)``: ``t`` as FP8 ``q = RNE(t / scale)`` (saturating) with the FP32 per-tensor
    ``scale = amax / fp8_max`` (1 for an all-zero tensor); ``t ~ q * scale``."""
    dtype, fmax = _FP8[spec.fmt]
    t = t.to(torch.float32)
    amax = t.abs().amax()
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    return (t / scale).clamp(-fmax, fmax).to(dtype), scale


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor) -> torch.Tensor:
    """FP32 ``(a @ b^T) * (scale_a * scale_b)`` of FP8 ``a`` [M, K] and ``b`` [N, K] (both contiguous, K and N
    multiples of 16).

    On CUDA: ``torch._scaled_mm`` on the FP8 tensor cores (FP32 accumulation, not the fast mode). Elsewhere:
    the exact products summed in FP32 (the spec; accumulation order aside, the two agree).
    """
    if a.is_cuda:
        return torch._scaled_mm(a, b.T, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    return (a.to(torch.float32) @ b.to(torch.float32).T) * (scale_a * scale_b)
